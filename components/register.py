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
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any, Iterator

import yaml

from components.core.config import GateConfig, Params, Paths, RegisterConfig, stage_config
from components.core.context import StageContext, StageError
from components.core.io import atomic_dir, read_json, read_meta, sha256_dir, sha256_file, write_json, write_meta
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
    lock_md5,
    log_datasets,
    meta_hash,
    weights_sha256,
)

log = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving.py")
EXAMPLE_PROMPT = "What is the capital of France?"
MAX_TAG = 5000
"""Chars; JSON tags stay below the strictest MLflow backend limit for tag values."""
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")


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


def _scalars(section: dict[str, Any]) -> dict[str, Any]:
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


def _check_gate_metrics(gate: GateConfig, metrics: dict[str, Any], path: Path) -> None:
    for m in {gate.metric, *gate.min, *gate.max_regression}:
        if not isinstance(metrics.get(m), float):
            raise StageError(f"{path}: sft.{m} missing, but register.gate uses it; remove {m!r} from "
                             f"register.gate in params.yaml or make evaluate compute it")


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
    enabled = next((str(d[k]).lower() for d in (meta.get("result"), meta.get("inputs")) if isinstance(d, dict)
                    for k in ("base_pretrained", "pretrain_enabled") if k in d), None)
    if enabled is None:
        enabled = str(params.pretrain.enabled).lower() if params is not None else "unknown"
    return {"sft_method": str(method), "pretrain_enabled": enabled}


def _under(root: Path, path: str | Path) -> Path:
    return Path(path) if Path(path).is_absolute() else root / path


def provenance(root: Path, paths: Paths, meta: dict[str, Any], params: Params | None
               ) -> tuple[dict[str, str], dict[str, tuple[Path, str | None]]]:
    """Lineage tags (data hashes, base checkpoint) and the dataset inputs {name: (path, digest)}."""
    tags: dict[str, str] = {}
    processed = (meta.get("inputs") or {}).get("processed") or paths.processed
    datasets: dict[str, tuple[Path, str | None]] = {}
    for key, path in (("raw", paths.raw), ("processed", processed)):
        if md5 := lock_md5(root, path):
            tags[f"data.{key}.md5"] = md5
        elif fallback := meta_hash(_under(root, path)):  # not run through DVC: the output's own metadata
            tags[f"data.{key}.meta_hash"] = fallback
        datasets[key] = (_under(root, path), md5 or fallback)
    tok = _under(root, processed) / "tokenizer"
    if tok.is_dir():
        tags["data.tokenizer.sha256"] = sha256_dir(tok)
        datasets["tokenizer"] = (tok, tags["data.tokenizer.sha256"][:32])
    init_from = params.model.init_from if params is not None else None
    if init_from:
        base = _under(root, init_from)
        tags["base_checkpoint.path"] = str(base.resolve())
        tags["base_checkpoint.sha256"] = weights_sha256(base) if base.is_dir() else "missing"
    return tags, datasets


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


def _pip_requirements(adapter: bool) -> list[str]:
    reqs = []
    for name in (*SERVING_PACKAGES, *(("peft",) if adapter else ())):
        try:
            reqs.append(f"{name}=={pkg_version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


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
        raise StageError(f"{base}: the LoRA base model of {model_dir} is missing; run `dvc repro pretrain` "
                         "(or `dvc checkout`), or set register.lora_format: merged")
    tags = {"lora_base.path": str(base.resolve()), "lora_base.sha256": weights_sha256(base)}
    if md5 := lock_md5(root, paths.pretrain):
        tags["lora_base.md5"] = md5
    return base, tags


def _log_model(cfg: RegisterConfig, folder: Path, size_mb: float, base_tags: dict[str, str] | None) -> Any:
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    example = [EXAMPLE_PROMPT]
    gen_params = {"max_new_tokens": cfg.max_new_tokens, "temperature": 1.0, "do_sample": False}
    signature = infer_signature(example, ["an answer"], params=gen_params)
    model_config: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens}
    if base_tags:
        model_config.update(base_path=base_tags["lora_base.path"], base_sha256=base_tags["lora_base.sha256"],
                            base_hint="restore it with `git checkout <git_commit> && dvc checkout` (see "
                                      "`python -m components.registry.lineage`)")
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(SERVING_CODE),
        artifacts={"hf_adapter" if base_tags else "hf_model": str(folder)},
        model_config=model_config, signature=signature, input_example=example,
        pip_requirements=_pip_requirements(bool(base_tags)),
        metadata={"model_size_mb": size_mb, "seedlm_stage": "register", "format": "adapter" if base_tags else "merged"})
    # log_model only warns when the example fails; a model that cannot generate is not registered.
    out = mlflow.pyfunc.load_model(info.model_uri).predict(
        pd.DataFrame({"prompt": example}), params={"max_new_tokens": min(4, cfg.max_new_tokens)})
    if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)):
        raise StageError(f"{folder}: the logged model returned {out!r} for one prompt; expected one "
                         "string (check the tokenizer/chat template in the sft folder)")
    return info


