"""The CUDA path end to end in one call of a few minutes (issue 12); run by bench/gpu_check.sh.

    bench/gpu_check.sh                 on a GPU machine: the full sizes below
    bench/gpu_check.sh --dry           anywhere (CPU): the same steps at tiny sizes, QLoRA skipped without CUDA

1. pretrain: bf16 pretraining of GPT-2 124M (12 x 768, context 1024, vocabulary 50304) through seedlm's training
   loop (components/training/loop.train, fused AdamW, torch.compile): tokens/s and MFU, counting
   6N + 12 L d T FLOPs per token against the device's dense bf16 peak (goal: >= 50% on an H200).
2. lora / qlora: SFT of a ~1.1B Llama created from config (22 x 2048, GQA 32/4 heads, context 1024), saved and
   loaded as a checkpoint: LoRA on bf16 weights, then 4-bit QLoRA (bitsandbytes NF4, prepare_model_for_kbit_training,
   gradient checkpointing): tokens/s, and CUDA's peak allocated memory against the memory plan's estimate.
3. serve: the serving engine (components/serving/engine.py) on the LoRA-merged ~1B model: generated tokens/s at
   batch 1 and with 32 concurrent prompts.
Every number goes to bench/results/gpu_check-<time>.json; the last line printed is that JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from components.core.config import LoraConfig, ModelConfig, PretrainConfig, SftConfig  # noqa: E402
from components.core.context import StageContext  # noqa: E402
from components.data import chat  # noqa: E402
from components.training import lora, memory  # noqa: E402
from components.training.base import quantization_config  # noqa: E402
from components.training.loop import PeakMemory, train  # noqa: E402
from components.training.model import build_model, device_and_precision, load_model, save_model  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165}
"""Dense bf16 tensor-core peaks (vendor data sheets) by device-name fragment; first match wins."""
FULL = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, context_length=1024, vocab=50304, batch=32, steps=40),
    "llama": dict(hidden=2048, layers=22, heads=32, kv=4, inter=5632, vocab=32000, context=1024, batch=8, steps=12),
    "serve": dict(prompts=32, max_tokens=128),
}
DRY = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=2, context_length=64, vocab=512, batch=4, steps=6),
    "llama": dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=512, context=64, batch=4, steps=4),
    "serve": dict(prompts=4, max_tokens=8),
}


def tokenizer(vocab: int) -> Any:
    """A word-level tokenizer of exactly `vocab` tokens with seedlm's chat tokens and template (throughput only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(chat.SPECIAL_TOKENS)
    words = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(words, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=specials[0], pad_token=specials[1], additional_special_tokens=specials[2:]
    )
    fast.chat_template = chat.CHAT_TEMPLATE
    return fast


