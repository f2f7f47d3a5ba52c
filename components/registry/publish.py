"""Publishing a registered version: the model logged as the seedlm pyfunc, the version created with its
tags and gate report, the stage's outputs written, aliases moved, and everything undone on failure."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import yaml

from components.core.config import RegisterConfig
from components.core.context import StageContext, StageError
from components.core.io import atomic_dir, write_json, write_meta
from components.core.redact import redact
from components.evaluation.gate import gate_markdown

log = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("pyfunc.py")
"""The registered pyfunc (MLflow models from code): copied into every model artifact."""
EXAMPLE_PROMPT = "What is the capital of France?"
MAX_TAG = 5000
"""Chars; JSON tags stay below the strictest MLflow backend limit for tag values."""
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
    "pydantic",
    "PyYAML",
)
"""What the pyfunc and the engine modules it ships import (pydantic, PyYAML: components/core/config.py)."""


def scalars(section: dict[str, Any]) -> dict[str, Any]:
    """Numbers and [lo, hi] intervals of one metrics section (nested groups are left out)."""
    out: dict[str, Any] = {}
    for k, v in section.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out[k] = [float(x) for x in v]
    return out


@dataclass
class Registration:
    """One registration, ready to publish: the logged model, its tags and gate decision, and where it goes."""

    cfg: RegisterConfig
    client: Any
    """MlflowClient of the registry."""
    info: Any
    """The logged model (mlflow.pyfunc.log_model's ModelInfo)."""
    tags: dict[str, str]
    gate: dict[str, Any]
    metrics: dict[str, Any]
    """The challenger's evaluation metrics."""
    run: Any
    """The register stage's MLflow run."""
    parent: str | None
    before: dict[str, str] | None
    """Aliases before this registration (None: the model is new); restored on failure."""
    champ: str | None
    out_dir: Path
    model_dir: Path
    eval_metrics_path: Path
    pdata: dict[str, Any]
    """The params the model was made with (registered as params.yaml)."""
    repo_root: Path
    ctx: StageContext


RAG_PACKAGES = ("bm25s", "lancedb", "pyarrow")
"""What retrieval over the shipped index imports (components/retrieval: search, lexical, store)."""


def _pip_requirements(adapter: bool, index: bool) -> list[str]:
    reqs = []
    for name in (*SERVING_PACKAGES, *(("peft",) if adapter else ()), *(RAG_PACKAGES if index else ())):
        try:
            reqs.append(f"{name}=={pkg_version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _model_config(cfg: RegisterConfig, base_tags: dict[str, str] | None) -> dict[str, Any]:
    config: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "model_name": cfg.model_name}
    if base_tags:
        config.update(
            base_path=base_tags["lora_base.path"],
            base_sha256=base_tags["lora_base.sha256"],
            base_hint="restore it with `git checkout <git_commit> && dvc checkout` (see "
            "`python -m components.registry.lineage`)",
        )
    return config


def log_model(
    cfg: RegisterConfig, folder: Path, size_mb: float, base_tags: dict[str, str] | None, index: Path | None = None
) -> Any:
    """Log `folder` as the seedlm pyfunc, with the generation engine's modules as its code_paths, and the retrieval
    `index` it was evaluated with (artifact `index`: chat, serve and the pyfunc answer from it)."""
    import tempfile

    import mlflow

    from components.registry import pyfunc, shipped
    from components.registry.models import INDEX_ARTIFACT

    artifacts = {"hf_adapter" if base_tags else "hf_model": str(folder)}
    if index is not None:
        artifacts[INDEX_ARTIFACT] = str(index)
    with tempfile.TemporaryDirectory(prefix="seedlm-code-") as tmp:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts=artifacts,
            code_paths=[str(shipped.stage(Path(tmp)))],
            model_config=_model_config(cfg, base_tags),
            signature=pyfunc.signature(cfg.max_new_tokens),
            input_example=({"messages": [{"role": "user", "content": EXAMPLE_PROMPT}]}, {"max_tokens": 4}),
            pip_requirements=_pip_requirements(bool(base_tags), index is not None),
            metadata={
                "model_size_mb": size_mb,
                "seedlm_stage": "register",
                "format": "adapter" if base_tags else "merged",
                "inputs": "chat: {messages, temperature, top_p, top_k, max_tokens, stop, n, seed, rag}; "
                "prompts: list of str, str or DataFrame prompt column",
            },
        )
    check_logged(info.model_uri, folder, min(4, cfg.max_new_tokens))
    return info


def check_logged(uri: str, folder: Path, max_tokens: int) -> None:
    """log_model only warns when the example fails; a model that cannot answer a prompt and a chat is not
    registered."""
    import mlflow

    model = mlflow.pyfunc.load_model(uri)
    out = model.predict([EXAMPLE_PROMPT], params={"max_tokens": max_tokens})
    chat = model.predict({"messages": [{"role": "user", "content": EXAMPLE_PROMPT}], "max_tokens": max_tokens})
    choices = chat.get("choices") if isinstance(chat, dict) else None
    if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)) or not choices:
        raise StageError(
            f"{folder}: the logged model returned {out!r} for one prompt and {chat!r} for one chat request; "
            "expected one string and a chat completion (check the tokenizer/chat template in the sft folder)"
        )


