"""Register stage: log the fine-tuned model to MLflow, version it, and gate champion promotion.

The only stage that writes to the MLflow registry. The runner has set the tracking URI and opened
this stage's run. Every new version gets alias `challenger`; alias `champion` moves to it only when
the gate passes: minimums reached, and no regression against the current champion, where a drop
counts only when it is significant (the paired-bootstrap CI of challenger - champion from the
evaluate stage lies below 0) and larger than the allowed one. The gate report (JSON + markdown) goes
on the version (tag `gate.report`, description) and into the run. Lineage (git, DVC hashes of raw,
processed data and tokenizer, base checkpoint, params, run ids) is stored as version tags and as
MLflow dataset inputs. Reading the champion, creating the version and moving aliases happen under a
file lock (components.registry.models.registry_lock), so concurrent registrations get distinct versions
and a consistent champion. A failure after the version is created deletes it again and restores
the aliases: no half-registered versions. A registration killed outright (SIGKILL) cannot clean up;
the next registration deletes what it left (its rerun continues the same MLflow run, `resume_key`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.core.config import GateConfig, Params, Paths, RegisterConfig, stage_config
from components.core.context import StageContext, StageError
from components.core.io import read_json, read_meta, sha256_dir, sha256_file
from components.core.params import config_hash
from components.core.redact import redact
from components.core.stages import STAGES
from components.evaluation.gate import evaluate_gate, gate_markdown  # noqa: F401 (the gate, re-exported)
from components.registry.models import registry_lock
from components.registry.provenance import (
    FLOW_RUN_TAG,
    dvc_hashes,
    flow_run_id,
    git_state,
    index_sha256,
    lock_md5,
    log_datasets,
    meta_hash,
    weights_sha256,
)
from components.registry.publish import (
    MAX_TAG,
    Registration,
    champion_evidence,
    drop_orphans,
    log_model,
    publish,
    registered_aliases,
    scalars,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- inputs
def _read_inputs(model_dir: Path, eval_metrics_path: Path) -> tuple[dict, dict]:
    meta = read_meta(model_dir, "sft")
    if not any(model_dir.glob("*.safetensors")):
        raise StageError(f"{model_dir}: no *.safetensors weights; re-run `dvc repro sft`")
    if not eval_metrics_path.is_file():
        raise StageError(f"{eval_metrics_path}: missing; run `dvc repro evaluate` (or the pipeline) first")
    evals = read_json(eval_metrics_path)
    if not isinstance(evals, dict) or not isinstance(evals.get("sft"), dict):
        raise StageError(f"{eval_metrics_path}: no 'sft' section of metrics; re-run `dvc repro evaluate`")
    return meta, evals


def _check_gate_metrics(gate: GateConfig, metrics: dict[str, Any], path: Path) -> None:
    for m in {gate.metric, *gate.min, *gate.max_regression}:
        if not isinstance(metrics.get(m), float):
            raise StageError(
                f"{path}: sft.{m} missing, but register.gate uses it; remove {m!r} from "
                f"register.gate in params.yaml or make evaluate compute it"
            )


# ---------------------------------------------------------------- provenance
def _params_data(params: Params | None, meta: dict[str, Any], cfg: RegisterConfig) -> dict[str, Any]:
    """The settings recorded on the version, with credentials (URL passwords, tokens) redacted."""
    if params is not None:
        return redact(params.model_dump(mode="json"))
    return redact({**(meta.get("config") or {}), "register": cfg.model_dump(mode="json")})


def _params_tag(params: Params | None, data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    if len(text) <= MAX_TAG:
        return text
    if params is not None:
        text = json.dumps(redact({s: stage_config(params, s) for s in STAGES}), sort_keys=True, separators=(",", ":"))
        if len(text) <= MAX_TAG:
            return text
    return json.dumps({"truncated": True, "see": "run artifact register/params.json"})


def _lineage(meta: dict[str, Any], params: Params | None) -> dict[str, str]:
    """sft method and whether its base was pretrained: from the sft folder's meta, else params."""
    method = ((meta.get("config") or {}).get("sft") or {}).get("method") or (params.sft.method if params else "unknown")
    enabled = next(
        (
            str(d[k]).lower()
            for d in (meta.get("result"), meta.get("inputs"))
            if isinstance(d, dict)
            for k in ("base_pretrained", "pretrain_enabled")
            if k in d
        ),
        None,
    )
    if enabled is None:
        enabled = str(params.pretrain.enabled).lower() if params is not None else "unknown"
    return {"sft_method": str(method), "pretrain_enabled": enabled}


