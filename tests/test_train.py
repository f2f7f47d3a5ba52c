"""training/loop.py, pretrain and sft on a tiny processed folder built here (tokenizer, token files, SFT sets)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from components.core.config import LoraConfig, ModelConfig, PretrainConfig, SftConfig, TrainConfig
from components.core.context import StageContext, StageError
from components.core.io import read_json, write_meta
from components.pretrain import pretrain, window_source
from components.sft import collate, load_examples, sft
from components.training.loop import evaluate_loss, lr_factor, train
from components.training.model import build_model

SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ANIMALS = ["fox", "owl", "frog", "bear", "wolf", "hare", "crow", "deer"]
PLACES = ["forest", "tower", "lake", "cave", "hill", "river", "field", "marsh"]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]  # peft
TINY = ModelConfig(arch="gpt2", n_layer=2, n_embd=64, n_head=2, context_length=32)
QUIET = StageContext(progress=False)


def make_processed(root: Path, *, train_tokens: int | None = None) -> Path:
    """A tiny stand-in for preprocess's output: tokenizer/, train.bin, val.bin, sft_* datasets, seedlm.json."""
    facts = [(a, p) for a, p in zip(ANIMALS, PLACES)]
    docs = [f"the {a} lives in the {p}." for a, p in facts] + [f"a {a} is never seen near the {p}." for a, p in facts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        docs * 5,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=SPECIAL,
            min_frequency=1,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL[0],
        eos_token=SPECIAL[0],
        pad_token=SPECIAL[1],
        additional_special_tokens=SPECIAL[2:],
    )
    t.save_pretrained(root / "tokenizer")
    rng = random.Random(0)
    stream = []
    for _ in range(40):
        for d in rng.sample(docs, len(docs)):
            stream += t(d)["input_ids"] + [t.eos_token_id]
    stream = np.array(stream[:train_tokens] if train_tokens is not None else stream, dtype=np.uint16)
    stream.tofile(root / "train.bin")
    val = np.array(sum((t(d)["input_ids"] + [t.eos_token_id] for d in docs[:6]), []), dtype=np.uint16)
    val.tofile(root / "val.bin")
    end = t.convert_tokens_to_ids("<|end|>")

    def example(q: str, a: str) -> dict:
        prompt = t(f"<|user|>\n{q}<|end|>\n<|assistant|>\n")["input_ids"]
        answer = t(a)["input_ids"] + [end]
        tail = t("\n")["input_ids"]
        return {
            "input_ids": prompt + answer + tail,
            "labels": [-100] * len(prompt) + answer + [-100] * len(tail),
            "prompt": json.dumps([{"role": "user", "content": q}]),
            "reference": a,
            "task": "qa",
        }

    rows = [example(f"where does the {a} live?", f"in the {p}") for a, p in facts]
    rows += [example(f"is the {a} seen near the {p}?", "no") for a, p in facts]
    for name, part in (("sft_train", rows[:12]), ("sft_val", rows[12:]), ("sft_test", rows[12:])):
        Dataset.from_dict({k: [r[k] for r in part] for k in part[0]}).save_to_disk(str(root / name))
    write_meta(
        root,
        "preprocess",
        {"preprocess": {"vocab_size": 320}},
        {
            "vocab_size": len(t),
            "dtype": "uint16",
            "eos_id": t.eos_token_id,
            "pad_id": t.pad_token_id,
            "train_tokens": len(stream),
            "val_tokens": len(val),
            "sft_train": 12,
            "sft_val": 4,
            "sft_test": 4,
        },
    )
    return root


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    return make_processed(tmp_path_factory.mktemp("processed"))


def _pretrain(processed: Path, out: Path, cfg: PretrainConfig, model_cfg: ModelConfig = TINY, ctx=QUIET, seed=7):
    return pretrain(
        model_cfg,
        cfg,
        processed,
        out / "model",
        out / "metrics.json",
        out / "plot.csv",
        out / "ckpt",
        seed=seed,
        ctx=ctx,
    )


