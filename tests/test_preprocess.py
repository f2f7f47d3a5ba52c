"""preprocess.py on tiny real inputs written in the ingest contract's format."""

from __future__ import annotations

import json
import os
import random
import tracemalloc
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components import preprocess as pp
from components.core.context import StageContext, StageError
from components.core.data_config import PreprocessConfig
from components.core.io import read_json, write_json, write_meta
from components.data import chat, dedup, shards

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "kappa",
    "lambda",
    "sigma",
    "omega",
    "river",
    "stone",
    "cloud",
    "lamp",
    "bread",
    "piano",
    "green",
    "north",
    "quiet",
    "seven",
    "market",
    "winter",
    "garden",
    "copper",
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def corpus(n: int, seed: int = 0, words: tuple[int, int] = (10, 60)) -> list[str]:
    rng = random.Random(seed)
    return [f"Doc {seed}-{i}: " + sentence(rng, rng.randint(*words)) for i in range(n)]


def qa_rows(n: int, split: str | None = None, offset: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is item {i}?"},
                {"role": "assistant", "content": f"Item {i} is {WORDS[i % len(WORDS)]}."},
            ],
            "split": split,
            "task": "qa" if i % 2 else None,
        }
        for i in range(offset, offset + n)
    ]


def write_raw(root: Path, docs: list[str], rows: list[dict], shards: int = 2) -> Path:
    raw = root / "raw"
    for kind, items in (("pretrain", [{"text": d} for d in docs]), ("sft", rows)):
        (raw / kind).mkdir(parents=True)
        step = -(-len(items) // shards)  # contiguous pieces: file order = list order
        for s in range(shards):
            with open(raw / kind / f"shard-{s:05d}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(x) + "\n" for x in items[s * step : (s + 1) * step])
    write_json(raw / "manifest.json", {"pretrain": [], "sft": []})
    write_meta(raw, "ingest", {}, {"pretrain_rows": len(docs), "sft_rows": len(rows)})
    return raw


def run(root: Path, raw: Path, name: str = "out", init_from: Path | None = None, **cfg) -> tuple[Path, dict]:
    cfg = PreprocessConfig(**{"vocab_size": 400, "max_chars": 2000, **cfg})
    out = root / name
    res = pp.preprocess(
        cfg, raw, out, root / f"{name}.json", seed=7, init_from=init_from, ctx=StageContext(progress=False)
    )
    return out, res


def load_tok(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)


def decode_bin(out: Path, split: str) -> list[str]:
    meta = read_json(out / "seedlm.json")["result"]
    tok = load_tok(out)
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    assert len(ids) and ids[-1] == meta["eos_id"]
    cuts = np.flatnonzero(ids == meta["eos_id"])
    return [tok.decode(d) for d in np.split(ids, cuts + 1)[:-1] for d in [d[:-1].tolist()]]


def load_split(out: Path, split: str):
    import datasets

    return datasets.load_from_disk(str(out / f"sft_{split}"))


# ---------------------------------------------------------------- the main fixture
SPECIAL_DOC = "A doc that mentions <|endoftext|> and <|end|> as plain text."
MESSY = [
    "Ｆｕｌｌｗｉｄｔｈ ﬁne text\r\nwith   many    spaces\x00\x07 and\r\n\r\n\r\n\r\nblank lines.   ",
    "Tabs\tstay,\u00a0nbsp\u2003goes;\u2028line\u2029breaks\x0bunify.\ufeff",
]
BASE_DOCS = corpus(240)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("main")
    docs = (
        BASE_DOCS[:120]
        + MESSY
        + [BASE_DOCS[3], "  " + BASE_DOCS[4].replace(" ", "  ") + "\r\n", "", " \n\t ", "tiny", "x" * 2500, SPECIAL_DOC]
        + BASE_DOCS[120:]
    )
    multi = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Green."},
        ],
        "split": "train",
        "task": "chat",
    }
    bad = [
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " \x00 "}]},
        {"messages": [{"role": "user", "content": "No answer"}]},
        {"messages": [{"role": "user", "content": "say <|end|>"}, {"role": "assistant", "content": "no"}]},
    ]
    rows = qa_rows(80) + qa_rows(6, split="test", offset=500) + [multi, qa_rows(1)[0]] + bad
    raw = write_raw(root, docs, rows)
    out, res = run(root, raw)
    return {"root": root, "raw": raw, "out": out, "res": res, "docs": docs, "rows": rows}


