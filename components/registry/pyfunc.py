"""The registered seedlm model: an MLflow pyfunc ("models from code") that answers OpenAI-style chat requests and
plain prompts with seedlm's one generation engine (components/serving/engine.py).

MLflow copies this file into the model artifact and runs it at load time, so it imports only mlflow, pandas,
numpy, torch/transformers/peft and the engine that ships with the model (`code/seedlm_engine_src`, written by
components/registry/shipped.py through `code_paths`): never this repo's modules. The engine is imported
from there under its own names, beside (not into) any `components` package the loading process has.

    model = mlflow.pyfunc.load_model("models:/seedlm@champion")
    model.predict(["Where does Zorblat live?"], params={"max_tokens": 16})           # -> ["..."]
    model.predict({"messages": [{"role": "user", "content": "Where does Zorblat live?"}], "max_tokens": 16})
    # -> {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": ...}}], ...}
    for chunk in model.predict_stream({"messages": [...]}): ...     # chat.completion.chunk dicts

Chat: a dict {"messages": [{"role": system|user|assistant, "content": str}, ...]} with, optionally, the
fields of MLflow's chat request (ChatCompletionRequest: temperature, top_p, top_k, max_tokens, stop, n) and
seed, repetition_penalty; `mlflow models serve` takes it as the request body. Or a DataFrame with a
`messages` column, one conversation per row. Answer: a ChatCompletionResponse dict (a list of them for a
DataFrame). A conversation longer than the context loses its oldest turns (system messages kept), counted in
`custom_outputs.trimmed_messages`.

Prompts: a list of str, a str, a DataFrame with a `prompt` column (or only one column), or {"prompt": ...}.
Each prompt is one user turn; answer: one string per prompt. A prompt longer than the context keeps its tail.

Retrieval: a version registered with an index (artifact `index`, the one evaluate scored it with; or
model_config `index_path`) grounds each chat's last user turn, and each plain prompt, in the index's top-k chunks
(components/serving/rag.py); a chat answer lists them in `custom_outputs.sources`. `rag`: false turns it off,
{"top_k": N} retrieves N chunks; true without an index is refused.

Params (the signature's params; a chat request's own fields win): the chat fields above, rag, and
max_new_tokens (what max_tokens defaults to, as registered) and do_sample (false: greedy whatever the
temperature), the names the first versions used. Default: greedy (temperature 0). Input or params it cannot
use raise MlflowException INVALID_PARAMETER_VALUE naming the field (`mlflow models serve`: HTTP 400).

The signature has params and no input schema: MLflow's column schemas turn a chat dict into DataFrame rows
(an unnamed string column) or drop `{"inputs": [...]}` strings (named columns), so this model checks its
input itself. `predict_stream` takes one prompt (yields text deltas) or one chat request (yields
ChatCompletionChunk dicts); `mlflow models serve` does not stream (`seedlm serve` does).

LoRA runs registered with `register.lora_format: adapter` ship only the adapter (artifact `hf_adapter`, with
the tokenizer); the base model is referenced by path and content hash in the model config (`base_path`,
`base_sha256`) and merged on load. A base that is missing or whose weights hash differs is refused; point to a
restored copy with `mlflow.pyfunc.load_model(uri, model_config={"base_path": "/path/to/base"})`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import queue
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

ARTIFACT = "hf_model"
ADAPTER = "hf_adapter"
CODE_DIR = "seedlm_engine_src"
"""Under the model's `code/` folder: the shipped `components` modules (components/registry/shipped.py)."""
PACKAGE = "components"
ENGINE = "components.serving.engine"
SAMPLING = "components.serving.sampling"
RAG = "components.serving.rag"
INDEX = "index"
"""The artifact holding the retrieval index the version was evaluated with (registry/models.py INDEX_ARTIFACT)."""
DEFAULT_MAX_TOKENS = 32
MAX_N = 8
"""At most this many choices per chat request."""
PARAMS: dict[str, tuple[str, Any]] = {
    "max_tokens": ("long", None),
    "temperature": ("double", None),
    "top_p": ("double", None),
    "top_k": ("long", None),
    "stop": ("string[]", []),
    "n": ("long", None),
    "seed": ("long", None),
    "repetition_penalty": ("double", None),
    "stream": ("boolean", None),
    "rag": ("boolean", None),
    "max_new_tokens": ("long", DEFAULT_MAX_TOKENS),
    "do_sample": ("boolean", None),
}
"""Predict-time params: name -> (MLflow type, `[]` for a list; default). Also the fields a chat request may carry."""
ACCEPTED = (
    'send {"messages": [{"role": "user", "content": "..."}]} (chat), a list of prompt strings, a string, '
    'or a DataFrame with a "prompt" or "messages" column'
)


