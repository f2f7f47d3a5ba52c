"""A tiny world for the retrieval tests: the real ingest stage's output of a small synthetic world and a BPE
tokenizer trained on it where preprocess puts one (seconds); and a tiny random-weight encoder folder in
sentence-transformers layout for dense retrieval."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components.core.data_config import IndexConfig, IngestConfig, SyntheticConfig  # noqa: E402

SEED = 5
WORLD = SyntheticConfig(entities=12, paraphrases=6, heldout_fraction=0.25, updates=0.75, context_share=0.3)


def build_world(root: Path) -> dict[str, Path]:
    """ingest's output of the tiny synthetic world under `root`, and a tokenizer as preprocess leaves one."""
    from _evaluate_fixtures import make_tokenizer

    from components.ingest import ingest

    raw, processed = root / "raw", root / "processed"
    (root / "sources").mkdir(parents=True, exist_ok=True)
    ingest(IngestConfig(synthetic=WORLD), raw, seed=SEED, sources_root=root / "sources", cache_dir=root / "dl")
    texts = [json.loads(line)["text"] for f in sorted((raw / "pretrain").glob("*.jsonl")) for line in f.open()]
    make_tokenizer(texts).save_pretrained(str(processed / "tokenizer"))
    return {"root": root, "raw": raw, "processed": processed, "sources": root / "sources"}


def build(world: dict[str, Path], out: Path, cache: Path | None = None, **settings: Any) -> dict[str, Any]:
    """The index of `world` into `out` with index settings `settings` (IndexConfig fields)."""
    from components.retrieval.build import build_index

    return build_index(
        IndexConfig(**settings),
        raw_dir=world["raw"],
        processed_dir=world["processed"],
        out_dir=out,
        world=WORLD,
        seed=SEED,
        sources_root=world["sources"],
        downloads_dir=world["root"] / "dl",
        cache_dir=cache or world["root"] / "embeddings",
    )


def answer_in(text: str, q: dict[str, Any]) -> bool:
    """Does a chunk state the question's answer (its entity and the answer value)?"""
    return bool(re.search(rf"\b{q['entity']}\b", text) and re.search(rf"\b{re.escape(q['value'])}\b", text))


def make_encoder(folder: Path, texts: list[str]) -> Path:
    """A 1-layer BERT with random weights and a word-level vocabulary of `texts`, saved like sentence-transformers
    saves a model (HF files at the root, mean pooling in 1_Pooling/config.json)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    conf = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(conf).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder
