"""Training throughput, three ways on the same model and the same packed data, measured back to back.

    python bench/train_bench.py            (make bench)    [--rounds 5 --steps 2 --threads N --compile]

(1) seedlm's pretrain component (the real stage function: batches, clipping, schedule, logging, async
checkpoints), (2) a bare PyTorch loop (forward, cross-entropy, backward, AdamW step: nothing else),
(3) the HF Trainer with default settings. Each runs in its own thread, paused between timing windows of
`--steps` optimizer steps; windows are interleaved round-robin with matmul probes, so every method sees the
same machine load, and ratios are medians of per-round ratios. MFU counts 6*N + 12*L*T*d FLOPs per token
against this machine's measured fp32/bf16 matmul throughput (and, on CUDA, the device's peak bf16).
Results go to bench/results/<time>.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from components.core.config import ModelConfig, Params, PretrainConfig  # noqa: E402
from components.core.context import StageContext  # noqa: E402
from components.pretrain import load_tokenizer, pretrain, token_file, window_source  # noqa: E402
from components.training.model import build_model, cpu_has_fast_bf16  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PEAK_BF16_TFLOPS = {
    "H200": 989,
    "H100 PCIe": 756,
    "H100": 989,
    "A100": 312,
    "L40S": 362,
    "L4": 121,
    "A10G": 70,
    "A10": 125,
    "4090": 165,
    "3090": 71,
}
"""Dense bf16 tensor-core peaks (vendor data sheets) by device-name fragment; first match wins."""
MM_N = {False: 2048, True: 8192}
MM_REPS = {False: {"matmul_fp32": 4, "matmul_bf16": 8}, True: {"matmul_fp32": 20, "matmul_bf16": 100}}
"""Matmul probe size and matmuls per window (CPU, CUDA): windows comparable to a training window."""


class Gate:
    """Pauses a training thread at window boundaries; records the seconds of each window it was let run."""

    def __init__(self) -> None:
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.t0: float | None = None
        self.c0 = 0.0
        self.windows: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds per window: helper threads count, other processes don't
        self.error: BaseException | None = None

    def tick(self) -> None:  # worker thread, every `steps` optimizer steps
        now, cpu = time.perf_counter(), time.process_time()
        if self.t0 is not None:
            self.windows.append(now - self.t0)
            self.cpu.append(cpu - self.c0)
        self.done.release()
        self.go.acquire()
        self.t0, self.c0 = time.perf_counter(), time.process_time()


class Method:
    def __init__(self, name: str, body: Callable[[Gate], Any]) -> None:
        self.name, self.gate, self.result = name, Gate(), None

        def run() -> None:
            try:
                self.result = body(self.gate)
            except BaseException as e:  # noqa: BLE001 - reported by the scheduler
                self.gate.error = e
            finally:
                self.gate.done.release()

        self.thread = threading.Thread(target=run, daemon=True, name=name)

    def window(self) -> None:
        """Let the thread run one window (or, the first time, start it and wait for its first boundary)."""
        if not self.thread.is_alive() and self.gate.t0 is None and not self.gate.windows:
            self.thread.start()
        else:
            self.gate.go.release()
        self.gate.done.acquire()
        if self.gate.error is not None:
            raise RuntimeError(f"{self.name} failed") from self.gate.error

    def finish(self) -> None:
        self.gate.go.release()
        self.thread.join()
        if self.gate.error is not None:
            raise RuntimeError(f"{self.name} failed") from self.gate.error


# ---------------------------------------------------------------- the contenders
def seedlm_pretrain(
    model_cfg: ModelConfig,
    data: Path,
    batch: int,
    steps: int,
    total: int,
    precision: str,
    compile_: bool,
    out: Path,
    ckpt_every: int = 10,
) -> Callable[[Gate], Any]:
    cfg = PretrainConfig(
        max_steps=total,
        batch_size=batch,
        warmup_steps=1,
        log_every=steps,
        eval_every=total,
        eval_batches=2,
        checkpoint_every=ckpt_every,
        precision=precision,
        compile=compile_,
    )

    def body(gate: Gate) -> dict:
        def log(metrics: dict, step: int | None = None) -> None:
            if "train_loss" in metrics:  # every `steps` steps (log_every)
                gate.tick()

        return pretrain(
            model_cfg,
            cfg,
            data,
            out / "model",
            out / "m.json",
            out / "p.csv",
            out / "ckpt",
            seed=0,
            ctx=StageContext(log=log, progress=False),
        )

    return body


def bare_loop(
    model_cfg: ModelConfig,
    data: Path,
    batch: int,
    steps: int,
    total: int,
    dtype: torch.dtype | None,
    attn: str = "sdpa",
) -> Callable[[Gate], Any]:
    def body(gate: Gate) -> None:
        tok = load_tokenizer(data)
        tokens = token_file(data, "train.bin", token_dtype(data))
        source = window_source(tokens, model_cfg.context_length, batch, seed=0)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(model_cfg, tok, seed=0).to(device)
        if attn != "sdpa":
            model.set_attn_implementation(attn)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(total):
            x, y = source(step, 0)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % steps == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                gate.tick()

    return body


def hf_trainer(model_cfg: ModelConfig, data: Path, batch: int, steps: int, total: int, out: Path) -> Callable:
    def body(gate: Gate) -> None:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        tok = load_tokenizer(data)
        tokens = token_file(data, "train.bin", token_dtype(data))
        T = model_cfg.context_length
        offsets = np.random.default_rng(0).integers(0, len(tokens) - T, total * batch)

        class Windows(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(offsets)

            def __getitem__(self, i: int) -> dict:
                ids = torch.from_numpy(tokens[offsets[i] : offsets[i] + T].astype(np.int64))
                return {"input_ids": ids, "labels": ids}

        class Tick(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step % steps == 0:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    gate.tick()

        args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=batch,
            max_steps=total,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=build_model(model_cfg, tok, seed=0), args=args, train_dataset=Windows(), callbacks=[Tick()]
        )
        trainer.train()
        return {"optim": str(args.optim), "bf16": args.bf16}

    return body


def matmul_probe(dtype: torch.dtype, device: torch.device, n: int, reps: int) -> Callable[[Gate], Any]:
    """Square n x n matmuls: the machine's achievable GFLOP/s at this precision (windows of `reps`)."""

    def body(gate: Gate) -> None:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        while True:
            for _ in range(reps):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            gate.tick()

    return body


