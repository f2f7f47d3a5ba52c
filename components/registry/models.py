"""The model registry as the stages use it: aliases, model URIs resolved to local folders, the
registration lock, a version's record."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.core.context import StageError

LOCK_TIMEOUT_S = 600.0
URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


# ---------------------------------------------------------------- registry
def tracking_uri() -> str:
    import mlflow

    from components.tracking.store import tracking_uri as default_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or (
        mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else default_uri()
    )


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
        raise StageError(
            f"{path}: another registration held the registry lock for {timeout:.0f} s; "
            "check for a stuck `register` process, then run again"
        ) from None
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
    """A local HF folder for `ref`: a model URI downloaded under `dst`, an MLflow model folder's HF folder (both
    with adapters merged under `dst`), any other folder as is."""
    if not is_uri(ref):
        path = Path(ref)
        return hf_folder(path, str(ref), dst) if (path / "MLmodel").is_file() else path
    return hf_folder(download_model(str(ref), dst), str(ref), dst)


def download_model(ref: str, dst: Path) -> Path:
    """The MLflow model folder of the model URI `ref`, downloaded under `dst` (StageError when it is not there)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(ref), dst_path=str(dst), tracking_uri=uri))
    except (MlflowException, OSError) as e:
        raise StageError(
            f"{ref}: not found in {uri} ({str(e).splitlines()[0][:300]}); list versions with "
            "`mlflow models` / the UI, or pass a local model folder"
        ) from None
    return local


INDEX_ARTIFACT = "index"
"""The pyfunc artifact holding the retrieval index a version was evaluated with (serving/rag.py answers with it)."""


def shipped_index(local: Path) -> Path | None:
    """The retrieval index folder the seedlm MLflow model folder `local` carries, or None."""
    from mlflow.models import Model

    arts = (Model.load(str(local)).flavors.get("python_function") or {}).get("artifacts") or {}
    return local / arts[INDEX_ARTIFACT]["path"] if INDEX_ARTIFACT in arts else None


def hf_folder(local: Path, ref: str, dst: Path) -> Path:
    """The HF model folder inside the seedlm MLflow model at `local`; an adapter-only one merged into `dst`."""
    import mlflow
    from mlflow.models import Model

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
        print(
            "evaluate other models: --model [NAME=]PATH_OR_URI (repeatable; e.g. models:/seedlm@champion) "
            "--out DIR (default reports/evaluate-models)\n"
        )
    models: dict[str, str] = {}
    for ref in known.model:
        name, ref = ref_name(ref, set(models))
        models[name] = ref
    return models, known.out, rest


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

            path = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path="register/params.json", tracking_uri=uri or tracking_uri()
            )
            params = json.loads(Path(path).read_text())
    aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == str(version))
    return {
        "name": name,
        "version": str(version),
        "aliases": aliases,
        "run_id": mv.run_id,
        "tags": tags,
        "params": params or {},
    }