def expected_docs(docs: list[str], cfg: PreprocessConfig) -> list[str]:
    seen, keep = set(), []
    for d in docs:
        c = pp.clean_text(d, cfg.normalization)
        if cfg.min_chars <= len(c) <= cfg.max_chars and c not in seen:
            seen.add(c)
            keep.append(c)
    return keep


def test_outputs_meta_and_metrics(main_run):
    out, res = main_run["out"], main_run["res"]
    assert sorted(os.listdir(out)) == [
        "seedlm.json",
        "sft_test",
        "sft_train",
        "sft_val",
        "tokenizer",
        "train.bin",
        "val.bin",
    ]
    assert not [p for p in os.listdir(out.parent) if p.startswith(".out")]  # no temp leftovers
    meta = read_json(out / "seedlm.json")
    assert meta["stage"] == "preprocess" and meta["config"]["preprocess"]["vocab_size"] == 400
    r = meta["result"]
    assert (r["dtype"], r["eos_id"], r["pad_id"], r["vocab_size"]) == ("uint16", 0, 1, 400)
    assert r["train_tokens"] == os.path.getsize(out / "train.bin") // 2
    assert r["val_tokens"] == os.path.getsize(out / "val.bin") // 2
    assert read_json(main_run["root"] / "out.json") == r["report"]
    assert res["artifacts"] == [str(main_run["root"] / "out.json")]


def test_report_counts_add_up(main_run):
    rep = main_run["res"]["report"]
    p, s = rep["pretrain"], rep["sft"]
    assert p["docs_in"] == len(main_run["docs"]) == p["kept"] + sum(p["dropped"].values())
    assert p["dropped"] == {"duplicate": 2, "empty": 2, "too_short": 1, "too_long": 1}
    assert p["kept"] == p["train_docs"] + p["val_docs"] and p["val_docs"] >= 1
    assert p["train_tokens"] + p["val_tokens"] == round(p["tokens_per_doc"]["mean"] * p["kept"]) + p["kept"]
    assert p["tokens_per_doc"]["p50"] <= p["tokens_per_doc"]["p95"] <= p["tokens_per_doc"]["max"]
    assert s["rows_in"] == len(main_run["rows"]) == s["kept"] + sum(s["dropped"].values())
    assert s["dropped"] == {"duplicate": 1, "empty": 1, "no_final_assistant": 1, "special_token_text": 1}
    assert s["kept"] == s["train"] + s["val"] + s["test"] and min(s["train"], s["val"], s["test"]) >= 1
    t = rep["tokenizer"]
    assert {k: t[k] for k in ("vocab_size", "trained", "tokens_added")} == {
        "vocab_size": 400,
        "trained": True,
        "tokens_added": 0,
    }
    assert t["sample_docs"] == p["train_docs"] and 0 < t["sample_mb"] < 1  # the sample is the whole train split
    assert p["dedup"]["filter_mb"] == 64 and 0 <= p["dedup"]["exact_false_positive_rate"] < 1e-9


def test_bins_decode_back_to_the_cleaned_deduplicated_docs(main_run):
    out = main_run["out"]
    train, val = decode_bin(out, "train"), decode_bin(out, "val")
    want = expected_docs(main_run["docs"], PreprocessConfig(max_chars=2000))
    assert sorted(train + val) == sorted(want)
    assert train == [d for d in want if d in set(train)]  # corpus order kept within a split
    assert SPECIAL_DOC in train + val  # special-token strings inside a doc stay text
    assert pp.clean_text(MESSY[0]) == "Fullwidth fine text\nwith many spaces and\n\nblank lines."
    assert pp.clean_text(MESSY[1]) == "Tabs\tstay, nbsp goes;\nline\nbreaks\nunify."


