"""preprocess: raw shards -> clean, de-duplicated, split text; a tokenizer; packed token files; SFT examples.

Pretraining text is processed in pieces of ingest's shards (components/data/corpus.py): cleaned and keyed,
de-duplicated against fixed-size filters, tokenized in batches by the tokenizers library, and written by
streaming, on `preprocess.workers` processes or a Dask cluster (`preprocess.engine`). Memory holds a few
pieces and the filters, never the corpus; the outputs are the same for any number of workers. The tokenizer
learns from the first `preprocess.tokenizer_sample_mb` of the train split. Work files live in the output's
temp folder and are deleted before it is swapped in.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Container, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from components.core.config import Params
from components.core.context import StageContext, StageError
from components.core.data_config import PreprocessConfig
from components.core.hub import resolve
from components.core.io import atomic_dir, read_meta, sha256_file, write_json, write_meta
from components.data import chat, conversations, dedup, templates
from components.data import corpus as pretrain_text
from components.data.clean import clean_text
from components.data.engine import Runner

__all__ = ["clean_text", "preprocess", "run", "train_tokenizer", "load_base_tokenizer"]
_RERUN = pretrain_text.RERUN
_SPECIAL = re.compile("|".join(map(re.escape, chat.SPECIAL_TOKENS)))


# ---------------------------------------------------------------- reading
def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise StageError(f"{path}:{n}: not valid JSON ({e.msg}); {_RERUN}") from None


def _shards(raw_dir: Path, kind: str) -> list[Path]:
    shards = sorted((raw_dir / kind).glob("shard-*.jsonl"))
    if not shards:
        raise StageError(f"{raw_dir / kind}: no shard-*.jsonl files; {_RERUN}")
    return shards


def _lines(path: Path, skip: Container[int] = (), extra: Iterable[Any] = ()) -> Iterator[Any]:
    """Read a work file of JSON lines, leaving out the lines in `skip` and appending `extra`."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i not in skip:
                yield json.loads(line)
    yield from extra


# ---------------------------------------------------------------- SFT rows
def _is_tool(m: Any) -> bool:
    return isinstance(m, dict) and m.get("role") == conversations.TOOL


