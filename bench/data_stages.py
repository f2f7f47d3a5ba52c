"""What the data bench runs in each fresh process: one stage, the tokenizer alone, or SFT packing vs padding.

python bench/data_stages.py NAME SPEC_JSON      (prints one JSON line: seconds and the stage's numbers)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ingest(spec: dict) -> dict:
    from components.core.data_config import IngestConfig, Source
    from components.ingest import ingest as run

    root = Path(spec["root"])  # the corpus in sources/corpus, a few instruction rows in sources/sft.jsonl
    src = root / "sources"
    cfg = IngestConfig(
        pretrain_sources=[Source(path=str(src / "corpus"))], sft_sources=[Source(path=str(src / "sft.jsonl"))]
    )
    t = time.perf_counter()
    res = run(cfg, Path(spec["out"]), seed=1, sources_root=src, cache_dir=root / "downloads")
    return {"seconds": time.perf_counter() - t, "mb": res["pretrain_bytes"] / 2**20, "docs": res["pretrain_rows"]}


def preprocess(spec: dict) -> dict:
    from components.core.data_config import PreprocessConfig
    from components.core.io import read_json
    from components.preprocess import preprocess as run

    raw, out = Path(spec["raw"]), Path(spec["out"])
    cfg = PreprocessConfig(workers=spec["workers"])
    t = time.perf_counter()
    res = run(cfg, raw, out, out.with_suffix(".json"), seed=1)
    secs = time.perf_counter() - t
    rep = res["report"]
    mb = read_json(raw / "seedlm.json")["result"]["pretrain_bytes"] / 2**20
    return {
        "seconds": secs,
        "mb": mb,
        "tokens": res["train_tokens"] + res["val_tokens"],
        "kept": rep["pretrain"]["kept"],
        "tokenizer_sample_mb": rep["tokenizer"]["sample_mb"],
    }


def encode(spec: dict) -> dict:
    """The upper bound: tokenizers' batch encode of the same documents alone (texts already in memory)."""
    import orjson
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(spec["tokenizer"]) / "tokenizer.json"))
    docs = [
        orjson.loads(line)["text"] for f in sorted(Path(spec["raw"]).glob("pretrain/*.jsonl")) for line in open(f, "rb")
    ]
    t = time.perf_counter()
    n = 0
    for i in range(0, len(docs), 1000):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(docs[i : i + 1000], add_special_tokens=False))
    secs = time.perf_counter() - t
    return {"seconds": secs, "mb": sum(len(d.encode()) for d in docs) / 2**20, "tokens": n}


def _sft_examples(tok, context: int) -> list:
    """The embedded default's instruction rows (varied lengths), encoded as SFT trains them."""
    import numpy as np

    from components.core.data_config import SyntheticConfig
    from components.data import chat, synthetic
    from components.ingest import _sft_row

    out = []
    for row in synthetic.instruction_rows(SyntheticConfig(), 1):
        ids, labels = chat.encode_chat(tok, _sft_row(row)["messages"])
        ids, labels = np.asarray(ids[: context + 1]), np.asarray(labels[: context + 1])
        if (labels[1:] != -100).any():
            out.append((ids[:-1], labels[1:]))
    return out


def packing(spec: dict) -> dict:
    """Useful (non-pad) tokens per second of the same SFT examples, padded vs packed, in alternating windows,
    with the attention kernel training picks (components/training/model.py: training_attention)."""
    import torch

    from components.core.config import ModelConfig, SftConfig
    from components.pretrain import load_tokenizer
    from components.sft import train_source
    from components.training.model import autocast, build_model, device_and_precision, training_attention

    torch.set_num_threads(spec["threads"])
    tok, model_cfg = load_tokenizer(Path(spec["processed"])), ModelConfig()
    rows = _sft_examples(tok, model_cfg.context_length)
    model = build_model(model_cfg, tok, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device, amp = device_and_precision("auto")
    training_attention(model, device, amp)
    sources = {
        mode: train_source(SftConfig(packing=mode == "packed"), rows, model_cfg.context_length, 16, tok.pad_token_id, 1)
        for mode in ("padded", "packed")
    }
    rates: dict[str, list[float]] = {m: [] for m in sources}
    for r in range(spec["rounds"] + 1):  # round 0 warms up
        for mode, source in sources.items():
            useful, t = 0, time.perf_counter()
            for step in range(spec["steps"]):
                x, y, *pos = source(r * spec["steps"] + step, 0)
                with autocast(device, amp):
                    logits = model(input_ids=x, use_cache=False, **({"position_ids": pos[0]} if pos else {})).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                useful += int((x != tok.pad_token_id).sum())
            if r:
                rates[mode].append(useful / (time.perf_counter() - t))
    med = {m: statistics.median(v) for m, v in rates.items()}
    return {"padded_tok_s": med["padded"], "packed_tok_s": med["packed"], "examples": len(rows)}


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]](json.loads(sys.argv[2]))))
