"""Dense embeddings from a local encoder folder (sentence-transformers or plain HF), with no download.

A sentence-transformers folder keeps the HF model at its root and its pooling in `1_Pooling/config.json`;
CLS pooling is used when that file asks for it, mean pooling otherwise. Vectors are L2-normalized (cosine).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.core.context import StageError
from components.core.io import sha256_file

WEIGHTS = ("*.safetensors", "pytorch_model.bin")
MAX_TOKENS = 512


def encoder_hash(folder: Path) -> str:
    """sha256 over the encoder's config, tokenizer, pooling and weights files (what its vectors depend on)."""
    import hashlib

    root = Path(folder)
    h = hashlib.sha256()
    names = ("*.json", "*.txt", "*.model", *WEIGHTS, "1_Pooling/*.json")
    for p in sorted({p for pattern in names for p in root.glob(pattern) if p.is_file()}):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def check_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not (path / "config.json").is_file() or not any(any(path.glob(w)) for w in WEIGHTS):
        raise StageError(
            f"index.embedding_model: {folder} is not an encoder folder (config.json and *.safetensors or "
            "pytorch_model.bin); point it at a local sentence-transformers or HF encoder folder, or set it to null"
        )
    return path


class Encoder:
    """Texts -> normalized float32 vectors (one row each)."""

    def __init__(self, folder: str | Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder = check_folder(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.folder), local_files_only=True, dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise StageError(f"index.embedding_model: cannot load {folder} ({e}); check the folder") from None
        pooling = self.folder / "1_Pooling" / "config.json"
        conf = json.loads(pooling.read_text(encoding="utf-8")) if pooling.is_file() else {}
        self.cls = bool(conf.get("pooling_mode_cls_token")) and not conf.get("pooling_mode_mean_tokens")
        limit = getattr(self.model.config, "max_position_embeddings", None) or MAX_TOKENS
        self.max_tokens = min(int(limit), MAX_TOKENS, int(getattr(self.tokenizer, "model_max_length", MAX_TOKENS)))
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[i : i + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                if self.cls:
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[i : i + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out