def signature(max_new_tokens: int = DEFAULT_MAX_TOKENS) -> Any:
    """The logged signature: the params above, no input schema (see the module doc)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import DataType, ParamSchema, ParamSpec

    specs = []
    for name, (kind, default) in PARAMS.items():
        shape = (-1,) if kind.endswith("[]") else None
        default = max_new_tokens if name == "max_new_tokens" else default
        specs.append(ParamSpec(name, DataType[kind.removesuffix("[]")], default, shape))
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema(specs))


def bad(message: str) -> MlflowException:
    """A request error: INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with HTTP 400."""
    return MlflowException.invalid_parameter_value(message)


# ---------------------------------------------------------------- the shipped engine
def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def import_shipped(root: Path) -> dict[str, ModuleType]:
    """Import the engine from the copy under `root`, by its own names, and return the `components` modules loaded.

    The process's own `components` modules (a repo, another version) are set aside meanwhile and put back
    afterwards, so neither copy sees the other; the engine keeps its modules through its globals. The swap lasts
    tens of milliseconds; a first import of a `components` module by another thread in that moment would see the
    shipped copy. (Holding CPython's global import lock instead could deadlock with such a thread.)"""
    root = Path(root).resolve()
    if not (root / PACKAGE).is_dir():
        raise MlflowException(
            f"{root}: the engine code shipped with this model is missing; register the model with seedlm "
            "(components/registry/publish.py logs it with code_paths)"
        )
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _ours(k)]}
    sys.path.insert(0, str(root))
    try:
        for name in (ENGINE, RAG):
            if (root / Path(*name.split("."))).with_suffix(".py").is_file():  # RAG: versions registered since
                importlib.import_module(name)
        loaded = {k: m for k, m in sys.modules.items() if _ours(k)}
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    stray = sorted(
        k for k, m in loaded.items() if getattr(m, "__file__", None) and root not in Path(m.__file__).parents
    )
    if stray:
        raise MlflowException(f"{root}: modules {stray} were not shipped with the model but are needed by the engine")
    return loaded


# ---------------------------------------------------------------- input
@dataclasses.dataclass
class Request:
    """What to answer: plain prompts, or conversations (with the chat request's own fields)."""

    prompts: list[str] | None = None
    chats: list[Any] | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    one: bool = False
    """A single chat dict: answer one response rather than a list."""