def _under(root: Path, path: str | Path) -> Path:
    return Path(path) if Path(path).is_absolute() else root / path


def provenance(
    root: Path, paths: Paths, meta: dict[str, Any], params: Params | None
) -> tuple[dict[str, str], dict[str, tuple[Path, str | None]]]:
    """Lineage tags (data hashes, base checkpoint) and the dataset inputs {name: (path, digest)}."""
    tags: dict[str, str] = {}
    processed = (meta.get("inputs") or {}).get("processed") or paths.processed
    datasets: dict[str, tuple[Path, str | None]] = {}
    for key, path in (("raw", paths.raw), ("processed", processed), ("index", paths.index)):
        if key == "index" and not (_under(root, path) / "seedlm.json").is_file():
            continue  # no retrieval index (registered outside the pipeline)
        if md5 := lock_md5(root, path):
            tags[f"data.{key}.md5"] = md5
        elif fallback := meta_hash(_under(root, path)):  # not run through DVC: the output's own metadata
            tags[f"data.{key}.meta_hash"] = fallback
        datasets[key] = (_under(root, path), md5 or fallback)
    if content := index_sha256(_under(root, paths.index)):  # the index evaluate scored retrieval with
        tags["data.index.content_sha256"] = content
    tok = _under(root, processed) / "tokenizer"
    if tok.is_dir():
        tags["data.tokenizer.sha256"] = sha256_dir(tok)
        datasets["tokenizer"] = (tok, tags["data.tokenizer.sha256"][:32])
    tags.update(base_checkpoint(root, paths, params))
    return tags, datasets


def base_checkpoint(root: Path, paths: Paths, params: Params | None) -> dict[str, str]:
    """Lineage of model.init_from: as written, where pretrain read it (the HF cache for hf:), its Hub commit and
    its weights hash; from the pretrain output's metadata, else from params."""
    meta = _under(root, paths.pretrain) / "seedlm.json"
    inputs = (read_json(meta).get("inputs") or {}) if meta.is_file() else {}
    spec = inputs.get("init_from") or (params.model.init_from if params is not None else None)
    if not spec:
        return {}
    base = Path(inputs["init_from_path"]) if inputs.get("init_from_path") else _under(root, spec)
    tags = {
        "base_checkpoint.source": str(spec),
        "base_checkpoint.path": str(base.resolve()),
        "base_checkpoint.sha256": weights_sha256(base) if base.is_dir() else "missing",
    }
    if inputs.get("init_from_revision"):
        tags["base_checkpoint.revision"] = str(inputs["init_from_revision"])
    return tags


# ---------------------------------------------------------------- mlflow
@contextlib.contextmanager
def _active_run(ctx: StageContext) -> Iterator[Any]:
    """The runner's active run; else resume ctx.run_id; else a standalone run named 'register'."""
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        yield run
        return
    with mlflow.start_run(run_id=ctx.run_id, run_name=None if ctx.run_id else "register") as run:
        yield run


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


@contextlib.contextmanager
def _model_folder(model_dir: Path, adapter: bool) -> Iterator[Path]:
    """The folder to ship: the merged model without `adapter/`, or (adapter) the adapter + tokenizer files."""
    if not (model_dir / "adapter").is_dir():
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="seedlm-register-") as tmp:
        staged = Path(tmp) / "model"
        if adapter:
            shutil.copytree(model_dir / "adapter", staged)
            for p in model_dir.iterdir():  # tokenizer, chat template, generation config, seedlm.json
                if p.is_file() and p.suffix != ".safetensors" and p.name != "config.json":
                    shutil.copy2(p, staged / p.name)
        else:
            shutil.copytree(model_dir, staged, ignore=lambda d, names: ["adapter"] if Path(d) == model_dir else [])
        yield staged


def _lora_base(model_dir: Path, meta: dict[str, Any], root: Path, paths: Paths) -> tuple[Path, dict[str, str]]:
    """The base an adapter needs (from the sft meta) and its tags; StageError when it is not there."""
    base = _under(root, (meta.get("inputs") or {}).get("base") or paths.pretrain)
    if not (base / "config.json").is_file() or not any(base.glob("*.safetensors")):
        raise StageError(
            f"{base}: the LoRA base model of {model_dir} is missing; run `dvc repro pretrain` "
            "(or `dvc checkout`), or set register.lora_format: merged"
        )
    tags = {"lora_base.path": str(base.resolve()), "lora_base.sha256": weights_sha256(base)}
    if md5 := lock_md5(root, paths.pretrain):
        tags["lora_base.md5"] = md5
    return base, tags


