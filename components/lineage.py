"""Where a registered model came from, and how to get it back.

Shared helpers (git state, DVC hashes from dvc.lock, registry look-ups, the registry lock, turning a
model URI into a local HF folder) and the `lineage` command:

    python -m components.lineage models:/seedlm/3            # how to reproduce v3, what changed vs champion
    python -m components.lineage models:/seedlm@challenger --against 2 --json

The tracking store is MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db` (as the runner uses).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import posixpath
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml

from components.common import StageError, sha256_file

FLOW_RUN_TAG = "prefect_flow_run_id"
"""Version tag (and StageContext.extra key) holding the orchestrator's flow-run id."""
FLOW_RUN_ENV = ("PREFECT__FLOW_RUN_ID", "PREFECT__RUNTIME__FLOW_RUN__ID")
LOCK_TIMEOUT_S = 600.0
URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
LINEAGE_TAGS = ("data.raw.md5", "data.processed.md5", "data.raw.meta_hash", "data.processed.meta_hash",
                "data.tokenizer.sha256", "base_checkpoint.sha256",
                "lora_base.sha256", "model_sha256", "params_hash")
"""Version tags compared by `lineage` (besides the params)."""


# ---------------------------------------------------------------- git / DVC
def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(root: Path) -> dict[str, str]:
    """{"git_commit": sha or "unknown", "git_dirty": "true"/"false"/"unknown"}."""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit else None
    return {"git_commit": commit.strip() if commit else "unknown",
            "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower()}


def read_lock(root: Path) -> dict[str, Any]:
    """dvc.lock as data ({} without one)."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        return yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise StageError(f"{lock}: not valid YAML ({e}); run `dvc repro` to rewrite it") from None


def _tag_key(*parts: str) -> str:
    key = re.sub(r"[^/\w.\- ]", "_", ".".join(parts))
    return posixpath.normpath(key).lstrip("/")[:250]


def dvc_hashes(root: Path) -> dict[str, str]:
    """`dvc.<stage>.<path>` -> md5 of every dep/out in dvc.lock (register's own, stale entry left out)."""
    tags = {}
    for stage, body in (read_lock(root).get("stages") or {}).items():
        if stage == "register":
            continue
        for kind in ("deps", "outs"):
            for entry in (body or {}).get(kind) or []:
                if isinstance(entry, dict) and entry.get("path") and entry.get("md5"):
                    tags[_tag_key("dvc", str(stage), str(entry["path"]))] = str(entry["md5"])
    return tags


def lock_md5(root: Path, path: str | Path) -> str | None:
    """The md5 dvc.lock records for the output `path` (relative to the repo root), or None."""
    path, root = Path(path), Path(root)
    if path.is_absolute() and path.resolve().is_relative_to(root.resolve()):
        path = path.resolve().relative_to(root.resolve())
    want = posixpath.normpath(path.as_posix())
    for body in (read_lock(root).get("stages") or {}).values():
        for entry in (body or {}).get("outs") or []:
            if isinstance(entry, dict) and posixpath.normpath(str(entry.get("path"))) == want:
                return str(entry.get("md5")) if entry.get("md5") else None
    return None


def meta_hash(folder: Path) -> str | None:
    """Hash of an output's seedlm.json (stage, config, inputs, result; not its timestamp), or None."""
    from components.config import config_hash
    path = Path(folder) / "seedlm.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    return config_hash({k: meta.get(k) for k in ("stage", "config", "inputs", "result")})


def weights_sha256(folder: Path) -> str:
    """Content hash of a model's weights and config (*.safetensors + config.json; serving checks the same)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted([*root.glob("*.safetensors"), root / "config.json"]):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def flow_run_id(extra: dict[str, Any] | None = None) -> str | None:
    """The orchestrator's flow-run id: from the StageContext extras, else the environment."""
    value = (extra or {}).get(FLOW_RUN_TAG) or next((os.environ[k] for k in FLOW_RUN_ENV if os.environ.get(k)), None)
    return str(value) if value else None


# ---------------------------------------------------------------- registry
def tracking_uri() -> str:
    import mlflow
    from components.runner import tracking_uri as default_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set()
                                                      else default_uri())


def sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def registry_lock(uri: str, root: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Serialize the read-champion / gate / create-version / move-aliases section of registrations.

    The lock file sits beside the sqlite DB (`<db folder>/.seedlm/registry-<db name>.lock`, inside the
    git-ignored `.seedlm/` for the repo's own `mlflow.db`), so every process using that store shares
    it; for a tracking server it is `<root>/.seedlm/registry.lock` (one machine only).
    """
    from filelock import FileLock, Timeout

    db = sqlite_file(uri)
    path = db.parent / ".seedlm" / f"registry-{db.name}.lock" if db else Path(root) / ".seedlm" / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout, thread_local=False, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        raise StageError(f"{path}: another registration held the registry lock for {timeout:.0f} s; "
                         "check for a stuck `register` process, then run again") from None
    try:
        yield path
    finally:
        lock.release()


def _client(uri: str | None = None) -> Any:
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri or tracking_uri())


def alias_version(name: str, alias: str = "champion", uri: str | None = None) -> str | None:
    """The version `alias` points at; None when the store, the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    if (db := sqlite_file(uri)) is not None and not db.is_file():
        return None  # no store yet: nothing registered (and do not create one just to look)
    try:
        return str(_client(uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise StageError(f"{uri}: cannot read alias {alias!r} of model {name!r}: {e}") from None


def is_uri(ref: str | Path) -> bool:
    return isinstance(ref, str) and ref.startswith(URI_PREFIXES)


def parse_model_uri(ref: str, uri: str | None = None) -> tuple[str, str]:
    """models:/NAME/VERSION or models:/NAME@ALIAS -> (name, version); StageError when it does not exist."""
    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", ref.rstrip("/"))
    if not m:
        raise StageError(f"{ref}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    name, ver, alias = m.groups()
    if alias:
        ver = alias_version(name, alias, uri)
        if ver is None:
            raise StageError(f"{ref}: no version of {name!r} has alias {alias!r} in {uri or tracking_uri()}")
    return name, str(ver)


def resolve_model(ref: str | Path, dst: Path) -> Path:
    """A local HF folder for `ref`: a folder as is; a model URI downloaded (adapters merged) under `dst`."""
    if not is_uri(ref):
        return Path(ref)
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    uri = tracking_uri()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(ref), dst_path=str(dst),
                                                         tracking_uri=uri))
    except (MlflowException, OSError) as e:
        raise StageError(f"{ref}: not found in {uri} ({str(e).splitlines()[0][:300]}); list versions with "
                         "`mlflow models` / the UI, or pass a local model folder") from None
    if not (local / "MLmodel").is_file():
        raise StageError(f"{ref}: not an MLflow model (no MLmodel file); pass a model URI or folder")
    arts = (Model.load(str(local)).flavors.get("python_function") or {}).get("artifacts") or {}
    if "hf_model" in arts:
        return local / arts["hf_model"]["path"]
    if "hf_adapter" in arts:  # adapter-only registration: merge onto the hash-checked base, as serving does
        try:
            py = mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
        except (OSError, ValueError) as e:
            raise StageError(f"{ref}: cannot load the LoRA adapter model: {e}") from None
        out = dst / "merged"
        py.model.save_pretrained(out)
        py.tokenizer.save_pretrained(out)
        return out
    raise StageError(f"{ref}: not a seedlm model (no hf_model/hf_adapter artifact); register it with seedlm")


def ref_name(ref: str, taken: set[str]) -> tuple[str, str]:
    """(name, ref) for `[NAME=]REF`: models:/seedlm/3 -> seedlm-v3, a folder -> its name; unique in `taken`."""
    name, sep, rest = ref.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        ref = rest
    elif m := re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))/?", ref):
        name = f"{m[1]}-v{m[2]}" if m[2] else f"{m[1]}-{m[3]}"
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(ref.rstrip("/")).name).strip("-.") or "model"
    while name in taken:
        name += "_"
    return name, ref


def parse_model_args(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """`--model [NAME=]REF` (repeatable) and `--out DIR` of `python -m components.evaluate`: (models, out, rest)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--out", default="reports/evaluate-models")
    known, rest = parser.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        print("evaluate other models: --model [NAME=]PATH_OR_URI (repeatable; e.g. models:/seedlm@champion) "
              "--out DIR (default reports/evaluate-models)\n")
    models: dict[str, str] = {}
    for ref in known.model:
        name, ref = ref_name(ref, set(models))
        models[name] = ref
    return models, known.out, rest


def log_datasets(datasets: dict[str, tuple[Path, str | None]], model_id: str | None = None) -> list[str]:
    """mlflow.log_input one MetaDataset per entry: name -> (local path, digest); returns the names logged."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import LoggedModelInput

    logged = []
    for name, (path, digest) in datasets.items():
        if not digest:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local files
            source = resolve_dataset_source(str(Path(path).resolve()))
        ds = MetaDataset(source=source, name=f"seedlm-{name}", digest=digest[:36])
        mlflow.log_input(ds, context=name, tags={"path": str(path)},
                         model=LoggedModelInput(model_id=model_id) if model_id else None)
        logged.append(name)
    return logged


# ---------------------------------------------------------------- the lineage command
def version_record(name: str, version: str, uri: str | None = None) -> dict[str, Any]:
    """Tags, aliases, run ids and params of one registered version."""
    client = _client(uri)
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags or {})
    params = None
    with contextlib.suppress(ValueError, TypeError):
        params = json.loads(tags.get("params", ""))
    if not isinstance(params, dict) or params.get("truncated"):
        params = None
        with contextlib.suppress(Exception):  # the full params live in the run artifacts
            import mlflow
            path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="register/params.json",
                                                       tracking_uri=uri or tracking_uri())
            params = json.loads(Path(path).read_text())
    aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == str(version))
    return {"name": name, "version": str(version), "aliases": aliases, "run_id": mv.run_id, "tags": tags,
            "params": params or {}}


def flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def compare(this: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Params that differ (key -> [other, this]) and lineage hashes that differ."""
    a, b = flat(other["params"]), flat(this["params"])
    params = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    keys = [*LINEAGE_TAGS, "git_commit", *sorted(k for k in {**this["tags"], **other["tags"]} if k.startswith("dvc."))]
    hashes = {k: [other["tags"].get(k), this["tags"].get(k)] for k in dict.fromkeys(keys)
              if other["tags"].get(k) != this["tags"].get(k)}
    return {"against": other["version"], "params": params, "hashes": hashes}


def reproduce_steps(rec: dict[str, Any], uri: str) -> list[str]:
    t, run = rec["tags"], rec["run_id"]
    steps = [f"export MLFLOW_TRACKING_URI={uri}", f"git checkout {t.get('git_commit', '<unknown commit>')}"]
    if t.get("git_dirty") != "false":
        steps.append(f"mlflow artifacts download -r {run} -a register/params.yaml -d .   # the tree was dirty: "
                     "the exact params")
    steps += [f"mlflow artifacts download -r {run} -a register/dvc.lock -d .   # the data/model hashes at "
              "registration",
              "dvc checkout   # data/raw, data/processed, models/* from the DVC cache (`dvc pull` with a remote)",
              "dvc repro      # recompute whatever the cache lacks (seeded: the same hashes come back)"]
    if t.get("lora_base.path"):
        steps.append(f"# LoRA adapter: its base must hash to {t.get('lora_base.sha256', '?')[:16]}… "
                     f"(was {t['lora_base.path']})")
    return steps


def lineage(ref: str, against: str | None = "champion", uri: str | None = None) -> dict[str, Any]:
    uri = uri or tracking_uri()
    name, ver = parse_model_uri(ref, uri)
    rec = version_record(name, ver, uri)
    out: dict[str, Any] = {"model_uri": f"models:/{name}/{ver}", **rec, "reproduce": reproduce_steps(rec, uri)}
    other = (alias_version(name, against, uri) if against and not against.isdigit() else against)
    if other and str(other) != ver:
        out["changes"] = compare(rec, version_record(name, str(other), uri))
        out["changes"]["against_ref"] = against
        if (a := rec["tags"].get("git_commit")) and (b := out["changes"]["hashes"].get("git_commit", [None])[0]):
            out["changes"]["code"] = (_git(Path.cwd(), "diff", "--stat", b, a) or "").strip() or None
    return out


def render(info: dict[str, Any]) -> str:
    t = info["tags"]
    lines = [f"{info['model_uri']}  aliases: {', '.join(info['aliases']) or '-'}  gate: {t.get('gate.decision', '?')}",
             f"  run {info['run_id']}  parent {t.get('parent_run_id', '-')}  flow run {t.get(FLOW_RUN_TAG, '-')}",
             f"  git {t.get('git_commit', '?')} (dirty: {t.get('git_dirty', '?')})  params {t.get('params_hash', '?')}"]
    lines += [f"  {k}: {t[k]}" for k in LINEAGE_TAGS if k in t and k != "params_hash"]
    lines += ["", "Reproduce:", *(f"  {s}" for s in info["reproduce"])]
    ch = info.get("changes")
    if ch:
        lines += ["", f"Changes against {ch['against_ref']} (v{ch['against']}):"]
        lines += [f"  param {k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in ch["params"].items()] \
            or ["  params: identical"]
        lines += [f"  {k}: {a} -> {b}" for k, (a, b) in ch["hashes"].items()] or ["  data/code hashes: identical"]
        if ch.get("code"):
            lines += ["  code:", *(f"    {x}" for x in ch["code"].splitlines())]
    else:
        lines += ["", "No other version to compare with (it is the champion, or there is none)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.lineage", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--against", default="champion", help="alias or version to diff against (default: champion)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException
    try:
        info = lineage(args.model, args.against)
    except (StageError, MlflowException) as e:
        print(f"seedlm lineage: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