def plain(value: Any) -> Any:
    """numpy arrays and scalars (as MLflow and pandas hand them over) as Python lists and scalars."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.ndim else plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _strings(values: list[Any], what: str) -> list[str]:
    if not values:
        raise bad(f"no {what} given; {ACCEPTED}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise bad(f"{what}[{i}] is {type(v).__name__} {v!r:.80}, not a string; {ACCEPTED}")
    return values


def _from_dict(data: dict[str, Any]) -> Request:
    unknown = sorted(set(data) - {"messages", "prompt"} - set(PARAMS))
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; a request takes messages (or prompt) and {', '.join(PARAMS)}")
    fields = {k: plain(v) for k, v in data.items() if k in PARAMS}
    if "messages" in data and "prompt" in data:
        raise bad("give messages (chat) or prompt, not both")
    if "messages" in data:
        return Request(chats=[plain(data["messages"])], fields=fields, one=True)
    if "prompt" in data:
        prompt = plain(data["prompt"])
        return Request(prompts=_strings(prompt if isinstance(prompt, list) else [prompt], "prompt"), fields=fields)
    raise bad(f"no messages or prompt in the request (fields: {sorted(data)}); {ACCEPTED}")


def _from_frame(df: pd.DataFrame) -> Request:
    if "messages" in df.columns:
        if len(df.columns) > 1:
            raise bad(
                f"a DataFrame with a messages column takes no other columns (got {list(df.columns)}); pass "
                "settings as params"
            )
        return Request(chats=[plain(m) for m in df["messages"]])
    if "prompt" in df.columns:
        column = df["prompt"]
    elif len(df.columns) == 1:
        column = df.iloc[:, 0]
    else:
        raise bad(f"a DataFrame needs a 'prompt' or 'messages' column; got columns {list(df.columns)}")
    return Request(prompts=_strings(plain(column.tolist()), "prompts"))


def parse_input(data: Any) -> Request:
    """The request in `data` (see the module doc); MlflowException naming what is wrong otherwise."""
    if isinstance(data, (np.ndarray, pd.Series)):
        data = plain(data.tolist() if isinstance(data, pd.Series) else data)
    if isinstance(data, str):
        return Request(prompts=[data])
    if isinstance(data, dict):
        return _from_dict(data)
    if isinstance(data, pd.DataFrame):
        return _from_frame(data)
    if isinstance(data, (list, tuple)):
        return Request(prompts=_strings(list(data), "prompts"))
    raise bad(f"unsupported input {type(data).__name__}; {ACCEPTED}")


def given(values: dict[str, Any] | None) -> dict[str, Any]:
    """The settings actually given: None and empty lists (MLflow's param defaults) mean "not set"."""
    return {k: plain(v) for k, v in (values or {}).items() if v is not None and v != []}


def temperature(settings: dict[str, Any]) -> float:
    """do_sample false: greedy; do_sample true without a temperature: 1.0; else the temperature (default 0)."""
    value, sample = settings.get("temperature"), settings.get("do_sample")
    if sample is False:
        return 0.0
    if value is None:
        return 1.0 if sample else 0.0
    return value


# ---------------------------------------------------------------- loading
def weights_sha256(folder: str | Path) -> str:
    """Content hash of a model's *.safetensors + config.json (as components.registry.provenance.weights_sha256)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted([*root.glob("*.safetensors"), root / "config.json"]):
        if p.is_file():
            f = hashlib.sha256()
            with open(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    f.update(block)
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + f.hexdigest().encode())
    return h.hexdigest()


def load_merged(adapter_dir: str, config: dict[str, Any]) -> Any:
    """The base model named in `config` (checked against its registered hash) with the LoRA adapter merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, want = config.get("base_path"), config.get("base_sha256")
    hint = config.get("base_hint") or "restore the base model folder"
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(
            f"LoRA base model {base!r} not found; {hint}, or load with model_config={{'base_path': '/path/to/base'}}"
        )
    got = weights_sha256(base)
    if want and got != want:
        raise ValueError(
            f"{base}: weights hash {got[:16]}… is not the registered base {want[:16]}…: the base "
            f"changed since registration; {hint}"
        )
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


class SeedLMChatModel(PythonModel):
    """Chat and prompt answers from a local HF causal LM, generated by the engine shipped with the model."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoTokenizer

        config = dict(getattr(context, "model_config", None) or {})
        modules = import_shipped(Path(__file__).resolve().parent / "code" / CODE_DIR)
        self.engine_mod, self.sampling, self.rag = modules[ENGINE], modules[SAMPLING], modules.get(RAG)
        name = str(config.get("model_name") or "seedlm")
        if ADAPTER in context.artifacts:
            path = context.artifacts[ADAPTER]
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.engine = self.engine_mod.from_model(load_merged(path, config), tokenizer, name=name, source=path)
        else:
            self.engine = self.engine_mod.load_folder(Path(context.artifacts[ARTIFACT]), name=name)
        self.engine.model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        index = config.get("index_path") or context.artifacts.get(INDEX)
        if index and not (Path(index) / "seedlm.json").is_file():
            raise FileNotFoundError(f"index_path {index!r}: not a seedlm index folder (no seedlm.json)")
        self.index = Path(index) if index and self.rag is not None else None
        """The retrieval index chats are grounded in (model_config `index_path`, else the shipped one), or None."""
        self.defaults = {"max_new_tokens": int(config.get("max_new_tokens", DEFAULT_MAX_TOKENS))}
        self.batch_size = int(config.get("batch_size", 8))
        self._lock = threading.Lock()
        """One generation at a time (`mlflow models serve` calls predict from several threads)."""

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.engine.stop_ids)

    # ------------------------------------------------------------ settings and prompts
    def _settings(
        self, params: dict[str, Any] | None, fields: dict[str, Any], *, stream: bool
    ) -> tuple[Any, int, tuple[bool, int | None]]:
        """(engine SamplingParams, n, (retrieve, top_k)) from the defaults, then params, then the request's fields."""
        merged = {**self.defaults, **given(params), **given(fields)}
        if merged.get("stream") and not stream:
            raise bad("stream: predict does not stream; call predict_stream, or use `seedlm serve` for HTTP streaming")
        n = merged.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise bad(f"n must be an integer in [1, {MAX_N}], got {n!r}")
        values = {k: merged.get(k) for k in ("top_p", "top_k", "seed", "repetition_penalty", "stop")}
        values["max_tokens"] = merged["max_tokens"] if "max_tokens" in merged else merged["max_new_tokens"]
        values["temperature"] = temperature(merged)
        try:
            rag = self.rag.rag_option(merged.get("rag"), self.index is not None) if self.rag else (False, None)
            return self.sampling.sampling_params(**values), n, rag
        except self.sampling.ParamError as e:
            raise bad(str(e)) from None

    def _text_prompt(self, text: str, settings: Any) -> Any:
        """One user turn in the chat template, kept to its tail when it leaves too little room for the answer."""
        engine = self.engine
        rendered = self.engine_mod.deps.prompt_text(engine.tokenizer, [{"role": "user", "content": text}])
        with engine.lock:
            ids = list(engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        ids = ids[-max(1, engine.context - min(settings.max_tokens, engine.context // 2)) :]
        return self.engine_mod.Prompt(ids, engine.context - len(ids))

    def _chat_prompt(self, messages: Any, settings: Any) -> Any:
        try:
            return self.engine_mod.chat_prompt(self.engine, messages, settings)
        except self.sampling.ParamError as e:
            raise bad(str(e)) from None

    def _ground(self, messages: Any, settings: Any, rag: tuple[bool, int | None]) -> tuple[Any, list | None]:
        """The messages with retrieved passages in the last user turn, and the sources (None: no retrieval)."""
        if not rag[0]:
            return messages, None
        try:
            return self.rag.ground(self.engine, self.index, messages, settings, rag[1])
        except self.sampling.ParamError as e:
            raise bad(str(e)) from None

    def _prompt(self, text: str, settings: Any, rag: tuple[bool, int | None]) -> Any:
        """A plain prompt as one user turn (with retrieved passages when `rag` says so)."""
        messages, _ = self._ground([{"role": "user", "content": text}], settings, rag)
        return self._text_prompt(messages[-1]["content"], settings)

    @staticmethod
    def _choices(settings: Any, n: int) -> list[Any]:
        """Settings of each of n choices: seeded ones get seed, seed + 1, ... (so they differ when sampling)."""
        if settings.seed is None:
            return [settings] * n
        return [dataclasses.replace(settings, seed=settings.seed + i) for i in range(n)]

    def _generate(self, prompts: list[Any], settings: list[Any]) -> list[Any]:
        with self._lock:
            return self.engine_mod.generate(self.engine, prompts, settings, max_batch=self.batch_size)

    def _response(self, completions: list[Any], prompt: Any, found: list | None) -> dict[str, Any]:
        from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, TokenUsageStats

        choices = [
            ChatChoice(index=i, message=ChatMessage(role="assistant", content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(completions)
        ]
        used = sum(c.completion_tokens for c in completions)
        usage = TokenUsageStats(
            prompt_tokens=len(prompt.ids), completion_tokens=used, total_tokens=len(prompt.ids) + used
        )
        return ChatCompletionResponse(
            choices=choices,
            usage=usage,
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=self.engine.label,
            custom_outputs=_extra(prompt, found),
        ).to_dict()

    # ------------------------------------------------------------ predict
    # The hint is pd.DataFrame (what pyfunc passes after schema enforcement; direct calls may also pass a list,
    # str or dict): MLflow infers no schema from it, so the logged signature stays as given.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        request = parse_input(model_input)
        settings, n, rag = self._settings(params, request.fields, stream=False)
        if request.prompts is not None:
            if n != 1:
                raise bad("n applies to chat requests; each plain prompt gets one answer")
            prompts = [self._prompt(p, settings, rag) for p in request.prompts]
            return [c.text for c in self._generate(prompts, [settings] * len(prompts))]
        grounded = [self._ground(m, settings, rag) for m in request.chats]
        built = [self._chat_prompt(m, settings) for m, _ in grounded]
        done = self._generate([p for p in built for _ in range(n)], self._choices(settings, n) * len(built))
        answers = [self._response(done[k * n : (k + 1) * n], p, grounded[k][1]) for k, p in enumerate(built)]
        return answers[0] if request.one else answers

    def predict_stream(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any] | str]:
        """One prompt: its text deltas; one chat request: ChatCompletionChunk dicts. Bad input raises before any
        generation (through PyFuncModel.predict_stream: at the first `next`)."""
        request = parse_input(model_input)
        settings, n, rag = self._settings(params, request.fields, stream=True)
        items = request.prompts if request.prompts is not None else request.chats
        if len(items) != 1:
            raise bad(f"predict_stream takes one prompt or one chat request, got {len(items)}")
        if request.prompts is not None:
            if n != 1:
                raise bad("n applies to chat requests; a plain prompt gets one answer")
            return self._stream(self._prompt(items[0], settings, rag), [settings], chat=False)
        messages, found = self._ground(items[0], settings, rag)
        return self._stream(self._chat_prompt(messages, settings), self._choices(settings, n), chat=True, found=found)

    def _stream(
        self, prompt: Any, settings: list[Any], *, chat: bool, found: list | None = None
    ) -> Iterator[dict[str, Any] | str]:
        events: queue.SimpleQueue = queue.SimpleQueue()

        def emit(row: Any, delta: str, finish: str | None) -> None:  # on the decoding thread
            events.put((row.index, delta, finish))

        rows = [self.engine_mod.make_row(self.engine, prompt, s, emit=emit, index=i) for i, s in enumerate(settings)]
        threading.Thread(target=self._decode, args=(rows, events), name="seedlm-pyfunc-stream", daemon=True).start()
        return self._events(rows, events, prompt, chat, found)

    def _decode(self, rows: list[Any], events: queue.SimpleQueue) -> None:
        try:
            with self._lock:
                self.engine_mod.run_rows(self.engine, rows, max_batch=self.batch_size)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            events.put(e)
        finally:
            events.put(None)

    def _events(
        self, rows: list[Any], events: queue.SimpleQueue, prompt: Any, chat: bool, found: list | None
    ) -> Iterator[Any]:
        from mlflow.types.llm import ChatChoiceDelta, ChatChunkChoice, ChatCompletionChunk

        cid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            while (event := events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                index, delta, finish = event
                if not chat:
                    if delta:
                        yield delta
                    continue
                choice = ChatChunkChoice(index=index, delta=ChatChoiceDelta(content=delta), finish_reason=finish)
                extra = _extra(prompt, found) if finish else None
                yield ChatCompletionChunk([choice], id=cid, model=self.engine.label, custom_outputs=extra).to_dict()
        finally:  # the consumer stopped early: end the rows
            for row in rows:
                row.cancelled.set()


def _extra(prompt: Any, found: list | None) -> dict[str, Any]:
    """A chat answer's custom_outputs: trimmed_messages, and the retrieval sources when it retrieved."""
    return {"trimmed_messages": prompt.trimmed, **({"sources": found} if found is not None else {})}


mlflow.models.set_model(SeedLMChatModel())