def _registered_aliases(client: Any, name: str) -> dict[str, str] | None:
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


def champion_evidence(client: Any, name: str, champ: str | None, evals: dict[str, Any]
                      ) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """(champion metrics, paired comparison): evaluate's, when it evaluated this very champion; else tags."""
    if champ is None:
        return None, None
    pair = (evals.get("compare") or {}).get("sft_vs_champion")
    if (evals.get("sources") or {}).get("champion") == f"models:/{name}/{champ}" and pair:
        return _scalars(evals.get("champion") or {}), pair
    return _champion_metrics(client, name, champ), None


def _run_link(run: Any) -> str:
    import mlflow

    uri = redact(mlflow.get_tracking_uri())
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"runs:/{run.info.run_id} (experiment {run.info.experiment_id}, tracking {uri})"


def _drop_orphans(client: Any, name: str, run: Any) -> None:
    """Delete the versions that registrations killed before they finished left behind: those of this run (a
    rerun after a kill resumes its run), and those without an alias whose run ended KILLED (the runner marks a
    dead process's run so) or FAILED (a rollback that failed too). One registration, one version."""
    dead = {r.info.run_id for status in ("KILLED", "FAILED") for r in client.search_runs(
        [run.info.experiment_id], f"attributes.status = '{status}' and tags.`seedlm.stage` = 'register'",
        max_results=1000)}
    aliased = set((_registered_aliases(client, name) or {}).values())  # (search results carry no aliases)
    for mv in client.search_model_versions(f"name='{name}'"):
        owner = (mv.tags or {}).get("mlflow_run_id")
        if owner == run.info.run_id or (owner in dead and str(mv.version) not in aliased):
            log.warning("register: deleting %s v%s, left by a killed registration (run %s)", name, mv.version, owner)
            client.delete_model_version(name, mv.version)


def _rollback(client: Any, name: str, ver: str | None, model_id: str, before: dict[str, str] | None) -> None:
    """Delete the half-registered version and restore the aliases as they were."""
    try:
        versions = [ver] if ver else [mv.version for mv in client.search_model_versions(f"name='{name}'")
                                      if getattr(mv, "model_id", None) == model_id]
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


# ---------------------------------------------------------------- the stage
def register(cfg: RegisterConfig, model_dir: Path, eval_metrics_path: Path, out_dir: Path, *,
             repo_root: Path, ctx: StageContext | None = None, params: Params | None = None) -> dict:
    """Log + register the sft model, tag its lineage, move aliases per the gate, write out_dir."""
    import mlflow
    from mlflow import MlflowClient

    ctx = ctx or StageContext()
    model_dir, eval_metrics_path, out_dir = Path(model_dir), Path(eval_metrics_path), Path(out_dir)
    paths = params.paths if params is not None else Paths()
    meta, evals = _read_inputs(model_dir, eval_metrics_path)
    metrics = _scalars(evals["sft"])
    _check_gate_metrics(cfg.gate, metrics, eval_metrics_path)
    lineage = _lineage(meta, params)
    adapter = cfg.lora_format == "adapter" and lineage["sft_method"] == "lora"
    if adapter and not (model_dir / "adapter").is_dir():
        raise StageError(f"{model_dir / 'adapter'}: missing, but register.lora_format is adapter; re-run "
                         "`dvc repro sft` or set register.lora_format: merged")
    base_tags = _lora_base(model_dir, meta, repo_root, paths)[1] if adapter else {}
    pdata = _params_data(params, meta, cfg)
    data_tags, datasets = provenance(repo_root, paths, meta, params)
    tags: dict[str, str] = {**git_state(repo_root), **dvc_hashes(repo_root), **data_tags, **base_tags, **lineage,
                            "params_hash": config_hash(pdata), "params": _params_tag(params, pdata),
                            "model_sha256": sha256_dir(model_dir), "model_format": "adapter" if adapter else "merged"}
    tags.update({f"metric.{k}": json.dumps(v) for k, v in metrics.items()})
    tags.update({f"metric.pretrain.{k}": json.dumps(v) for k, v in _scalars(evals.get("pretrain") or {}).items()})
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
        info = _log_model(cfg, folder, size_mb, base_tags)
        tags["datasets"] = ",".join(log_datasets(datasets, info.model_id))
        with registry_lock(mlflow.get_tracking_uri(), repo_root):  # read champion .. move aliases: one at a time
            _drop_orphans(client, name, run)
            before = _registered_aliases(client, name)
            champ = (before or {}).get("champion")
            champion, paired = champion_evidence(client, name, champ, evals)
            gate = evaluate_gate(cfg.gate, metrics, champion, champ, paired)
            result = _publish(cfg, client, name, info, tags, gate, metrics, run, parent, before, champ, out_dir,
                              model_dir, eval_metrics_path, pdata, repo_root, ctx)
    return result


