"""The memory plan (components/training/memory.py): its estimate against measured peak memory on CPU (within 25%),
its parts, and a run that cannot fit stopping at once with the estimate and the settings that would fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.core.config import LoraConfig
from components.core.context import StageError
from components.training import memory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = {  # a llama (GQA) / gpt2 / qwen2 layout of ~7-11M parameters, vocabulary 16k, 8 x 128 tokens
    "llama-full-fp32": {"family": "llama", "method": "full", "precision": "fp32"},
    "gpt2-full-bf16-autocast": {"family": "gpt2", "method": "full", "precision": "bf16"},
    "qwen2-lora-bf16-weights": {"family": "qwen2", "method": "lora", "precision": "bf16", "weights": "bf16"},
    "llama-full-checkpointing": {"family": "llama", "method": "full", "precision": "fp32", "checkpointing": True},
    "qwen2-lora-all-linear-fp32": {"family": "qwen2", "method": "lora", "precision": "fp32", "targets": "all-linear"},
}


def _probe(spec: dict) -> dict:
    res = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_memory_probe.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured():
    """Each run in a fresh process (tests/_memory_probe.py: the real training loop, peak RSS over the baseline before
    the model exists), two at a time: one torch thread each, and each process's RSS is its own."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(RUNS, pool.map(_probe, RUNS.values())))


@pytest.mark.parametrize("name", list(RUNS))
def test_plan_is_within_25_percent_of_the_measured_peak(measured, name):
    out = measured[name]
    ratio = out["plan_mb"] / out["measured_mb"]
    assert 0.75 <= ratio <= 1.25, f"{name}: plan {out['plan_mb']:.0f} MiB vs measured {out['measured_mb']:.0f} MiB"
    assert out["measured_mb"] > 250  # big enough that the ratio measures the run, not the interpreter's noise


def llama(vocab: int = 32000, layers: int = 4, hidden: int = 256, context: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=context,
        tie_word_embeddings=False,
    )


def setup(**kw) -> memory.Setup:
    base = dict(key="sft", method="full", batch_size=8, grad_accum=1, context=128, weights=torch.float32, autocast=None)
    return memory.Setup(**{**base, **kw})


def test_parts_follow_method_dtype_and_settings():
    conf = llama()
    full = memory.estimate(conf, setup())
    n = full.n_params
    assert full.trainable == n and full.parts["weights"] == 4 * n
    assert full.parts["gradients"] == 4 * n and full.parts["optimizer"] == 8 * n
    assert full.parts["logits"] == 8 * 128 * 32000 * 16  # logits, log-softmax and two gradients, fp32
    lora = memory.estimate(conf, setup(method="lora", lora=LoraConfig(), weights=torch.bfloat16))
    assert lora.trainable < n // 20 and lora.parts["optimizer"] == 8 * lora.trainable
    assert lora.parts["weights"] < 0.6 * full.parts["weights"] and lora.peak < full.peak
    ckpt = memory.estimate(conf, setup(checkpointing=True))
    assert ckpt.parts["activations"] < full.parts["activations"] / 2
    half = memory.estimate(conf, setup(batch_size=4))
    assert half.parts["activations"] == pytest.approx(full.parts["activations"] / 2, rel=0.01)
    blocks = llama(vocab=1000, hidden=512)  # the blocks' linear layers dominate: what 4 bits shrink
    b16 = memory.estimate(blocks, setup(method="lora", lora=LoraConfig(), weights=torch.bfloat16))
    q4 = memory.estimate(blocks, setup(method="lora", lora=LoraConfig(), quantization="4bit", device="cuda"))
    q8 = memory.estimate(blocks, setup(method="lora", lora=LoraConfig(), quantization="8bit", device="cuda"))
    assert q4.parts["weights"] < 0.45 * b16.parts["weights"] < q8.parts["weights"] < 0.7 * b16.parts["weights"]
    long = memory.estimate(llama(context=4096), setup(context=4096, batch_size=1))
    short = memory.estimate(llama(context=4096), setup(context=1024, batch_size=1))
    assert long.parts["activations"] > 3.5 * short.parts["activations"]  # linear in T (SDPA), extrapolated
    assert "activations" in full.table() and "fits" in full.table()


def test_activation_probe_matches_saved_tensors_of_the_full_model():
    """The narrow replica's estimate against autograd's saved tensors of the real model, for one micro-batch."""
    from transformers import AutoModelForCausalLM

    conf = llama(vocab=512, layers=3, hidden=256)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").train()
    saved = memory._saved_bytes(model, 4, 128, None) - 4 * 128 * 512 * 4  # minus the log-softmax (in "logits")
    est, note = memory.activations(conf, setup(batch_size=4))
    assert note is None and est == pytest.approx(saved, rel=0.1)


def test_a_run_that_cannot_fit_stops_with_the_estimate_and_what_would_fit():
    conf = llama(vocab=32000, layers=4, hidden=512)
    big = memory.estimate(conf, setup())
    limit_gb = big.peak / memory.GIB * 0.6
    with pytest.raises(StageError) as e:
        memory.check(conf, setup(), limit_gb)
    msg = str(e.value)
    assert msg.startswith("sft: this run needs about") and "sft.memory_gb" in msg and "settings that fit:" in msg
    assert "sft.method=lora" in msg or "sft.batch_size=" in msg
    for part in ("weights", "gradients", "optimizer", "activations"):
        assert part in msg
    assert "4bit" not in msg  # QLoRA is suggested on CUDA only
    with pytest.raises(StageError, match="none of LoRA, 4-bit, a smaller batch or checkpointing is enough"):
        memory.check(conf, setup(), 0.001)
    assert memory.check(conf, setup(), None).fits  # this machine's RAM is plenty


def test_the_stage_prints_the_plan_and_quantization_on_cpu_is_refused():
    from components.training.base import quantization_config

    with pytest.raises(StageError, match=r"sft.quantization: 4bit .*needs a CUDA GPU"):
        quantization_config("4bit", torch.bfloat16)
    assert quantization_config(None, torch.float32) is None