# ---------------------------------------------------------------- data, flops, report
def make_data(cache: Path, vocab: int | None = None) -> Path:
    """The embedded synthetic corpus through the real ingest + preprocess stages (cached). With `vocab`
    (e.g. 50257 for GPT-2 124M): a word-level tokenizer of that size and uniform random tokens, for
    throughput only."""
    if vocab:
        return random_data(cache / f"random-{vocab}", vocab)
    from components.ingest import ingest
    from components.preprocess import preprocess

    p = Params()
    processed = cache / "processed"
    if not (processed / "seedlm.json").is_file():
        quiet = StageContext(progress=False)
        ingest(p.ingest, cache / "raw", seed=p.seed, sources_root=cache / "sources", cache_dir=cache / "dl", ctx=quiet)
        preprocess(p.preprocess, cache / "raw", processed, cache / "preprocess.json", seed=p.seed, ctx=quiet)
    return processed


def random_data(folder: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from components.core.io import write_meta

    if (folder / "seedlm.json").is_file():
        return folder
    special = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = special + [f"w{i}" for i in range(vocab - len(special))]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|pad|>")),
        bos_token=special[0],
        eos_token=special[0],
        pad_token=special[1],
    )
    tok.save_pretrained(folder / "tokenizer")
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 2_000_000), ("val.bin", 100_000)):
        rng.integers(0, vocab, n, dtype=np.int64).astype(dtype).tofile(folder / name)
    write_meta(folder, "preprocess", {"random": vocab}, {"vocab_size": vocab, "dtype": np.dtype(dtype).name})
    return folder


def token_dtype(data: Path) -> str:
    return json.loads((data / "seedlm.json").read_text())["result"].get("dtype", "uint16")


def flops_per_token(model_cfg: ModelConfig, vocab: int) -> float:
    """6 * matmul parameters (blocks + the tied output layer) + 12 * L * T * d for attention (PaLM's count)."""
    L, d, T = model_cfg.n_layer, model_cfg.n_embd, model_cfg.context_length
    return 6 * (L * 12 * d * d + d * vocab) + 12 * L * T * d