def random_batches(vocab: int, batch: int, context: int):
    def batches(step: int, micro: int):
        x = torch.randint(0, vocab, (batch, context + 1), generator=torch.Generator().manual_seed(step * 7 + micro))
        return x[:, :-1], x[:, 1:]

    return batches


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((float(v) for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def windows(run: Any) -> tuple[list[float], Any]:
    """Call run(ctx) with a StageContext that records every logged tokens/s window."""
    seen: list[float] = []

    def log(metrics: dict, step: int | None = None) -> None:
        if "tokens_per_s" in metrics:
            seen.append(float(metrics["tokens_per_s"]))

    return seen, run(StageContext(log=log, progress=False))


# ---------------------------------------------------------------- 1. pretraining MFU
def pretrain_mfu(size: dict, compile_: bool, tmp: Path) -> dict:
    tok = tokenizer(size["vocab"])
    cfg = ModelConfig(**{k: size[k] for k in ("n_layer", "n_embd", "n_head", "context_length")})
    model = build_model(cfg, tok, seed=0)
    n = sum(p.numel() for p in model.parameters())
    train_cfg = PretrainConfig(
        max_steps=size["steps"],
        warmup_steps=1,
        batch_size=size["batch"],
        log_every=max(1, size["steps"] // 8),
        eval_every=10**6,
        checkpoint_every=10**6,
        precision="bf16",
        compile=compile_,
    )
    batches = random_batches(size["vocab"], size["batch"], size["context_length"])
    tps, res = windows(
        lambda ctx: train(model, train_cfg, batches, eval_batches_fn=list, ckpt_dir=tmp / "pre", seed=0, ctx=ctx)
    )
    steady = sorted(tps[2:] or tps)[len(tps[2:] or tps) // 2]  # median after the compile/warm-up windows
    flops = 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.context_length
    peak = peak_tflops()
    return {
        "params": n,
        "tokens_per_s": steady,
        "tflops": steady * flops / 1e12,
        "mfu": steady * flops / (peak * 1e12) if peak else None,
        "peak_bf16_tflops": peak,
        "compile": compile_,
        "final_loss": res["final_train_loss"],
    }


# ---------------------------------------------------------------- 2. LoRA / QLoRA of a ~1B model
def llama_checkpoint(size: dict, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    conf = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv"],
        intermediate_size=size["inter"],
        max_position_embeddings=size["context"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
    save_model(model, tokenizer(size["vocab"]), folder)
    return folder


def sft_run(size: dict, folder: Path, quantization: str | None, tmp: Path) -> dict:
    """LoRA (bf16 base) or QLoRA SFT for a few steps: tokens/s and peak memory against the plan."""
    from transformers import AutoConfig

    device, amp = device_and_precision("auto")
    cuda = device.type == "cuda"
    weights = torch.bfloat16 if cuda or amp is not None else torch.float32
    adapters = LoraConfig(r=16, alpha=32, target_modules="all-linear")
    cfg = SftConfig(
        method="lora",
        lora=adapters,
        quantization=quantization,
        max_steps=size["steps"],
        warmup_steps=1,
        batch_size=size["batch"],
        log_every=max(1, size["steps"] // 4),
        eval_every=10**6,
        checkpoint_every=10**6,
        gradient_checkpointing=quantization is not None,
    )
    setup = memory.Setup(
        key="sft",
        method="lora",
        batch_size=size["batch"],
        grad_accum=1,
        context=size["context"],
        weights=weights,
        autocast=amp,
        device=device.type,
        quantization=quantization,
        checkpointing=cfg.gradient_checkpointing,
        lora=adapters,
    )
    plan = memory.estimate(AutoConfig.from_pretrained(folder), setup)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_rss = psutil.Process().memory_info().rss
    quant = quantization_config(quantization, weights)
    model = load_model(folder, dtype=weights, quantization=quant)
    if quant is not None:
        model = lora.prepare_quantized(model, cfg.gradient_checkpointing)
    model = lora.add_lora(model, adapters, 0)
    batches = random_batches(size["vocab"], size["batch"], size["context"])
    with PeakMemory(every=0.01) as mem:
        tps, res = windows(
            lambda ctx: train(model, cfg, batches, eval_batches_fn=list, ckpt_dir=tmp / "sft", seed=0, ctx=ctx)
        )
    measured = mem.cuda_mb if cuda else mem.rss_mb - base_rss / 2**20
    out = {
        "tokens_per_s": sorted(tps[1:] or tps)[len(tps[1:] or tps) // 2],
        "trainable": plan.trainable,
        "plan_gb": plan.peak / memory.GIB,
        "peak_gb": measured / 1024,
        "plan_vs_peak": plan.peak / memory.GIB / (measured / 1024) if measured > 0 else None,
        "measured": "cuda max allocated" if cuda else "RSS above the baseline",
        "final_loss": res["final_train_loss"],
    }
    out["model"] = model if quantization is None else None
    return out


# ---------------------------------------------------------------- 3. serving
def serve(model: Any, size: dict, vocab: int) -> dict:
    from components.serving import engine as eng
    from components.serving.sampling import sampling_params

    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    engine = eng.from_model(model.eval(), tokenizer(vocab), name="gpu-check")
    params = sampling_params(max_tokens=size["max_tokens"])
    out = {}
    for label, n in (("batch1", 1), (f"batch{size['prompts']}", size["prompts"])):
        prompts = [
            eng.chat_prompt(
                engine, [{"role": "user", "content": " ".join(f"w{(i * 7 + j) % 500}" for j in range(32))}], params
            )
            for i in range(n)
        ]
        t0 = time.perf_counter()
        done = eng.generate(engine, prompts, params, max_batch=n)
        seconds = time.perf_counter() - t0
        out[f"{label}_tokens_per_s"] = sum(c.completion_tokens for c in done) / seconds
    return out


# ---------------------------------------------------------------- the check
def environment() -> dict:
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "bitsandbytes": bnb,
        "memory_gb": (torch.cuda.mem_get_info()[1] if cuda else psutil.virtual_memory().total) / memory.GIB,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny sizes, CPU allowed (checks the script itself)")
    ap.add_argument("--no-compile", action="store_true", help="pretrain without torch.compile")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run on a GPU machine, or with --dry to check the script", file=sys.stderr)
        return 2
    sizes = DRY if args.dry else FULL
    report: dict[str, Any] = {"dry": args.dry, "environment": environment(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="seedlm-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        report["pretrain"] = pretrain_mfu(sizes["gpt2"], compile_=not (args.no_compile or args.dry), tmp=tmp)
        folder = llama_checkpoint(sizes["llama"], tmp / "llama")
        lora_run = sft_run(sizes["llama"], folder, None, tmp)
        model = lora_run.pop("model")
        report["lora"] = lora_run
        if torch.cuda.is_available():
            report["qlora"] = sft_run(sizes["llama"], folder, "4bit", tmp)
            report["qlora"].pop("model")
        else:
            report["qlora"] = {"skipped": "4-bit QLoRA needs CUDA and bitsandbytes"}
        report["serve"] = serve(model, sizes["serve"], sizes["llama"]["vocab"])
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"gpu_check: wrote {path}", file=sys.stderr)
    print(json.dumps(report, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