@pytest.fixture(scope="module")
def base(processed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    _pretrain(
        processed,
        out,
        PretrainConfig(
            max_steps=30,
            warmup_steps=3,
            batch_size=8,
            lr=3e-3,
            eval_every=30,
            log_every=10,
            checkpoint_every=100,
            precision="fp32",
        ),
    )
    return out / "model"


def _sft(processed: Path, base: Path, out: Path, cfg: SftConfig, ctx=QUIET, seed=7):
    return sft(
        cfg, processed, base, out / "model", out / "metrics.json", out / "plot.csv", out / "ckpt", seed=seed, ctx=ctx
    )


class Crash(RuntimeError):
    pass


def crash_at(step: int) -> StageContext:
    def log(metrics, s=None):
        if s == step and "train_loss" in metrics:
            raise Crash(f"simulated crash at step {s}")

    return StageContext(log=log, progress=False)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- the loop itself
def test_training_lowers_loss_and_schedule(tmp_path):
    pattern = np.tile(np.arange(16, dtype=np.uint16), 400)  # a learnable cyclic stream
    tok = PreTrainedTokenizerFast.from_pretrained(make_processed(tmp_path / "p") / "tokenizer")
    model = build_model(TINY, tok, seed=0)
    cfg = TrainConfig(
        max_steps=40,
        warmup_steps=4,
        batch_size=8,
        lr=3e-3,
        log_every=5,
        eval_every=20,
        checkpoint_every=1000,
        precision="fp32",
    )
    val = [window_source(pattern, 32, 8, seed=99)(0, 0)]
    logged = []
    ctx = StageContext(log=lambda m, s=None: logged.append((s, m)), progress=False)
    res = train(
        model,
        cfg,
        window_source(pattern, 32, 8, seed=0),
        eval_batches_fn=lambda: val,
        ckpt_dir=tmp_path / "ckpt",
        seed=0,
        ctx=ctx,
    )
    first = res["history"][0]["train_loss"]
    assert first > 3.0 and res["final_train_loss"] < 0.3 * first and res["val_loss"] < 1.0
    assert res["val_ppl"] == pytest.approx(np.exp(res["val_loss"]))
    assert res["steps"] == 40 and res["tokens"] == 40 * 8 * 32 and res["tokens_per_s"] > 0 and res["peak_mem_mb"] > 0
    assert [h["step"] for h in res["history"]] == list(range(5, 41, 5))
    assert [h["val_loss"] is not None for h in res["history"]] == [s % 20 == 0 for s in range(5, 41, 5)]
    train_logs = [m for _, m in logged if "train_loss" in m]
    assert len(train_logs) == 8 and set(train_logs[0]) == {"train_loss", "lr", "tokens_per_s", "grad_norm"}
    assert lr_factor(0, cfg) == pytest.approx(1 / 5) and lr_factor(4, cfg) == pytest.approx(1.0)
    assert lr_factor(39, cfg) == pytest.approx(0.1, abs=0.01)
    assert not (tmp_path / "ckpt").exists()


def test_gradient_checkpointing_and_grad_accum_match_plain_training(tmp_path, processed):
    tok = PreTrainedTokenizerFast.from_pretrained(processed / "tokenizer")
    stream = np.fromfile(processed / "train.bin", dtype=np.uint16)
    cfg = TrainConfig(
        max_steps=3, warmup_steps=1, batch_size=4, log_every=3, eval_every=3, checkpoint_every=100, precision="fp32"
    )
    val = [window_source(stream, 32, 4, seed=5)(0, 0)]
    runs = {}
    for name, update in (("plain", {}), ("ckpt", {"gradient_checkpointing": True})):
        runs[name] = train(
            build_model(TINY, tok, 0),
            cfg.model_copy(update=update),
            window_source(stream, 32, 4, 0),
            eval_batches_fn=lambda: val,
            ckpt_dir=tmp_path / name,
            seed=0,
            ctx=QUIET,
        )
    assert runs["ckpt"]["val_loss"] == pytest.approx(runs["plain"]["val_loss"], abs=1e-5)
    # two micro-batches of 2 rows each see other data than one batch of 4, but train just as well
    accum = train(
        build_model(TINY, tok, 0),
        cfg.model_copy(update={"grad_accum": 2, "batch_size": 2}),
        window_source(stream, 32, 2, 0),
        eval_batches_fn=lambda: val,
        ckpt_dir=tmp_path / "a",
        seed=0,
        ctx=QUIET,
    )
    assert accum["tokens"] == runs["plain"]["tokens"] == 3 * 4 * 32
    assert abs(accum["val_loss"] - runs["plain"]["val_loss"]) < 0.2


def test_golden_loss(tmp_path):
    """A fixed tiny fp32 run (torch 2.13 CPU) reproduces its recorded final loss."""
    tok = PreTrainedTokenizerFast.from_pretrained(make_processed(tmp_path / "p") / "tokenizer")
    stream = (np.arange(5000, dtype=np.int64) * 7 % 61).astype(np.uint16)
    cfg = TrainConfig(
        max_steps=6,
        warmup_steps=2,
        batch_size=4,
        lr=2e-3,
        log_every=3,
        eval_every=6,
        checkpoint_every=100,
        precision="fp32",
    )
    res = train(
        build_model(TINY, tok, seed=0),
        cfg,
        window_source(stream, 32, 4, seed=0),
        eval_batches_fn=lambda: [],
        ckpt_dir=tmp_path / "c",
        seed=0,
        ctx=QUIET,
    )
    assert res["val_loss"] is None
    assert res["final_train_loss"] == pytest.approx(GOLDEN_FINAL_LOSS, abs=1e-4)


GOLDEN_FINAL_LOSS = 5.1109786  # recorded: torch 2.13.0+cpu, transformers 5.23, fp32


def test_mismatched_checkpoint_is_ignored(tmp_path, processed):
    tok = PreTrainedTokenizerFast.from_pretrained(processed / "tokenizer")
    stream = np.fromfile(processed / "train.bin", dtype=np.uint16)
    cfg = TrainConfig(max_steps=6, warmup_steps=1, batch_size=4, log_every=3, checkpoint_every=2, precision="fp32")
    run = dict(eval_batches_fn=lambda: [], ckpt_dir=tmp_path / "c", seed=0)
    with pytest.raises(Crash):
        train(build_model(TINY, tok, 0), cfg, window_source(stream, 32, 4, 0), ctx=crash_at(6), **run)
    assert (tmp_path / "c" / "latest").read_text().strip() == "step-000004"
    assert sorted(p.name for p in (tmp_path / "c").glob("step-*")) == ["step-000002", "step-000004"]
    res = train(
        build_model(TINY, tok, 0), cfg, window_source(stream, 32, 4, 0), ctx=QUIET, fingerprint="other data", **run
    )
    assert res["resumed_from"] == 0
    with pytest.raises(Crash):
        train(build_model(TINY, tok, 0), cfg, window_source(stream, 32, 4, 0), ctx=crash_at(6), **run)
    res = train(build_model(TINY, tok, 0), cfg, window_source(stream, 32, 4, 0), ctx=QUIET, **run)
    assert res["resumed_from"] == 4


# ---------------------------------------------------------------- pretrain
RESUME_PT = PretrainConfig(
    max_steps=10, warmup_steps=2, batch_size=4, lr=2e-3, log_every=3, eval_every=4, checkpoint_every=2, precision="fp32"
)


def test_pretrain_resume_is_exact(tmp_path, processed):
    dropout = TINY.model_copy(update={"dropout": 0.1})  # the RNG state must be restored too
    full = _pretrain(processed, tmp_path / "full", RESUME_PT, dropout)
    with pytest.raises(Crash):
        _pretrain(processed, tmp_path / "cut", RESUME_PT, dropout, ctx=crash_at(9))
    ckpts = list((tmp_path / "cut" / "ckpt" / "pretrain").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "latest").read_text().strip() == "step-000008"
    assert not (tmp_path / "cut" / "model").exists()
    resumed = _pretrain(processed, tmp_path / "cut", RESUME_PT, dropout)
    assert resumed["resumed_from"] == 8 and full["resumed_from"] == 0
    for k in ("final_train_loss", "val_loss", "tokens"):
        assert resumed[k] == full[k], k
    _assert_same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
    assert (tmp_path / "cut" / "plot.csv").read_text() == (tmp_path / "full" / "plot.csv").read_text()
    assert not ckpts[0].exists()  # deleted after success


def test_pretrain_outputs_metrics_and_plots(tmp_path, processed):
    res = _pretrain(processed, tmp_path, RESUME_PT.model_copy(update={"precision": "auto"}))
    m = read_json(tmp_path / "metrics.json")
    for k in ("final_train_loss", "val_loss", "val_ppl", "tokens", "tokens_per_s", "steps", "n_params", "peak_mem_mb"):
        assert m[k] == res[k] and m[k] is not None
    rows = list(csv.DictReader((tmp_path / "plot.csv").open()))
    assert list(rows[0]) == ["step", "train_loss", "val_loss", "lr"] and rows[-1]["step"] == "10"
    assert rows[-1]["val_loss"] != "" and rows[0]["val_loss"] == ""
    meta = read_json(tmp_path / "model" / "seedlm.json")
    assert meta["stage"] == "pretrain" and meta["config"]["model"]["n_embd"] == 64
    assert meta["config"]["pretrain"]["max_steps"] == 10 and meta["result"]["enabled"] is True
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.n_positions == 32


def test_pretrain_disabled_writes_fresh_seeded_model(tmp_path, processed):
    res = _pretrain(processed, tmp_path, PretrainConfig(enabled=False), seed=11)
    assert res["enabled"] is False and "final_train_loss" not in res
    tok = PreTrainedTokenizerFast.from_pretrained(processed / "tokenizer")
    fresh = build_model(TINY, tok, seed=11)
    saved = _weights(tmp_path / "model")
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items() if k in saved)
    assert read_json(tmp_path / "metrics.json")["enabled"] is False
    assert (tmp_path / "plot.csv").read_text().strip() == "step,train_loss,val_loss,lr"


