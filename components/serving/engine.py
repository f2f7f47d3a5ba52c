"""The one generation implementation of seedlm: chat, serve, evaluate and the pyfunc all call this module.

    engine = load_engine("models:/seedlm@champion")            # or a model folder
    params = sampling_params(max_tokens=32, temperature=0.7, seed=1)
    prompt = chat_prompt(engine, [{"role": "user", "content": "Where does Zorblat live?"}], params)
    [answer] = generate(engine, [prompt], params)              # answer.text, .finish_reason, .trimmed

The prompt is the tokenizer's chat template plus the generation prompt. A conversation that does not fit
the context loses its oldest turns first (leading system messages are kept; `Prompt.trimmed` counts the
dropped messages); one that cannot fit even then raises ParamError naming the limit. Decoding is
batched with a KV cache (`decode`), greedy or sampled per row (`sampling`), and stops at `<|end|>`/eos,
at a stop string or after max_tokens. `generate_texts` is evaluate's batched greedy entry point.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.serving import deps
from components.serving.decode import Emit, Row, drive
from components.serving.detok import TextStream
from components.serving.sampling import ParamError, SamplingParams, check_text

ROLES = deps.ROLES


@dataclass
class Engine:
    """A loaded model and what generation needs from it; `label` names the version in responses."""

    model: Any
    tokenizer: Any
    name: str
    version: str | None = None
    source: str = ""
    context: int = 0
    stop_ids: set[int] = field(default_factory=set)
    pad_id: int = 0
    detokenizer: Any = None
    """A copy of the tokenizer for the decoding thread (fast tokenizers are not meant to be shared by threads)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while building prompts with `tokenizer`."""
    index: Path | None = None
    """The retrieval index the registered version carries (serving/rag.py), kept on disk while the engine lives."""

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}" if self.version else self.name

    @property
    def fingerprint(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"local:{self.name}"


def from_model(
    model: Any, tokenizer: Any, *, name: str = "model", version: str | None = None, source: str = ""
) -> Engine:
    """An Engine around an in-memory model and its tokenizer (put in eval mode)."""
    if not getattr(tokenizer, "chat_template", None):
        raise deps.StageError(f"{source or name}: the tokenizer has no chat_template; rerun preprocess and sft")
    cfg = model.config
    context = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024)
    stops = set(deps.stop_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    return Engine(model.eval(), tokenizer, name, version, source or name, context, stops, pad, copy.deepcopy(tokenizer))


def load_folder(folder: Path, *, name: str | None = None, version: str | None = None, source: str = "") -> Engine:
    """An Engine for a local HF model folder (safetensors + tokenizer with a chat template)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    what = source or str(folder)
    if not (folder / "config.json").is_file():
        raise deps.StageError(f"{what}: not a model folder (no config.json); pass a models:/ URI or a model folder")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = deps.load_model(folder, what=what, tokenizer=tokenizer)
    return from_model(model, tokenizer, name=name or folder.resolve().name, version=version, source=what)


def load_engine(ref: str | Path) -> Engine:
    """An Engine for a model folder or a `models:/NAME/VERSION` / `models:/NAME@ALIAS` URI (StageError if absent).

    An alias is read once and that version is loaded, so the engine names the version it really holds."""
    if not deps.is_uri(str(ref)):
        return load_folder(Path(ref))
    ref = str(ref)
    name, version = deps.parse_model_uri(ref) if ref.startswith("models:/") else ("model", None)
    pinned = f"models:/{name}/{version}" if version else ref
    with tempfile.TemporaryDirectory(prefix="seedlm-serve-") as tmp:
        local = deps.download_model(pinned, Path(tmp))
        engine = load_folder(deps.hf_folder(local, pinned, Path(tmp)), name=name, version=version, source=pinned)
        if (index := deps.shipped_index(local)) is not None:
            keep = Path(tempfile.mkdtemp(prefix="seedlm-index-"))
            engine.index = Path(shutil.move(index, keep / "index"))
            weakref.finalize(engine, shutil.rmtree, keep, True)
    return engine


