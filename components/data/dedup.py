"""De-duplication keys: content digests (exact de-dup and the stable split coordinate) and MinHash + LSH
signatures for near-duplicates (`preprocess.dedup: near`), in numpy: no extra dependency."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

NUM_PERM = 128
"""MinHash permutations per signature."""
SHINGLE = 5
"""Words per shingle."""


def digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def unit(value: int) -> float:
    """A content hash as a number in [0, 1): the split coordinate (stable as the corpus grows)."""
    return value / 2.0**64


# ---------------------------------------------------------------- near de-dup (MinHash + LSH)
def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) minimizing false positives + false negatives around `threshold`."""
    s = np.linspace(0.0, 1.0, 401)
    best, pick = float("inf"), (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - s**r) ** b  # probability that two docs of similarity s share a band
            fp, fn = np.where(s <= threshold, p, 0), np.where(s >= threshold, 1 - p, 0)
            err = np.trapezoid(fp, s) + np.trapezoid(fn, s)
            if err < best:
                best, pick = err, (b, r)
    return pick


def perms(seed: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.random.default_rng(seed).integers(0, 2**64 - 1, (2, NUM_PERM), np.uint64, endpoint=True)
    return a | np.uint64(1), b


def minhash(text: str, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """MinHash signature over word 5-gram shingles (a shorter text is one shingle).

    Shingle hashes are 32-bit; each permutation is a multiply-add-shift hash (a*x + b mod 2^64) >> 32.
    """
    words = text.split() or [""]
    w = np.fromiter((zlib.crc32(x.encode("utf-8")) for x in words), np.uint64, len(words))
    k = min(SHINGLE, len(w))
    n = len(w) - k + 1
    h = np.zeros(n, np.uint64)
    for j in range(k):  # polynomial hash of the k words of each shingle (wraps mod 2^64)
        h = h * np.uint64(0x9E3779B97F4A7C15) + w[j : j + n]
    h = (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    a, b = perms
    sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
    for i in range(0, n, 2048):  # bounded temporaries for long documents
        sig = np.minimum(sig, ((h[i : i + 2048, None] * a + b) >> np.uint64(32)).min(axis=0))
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> set[int]:
    return {digest(f"{i}:{sig[i * rows : (i + 1) * rows].tobytes().hex()}") for i in range(bands)}