# ---------------------------------------------------------------- the stage
def register(
    cfg: RegisterConfig,
    model_dir: Path,
    eval_metrics_path: Path,
    out_dir: Path,
    *,
    repo_root: Path,
    ctx: StageContext | None = None,
    params: Params | None = None,
) -> dict:
    """Log + register the sft model, tag its lineage, move aliases per the gate, write out_dir."""
    import mlflow
    from mlflow import MlflowClient

    ctx = ctx or StageContext()
    model_dir, eval_metrics_path, out_dir = Path(model_dir), Path(eval_metrics_path), Path(out_dir)
    paths = params.paths if params is not None else Paths()
    meta, evals = _read_inputs(model_dir, eval_metrics_path)
    metrics = scalars(evals["sft"])
    _check_gate_metrics(cfg.gate, metrics, eval_metrics_path)
    lineage = _lineage(meta, params)
    adapter = cfg.lora_format == "adapter" and lineage["sft_method"] == "lora"
    if adapter and not (model_dir / "adapter").is_dir():
        raise StageError(
            f"{model_dir / 'adapter'}: missing, but register.lora_format is adapter; re-run "
            "`dvc repro sft` or set register.lora_format: merged"
        )
    base_tags = _lora_base(model_dir, meta, repo_root, paths)[1] if adapter else {}
    pdata = _params_data(params, meta, cfg)
    data_tags, datasets = provenance(repo_root, paths, meta, params)
    tags: dict[str, str] = {
        **git_state(repo_root),
        **dvc_hashes(repo_root),
        **data_tags,
        **base_tags,
        **lineage,
        "params_hash": config_hash(pdata),
        "params": _params_tag(params, pdata),
        "model_sha256": sha256_dir(model_dir),
        "model_format": "adapter" if adapter else "merged",
    }
    tags.update({f"metric.{k}": json.dumps(v) for k, v in metrics.items()})
    tags.update({f"metric.pretrain.{k}": json.dumps(v) for k, v in scalars(evals.get("pretrain") or {}).items()})
    if isinstance(evals.get("n_examples"), (int, float)):
        tags["eval.n_examples"] = str(evals["n_examples"])
    if flow_run := flow_run_id(ctx.extra):
        tags[FLOW_RUN_TAG] = flow_run

    name, client = cfg.model_name, MlflowClient()
    with _active_run(ctx) as run, _model_folder(model_dir, adapter) as folder:
        run_id = run.info.run_id
        parent = ctx.parent_run_id or (run.data.tags or {}).get("mlflow.parentRunId")
        tags["mlflow_run_id"] = run_id
        if parent:
            tags["parent_run_id"] = parent
        size_mb = _size_mb(folder)
        tags["model_size_mb"] = str(size_mb)
        info = log_model(cfg, folder, size_mb, base_tags, datasets["index"][0] if "index" in datasets else None)
        tags["datasets"] = ",".join(log_datasets(datasets, info.model_id))
        with registry_lock(mlflow.get_tracking_uri(), repo_root):  # read champion .. move aliases: one at a time
            drop_orphans(client, name, run)
            before = registered_aliases(client, name)
            champ = (before or {}).get("champion")
            champion, paired = champion_evidence(client, name, champ, evals)
            gate = evaluate_gate(cfg.gate, metrics, champion, champ, paired)
            result = publish(
                Registration(
                    cfg,
                    client,
                    info,
                    tags,
                    gate,
                    metrics,
                    run,
                    parent,
                    before,
                    champ,
                    out_dir,
                    model_dir,
                    eval_metrics_path,
                    pdata,
                    repo_root,
                    ctx,
                )
            )
    return result


def resume_key(params: Params) -> str:
    """A rerun of the same registration (same settings, model and evaluation) after a kill continues its
    MLflow run, so that it can find and replace the version the killed attempt left (see runner)."""
    p = params.paths
    inputs = [Path(p.sft) / "seedlm.json", Path(p.metrics) / "evaluate.json"]
    digests = [sha256_file(f) if f.is_file() else "missing" for f in inputs]
    return f"register:{config_hash({'register': params.register.model_dump(mode='json'), 'inputs': digests})}"


def run(params: Params, ctx: StageContext) -> dict:
    p = params.paths
    return register(
        params.register,
        Path(p.sft),
        Path(p.metrics) / "evaluate.json",
        Path(p.register),
        repo_root=Path.cwd(),
        ctx=ctx,
        params=params,
    )


if __name__ == "__main__":
    from components.core.runner import main

    raise SystemExit(main("register"))
