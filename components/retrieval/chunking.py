"""Documents into chunks measured in the pipeline tokenizer's tokens.

A chunk packs whole sentences up to `size` tokens; consecutive chunks of a document share the trailing sentences
that fit in `overlap` tokens. A sentence longer than `size` is cut into token windows. Every chunk keeps its
source, its location (the document's location plus its character span) and the sha256 of its text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

BATCH_DOCS = 256
"""Documents tokenized per tokenizer call."""
_SENTENCE = re.compile(r"[^.!?\n]*(?:[.!?]+[\"')\]]*|\n+|$)\s*")


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    """Where it came from: a path, a url (credentials redacted), an hf dataset, `synthetic:news`, ..."""
    location: str
    """Where in the source: `file:line`, `row n`."""


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str
    location: str
    doc_hash: str
    """sha256 of the whole document's text (what incremental re-indexing compares)."""
    hash: str
    """sha256 of the chunk's text."""
    tokens: int


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`, each with its trailing whitespace; together they cover it."""
    spans = [(m.start(), m.end()) for m in _SENTENCE.finditer(text) if m.end() > m.start()]
    return spans or [(0, len(text))]


def _units(text: str, spans: list[tuple[int, int]], offsets: Sequence[tuple[int, int]], size: int) -> list[tuple]:
    """(start char, end char, tokens) per sentence; a sentence above `size` tokens becomes several windows."""
    ends = [end for _, end in spans]
    per: list[list[tuple[int, int]]] = [[] for _ in spans]
    k = 0
    for start, end in offsets:  # a token belongs to the sentence holding its last character
        while k < len(spans) - 1 and end - 1 >= ends[k]:
            k += 1
        per[k].append((start, end))
    units = []
    for (s0, s1), toks in zip(spans, per):
        cuts = _cuts(text, toks, size)
        for a, b in zip(cuts, cuts[1:]):
            units.append((s0 if a == 0 else toks[a][0], s1 if b == len(toks) else toks[b][0], b - a))
    return units


def _cuts(text: str, toks: Sequence[tuple[int, int]], size: int) -> list[int]:
    """Token indices cutting a sentence into pieces of at most `size` tokens, at word starts where possible."""
    cuts = [0]
    while len(toks) - cuts[-1] > size:
        first = cuts[-1]
        words = [c for c in range(first + size, first, -1) if _word_start(text, toks[c][0])]
        cuts.append(words[0] if words else first + size)
    return [*cuts, len(toks)]


def _word_start(text: str, pos: int) -> bool:
    return pos == 0 or text[pos].isspace() or text[pos - 1].isspace()


def windows(lengths: Sequence[int], size: int, overlap: int) -> list[tuple[int, int]]:
    """[first, last) unit ranges: units packed up to `size` tokens; the next range starts at the trailing units
    of this one that fit in `overlap` tokens (always moving forward)."""
    out: list[tuple[int, int]] = []
    i, n = 0, len(lengths)
    while i < n:
        j, total = i, 0
        while j < n and (j == i or total + lengths[j] <= size):
            total += lengths[j]
            j += 1
        out.append((i, j))
        if j >= n:
            break
        nxt, kept = j, 0
        while nxt - 1 > i and kept + lengths[nxt - 1] <= overlap:
            nxt -= 1
            kept += lengths[nxt]
        while nxt < j and kept + lengths[j] > size:  # the next chunk must reach past this one
            kept -= lengths[nxt]
            nxt += 1
        i = nxt
    return out


def chunk_document(doc: Document, offsets: Sequence[tuple[int, int]], size: int, overlap: int) -> list[Chunk]:
    """The chunks of one document, given its token offsets (characters) from the pipeline tokenizer."""
    text = doc.text
    units = _units(text, sentence_spans(text), offsets, size)
    doc_hash = sha256_text(text)
    chunks = []
    for first, last in windows([u[2] for u in units], size, overlap):
        start, end = units[first][0], units[last - 1][1]
        body = text[start:end].strip()
        if not body:
            continue
        lead = len(text[start:end]) - len(text[start:end].lstrip())
        span = f"chars {start + lead}-{start + lead + len(body)}"
        chunks.append(
            Chunk(
                text=body,
                source=doc.source,
                location=f"{doc.location}, {span}" if doc.location else span,
                doc_hash=doc_hash,
                hash=sha256_text(body),
                tokens=sum(u[2] for u in units[first:last]),
            )
        )
    return chunks


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) >= BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def token_offsets(tokenizer: Any, texts: list[str]) -> list[Sequence[tuple[int, int]]]:
    """Character spans of each text's tokens, from a `tokenizers.Tokenizer` or a transformers tokenizer."""
    if hasattr(tokenizer, "encode_batch"):
        return [e.offsets for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def chunk_documents(docs: Iterable[Document], tokenizer: Any, size: int, overlap: int) -> Iterator[Chunk]:
    """Chunks of every document (blank documents give none), tokenized in batches."""
    for batch in _batches(d for d in docs if d.text.strip()):
        for doc, offsets in zip(batch, token_offsets(tokenizer, [d.text for d in batch])):
            yield from chunk_document(doc, offsets, size, overlap)
