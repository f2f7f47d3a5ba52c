"""One training run measured against its memory plan, in a fresh process (not a test module).

    python tests/_memory_probe.py '{"family": "llama", "method": "full", "precision": "fp32", ...}'

Prints one JSON line: the plan's peak and parts, and the measured peak: resident memory sampled through the
training loop (loop.PeakMemory) minus the resident memory before the model was built, so the interpreter and its
libraries do not count. The model is built from config in memory (no file mapping), then trained by the real
loop (components/training/loop.train) for a few steps."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config  # noqa: E402

from components.core.config import LoraConfig, SftConfig  # noqa: E402
from components.core.context import StageContext  # noqa: E402
from components.training import memory  # noqa: E402
from components.training.loop import PeakMemory, train  # noqa: E402
from components.training.lora import add_lora  # noqa: E402
from components.training.model import device_and_precision  # noqa: E402

MB = 2**20


def config(family: str, vocab: int, context: int):
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=256, n_layer=4, n_head=4, n_positions=context)
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=family == "qwen2",
    )


def main(spec: dict) -> dict:
    torch.set_num_threads(1)
    vocab, batch, context = spec.get("vocab", 16000), spec.get("batch", 8), spec.get("context", 128)
    conf = config(spec["family"], vocab, context)
    lora = LoraConfig(target_modules=spec.get("targets")) if spec["method"] == "lora" else None
    weights = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.get("weights", "fp32")]
    cfg = SftConfig(
        max_steps=spec.get("steps", 3),
        warmup_steps=1,
        batch_size=batch,
        precision=spec["precision"],
        checkpoint_every=1000,
        eval_every=1000,
        gradient_checkpointing=spec.get("checkpointing", False),
        method=spec["method"],
    )
    device, amp = device_and_precision(cfg.precision)
    setup = memory.Setup(
        key="sft",
        method=cfg.method,
        batch_size=batch,
        grad_accum=1,
        context=context,
        weights=weights,
        autocast=amp,
        device=device.type,
        checkpointing=cfg.gradient_checkpointing,
        lora=lora,
    )
    plan = memory.estimate(conf, setup)

    proc = psutil.Process()
    base = proc.memory_info().rss
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa", dtype=weights)
    if lora is not None:
        model = add_lora(model, lora, 0)

    def batches(step: int, micro: int):
        x = torch.randint(0, vocab, (batch, context + 1), generator=torch.Generator().manual_seed(step))
        return x[:, :-1], x[:, 1:]

    with tempfile.TemporaryDirectory() as ckpt, PeakMemory(every=0.002) as mem:
        train(model, cfg, batches, eval_batches_fn=list, ckpt_dir=Path(ckpt), seed=0, ctx=StageContext(progress=False))
    return {
        "plan_mb": plan.peak / MB,
        "parts_mb": {k: v / MB for k, v in plan.parts.items()},
        "measured_mb": mem.rss_mb - base / MB,
        "trainable": plan.trainable,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
