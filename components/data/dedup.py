"""De-duplication: content digests (exact de-dup and the stable split coordinate), MinHash + LSH band keys
for near-duplicates (`preprocess.dedup: near`), and the fixed-size filter that remembers the keys seen, all
in numpy: no extra dependency.

Memory is bounded independent of the corpus: keys go into a Bloom filter of `preprocess.dedup_mb` MiB (7
bits of one 64-bit word per key). Its price is a false-positive rate, reported with the outputs
(`dedup_false_positive_rate`): a new key taken for a seen one drops a document that was not a duplicate.
With 64 MiB the rate is 1.3e-7 after 1 million keys, 6e-5 after 10 million, 6e-4 after 20 million (double
the MiB per doubling of the keys to keep a rate); near de-dup adds one key per LSH band per document."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

NUM_PERM = 128
"""MinHash permutations per signature."""
SHINGLE = 5
"""Words per shingle."""


def digest_bytes(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def digest(text: str) -> int:
    return digest_bytes(text.encode("utf-8"))


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


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective scramble of 64-bit keys (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[documents, bands] 64-bit keys, one per LSH band of each signature (the band's index mixed in)."""
    sigs = np.atleast_2d(np.asarray(sigs, np.uint64))
    out = np.empty((len(sigs), bands), np.uint64)
    for i in range(bands):
        h = np.full(len(sigs), i + 1, np.uint64)
        for j in range(rows):
            h = _mix(h ^ sigs[:, i * rows + j])
        out[:, i] = h
    return out


# ---------------------------------------------------------------- the keys seen: a fixed-size filter
class SeenFilter:
    """A blocked Bloom filter of 64-bit keys in `mb` MiB: each key sets PROBES bits of one 64-bit word (one
    memory access per key). Memory is touched only as keys arrive."""

    PROBES = 7

    def __init__(self, mb: float) -> None:
        self.words = np.zeros(max(1, int(mb * 2**17)), np.uint64)
        self.n = 0

    def _where(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(word index, bit mask) of each key."""
        h = _mix(keys)
        mask = np.zeros(len(keys), np.uint64)
        for i in range(self.PROBES):
            mask |= np.left_shift(np.uint64(1), (h >> np.uint64(6 * i)) & np.uint64(63))
        return (keys % np.uint64(len(self.words))).astype(np.intp), mask

    def contains(self, keys: np.ndarray) -> np.ndarray:
        word, mask = self._where(np.asarray(keys, np.uint64))
        return (self.words[word] & mask) == mask

    def add(self, keys: np.ndarray) -> None:
        word, mask = self._where(np.asarray(keys, np.uint64))
        self.n += len(word)
        while len(word):  # keys sharing a word: one write wins per round, the others go again
            self.words[word] |= mask
            lost = (self.words[word] & mask) != mask
            word, mask = word[lost], mask[lost]

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Which keys are new, in order (a repeat within `keys` is not); adds them. As if one by one."""
        keys = np.asarray(keys, np.uint64)
        new = np.zeros(len(keys), bool)
        if len(keys):
            first = np.unique(keys, return_index=True)[1]
            first = first[~self.contains(keys[first])]
            new[first] = True
            self.add(keys[first])
        return new

    def add_unmatched(self, keys: np.ndarray) -> np.ndarray:
        """For [documents, bands] keys: which documents share no key with an earlier kept one (seen before, or
        kept earlier in `keys`); adds the keys of those. As if document by document."""
        if not len(keys):
            return np.zeros(0, bool)
        keys = np.asarray(keys, np.uint64).reshape(len(keys), -1)
        keep = ~self.contains(keys.ravel()).reshape(keys.shape).any(axis=1)
        rest = np.flatnonzero(keep)
        flat = keys[rest].ravel()
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        shared = (counts[inverse] > 1).reshape(len(rest), -1)
        taken: set[int] = set()
        for i in np.flatnonzero(shared.any(axis=1)):  # only documents that share a key need an order
            mine = {int(k) for k in keys[rest[i]][shared[i]]}
            if taken.isdisjoint(mine):
                taken |= mine
            else:
                keep[rest[i]] = False
        self.add(keys[keep].ravel())
        return keep

    def false_positive_rate(self) -> float:
        """Chance that a new key is taken for a seen one, after the keys added so far (the load of a word is
        Poisson; a word holding j keys has each bit set with probability 1 - (63/64)^(PROBES j))."""
        load = self.n / len(self.words)
        j = np.arange(int(load + 12 * load**0.5 + 30))
        log_pois = -load + j * np.log(max(load, 1e-300)) - np.cumsum(np.log(np.maximum(j, 1)))
        return float(np.sum(np.exp(log_pois) * (1 - (63 / 64) ** (self.PROBES * j)) ** self.PROBES))
