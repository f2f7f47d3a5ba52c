"""Chunking by tokens with overlap: whole sentences, every chunk within the size, consecutive chunks sharing at
most `overlap` tokens, every chunk with its source, location and hash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.retrieval.chunking import (
    Document,
    chunk_document,
    chunk_documents,
    sentence_spans,
    sha256_text,
    windows,
)

TEXT = (
    "Zorb lives in Holm. Zorb plays the harp! Is Zorb a baker? Yes, by trade Zorb is a baker.\n"
    "The river runs past the market square. Zorb keeps a goat as a pet."
)


def word_tokenizer():
    """A real `tokenizers` tokenizer with a token per word and per punctuation mark (easy to count by eye)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.replace("\n", " ").replace(".", " ").replace("!", " ").replace("?", " ").split()))
    vocab = {w: i for i, w in enumerate(["[UNK]", ".", "!", "?", ",", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return tok


@given(st.text(alphabet="ab .!?\n", max_size=80))
@settings(max_examples=200, deadline=None)
def test_sentence_spans_cover_the_text(text):
    spans = sentence_spans(text)
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(a < b for a, b in spans) or text == ""


@given(st.lists(st.integers(1, 30), min_size=1, max_size=40), st.integers(1, 40), st.integers(0, 39))
@settings(max_examples=300, deadline=None)
def test_windows_pack_units_with_overlap(lengths, size, overlap):
    overlap = min(overlap, size - 1)
    wins = windows(lengths, size, overlap)
    assert wins[0][0] == 0 and wins[-1][1] == len(lengths)
    for a, b in wins:
        assert a < b and (b - a == 1 or sum(lengths[a:b]) <= size)
    for (a1, b1), (a2, b2) in zip(wins, wins[1:]):
        assert a1 < a2 <= b1 and b1 < b2  # always forward, no gap
        assert sum(lengths[a2:b1]) <= overlap  # what two chunks share fits the overlap


def test_chunks_are_whole_sentences_within_size_with_overlap():
    tok = word_tokenizer()
    doc = Document(TEXT, "notes.txt", "notes.txt:1")
    offsets = tok.encode(TEXT, add_special_tokens=False).offsets
    chunks = chunk_document(doc, offsets, size=12, overlap=6)
    assert len(chunks) >= 3
    for c in chunks:
        n = len(tok.encode(c.text, add_special_tokens=False).ids)
        assert n == c.tokens <= 12
        assert c.text[-1] in ".!?" and c.text[0].isupper()  # sentence boundaries
        a, b = (int(x) for x in c.location.rsplit("chars ", 1)[1].split("-"))
        assert TEXT[a:b] == c.text and c.location.startswith("notes.txt:1, chars ")
        assert c.source == "notes.txt" and c.hash == sha256_text(c.text) and c.doc_hash == sha256_text(TEXT)
    spans = [tuple(int(x) for x in c.location.rsplit("chars ", 1)[1].split("-")) for c in chunks]
    shared = [TEXT[b0:a1] for (a0, a1), (b0, b1) in zip(spans, spans[1:]) if b0 < a1]
    assert shared and all(len(tok.encode(t).ids) <= 6 for t in shared)  # overlaps: whole sentences, <= 6 tokens
    assert all(t.strip()[-1] in ".!?" for t in shared)
    assert spans[0][0] == 0 and spans[-1][1] == len(TEXT)
    assert all(b0 <= a1 + 1 for (a0, a1), (b0, b1) in zip(spans, spans[1:]))  # no gap (but the newline)


def test_a_sentence_longer_than_a_chunk_is_cut_into_token_windows():
    tok = word_tokenizer()
    long = "Zorb " * 30 + "lives in Holm."
    doc = Document(long, "s", "")
    chunks = chunk_document(doc, tok.encode(long).offsets, size=8, overlap=2)
    assert all(c.tokens <= 8 for c in chunks) and len(chunks) >= 4
    assert chunks[0].location.startswith("chars 0-")


@pytest.mark.parametrize("size,overlap", [(16, 0), (16, 8), (64, 16)])
def test_chunk_documents_with_the_pipeline_tokenizer(world, size, overlap):
    from components.retrieval.build import load_tokenizer
    from components.retrieval.documents import ingested

    tok = load_tokenizer(world["processed"])
    docs = list(ingested(world["raw"]))[:6]
    chunks = list(chunk_documents([*docs, Document("   ", "blank", "")], tok, size, overlap))
    assert {c.source for c in chunks} == {"ingest:synthetic"}  # a blank document gives no chunk
    assert all(c.tokens <= size for c in chunks)
    words = {w for d in docs for w in d.text.split()}
    assert words == {w for c in chunks for w in c.text.split()}  # nothing lost