def _publish(cfg: RegisterConfig, client: Any, name: str, info: Any, tags: dict[str, str], gate: dict[str, Any],
             metrics: dict[str, Any], run: Any, parent: str | None, before: dict[str, str] | None,
             champ: str | None, out_dir: Path, model_dir: Path, eval_metrics_path: Path, pdata: dict[str, Any],
             repo_root: Path, ctx: StageContext) -> dict[str, Any]:
    """Create the version with its gate report, write out_dir and the run artifacts, then move aliases."""
    import mlflow

    tags = {**tags, "gate.decision": gate["decision"], "gate.reasons": "; ".join(gate["reasons"])[:MAX_TAG]}
    report = json.dumps(gate, sort_keys=True, default=str)
    tags["gate.report"] = report if len(report) <= MAX_TAG else json.dumps(
        {"decision": gate["decision"], "see": "run artifact register/gate.json"})
    ver: str | None = None
    try:
        ver = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
        md = gate_markdown(name, ver, gate, metrics)
        client.update_model_version(name, ver, description=(
            f"seedlm model from MLflow run {_run_link(run)}" + (f", parent run {parent}" if parent else "")
            + f". Lineage: `python -m components.registry.lineage models:/{name}/{ver}`.\n\n" + md))
        aliases = ["challenger", *(["champion"] if gate["passed"] else [])]
        result = {"model_name": name, "version": int(ver), "promoted": gate["passed"],
                  "gate_passed": gate["passed"], "decision": gate["decision"], "aliases": aliases,
                  "model_uri": f"models:/{name}/{ver}", "champion_uri": f"models:/{name}@champion",
                  "champion_version": int(ver) if gate["passed"] else (int(champ) if champ else None),
                  "previous_champion": int(champ) if champ else None, "run_id": run.info.run_id,
                  "logged_model_uri": info.model_uri, "model_size_mb": float(tags["model_size_mb"]),
                  "model_format": tags["model_format"]}
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / "registration.json", {**result, "gate": gate, "tags": tags})
            write_json(tmp / "gate.json", gate)
            (tmp / "gate.md").write_text(md, encoding="utf-8")
            (tmp / "params.yaml").write_text(yaml.safe_dump(pdata, sort_keys=False), encoding="utf-8")
            if (repo_root / "dvc.lock").is_file():
                shutil.copy2(repo_root / "dvc.lock", tmp / "dvc.lock")
            write_meta(tmp, "register", cfg.model_dump(mode="json"), result,
                       {"model_dir": str(model_dir), "eval_metrics": str(eval_metrics_path),
                        "model_sha256": tags["model_sha256"], "params_hash": tags["params_hash"]})
            mlflow.log_artifacts(str(tmp), "register")
            mlflow.log_dict(pdata, "register/params.json")
            ctx.log({"gate_passed": float(gate["passed"])}, None)
            for alias in aliases:
                client.set_registered_model_alias(name, alias, ver)
    except BaseException:
        _rollback(client, name, ver, info.model_id, before)
        raise
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
    return register(params.register, Path(p.sft), Path(p.metrics) / "evaluate.json", Path(p.register),
                    repo_root=Path.cwd(), ctx=ctx, params=params)


if __name__ == "__main__":
    from components.core.runner import main
    raise SystemExit(main("register"))