def registered_aliases(client: Any, name: str) -> dict[str, str] | None:
    """Alias -> version of the registered model; None when the model does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _champion_metrics(client: Any, name: str, ver: str) -> dict[str, float]:
    out = {}
    for k, v in client.get_model_version(name, ver).tags.items():
        if k.startswith("metric.") and k.count(".") == 1:
            with contextlib.suppress(ValueError):
                out[k.removeprefix("metric.")] = float(v)
    return out


def champion_evidence(
    client: Any, name: str, champ: str | None, evals: dict[str, Any]
) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """(champion metrics, paired comparison): evaluate's, when it evaluated this very champion; else tags."""
    if champ is None:
        return None, None
    pair = (evals.get("compare") or {}).get("sft_vs_champion")
    if (evals.get("sources") or {}).get("champion") == f"models:/{name}/{champ}" and pair:
        return scalars(evals.get("champion") or {}), pair
    return _champion_metrics(client, name, champ), None


def run_link(run: Any) -> str:
    import mlflow

    uri = redact(mlflow.get_tracking_uri())
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"runs:/{run.info.run_id} (experiment {run.info.experiment_id}, tracking {uri})"


def drop_orphans(client: Any, name: str, run: Any) -> None:
    """Delete the versions that registrations killed before they finished left behind: those of this run (a
    rerun after a kill resumes its run), and those without an alias whose run ended KILLED (the runner marks a
    dead process's run so) or FAILED (a rollback that failed too). One registration, one version."""
    dead = {
        r.info.run_id
        for status in ("KILLED", "FAILED")
        for r in client.search_runs(
            [run.info.experiment_id],
            f"attributes.status = '{status}' and tags.`seedlm.stage` = 'register'",
            max_results=1000,
        )
    }
    aliased = set((registered_aliases(client, name) or {}).values())  # (search results carry no aliases)
    for mv in client.search_model_versions(f"name='{name}'"):
        owner = (mv.tags or {}).get("mlflow_run_id")
        if owner == run.info.run_id or (owner in dead and str(mv.version) not in aliased):
            log.warning("register: deleting %s v%s, left by a killed registration (run %s)", name, mv.version, owner)
            client.delete_model_version(name, mv.version)


def _rollback(client: Any, name: str, ver: str | None, model_id: str, before: dict[str, str] | None) -> None:
    """Delete the half-registered version and restore the aliases as they were."""
    try:
        versions = (
            [ver]
            if ver
            else [
                mv.version
                for mv in client.search_model_versions(f"name='{name}'")
                if getattr(mv, "model_id", None) == model_id
            ]
        )
        for v in versions:
            client.delete_model_version(name, v)
        if before is None:
            if not client.search_model_versions(f"name='{name}'"):
                client.delete_registered_model(name)
            return
        for alias, v in before.items():
            if alias in ("champion", "challenger"):
                client.set_registered_model_alias(name, alias, v)
    except Exception:  # the original error is what matters; report this one and re-raise that
        log.exception("rollback of %s v%s failed; check the registry by hand", name, ver)


def publish(r: Registration) -> dict[str, Any]:
    """Create the version with its gate report, write out_dir and the run artifacts, then move aliases; a
    failure on the way deletes the version and restores the aliases."""
    import mlflow

    cfg, client, name, info, gate, run, champ = r.cfg, r.client, r.cfg.model_name, r.info, r.gate, r.run, r.champ

    tags = {**r.tags, "gate.decision": gate["decision"], "gate.reasons": "; ".join(gate["reasons"])[:MAX_TAG]}
    report = json.dumps(gate, sort_keys=True, default=str)
    tags["gate.report"] = (
        report
        if len(report) <= MAX_TAG
        else json.dumps({"decision": gate["decision"], "see": "run artifact register/gate.json"})
    )
    ver: str | None = None
    try:
        ver = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
        md = gate_markdown(name, ver, gate, r.metrics)
        client.update_model_version(
            name,
            ver,
            description=(
                f"seedlm model from MLflow run {run_link(run)}"
                + (f", parent run {r.parent}" if r.parent else "")
                + f". Lineage: `python -m components.registry.lineage models:/{name}/{ver}`.\n\n"
                + md
            ),
        )
        aliases = ["challenger", *(["champion"] if gate["passed"] else [])]
        result = {
            "model_name": name,
            "version": int(ver),
            "promoted": gate["passed"],
            "gate_passed": gate["passed"],
            "decision": gate["decision"],
            "aliases": aliases,
            "model_uri": f"models:/{name}/{ver}",
            "champion_uri": f"models:/{name}@champion",
            "champion_version": int(ver) if gate["passed"] else (int(champ) if champ else None),
            "previous_champion": int(champ) if champ else None,
            "run_id": run.info.run_id,
            "logged_model_uri": info.model_uri,
            "model_size_mb": float(tags["model_size_mb"]),
            "model_format": tags["model_format"],
        }
        with atomic_dir(r.out_dir) as tmp:
            write_json(tmp / "registration.json", {**result, "gate": gate, "tags": tags})
            write_json(tmp / "gate.json", gate)
            (tmp / "gate.md").write_text(md, encoding="utf-8")
            (tmp / "params.yaml").write_text(yaml.safe_dump(r.pdata, sort_keys=False), encoding="utf-8")
            if (r.repo_root / "dvc.lock").is_file():
                shutil.copy2(r.repo_root / "dvc.lock", tmp / "dvc.lock")
            write_meta(
                tmp,
                "register",
                cfg.model_dump(mode="json"),
                result,
                {
                    "model_dir": str(r.model_dir),
                    "eval_metrics": str(r.eval_metrics_path),
                    "model_sha256": tags["model_sha256"],
                    "params_hash": tags["params_hash"],
                },
            )
            mlflow.log_artifacts(str(tmp), "register")
            mlflow.log_dict(r.pdata, "register/params.json")
            r.ctx.log({"gate_passed": float(gate["passed"])}, None)
            for alias in aliases:
                client.set_registered_model_alias(name, alias, ver)
    except BaseException:
        _rollback(client, name, ver, info.model_id, r.before)
        raise
    return result
