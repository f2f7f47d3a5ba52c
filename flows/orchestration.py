"""The pipeline's side of distributed runs: submit a stage to its deployment and watch it, apply
params overrides, link a registered version to its runs, and say in one place how a run ended."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from components.core.config import OrchestrationConfig, load_params
from components.core.params import set_dotted
from flows.stages import read_record, stage_cache_key

STAGE_FLOW = "seedlm-stage"
"""Flow name of the per-stage deployments: `seedlm-stage/<stage>`."""


class StageFailed(RuntimeError):
    """A stage's flow run on a worker ended Failed, Crashed (after its retries), Cancelled or timed out."""


log = logging.getLogger(__name__)


def apply_overrides(root: Path, overrides: dict[str, Any] | None) -> None:
    """Write dotted-key overrides into params.yaml (comments kept), as `dvc exp run -S` does; validated first."""
    if not overrides:
        return
    from dvc.utils.serialize import modify_yaml

    load_params(root / "params.yaml", overrides)  # raises ConfigError naming the bad key
    with modify_yaml(root / "params.yaml") as data:
        for key, value in overrides.items():
            set_dotted(data, key, value)


def _wait(client: Any, run_id: Any, timeout_s: float, poll_s: float) -> Any:
    """The flow run once final; cancelled (and returned) when it runs longer than `timeout_s`."""
    from prefect.states import Cancelling

    started = None
    while True:
        fr = client.read_flow_run(run_id)
        if fr.state and fr.state.is_final():
            return fr
        if fr.state and fr.state.is_running():
            started = started or time.monotonic()
            if time.monotonic() - started > timeout_s:
                client.set_flow_run_state(run_id, Cancelling(message=f"timed out after {timeout_s:.0f} s"), force=True)
                return client.read_flow_run(run_id)
        time.sleep(poll_s)


@task(name="submit", cache_key_fn=stage_cache_key, persist_result=True, cache_expiration=None)
def submit(stage: str, key: str, params: dict[str, Any], orch: OrchestrationConfig, storage: str) -> dict:
    """Run `stage` as a flow run of its deployment on its pool; resubmit it when it crashed (a lost worker);
    return the record it filed under `key`."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    log = get_run_logger()
    pool, timeout = orch.pools[stage], orch.timeouts[stage]
    for attempt in range(orch.retries + 1):
        name = stage if not attempt else f"{stage}-retry{attempt}"
        fr = run_deployment(
            f"{STAGE_FLOW}/{stage}",
            parameters={**params, "key": key},
            timeout=0,
            flow_run_name=name,
            tags=["seedlm", f"pool:{pool}"],
            as_subflow=True,
        )
        log.info("%s: flow run %s submitted to pool %s", stage, fr.name, pool)
        with get_client(sync_client=True) as client:
            fr = _wait(client, fr.id, timeout, orch.poll_s)
        state = fr.state
        if state.is_completed():
            return read_record(storage, key)
        if state.is_crashed() and attempt < orch.retries:
            log.warning(
                "%s: flow run %s crashed (%s); resubmitting in %d s (%d of %d); it resumes from its last checkpoint",
                stage,
                fr.name,
                state.message,
                orch.retry_delay_s,
                attempt + 1,
                orch.retries,
            )
            time.sleep(orch.retry_delay_s)
            continue
        raise StageFailed(
            f"{stage}: flow run {fr.name} on pool {pool} ended {state.type.value}: {state.message or 'no message'}"
        )
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- links and outcome
def prefect_run_url(flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run (None in ephemeral mode, which has no UI)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() if PREFECT_API_URL.value() else None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui and flow_run_id else None


def _artifact_url(uri: str, run_id: str, path: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/get-artifact?path={path}&run_uuid={run_id}"
    return f"runs:/{run_id}/{path}"


LINKS = "**Links**"
"""Heading of the links block in a version's description (written once, rewritten in place)."""


def annotate_version(mlflow: Any, reg: dict[str, Any], flow_run_id: str | None) -> dict[str, str]:
    """Give the version's description one links block: its MLflow run, the Prefect flow run that registered
    it and its gate report (only the links the register stage did not write). Idempotent: a later run that
    finds register up to date leaves the description as it is. Returns the links."""
    from mlflow import MlflowClient

    if not reg.get("model_name") or not reg.get("version") or not reg.get("run_id"):
        return {}
    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    mv = client.get_model_version(reg["model_name"], str(reg["version"]))
    run = client.get_run(reg["run_id"])
    web = uri.startswith(("http://", "https://"))
    links = {
        "MLflow run": (
            f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            if web
            else f"runs:/{run.info.run_id}"
        ),
        "Gate report": _artifact_url(uri, reg["run_id"], "register/gate.md"),
    }
    flow_run_id = (mv.tags or {}).get("prefect_flow_run_id") or flow_run_id  # the run that registered it
    if url := prefect_run_url(flow_run_id):
        links["Prefect flow run"] = url
    elif flow_run_id:
        links["Prefect flow run"] = f"{flow_run_id} (ephemeral Prefect, no UI)"
    base = re.sub(r"\n*" + re.escape(LINKS) + r"\n(?:- [^\n]*(?:\n|$))*", "\n", mv.description or "").strip()
    missing = [f"- {label}: {url}" for label, url in links.items() if url not in base]
    description = (base + "\n\n" + LINKS + "\n" + "\n".join(missing)).strip() if missing else base
    if description != (mv.description or "").strip():
        client.update_model_version(mv.name, mv.version, description=description)
    for label, url in links.items():
        client.set_model_version_tag(mv.name, mv.version, "link." + label.lower().replace(" ", "_"), url)
    return links


def outcome(mlflow: Any, reg: dict[str, Any], how: str) -> tuple[str, str]:
    """("promoted" | "gated_out" | "unchanged", why) for the register stage's result; "unchanged" when register
    was up to date (nothing was registered: the version and the aliases stay as they are)."""
    name, ver = reg.get("model_name"), reg.get("version")
    if how not in ("ran", "forced"):
        champ = None
        try:
            champ = mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version
        except Exception as e:  # noqa: BLE001 - the registry is optional for the message
            log.debug("no champion of %s: %s", name, e)
        standing = (
            f"v{ver} is champion" if str(champ) == str(ver) else (f"champion is v{champ}" if champ else "no champion")
        )
        return "unchanged", f"{name} v{ver} unchanged: register was up to date ({standing})"
    if reg.get("promoted"):
        return "promoted", f"{name} v{ver} promoted to champion"
    reasons = ""
    try:
        reasons = mlflow.MlflowClient().get_model_version(name, str(ver)).tags.get("gate.reasons", "")
    except Exception as e:  # noqa: BLE001 - the registry is optional for the message
        log.debug("no gate reasons for %s v%s: %s", name, ver, e)
    champ = reg.get("champion_version")
    return "gated_out", (
        f"{name} v{ver} gated out, stays challenger"
        + (f" (champion stays v{champ})" if champ else "")
        + f": {reasons or reg.get('decision', 'rejected')}"
    )
