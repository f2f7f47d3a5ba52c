"""sft.packing: examples share rows, position ids restart per example, and attention stays within each example
(a packed row gives each example exactly the logits it gets alone), on GPT-2 and Llama, eager and SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.config import SftConfig
from components.sft import train_source
from components.training import packing
from components.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
V = 50


def examples(n: int, seed: int = 0) -> list[packing.Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 14))
        x = rng.integers(2, V, k).astype(np.int64)
        y = np.where(rng.random(k) < 0.5, -100, rng.integers(2, V, k)).astype(np.int64)
        y[-1] = int(rng.integers(2, V))  # every example trains on something
        out.append((x, y))
    return out


def tiny(arch: str, attn: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":
        conf = GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    else:
        conf = LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    return AutoModelForCausalLM.from_config(conf, attn_implementation=attn).eval()


def test_rows_hold_every_example_once_within_the_context():
    rows = examples(60)
    packed = packing.pack(rows, 32)
    assert all(len(r[0]) <= 32 for r in packed) and len(packed) < len(rows) / 2
    assert packing.efficiency(packed, 32) > 0.85
    got = sorted(tuple(x[s : s + n].tolist()) for x, _, pos in packed for s, n in _spans(pos))
    assert got == sorted(tuple(x.tolist()) for x, _ in rows)
    x, y, pos = packing.collate(packed[:3], pad_id=0)
    assert x.shape == y.shape == pos.shape and (pos[:, 0] == 0).all()


def _spans(pos: np.ndarray) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(a, b - a) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_stays_within_each_example(arch, attn):
    model, rows = tiny(arch, attn), examples(12, seed=1)
    x, _, pos = packing.collate(packing.pack(rows, 32), pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=x, position_ids=pos, use_cache=False).logits
        for r in range(x.shape[0]):
            for start, n in _spans(pos[r].numpy()):
                alone = model(input_ids=x[r : r + 1, start : start + n], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, atol=1e-5, rtol=1e-4)


def test_training_with_packing_passes_position_ids(tmp_path):
    model, rows = tiny("gpt2", "sdpa"), examples(40, seed=2)
    cfg = SftConfig(
        packing=True, max_steps=4, warmup_steps=1, batch_size=2, eval_every=2, log_every=1, precision="fp32"
    )
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    source = train_source(cfg, rows, 32, 2, pad_id=0, seed=3)
    assert len(source(0, 0)) == 3
    res = train(model, cfg, source, eval_batches_fn=lambda: [], ckpt_dir=tmp_path / "ck", seed=3, desc="sft")
    assert np.isfinite(res["final_train_loss"]) and len(seen) == 4 and all(p is not None for p in seen)
    unpacked = train_source(cfg.model_copy(update={"packing": False}), rows, 32, 2, pad_id=0, seed=3)
    assert len(unpacked(0, 0)) == 2  # examples, padded: no position ids