def test_split_is_by_content_hash(main_run):
    out = main_run["out"]
    val, train = decode_bin(out, "val"), decode_bin(out, "train")
    assert all(dedup.unit(dedup.digest(d)) < 0.05 for d in val)
    assert all(dedup.unit(dedup.digest(d)) >= 0.05 for d in train)


def test_split_is_stable_as_the_corpus_grows(tmp_path, main_run):
    """Hash-assigned docs/rows never move (the empty-split fallback aside, which these sizes avoid)."""
    small = write_raw(tmp_path / "a", BASE_DOCS[:150], qa_rows(200))
    grown = write_raw(
        tmp_path / "b",
        corpus(150, seed=1)[:75] + BASE_DOCS[:150] + corpus(150, seed=1)[75:],
        qa_rows(100, offset=1000) + qa_rows(200),
    )
    out_a, _ = run(tmp_path, small, "a_out")
    out_b, _ = run(tmp_path, grown, "b_out")
    old = set(decode_bin(out_a, "val"))
    assert old and old == set(decode_bin(out_b, "val")) & set(BASE_DOCS)
    assert set(decode_bin(out_a, "train")) <= set(decode_bin(out_b, "train"))
    for split in ("train", "val", "test"):
        before = {r for r in load_split(out_a, split)["reference"]}
        assert before <= set(load_split(out_b, split)["reference"])
    run(tmp_path, small, "a_again")  # and deterministic: the same input gives the same bytes
    assert (tmp_path / "a_out" / "val.bin").read_bytes() == (tmp_path / "a_again" / "val.bin").read_bytes()