def device_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def previous_run(config: dict, results: Path) -> dict | None:
    """The newest saved run of the same configuration, else the newest of any (flagged), else the baseline."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("train_bench-*.json"), reverse=True)]
    baseline = ROOT / "bench" / "baseline.json"
    if baseline.is_file():
        runs.append(json.loads(baseline.read_text()))
    return next((r for r in runs if r.get("config") == config), runs[0] if runs else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="random tokens over a vocabulary of this size (default: the embedded corpus, BPE 1024)",
    )
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per timing window")
    ap.add_argument("--rounds", type=int, default=10, help="measured windows per method")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (all methods)")
    ap.add_argument("--checkpoint-every", type=int, default=10, help="pretrain's checkpoint interval (steps)")
    ap.add_argument("--compile", action="store_true", help="also time the pretrain component with torch.compile")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of saved runs (and the bench data)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = not args.no_bf16 and (torch.cuda.is_bf16_supported() if cuda else cpu_has_fast_bf16())
    model_cfg = ModelConfig(
        arch="gpt2", n_layer=args.layers, n_embd=args.width, n_head=args.heads, context_length=args.context
    )
    args.results.mkdir(parents=True, exist_ok=True)
    data = make_data(args.results / "data", args.vocab)
    vocab = len(load_tokenizer(data))
    fpt = flops_per_token(model_cfg, vocab)
    total = args.steps * (args.rounds + 2)  # a start-up window and a warm-up window, then the measured ones
    tmp = Path(tempfile.mkdtemp(prefix="seedlm-bench-"))
    B, S, ck = args.batch, args.steps, args.checkpoint_every
    methods = {
        "pretrain_fp32": seedlm_pretrain(model_cfg, data, B, S, total, "fp32", False, tmp / "p32", ck),
        "bare_fp32": bare_loop(model_cfg, data, B, S, total, None),
        "trainer_fp32": hf_trainer(model_cfg, data, B, S, total, tmp / "trainer"),
        "matmul_fp32": matmul_probe(torch.float32, device, MM_N[cuda], MM_REPS[cuda]["matmul_fp32"]),
    }
    if bf16:
        methods |= {
            "pretrain_bf16": seedlm_pretrain(model_cfg, data, B, S, total, "bf16", False, tmp / "p16", ck),
            "bare_bf16": bare_loop(model_cfg, data, B, S, total, torch.bfloat16),
            "bare_bf16_eager": bare_loop(model_cfg, data, B, S, total, torch.bfloat16, "eager"),
            "matmul_bf16": matmul_probe(torch.bfloat16, device, MM_N[cuda], MM_REPS[cuda]["matmul_bf16"]),
        }
    if args.compile:
        methods["pretrain_compiled"] = seedlm_pretrain(
            model_cfg, data, B, S, total, "bf16" if bf16 else "fp32", True, tmp / "pc", ck
        )
    runners = {k: Method(k, v) for k, v in methods.items()}
    t_start = time.perf_counter()
    print(
        f"seedlm bench: {args.layers} layers x {args.width}, {args.heads} heads, context {args.context}, "
        f"batch {B}, vocab {vocab}, {torch.get_num_threads()} threads, {device}; {args.rounds} rounds of "
        f"{S}-step windows",
        file=sys.stderr,
    )
    for _ in range(2):  # start-up, then warm-up (compilation, allocator, caches): not measured
        for r in runners.values():
            r.window()
    for r in runners.values():
        r.gate.windows.clear()
        r.gate.cpu.clear()
    order = list(runners.values())
    for i in range(args.rounds):
        for r in order[i % len(order) :] + order[: i % len(order)]:  # rotate: no method always follows another
            r.window()
        print(f"  round {i + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    results = {}
    for name, r in runners.items():
        if not name.startswith("matmul"):
            r.finish()
            results[name] = r.result
    secs = {k: r.gate.windows for k, r in runners.items()}
    shutil.rmtree(tmp, ignore_errors=True)

    tokens = B * args.context * S
    tok_s = {k: statistics.median(tokens / w for w in v) for k, v in secs.items() if not k.startswith("matmul")}
    flops = {
        k: statistics.median(2 * MM_N[cuda] ** 3 * MM_REPS[cuda][k] / w for w in secs[k])
        for k in ("matmul_fp32", "matmul_bf16")
        if k in secs
    }

    cpu = {k: r.gate.cpu for k, r in runners.items()}

    def ratio(
        a: str, b: str, of: dict = secs
    ) -> float | None:  # median of per-round ratios: load cancels within a round
        if a not in of or b not in of:
            return None
        return statistics.median(y / x for x, y in zip(of[a], of[b]))

    out: dict[str, Any] = {
        "config": {
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "context": args.context,
            "batch": B,
            "vocab": vocab,
            "threads": torch.get_num_threads(),
            "device": device_peak()[0],
            "torch": torch.__version__,
        },  # what "the same configuration" means for the comparison
        "measurement": {"steps_per_window": S, "rounds": args.rounds, "checkpoint_every": ck},
        "pretrain_tok_s": tok_s["pretrain_fp32"],
        "bare_tok_s": tok_s["bare_fp32"],
        "trainer_tok_s": tok_s["trainer_fp32"],
        "pretrain_vs_bare": ratio("pretrain_fp32", "bare_fp32"),
        "trainer_vs_bare": ratio("trainer_fp32", "bare_fp32"),
        "pretrain_vs_bare_cpu": ratio("pretrain_fp32", "bare_fp32", cpu),
        "load_average": os.getloadavg()[0],
        "tok_s": tok_s,
        "matmul_gflop_s": {k.split("_")[1]: v / 1e9 for k, v in flops.items()},
        "flops_per_token": fpt,
        "trainer": results.get("trainer_fp32"),
        "seconds": time.perf_counter() - t_start,
    }

    def precision_of(k: str) -> str:
        return "bf16" if "bf16" in k or (k == "pretrain_compiled" and bf16) else "fp32"

    def mfu(k: str) -> float:  # per round, against the matmul probe of the same round; then the median
        probe = f"matmul_{precision_of(k)}"
        return statistics.median(
            (tokens * fpt / w) / (2 * MM_N[cuda] ** 3 * MM_REPS[cuda][probe] / m) for w, m in zip(secs[k], secs[probe])
        )

    out["mfu"] = {k: mfu(k) for k in tok_s}
    if bf16:
        out |= {
            "pretrain_bf16_tok_s": tok_s["pretrain_bf16"],
            "bf16_speedup": ratio("pretrain_bf16", "pretrain_fp32"),
            "bf16_speedup_cpu": ratio("pretrain_bf16", "pretrain_fp32", cpu),
            "pretrain_bf16_vs_bare_bf16_eager_cpu": ratio("pretrain_bf16", "bare_bf16_eager", cpu),
            "bare_bf16_speedup": ratio("bare_bf16", "bare_fp32"),
            "pretrain_bf16_vs_bare_bf16": ratio("pretrain_bf16", "bare_bf16"),
            "pretrain_bf16_vs_bare_bf16_eager": ratio("pretrain_bf16", "bare_bf16_eager"),
        }
    if args.compile:
        out["compiled_vs_uncompiled"] = ratio("pretrain_compiled", "pretrain_bf16" if bf16 else "pretrain_fp32")
    name, peak = device_peak()
    if peak:
        out["mfu_vs_device_peak_bf16"] = {k: v * fpt / peak for k, v in tok_s.items()}
    prev = previous_run(out["config"], args.results)
    report(out, prev)
    path = args.results / f"train_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"saved {path}", file=sys.stderr)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict) or k in ("mfu", "matmul_gflop_s")}))
    return 0


def report(out: dict, prev: dict | None) -> None:
    tok_s, mfu = out["tok_s"], out["mfu"]
    bare = tok_s["bare_fp32"]
    print(f"\n{'method':<20}{'tok/s':>10}{'vs bare fp32':>14}{'MFU (measured matmul)':>24}")
    for k, v in tok_s.items():
        print(f"{k:<20}{v:>10,.0f}{v / bare:>13.2f}x{mfu[k]:>23.1%}")
    mm = out["matmul_gflop_s"]
    print("matmul: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in mm.items()))
    print(
        f"pretrain vs bare loop (fp32, median of per-round ratios): {out['pretrain_vs_bare']:.3f}x wall-clock, "
        f"{out['pretrain_vs_bare_cpu']:.3f}x per CPU-second;  Trainer vs bare: {out['trainer_vs_bare']:.3f}x"
    )
    if "bf16_speedup" in out:
        print(
            f"bf16 autocast over fp32: pretrain {out['bf16_speedup']:.2f}x ({out['bf16_speedup_cpu']:.2f}x per "
            f"CPU-second), bare loop {out['bare_bf16_speedup']:.2f}x; pretrain bf16 vs bare bf16 "
            f"{out['pretrain_bf16_vs_bare_bf16']:.2f}x (vs the bare loop with the same eager attention "
            f"{out['pretrain_bf16_vs_bare_bf16_eager']:.2f}x, "
            f"{out['pretrain_bf16_vs_bare_bf16_eager_cpu']:.2f}x per CPU-second)"
        )
    if out["config"]["device"] == "cpu" and out["load_average"] > out["config"]["threads"]:
        print(
            f"note: load average {out['load_average']:.1f} on a machine shared with other work: wall-clock ratios "
            "are noisy (the per-CPU-second ones less so); --threads 1 is steadier"
        )
    if "mfu_vs_device_peak_bf16" in out:
        print(
            "MFU vs device peak bf16: " + ", ".join(f"{k} {v:.1%}" for k, v in out["mfu_vs_device_peak_bf16"].items())
        )
    if prev:
        same = prev.get("config") == out["config"]
        keys = [k for k in ("pretrain_tok_s", "bare_tok_s", "trainer_tok_s", "pretrain_bf16_tok_s") if prev.get(k)]
        print(
            f"vs last saved run{'' if same else ' (different config or machine: compare with care)'}: "
            + ", ".join(f"{k} {out[k] / prev[k]:.2f}x" for k in keys if out.get(k))
        )


if __name__ == "__main__":
    raise SystemExit(main())