def test_pretrain_errors(tmp_path):
    short = make_processed(tmp_path / "short", train_tokens=20)
    with pytest.raises(StageError, match=r"train\.bin: 20 tokens.*model\.context_length"):
        _pretrain(short, tmp_path / "o", RESUME_PT)
    with pytest.raises(StageError, match=r"pretrain\.precision: fp16"):
        _pretrain(
            short,
            tmp_path / "o",
            RESUME_PT.model_copy(update={"precision": "fp16"}),
            TINY.model_copy(update={"context_length": 8}),
        )
    assert not (tmp_path / "o" / "model").exists()


# ---------------------------------------------------------------- sft
RESUME_SFT = SftConfig(
    max_steps=8, warmup_steps=1, batch_size=4, lr=2e-3, log_every=3, eval_every=4, checkpoint_every=3, precision="fp32"
)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_resume_is_exact(tmp_path, processed, base, method):
    cfg = RESUME_SFT.model_copy(update={"method": method, "lora": LoraConfig(r=4, alpha=8, dropout=0.1)})
    full = _sft(processed, base, tmp_path / "full", cfg)
    with pytest.raises(Crash):
        _sft(processed, base, tmp_path / "cut", cfg, ctx=crash_at(8))
    resumed = _sft(processed, base, tmp_path / "cut", cfg)
    assert resumed["resumed_from"] == 6
    for k in ("final_train_loss", "val_loss", "tokens"):
        assert resumed[k] == full[k], k
    _assert_same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
    assert full["method"] == method and resumed["resumed_from"] == 6 and full["resumed_from"] == 0