# ---------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """Token ids to complete, how many new tokens fit after them (`room`), and how many oldest messages were
    dropped to fit. A row generates min(max_tokens, room) tokens at most."""

    ids: list[int]
    room: int
    trimmed: int = 0


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A non-empty list of {'role': system|user|assistant, 'content': str}; ParamError names the bad item."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ParamError("messages", "messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ParamError(
                f"messages[{i}].role", f"messages[{i}]: role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        if not isinstance(m.get("content"), str):
            raise ParamError(f"messages[{i}].content", f"messages[{i}]: content must be a string")
        check_text(f"messages[{i}].content", m["content"])
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _too_long(engine: Engine, n: int, what: str) -> ParamError:
    return ParamError(
        what,
        f"the prompt is {n} tokens but this model's context is {engine.context} tokens "
        f"(prompt + answer must fit); shorten the {what}",
        code="context_length_exceeded",
    )


def _encode(engine: Engine, text: str) -> list[int]:
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(engine: Engine, messages: Any, params: SamplingParams) -> Prompt:
    """The conversation as prompt ids, oldest turns dropped until it leaves room for the answer.

    Room kept for the answer: max_tokens, but at most half the context (so a large max_tokens does not
    erase the history). Leading system messages and the last message are always kept."""
    msgs = check_messages(messages)
    head = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
    system, rest = msgs[:head], msgs[head:]
    reserve, dropped = min(params.max_tokens, engine.context // 2), 0
    with engine.lock:
        while True:
            ids = _encode(engine, deps.prompt_text(engine.tokenizer, system + rest[dropped:]))
            if len(ids) + reserve <= engine.context or len(rest) - dropped <= 1:
                break
            dropped += 1
            while dropped < len(rest) - 1 and rest[dropped]["role"] != "user":  # start at a user turn
                dropped += 1
    if len(ids) >= engine.context:
        raise _too_long(engine, len(ids), "messages")
    return Prompt(ids, engine.context - len(ids), dropped)


def text_prompt(engine: Engine, text: Any, params: SamplingParams, param: str = "prompt") -> Prompt:
    """A plain-text prompt (completions): no template, no trimming."""
    if not isinstance(text, str) or not text:
        raise ParamError(param, f"{param} must be a non-empty string")
    check_text(param, text)
    with engine.lock:
        ids = _encode(engine, text)
    if len(ids) >= engine.context:
        raise _too_long(engine, len(ids), param)
    return Prompt(ids, engine.context - len(ids))


# ---------------------------------------------------------------- generation
@dataclass
class Completion:
    """One finished answer. finish_reason: stop (end token or stop string), length, or cancelled."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    trimmed: int = 0


def make_row(
    engine: Engine, prompt: Prompt, params: SamplingParams, *, emit: Emit | None = None, index: int = 0
) -> Row:
    """A decode row for `prompt`; `emit(row, delta, finish)` receives its text as it is generated."""
    max_new = min(params.max_tokens, prompt.room)
    return Row(prompt.ids, params, max_new, TextStream(engine.detokenizer, params.stop), emit, index=index)


def completion(row: Row, prompt: Prompt) -> Completion:
    return Completion(
        row.stream.final,
        row.finish_reason or "cancelled",
        len(prompt.ids),
        len(row.tokens),
        list(row.tokens),
        prompt.trimmed,
    )


def run_rows(engine: Engine, rows: Sequence[Row], *, max_batch: int = 16) -> None:
    """Decode `rows` in this thread, up to `max_batch` at a time (rows join as others finish)."""
    waiting = deque(rows)

    def take(n: int, idle: bool) -> list[Row]:
        return [waiting.popleft() for _ in range(min(n, len(waiting)))]

    drive(engine.model, take, max_batch=max_batch, pad_id=engine.pad_id, stop_ids=engine.stop_ids)


def generate(
    engine: Engine, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams], *, max_batch: int = 16
) -> list[Completion]:
    """Answers to `prompts` (one settings object for all, or one per prompt), decoded together."""
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    rows = [make_row(engine, p, s, index=i) for i, (p, s) in enumerate(zip(prompts, per_row, strict=True))]
    run_rows(engine, rows, max_batch=max_batch)
    return [completion(r, p) for r, p in zip(rows, prompts, strict=True)]


def generate_texts(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16
) -> tuple[list[str], dict[str, float]]:
    """evaluate's entry point: greedy answers to rendered prompts (kept to their tail when too long), cut at
    `<|end|>`/eos and stripped, with {"gen_tokens", "gen_tokens_per_s"}. Run it under the caller's
    thread count / no autocast (fp32 decoding is fastest for small models on CPU)."""
    engine = from_model(model, tokenizer)
    params = SamplingParams(max_tokens=max_new_tokens)
    room = max(1, engine.context - max_new_tokens)
    encoded = [_encode(engine, p)[-room:] or [engine.pad_id] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths decode together
    built = {i: Prompt(encoded[i], engine.context - len(encoded[i])) for i in order}
    rows = {i: make_row(engine, built[i], params) for i in order}
    start = time.perf_counter()
    run_rows(engine, [rows[i] for i in order], max_batch=batch_size)
    n_new = sum(len(r.tokens) for r in rows.values())
    texts = [rows[i].stream.final for i in range(len(prompts))]
    return texts, {"gen_tokens": n_new, "gen_tokens_per_s": n_new / max(time.perf_counter() - start, 1e-9)}
