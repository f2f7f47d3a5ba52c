"""params.yaml as the code reads it: strict YAML, `-S`-style dotted overrides, every validation error in
one message naming its key, and the settings hash. Knows nothing of the schema: components/core/config.py passes
its `Params` model in."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """params.yaml is invalid; the message lists every problem, one per line."""


def validate(model: type[M], data: Any, source: str) -> M:
    """Parsed YAML validated as `model`; else one ConfigError naming each bad key (with a close match)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [_format_error(model, err, source) for err in e.errors()]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines) + "\nFix these keys and run again.") from None


def read_yaml(path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """The parsed file (an empty file: {}) with `overrides` (dotted keys -> values) applied."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the repo root or pass --params PATH")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}); check its permissions") from None
    if data is None:
        data = {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value, str(path))
    return data


def _format_error(root: type[BaseModel], err: dict[str, Any], source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    if err["type"] == "extra_forbidden":
        parent = model_at(root, err["loc"][:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(err["loc"][-1]), list(parent.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(parent.model_fields)}"
        return f"{source}: {loc}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{source}: {loc or '<top level>'}: {msg}{shown}"


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section model at `loc` (list indices skipped) below `root`; None where it is not a section."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            for inner in (cand, *getattr(cand, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
            else:
                continue
            break
        else:
            return None
    return model


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (lines {first + 1} and {key_node.start_mark.line + 1}); keep one",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def set_dotted(data: Any, key: str, value: Any, where: str = "params.yaml") -> None:
    """data["a"]["b"] = value for key "a.b" (as `dvc exp run -S a.b=value`), creating missing sections."""
    node = data
    *parents, last = key.split(".")
    for i, part in enumerate(parents):
        node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ConfigError(
                f"override {key}: {'.'.join(parents[: i + 1])} is not a section (a mapping) in "
                f"{where}; set a key of a section, e.g. -S pretrain.max_steps=50"
            )
    if not isinstance(node, dict):
        raise ConfigError(f"override {key}: {where} does not hold a mapping of sections")
    node[last] = value


def flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists (as JSON text) and empty mappings stay values."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, list) else data}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-S {item!r}: expected KEY=VALUE, e.g. -S pretrain.max_steps=50")
        out[key.strip()] = yaml.safe_load(value)
    return out