def test_sft_lora_trains_only_adapters_and_merges_exactly(tmp_path, processed, base):
    from peft import PeftModel

    res = _sft(
        processed,
        base,
        tmp_path,
        RESUME_SFT.model_copy(update={"method": "lora", "lr": 1e-2, "lora": LoraConfig(r=4, alpha=8)}),
    )
    assert 0 < res["trainable_params"] < res["n_params"] / 5
    adapter = tmp_path / "model" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    merged_w, base_w = _weights(tmp_path / "model"), _weights(base)
    assert merged_w.keys() == base_w.keys()
    changed = {k for k in base_w if not torch.equal(merged_w[k], base_w[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc") for k in changed)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
    assert read_json(tmp_path / "model" / "seedlm.json")["result"]["method"] == "lora"


def test_sft_loss_counts_only_response_tokens(tmp_path, processed, base):
    rows, dropped = load_examples(processed / "sft_val", context=32)
    assert dropped == 0 and rows
    x, y = collate(rows, pad_id=1)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    ours = evaluate_loss(model, [(x, y)], torch.device("cpu"), None)
    # independent reference: HF's own shifted loss on the dataset's labels, token-weighted
    from datasets import load_from_disk

    ds = load_from_disk(str(processed / "sft_val"))
    tot, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(ds["input_ids"], ds["labels"]):
            k = sum(1 for v in labels[1:] if v != -100)
            tot += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * k
            n += k
    assert ours == pytest.approx(tot / n, rel=1e-5)
    # corrupting tokens no response target depends on (the tail after the last labelled token) changes nothing
    ids_bad, tails = [], 0
    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        last = max(i for i, v in enumerate(labels) if v != -100)
        tails += len(ids) - last - 1
        ids_bad.append(ids[: last + 1] + [(v + 7) % 300 for v in ids[last + 1 :]])
    assert tails > 0
    corrupt = tmp_path / "corrupt"
    Dataset.from_dict({"input_ids": ids_bad, "labels": list(ds["labels"])}).save_to_disk(str(corrupt))
    rows_bad, _ = load_examples(corrupt, context=32)
    assert evaluate_loss(model, [collate(rows_bad, pad_id=1)], torch.device("cpu"), None) == ours
    # ...while counting every token (labels = input_ids) would give a different loss
    everything = tmp_path / "everything"
    Dataset.from_dict({"input_ids": ids_bad, "labels": ids_bad}).save_to_disk(str(everything))
    rows_all, _ = load_examples(everything, context=32)
    assert evaluate_loss(model, [collate(rows_all, pad_id=1)], torch.device("cpu"), None) != pytest.approx(ours)


def test_sft_drops_examples_without_response_tokens(tmp_path, processed, base):
    """Prompt-only rows and rows whose response lies past the context are dropped, counted, and change nothing."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("tokenizer", "train.bin", "val.bin", "sft_train", "sft_test", "seedlm.json"):
        (data / name).symlink_to(processed / name)
    val = Dataset.load_from_disk(str(processed / "sft_val")).to_dict()
    n = len(val["input_ids"])
    val["input_ids"] += [[3, 10, 11, 12, 5], [3] + [10] * 40 + [5, 4, 20, 5]]
    val["labels"] += [[-100] * 5, [-100] * 43 + [20, 5]]
    for k in ("prompt", "reference", "task"):
        val[k] += [val[k][0]] * 2
    Dataset.from_dict(val).save_to_disk(str(data / "sft_val"))
    cfg = RESUME_SFT.model_copy(update={"max_steps": 2, "checkpoint_every": 100})
    plain = _sft(processed, base, tmp_path / "plain", cfg)
    extra = _sft(data, base, tmp_path / "extra", cfg)
    assert (plain["dropped_val"], extra["dropped_val"]) == (0, 2)
    assert extra["val_examples"] == plain["val_examples"] == n
    assert extra["val_loss"] == plain["val_loss"]


def test_llama_pretrain_then_lora_sft(tmp_path, processed):
    llama = ModelConfig(arch="llama", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, context_length=32)
    short = dict(
        max_steps=3, warmup_steps=1, batch_size=4, log_every=3, eval_every=3, checkpoint_every=2, precision="fp32"
    )
    pre = _pretrain(processed, tmp_path / "pre", PretrainConfig(**short), llama)
    assert pre["arch"] == "llama" and pre["val_loss"] is not None
    res = _sft(
        processed,
        tmp_path / "pre" / "model",
        tmp_path / "sft",
        SftConfig(method="lora", lora=LoraConfig(r=2, alpha=4), lr=1e-2, **short),
    )
    adapter = json.loads((tmp_path / "sft" / "model" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # r=2 adapters on 7 projections in 2 layers: (in + out) * r each
    per_layer = 2 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + 2 * (64 + 192) + (192 + 64))
    assert res["trainable_params"] == 2 * per_layer
    with pytest.raises(StageError, match=r"sft\.lora\.target_modules"):
        _sft(
            processed,
            tmp_path / "pre" / "model",
            tmp_path / "bad",
            SftConfig(method="lora", lora=LoraConfig(target_modules=["c_attn"]), **short),
        )


# ---------------------------------------------------------------- speed & memory plumbing (issue 3)
def test_peak_memory_sees_a_transient_allocation():
    from components.training.loop import PeakMemory

    with PeakMemory() as outer:
        base = outer.rss_mb
        with PeakMemory() as inner:
            block = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
            time.sleep(0.3)
            del block
        assert inner.rss_mb > base + 200  # the nested block shares the outer sampler
    assert outer.rss_mb >= inner.rss_mb
    report = outer.report()
    assert report["peak_mem_mb"] == report["peak_rss_mb"] == outer.rss_mb and report["peak_cuda_mb"] == 0.0