def _renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template SFT will use (a base tokenizer's, else seedlm's) renders tool messages; if not,
    rows holding them are dropped and counted (`dropped.tool_messages`)."""
    source = templates.template(tokenizer) if tokenizer is not None else None
    return conversations.template_renders(source or chat.CHAT_TEMPLATE, conversations.TOOL)


def _check_sft_row(row: Any, where: str) -> list[dict]:
    msgs = row.get("messages") if isinstance(row, dict) else None
    problem = None if isinstance(msgs, list) and msgs else "messages must be a non-empty list"
    try:  # tool messages: checked against the template in _clean_sft
        chat.render([m for m in msgs if not _is_tool(m)] if problem is None else [])
    except ValueError as e:
        problem = str(e)
    if problem is None and row.get("split") not in (None, "train", "val", "test"):
        problem = f"split {row.get('split')!r} is not train/val/test/null"
    if problem is None and not isinstance(row.get("task"), (str, type(None))):
        problem = "task must be a string or null"
    if problem:
        raise StageError(f"{where}: {problem}; {_RERUN}")
    return msgs


def _clean_sft(
    cfg: PreprocessConfig,
    shards: list[Path],
    work: Path,
    progress: bool,
    special: re.Pattern = _SPECIAL,
    *,
    tools: bool = False,
) -> dict:
    """Clean, de-dup and split instruction rows into work/sft_{train,val,test}.jsonl. Rows whose text holds a
    control token of the chat format (`special`) are dropped: they would turn into format tokens."""
    dropped: Counter[str] = Counter()
    seen: set[int] = set()
    count = {"train": 0, "val": 0, "test": 0}
    edge: tuple[float, int, dict] | None = None  # the train row nearest the val line
    spare: list[tuple[float, int, dict]] = []  # train rows that would be val by hash: moved if val is empty
    files = {s: open(work / f"sft_{s}.jsonl", "w", encoding="utf-8") for s in count}
    n_in, t = 0, cfg.sft_test_fraction
    try:
        for shard in shards:
            for n, row in tqdm(_read_jsonl(shard), desc=f"sft {shard.name}", unit="row", disable=not progress):
                n_in += 1
                msgs = _check_sft_row(row, f"{shard}:{n}")
                msgs = [{"role": m["role"], "content": clean_text(m["content"], cfg.normalization)} for m in msgs]
                key = dedup.digest(json.dumps(msgs))
                reason = (
                    "empty"
                    if any(not m["content"] for m in msgs)
                    else "tool_messages"
                    if not tools and any(map(_is_tool, msgs))
                    else "no_final_assistant"
                    if msgs[-1]["role"] != "assistant"
                    else "no_prompt"
                    if len(msgs) < 2  # a reply to nothing: no prompt to evaluate it on
                    else "special_token_text"
                    if any(special.search(m["content"]) for m in msgs)
                    else "duplicate"
                    if key in seen
                    else None
                )
                if reason:
                    dropped[reason] += 1
                    continue
                seen.add(key)
                u = dedup.unit(dedup.digest(json.dumps(msgs[:-1])))  # by prompt: one question never spans two splits
                v = ((u - t) % 1.0) / (1 - t)  # the val coordinate; >= 1 in the test zone
                split = row.get("split") or ("test" if u < t else "val" if v < cfg.val_fraction else "train")
                rec = {"messages": msgs, "task": row.get("task") or ""}
                if split == "train":
                    edge = (v, count[split], rec) if edge is None or v < edge[0] else edge
                    spare += [(v, count[split], rec)] if v < cfg.val_fraction else []
                files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
                count[split] += 1
    finally:
        for f in files.values():
            f.close()
    moves = {s: ((), []) for s in count}
    if count["val"] == 0 and count["train"] >= 2:  # e.g. every row says `split: train`: carve val by hash
        pick = spare if 0 < len(spare) < count["train"] else [edge]
        moves["train"], moves["val"] = ({i for _, i, _ in pick}, []), ((), [r for _, _, r in pick])
        count["train"], count["val"] = count["train"] - len(pick), len(pick)
    if count["train"] == 0:
        raise StageError(
            f"{shards[0].parent}: no instruction rows left for training (of {n_in}; dropped "
            f"{dict(dropped)}); add rows to ingest.sft_sources"
        )
    return {"rows_in": n_in, "kept": sum(count.values()), "dropped": dict(dropped), **count, "moves": moves}


def _sft_rows(path: str, skip: Container[int], extra: Iterable[dict], tokenizer: Any) -> Iterator[dict]:
    for rec in _lines(Path(path), skip, extra):
        msgs = rec["messages"]
        ids, labels = chat.encode_chat(tokenizer, msgs)
        yield {
            "input_ids": ids,
            "labels": labels,
            "prompt": json.dumps(msgs[:-1], ensure_ascii=False),
            "reference": msgs[-1]["content"],
            "task": rec["task"],
        }


def _save_sft(work: Path, out: Path, sft: dict, tokenizer: Any, progress: bool) -> dict:
    """Encode each split with chat.encode_chat into a `datasets` folder; returns token counts."""
    import datasets
    import pyarrow.compute as pc

    feats = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "prompt": datasets.Value("string"),
            "reference": datasets.Value("string"),
            "task": datasets.Value("string"),
        }
    )
    was_off = datasets.utils.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    tokens = response = 0
    try:
        for split in ("train", "val", "test"):
            if sft[split] == 0:
                ds = datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
            else:
                skip, extra = sft["moves"][split]
                ds = datasets.Dataset.from_generator(
                    _sft_rows,
                    features=feats,
                    cache_dir=str(work / "hf_cache"),
                    gen_kwargs={
                        "path": str(work / f"sft_{split}.jsonl"),
                        "skip": skip,
                        "extra": tuple(extra),
                        "tokenizer": tokenizer,
                    },
                )
                tokens += pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py()
                labels = pc.list_flatten(ds.data.column("labels"))
                response += pc.sum(pc.not_equal(labels, chat.IGNORE_INDEX)).as_py()
            ds.save_to_disk(str(out / f"sft_{split}"))
            del ds
    finally:
        if not progress and not was_off:
            datasets.enable_progress_bars()
    return {"tokens": tokens, "response_tokens": response}


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Any:
    """Byte-level BPE with the chat special tokens first (ids 0..5), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(chat.SPECIAL_TOKENS)
    if vocab_size < floor:
        raise StageError(
            f"params.yaml: preprocess.vocab_size is {vocab_size}; a byte-level BPE needs at least "
            f"{floor} (256 bytes + {len(chat.SPECIAL_TOKENS)} special tokens): raise it"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(chat.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=chat.EOS_TOKEN,
        eos_token=chat.EOS_TOKEN,
        pad_token=chat.PAD_TOKEN,
        additional_special_tokens=list(chat.SPECIAL_TOKENS[2:]),
    )
    fast.chat_template = chat.CHAT_TEMPLATE
    return fast


def load_base_tokenizer(init_from: Path) -> tuple[Any, int]:
    """The tokenizer of a local checkpoint folder (model.init_from), made chat-ready; + tokens added."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not init_from.is_dir() or not any((init_from / n).is_file() for n in names):
        raise StageError(
            f"params.yaml: model.init_from: {init_from} is not a folder with a tokenizer "
            f"(one of {', '.join(names)}); point it at a local HF checkpoint folder or set it to null"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(init_from), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is the same user-fixable problem
        raise StageError(
            f"params.yaml: model.init_from: cannot load the tokenizer in {init_from} ({e}); "
            "point it at a local HF checkpoint folder"
        ) from None
    return tok, chat.ensure_chat_tokens(tok)


def _tokenizer_texts(work: Path, pre: dict, sft: dict, cap_mb: float, used: dict) -> Iterator[list[str]]:
    """The tokenizer's sample: the first `cap_mb` of the train split, then of the SFT train messages."""
    cap = max(1, int(cap_mb * 2**20))
    yield from pretrain_text.train_sample(work, pre["pieces"], cap, used)
    size = 0
    for row in _lines(work / "sft_train.jsonl", *sft["moves"]["train"]):
        texts = [m["content"] for m in row["messages"]]
        yield texts
        size += sum(len(t.encode("utf-8")) for t in texts)
        if size >= cap:
            break
    used["bytes"] += size


def _tokenizer(cfg: PreprocessConfig, base: Any, work: Path, pre: dict, sft: dict) -> tuple[Any, dict]:
    """The base checkpoint's tokenizer, or one trained on the bounded sample; + what the sample held."""
    if base is not None:
        return base, {"sample_mb": 0.0, "sample_docs": 0}
    used: dict[str, int] = {}
    tok = train_tokenizer(
        _tokenizer_texts(work, pre, sft, cfg.tokenizer_sample_mb, used), cfg.vocab_size, cfg.min_frequency
    )
    return tok, {"sample_mb": round(used["bytes"] / 2**20, 3), "sample_docs": used["docs"]}


# ---------------------------------------------------------------- the stage
def _check_raw(raw_dir: Path) -> None:
    if not raw_dir.is_dir():
        raise StageError(f"{raw_dir}: missing; {_RERUN}")
    if read_meta(raw_dir, "ingest").get("stage") != "ingest" or not (raw_dir / "manifest.json").is_file():
        raise StageError(f"{raw_dir}: not an ingest output (seedlm.json, manifest.json); {_RERUN}")


def _pretrain_pass(
    cfg: PreprocessConfig, shards: list[Path], work: Path, seed: int, runner: Runner, ctx: StageContext
) -> dict:
    t0 = time.perf_counter()
    pre = pretrain_text.clean_and_split(cfg, shards, work, seed, runner, ctx.progress)
    ctx.log({"preprocess/docs_per_s": pre["docs_in"] / max(time.perf_counter() - t0, 1e-9)}, None)
    return pre


def preprocess(
    cfg: PreprocessConfig,
    raw_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    *,
    seed: int,
    init_from: Path | None = None,
    ctx: StageContext | None = None,
) -> dict:
    """Ingest output -> tokenizer, train/val token files and SFT datasets."""
    ctx = ctx or StageContext()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _check_raw(raw_dir)
    pre_shards, sft_shards = _shards(raw_dir, "pretrain"), _shards(raw_dir, "sft")
    base, added = load_base_tokenizer(Path(init_from)) if init_from is not None else (None, 0)

    with atomic_dir(out_dir) as tmp, Runner(cfg.workers, cfg.engine, cfg.dask_address) as runner:
        work = tmp / "_work"
        work.mkdir()
        pre = _pretrain_pass(cfg, pre_shards, work, seed, runner, ctx)
        sft = _clean_sft(cfg, sft_shards, work, ctx.progress, _control_pattern(base), tools=_renders_tools(base))
        tokenizer, sample = _tokenizer(cfg, base, work, pre, sft)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
        t0 = time.perf_counter()
        tok = pretrain_text.tokenize_and_merge(
            work, pre, tmp / "tokenizer", tokenizer.eos_token_id, dtype, tmp, runner, progress=ctx.progress
        )
        n_tokens = tok["train_tokens"] + tok["val_tokens"]
        ctx.log({"preprocess/tokens_per_s": n_tokens / max(time.perf_counter() - t0, 1e-9)}, None)
        sft.update(_save_sft(work, tmp, sft, tokenizer, ctx.progress))
        sft.pop("moves")
        for key in ("pieces", "moved_to"):
            pre.pop(key)
        report = {
            "pretrain": {**pre, **tok},
            "sft": sft,
            "tokenizer": {"vocab_size": len(tokenizer), "trained": base is None, "tokens_added": added, **sample},
        }
        result = {
            "vocab_size": len(tokenizer),
            "dtype": np.dtype(dtype).name,
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
            "train_tokens": tok["train_tokens"],
            "val_tokens": tok["val_tokens"],
            "sft_train": sft["train"],
            "sft_val": sft["val"],
            "sft_test": sft["test"],
            "report": report,
        }
        shutil.rmtree(work)
        config = {
            "seed": seed,
            "preprocess": cfg.model_dump(mode="json"),
            "model.init_from": str(init_from) if init_from is not None else None,
        }
        inputs = {
            "raw": str(raw_dir),
            "raw_manifest_sha256": sha256_file(raw_dir / "manifest.json"),
            **({"init_from": str(init_from)} if init_from is not None else {}),
        }
        write_meta(tmp, "preprocess", config, result, inputs)
    write_json(metrics_path, report)
    return {**result, "artifacts": [str(metrics_path)]}


def _control_pattern(tokenizer: Any) -> re.Pattern:
    """seedlm's chat tokens, and a base tokenizer's own control tokens (`<|im_end|>`, `</s>`, ...)."""
    if tokenizer is None:
        return _SPECIAL
    tokens = sorted({*chat.SPECIAL_TOKENS, *templates.control_tokens(tokenizer)}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)))


def run(params: Params, ctx: StageContext) -> dict:
    p = params.paths
    base = resolve(params.model.init_from)  # hf:ORG/NAME: the HF cache's copy (downloaded when allowed)
    init = base.path if base is not None else None
    return preprocess(
        params.preprocess,
        Path(p.raw),
        Path(p.processed),
        Path(p.metrics) / "preprocess.json",
        seed=params.seed,
        init_from=init,
        ctx=ctx,
    )


if __name__ == "__main__":
    from components.core.runner import main

    raise SystemExit(main("preprocess"))