def test_tokenizer_round_trip_and_special_ids(main_run):
    tok = load_tok(main_run["out"])
    assert tok.convert_tokens_to_ids(list(chat.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert tok.chat_template == chat.CHAT_TEMPLATE and len(tok) == 400
    for text in ("Doc 9-9: alpha river.", "Ünïcödé 😀 never seen ☃", "tabs\tand\nnewlines  x"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok("alpha beta gamma", add_special_tokens=False)["input_ids"]) < 6  # merges were learned


def test_sft_datasets_columns_ids_and_masks(main_run):
    out = main_run["out"]
    tok = load_tok(out)
    seen_refs = []
    for split in ("train", "val", "test"):
        ds = load_split(out, split)
        assert ds.column_names == ["input_ids", "labels", "prompt", "reference", "task"]
        for row in ds:
            msgs = json.loads(row["prompt"]) + [{"role": "assistant", "content": row["reference"]}]
            assert row["input_ids"] == chat.chat_ids(tok, msgs)
            kept = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
            want = "".join(m["content"] + chat.END_TOKEN for m in msgs if m["role"] == "assistant")
            assert kept == want
            seen_refs.append((split, row["reference"], row["task"]))
    assert ("train", "Green.", "chat") in seen_refs  # explicit split honoured, multi-turn kept
    assert {r for s, r, _ in seen_refs if s == "test"} >= {
        f"Item {i} is {WORDS[i % len(WORDS)]}." for i in range(500, 506)
    }
    assert {t for _, _, t in seen_refs} == {"qa", "", "chat"}
    total = sum(len(load_split(out, s)) for s in ("train", "val", "test"))
    rep = main_run["res"]["report"]["sft"]
    assert total == rep["kept"] and rep["response_tokens"] < rep["tokens"]


def test_sft_val_is_carved_from_train_when_rows_all_say_train(tmp_path):
    raw = write_raw(tmp_path, BASE_DOCS[:40], qa_rows(200, split="train") + qa_rows(20, "test", offset=900))
    out, res = run(tmp_path, raw, vocab_size=300)
    assert (res["sft_test"], res["sft_train"] + res["sft_val"]) == (20, 200)
    assert 2 <= res["sft_val"] <= 25  # ~ val_fraction of the train rows, not one row, not the test zone
    train_refs = set(load_split(out, "train")["reference"])
    assert not train_refs & set(load_split(out, "val")["reference"])


def test_near_duplicates(tmp_path):
    rng = random.Random(3)
    base = [sentence(rng, 120) for _ in range(30)]
    near = []
    for d in base[:10]:  # change one word of ~120: word-5-gram Jaccard ~0.92
        w = d.split()
        w[60] = "CHANGED"
        near.append(" ".join(w))
    perms = dedup.perms(0)
    a, b = dedup.minhash(base[0], perms), dedup.minhash(near[0], perms)
    assert 0.8 < np.mean(a == b) < 1.0
    assert np.mean(dedup.minhash(base[0], perms) == dedup.minhash(base[1], perms)) < 0.1
    bands, rows = dedup.lsh_params(0.85)
    assert bands * rows <= dedup.NUM_PERM and 0.75 < (1 / bands) ** (1 / rows) < 0.95
    raw = write_raw(tmp_path, base + near + [base[5]], qa_rows(10))
    _, res = run(tmp_path, raw, "near", dedup="near", vocab_size=300)
    assert res["report"]["pretrain"]["dropped"] == {"duplicate": 1, "near_duplicate": 10}
    _, res = run(tmp_path, raw, "exact", dedup="exact", vocab_size=300)
    assert res["report"]["pretrain"]["dropped"] == {"duplicate": 1}
    _, res = run(tmp_path, raw, "none", dedup="none", vocab_size=300)
    assert res["report"]["pretrain"]["dropped"] == {} and res["report"]["pretrain"]["kept"] == 41


def test_empty_val_takes_the_nearest_train_doc(tmp_path):
    docs = [d for d in BASE_DOCS if dedup.unit(dedup.digest(d)) >= 0.01][:3]
    _, res = run(tmp_path, write_raw(tmp_path, docs, qa_rows(5)), val_fraction=0.01, vocab_size=300)
    p = res["report"]["pretrain"]
    assert (p["train_docs"], p["val_docs"]) == (2, 1)
    nearest = min(docs, key=lambda d: dedup.unit(dedup.digest(d)))
    assert decode_bin(tmp_path / "out", "val") == [nearest]


def test_too_small_corpus_is_a_clear_error(tmp_path):
    raw = write_raw(tmp_path, ["only one document here", "tiny"], qa_rows(5), shards=1)
    with pytest.raises(StageError, match="pretrain_sources.*min_chars"):
        run(tmp_path, raw)


def test_input_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(StageError, match="ingest"):
        run(tmp_path, tmp_path / "nowhere")
    (tmp_path / "notraw").mkdir()
    with pytest.raises(StageError, match="seedlm.json.*ingest"):
        run(tmp_path, tmp_path / "notraw")
    raw = write_raw(tmp_path, BASE_DOCS[:20], qa_rows(5), shards=1)
    with pytest.raises(StageError, match="model.init_from"):
        run(tmp_path, raw, init_from=tmp_path / "notraw")
    with pytest.raises(StageError, match="preprocess.vocab_size"):
        run(tmp_path, raw, vocab_size=100)
    out, _ = run(tmp_path, raw, vocab_size=300)  # a good output, then failures must not touch it
    before = (out / "train.bin").read_bytes()
    with open(raw / "sft" / "shard-00000.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(StageError, match=r"sft/shard-00000.jsonl:6: .*unknown|sft/shard-00000.jsonl:6: .*role"):
        run(tmp_path, raw, vocab_size=300)
    with open(raw / "pretrain" / "shard-00000.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(StageError, match=r"pretrain/shard-00000.jsonl:21: not valid JSON"):
        run(tmp_path, raw, vocab_size=300)
    assert (out / "train.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_init_from_base_tokenizer_gets_chat_tokens(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        corpus(50, seed=9),
        trainers.BpeTrainer(
            vocab_size=350, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    base = tmp_path / "base"
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>").save_pretrained(str(base))
    raw = write_raw(tmp_path, BASE_DOCS[:60], qa_rows(30))
    out, res = run(tmp_path, raw, init_from=base)
    tok = load_tok(out)
    assert res["report"]["tokenizer"] == {
        "vocab_size": 354,
        "trained": False,
        "tokens_added": 4,
        "sample_mb": 0.0,
        "sample_docs": 0,
    }
    assert (res["vocab_size"], res["eos_id"], res["pad_id"]) == (354, 0, None)  # no pad added: padding uses eos
    assert tok.chat_template == chat.CHAT_TEMPLATE
    assert all(tok.convert_tokens_to_ids(s) is not None for s in chat.SPECIAL_TOKENS if s != chat.PAD_TOKEN)
    assert sorted(decode_bin(out, "train") + decode_bin(out, "val")) == sorted(BASE_DOCS[:60])
    row = load_split(out, "train")[0]
    msgs = json.loads(row["prompt"]) + [{"role": "assistant", "content": row["reference"]}]
    assert row["input_ids"] == chat.chat_ids(tok, msgs)
    assert read_json(out / "seedlm.json")["inputs"]["init_from"] == str(base)


def test_memory_stays_flat_as_the_corpus_grows(tmp_path, monkeypatch):
    """Peak Python memory is set by the piece, the batch, the filters and the tokenizer's sample, not the
    corpus: 4x the text, about the same peak."""
    monkeypatch.setattr(shards, "BATCH_DOCS", 200)
    monkeypatch.setattr(shards, "BATCH_CHARS", 100_000)
    small = {"vocab_size": 300, "chunk_mb": 0.25, "tokenizer_sample_mb": 0.5, "dedup_mb": 1}
    peaks = []
    run(tmp_path, write_raw(tmp_path / "warm", corpus(50), qa_rows(10)), "warm", **small)  # imports
    for n in (600, 2400):
        raw = write_raw(tmp_path / str(n), corpus(n, seed=n, words=(150, 250)), qa_rows(10))
        tracemalloc.start()
        try:
            run(tmp_path, raw, f"m{n}", **small)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    size = [sum(f.stat().st_size for f in (tmp_path / str(n) / "raw" / "pretrain").iterdir()) for n in (600, 2400)]
    assert size[1] - size[0] > 2_000_000
    assert peaks[1] - peaks[0] < 0.2 * (size[1] - size[0]), (peaks, size)  # holding the docs would add > 100%


# ---------------------------------------------------------------- cleaning rules
@settings(max_examples=300, deadline=None)
@given(
    st.text(st.characters(blacklist_categories=()), max_size=80)  # lone surrogates too: JSON can carry them
    | st.text(" \t\n\r\x0b\x0c\x85\u2028\u00a0\ufeffab\u0301e\ufb01", max_size=40),
    st.sampled_from(["NFKC", "NFC", "none"]),
)
def test_clean_text_properties(text, form):
    out = pp.clean_text(text, form)
    assert pp.clean_text(out, form) == out  # idempotent
    assert not any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t" for c in out)
    out.encode("utf-8")  # always writable
    assert "\r" not in out and "  " not in out and "\n\n\n" not in out and " \n" not in out
    assert out == out.strip()
    if form != "none":
        assert unicodedata.is_normalized(form, out)


def test_clean_text_examples():
    assert pp.clean_text("ﬁ Ａ ²", "NFKC") == "fi A 2"
    assert pp.clean_text("ﬁ Ａ", "NFC") == "ﬁ Ａ"
    assert pp.clean_text("e\u0301", "NFC") == "\u00e9" and pp.clean_text("e\u0301", "none") == "e\u0301"
    assert pp.clean_text("a\x00b\x1bc\x7fd\u200be") == "abcd\u200be"  # zero-width space is not a control char
    assert pp.clean_text(" a \r\n\r\n\r\n  b \n") == "a\n\n b"  # one space of indentation stays
