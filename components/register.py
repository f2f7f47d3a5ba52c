"""Register stage: log the fine-tuned model to MLflow, version it, and gate champion promotion.

The only stage that talks to the MLflow registry. The runner has set the tracking URI and opened
this stage's run. Every new version gets alias `challenger`; alias `champion` moves to it only when
the gate passes (minimums reached, no regression against the current champion). Lineage (git, DVC
hashes, params, run ids, evaluation metrics) is stored as version tags. A failure after the version
is created deletes it again and restores the aliases: no half-registered versions.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version as pkg_version
from pathlib import Path
from typing import Any, Iterator

import yaml

from components.common import (StageContext, StageError, atomic_dir, read_json, read_meta,
                               sha256_dir, write_json, write_meta)
from components.config import GateConfig, Params, RegisterConfig, STAGES, config_hash, stage_config

log = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving.py")
EXAMPLE_PROMPT = "What is the capital of France?"
MAX_PARAMS_TAG = 5000
"""Chars; the `params` JSON tag stays below the strictest MLflow backend limit for tag values."""
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


# ---------------------------------------------------------------- the gate
def evaluate_gate(gate: GateConfig, challenger: dict[str, Any], champion: dict[str, float] | None,
                  champion_version: str | None = None) -> dict[str, Any]:
    """Apply the promotion rules (higher is better for every gate metric). Pure; no MLflow."""
    rules: list[dict[str, Any]] = []
    for m, lo in sorted(gate.min.items()):
        value = challenger[m]
        rules.append({"rule": "min", "metric": m, "value": value, "threshold": lo, "passed": value >= lo,
                      "detail": f"{m} = {value:.4f} {'>=' if value >= lo else '<'} minimum {lo:.4f}"})
    for m in sorted({gate.metric, *gate.max_regression}):
        allowed = gate.max_regression.get(m, 0.0)
        value = challenger[m]
        base = None if champion is None else champion.get(m)
        rule = {"rule": "max_regression", "metric": m, "value": value, "champion": base,
                "champion_version": champion_version, "allowed_drop": allowed}
        if champion is None:
            rule.update(passed=True, detail=f"no champion yet; {m} not compared")
        elif base is None:
            rule.update(passed=True, detail=f"champion v{champion_version} has no metric.{m} tag; not compared")
        else:
            drop = base - value
            ok = drop <= allowed + 1e-12
            rule.update(drop=drop, passed=ok, detail=(
                f"{m} = {value:.4f} vs champion v{champion_version} {base:.4f}: drop {drop:+.4f} "
                f"{'<=' if ok else '>'} allowed {allowed:.4f}"))
        rules.append(rule)
    passed = all(r["passed"] for r in rules)
    reasons = [r["detail"] for r in rules if not r["passed"]] or ["all rules passed"]
    return {"decision": "promoted" if passed else "rejected", "passed": passed, "metric": gate.metric,
            "rules": rules, "reasons": reasons, "champion_version": champion_version,
            "config": gate.model_dump(mode="json")}


def gate_markdown(name: str, version: str, gate: dict[str, Any], challenger: dict[str, Any]) -> str:
    lines = [f"# Gate report: {name} v{version}", "",
             f"**Decision: {gate['decision']}**"
             + (f" (champion stays v{gate['champion_version']})" if not gate["passed"]
                and gate["champion_version"] else ""), "",
             "| rule | metric | challenger | threshold / champion | passed | detail |",
             "|---|---|---|---|---|---|"]
    for r in gate["rules"]:
        ref = r.get("threshold", r.get("champion"))
        ref_s = "-" if ref is None else f"{ref:.4f}"
        lines.append(f"| {r['rule']} | {r['metric']} | {r['value']:.4f} | {ref_s} | "
                     f"{'yes' if r['passed'] else 'NO'} | {r['detail']} |")
    ci = challenger.get(f"{gate['metric']}_ci")
    if ci:
        lines += ["", f"{gate['metric']} confidence interval: [{ci[0]:.4f}, {ci[1]:.4f}]"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- provenance
def _git(repo_root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(repo_root: Path) -> dict[str, str]:
    commit = _git(repo_root, "rev-parse", "HEAD")
    status = _git(repo_root, "status", "--porcelain") if commit else None
    return {"git_commit": commit.strip() if commit else "unknown",
            "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower()}


def _tag_key(*parts: str) -> str:
    key = re.sub(r"[^/\w.\- ]", "_", ".".join(parts))
    return posixpath.normpath(key).lstrip("/")[:250]


def dvc_hashes(repo_root: Path) -> dict[str, str]:
    """`dvc.<stage>.<path>` -> md5 of every dep/out recorded in dvc.lock (empty without one).

    The register stage's own entry is left out: while it runs, that entry is the previous run's.
    """
    lock = repo_root / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise StageError(f"{lock}: not valid YAML ({e}); run `dvc repro` to rewrite it") from None
    tags = {}
    for stage, body in (data.get("stages") or {}).items():
        if stage == "register":
            continue
        for kind in ("deps", "outs"):
            for entry in (body or {}).get(kind) or []:
                if isinstance(entry, dict) and entry.get("path") and entry.get("md5"):
                    tags[_tag_key("dvc", str(stage), str(entry["path"]))] = str(entry["md5"])
    return tags


def _params_data(params: Params | None, meta: dict[str, Any], cfg: RegisterConfig) -> dict[str, Any]:
    if params is not None:
        return params.model_dump(mode="json")
    return {**(meta.get("config") or {}), "register": cfg.model_dump(mode="json")}


def _params_tag(params: Params | None, data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    if len(text) <= MAX_PARAMS_TAG:
        return text
    if params is not None:
        text = json.dumps({s: stage_config(params, s) for s in STAGES}, sort_keys=True, separators=(",", ":"))
        if len(text) <= MAX_PARAMS_TAG:
            return text
    return json.dumps({"truncated": True, "see": "run artifact register/params.json"})


def _lineage(meta: dict[str, Any], params: Params | None) -> dict[str, str]:
    cfg = meta.get("config") or {}
    if params is not None:
        return {"sft_method": params.sft.method, "pretrain_enabled": str(params.pretrain.enabled).lower()}
    method = (cfg.get("sft") or {}).get("method", "unknown")
    enabled = next((str(d["pretrain_enabled"]).lower() for d in (meta.get("result"), meta.get("inputs"))
                    if isinstance(d, dict) and "pretrain_enabled" in d), "unknown")
    return {"sft_method": str(method), "pretrain_enabled": enabled}


def _prefect_flow_run_id(ctx: StageContext) -> str | None:
    return (ctx.extra.get("prefect_flow_run_id") or os.environ.get("PREFECT__FLOW_RUN_ID")
            or os.environ.get("PREFECT__RUNTIME__FLOW_RUN__ID"))


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


def _pip_requirements() -> list[str]:
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            reqs.append(f"{name}=={pkg_version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


@contextlib.contextmanager
def _model_folder(model_dir: Path) -> Iterator[Path]:
    """The folder to ship: the sft folder itself, or a copy without the LoRA `adapter/` subfolder."""
    if not (model_dir / "adapter").is_dir():
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="seedlm-register-") as tmp:
        staged = Path(tmp) / "model"
        shutil.copytree(model_dir, staged, ignore=lambda d, names: ["adapter"] if Path(d) == model_dir else [])
        yield staged


def _log_model(cfg: RegisterConfig, folder: Path, size_mb: float) -> Any:
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    example = [EXAMPLE_PROMPT]
    gen_params = {"max_new_tokens": cfg.max_new_tokens, "temperature": 1.0, "do_sample": False}
    signature = infer_signature(example, ["an answer"], params=gen_params)
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(SERVING_CODE), artifacts={"hf_model": str(folder)},
        model_config={"max_new_tokens": cfg.max_new_tokens}, signature=signature,
        input_example=example, pip_requirements=_pip_requirements(),
        metadata={"model_size_mb": size_mb, "seedlm_stage": "register"})
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


def _run_link(run: Any) -> str:
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"runs:/{run.info.run_id} (experiment {run.info.experiment_id}, tracking {uri})"


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
    meta, evals = _read_inputs(model_dir, eval_metrics_path)
    metrics = _scalars(evals["sft"])
    _check_gate_metrics(cfg.gate, metrics, eval_metrics_path)
    lineage = _lineage(meta, params)
    if lineage["sft_method"] == "lora" and cfg.lora_format == "adapter":
        raise StageError("params.yaml: register.lora_format: adapter is not supported yet (the pyfunc "
                         "needs the base weights); set register.lora_format: merged")
    pdata = _params_data(params, meta, cfg)
    tags: dict[str, str] = {**git_state(repo_root), **dvc_hashes(repo_root), **lineage,
                            "params_hash": config_hash(pdata), "params": _params_tag(params, pdata),
                            "model_sha256": sha256_dir(model_dir)}
    tags.update({f"metric.{k}": json.dumps(v) for k, v in metrics.items()})
    tags.update({f"metric.pretrain.{k}": json.dumps(v) for k, v in _scalars(evals.get("pretrain") or {}).items()})
    if isinstance(evals.get("n_examples"), (int, float)):
        tags["eval.n_examples"] = str(evals["n_examples"])
    if flow_run := _prefect_flow_run_id(ctx):
        tags["prefect_flow_run_id"] = str(flow_run)

    name, client = cfg.model_name, MlflowClient()
    with _active_run(ctx) as run, _model_folder(model_dir) as folder:
        run_id = run.info.run_id
        parent = ctx.parent_run_id or (run.data.tags or {}).get("mlflow.parentRunId")
        tags["mlflow_run_id"] = run_id
        if parent:
            tags["parent_run_id"] = parent
        size_mb = _size_mb(folder)
        tags["model_size_mb"] = str(size_mb)
        info = _log_model(cfg, folder, size_mb)

        before = _registered_aliases(client, name)
        champ = (before or {}).get("champion")
        gate = evaluate_gate(cfg.gate, metrics, _champion_metrics(client, name, champ) if champ else None, champ)
        tags["gate.decision"] = gate["decision"]
        tags["gate.reasons"] = "; ".join(gate["reasons"])
        m = cfg.gate.metric
        description = (f"seedlm model from MLflow run {_run_link(run)}"
                       + (f", parent run {parent}" if parent else "")
                       + f". {m}={metrics[m]:.4f}; gate: {gate['decision']} ({tags['gate.reasons']}).")
        ver: str | None = None
        try:
            ver = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
            client.update_model_version(name, ver, description=description)
            aliases = ["challenger", *(["champion"] if gate["passed"] else [])]
            model_uri = f"models:/{name}/{ver}"
            result = {"model_name": name, "version": int(ver), "promoted": gate["passed"],
                      "gate_passed": gate["passed"], "decision": gate["decision"], "aliases": aliases,
                      "model_uri": model_uri, "champion_uri": f"models:/{name}@champion",
                      "champion_version": int(ver) if gate["passed"] else (int(champ) if champ else None),
                      "previous_champion": int(champ) if champ else None, "run_id": run_id,
                      "logged_model_uri": info.model_uri, "model_size_mb": size_mb}
            with atomic_dir(out_dir) as tmp:
                write_json(tmp / "registration.json", {**result, "gate": gate, "tags": tags})
                (tmp / "gate.md").write_text(gate_markdown(name, ver, gate, metrics), encoding="utf-8")
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


def run(params: Params, ctx: StageContext) -> dict:
    p = params.paths
    return register(params.register, Path(p.sft), Path(p.metrics) / "evaluate.json", Path(p.register),
                    repo_root=Path.cwd(), ctx=ctx, params=params)


if __name__ == "__main__":
    from components.runner import main
    raise SystemExit(main("register"))
