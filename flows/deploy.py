"""Create seedlm's Prefect deployments from params.yaml (`orchestration:`) on a Prefect server.

    python -m flows.deploy                                  # code from this checkout, on every pool
    python -m flows.deploy --pool-source gpu=/srv/seedlm    # gpu workers use their own clone
    python -m flows.deploy --source https://git.example/seedlm.git --branch main   # workers clone per run
    python -m flows.deploy --automations [--notify BLOCK]   # + zombie-run detection (+ notifications)

Deployments: `seedlm/<schedule>` (the pipeline, one per `orchestration.schedules` entry, with its cron
schedule and its params overrides, on `orchestration.pipeline_pool`) and `seedlm-stage/<stage>` (one
stage, on `orchestration.pools[stage]`; the pipeline submits these in `mode: deployments`).
Settings come from params.yaml only; the server is PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (quiet defaults)
from components.core.config import Params, load_params
from components.core.params import ConfigError
from components.core.stages import STAGES

PIPELINE_ENTRY = "flows/pipeline.py:pipeline"
STAGE_ENTRY = "flows/stages.py:stage_flow"
ZOMBIE_AUTOMATION = "seedlm: crash zombie flow runs"
NOTIFY_AUTOMATION = "seedlm: notify when a run fails or crashes"


def _source(pool: str, default: str, per_pool: dict[str, str], branch: str | None) -> Any:
    src = per_pool.get(pool, default)
    if "://" in src or src.startswith("git@"):
        from prefect.runner.storage import GitRepository

        return GitRepository(url=src, branch=branch)
    return str(Path(src).resolve())


def deploy_all(
    params: Params,
    source: str,
    per_pool: dict[str, str] | None = None,
    branch: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, str]:
    """Create or update every deployment; return {"<flow>/<deployment>": id}."""
    from prefect import flow
    from prefect.schedules import Cron

    orch, per_pool = params.orchestration, per_pool or {}
    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(orch.heartbeat_s), **(env or {})}
    ids: dict[str, str] = {}
    for name, sched in orch.schedules.items():
        check_overrides(params, sched.overrides, name)
        pipe = flow.from_source(_source(orch.pipeline_pool, source, per_pool, branch), PIPELINE_ENTRY)
        ids[f"seedlm/{name}"] = str(
            pipe.deploy(
                name=name,
                work_pool_name=orch.pipeline_pool,
                schedules=[Cron(sched.cron, timezone=sched.timezone)],
                parameters={"overrides": sched.overrides},
                job_variables={"env": env},
                concurrency_limit=1,
                build=False,
                push=False,
                print_next_steps=False,
                tags=["seedlm"],
                description=f"seedlm pipeline, {sched.cron} ({sched.timezone}); overrides {sched.overrides or 'none'}",
            )
        )
    for stage in STAGES:
        pool = orch.pools[stage]
        one = flow.from_source(_source(pool, source, per_pool, branch), STAGE_ENTRY)
        ids[f"seedlm-stage/{stage}"] = str(
            one.deploy(
                name=stage,
                work_pool_name=pool,
                parameters={"stage": stage},
                job_variables={"env": env},
                build=False,
                push=False,
                print_next_steps=False,
                tags=["seedlm", f"stage:{stage}"],
                description=f"seedlm stage {stage} on pool {pool}; submitted by the pipeline in mode: deployments",
            )
        )
    return ids


def check_overrides(params: Params, overrides: dict[str, Any], name: str) -> None:
    """Fail at deploy time, not at 3 am, when a schedule's overrides are invalid."""
    from components.core.config import parse_params

    data = params.model_dump(mode="json")
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"orchestration.schedules.{name}.overrides: {key}: no such setting")
            node = node[part]
        if last not in node:
            raise ConfigError(f"orchestration.schedules.{name}.overrides: {key}: no such setting")
        node[last] = value
    parse_params(data, f"orchestration.schedules.{name}.overrides")


def create_automations(heartbeat_s: int, notify_block: str | None = None) -> list[str]:
    """Mark flow runs Crashed when their heartbeats stop (a dead worker or machine), so the pipeline
    resubmits them; optionally notify through a notification block on Failed/Crashed seedlm runs."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    made = []
    _drop(ZOMBIE_AUTOMATION)
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=3 * heartbeat_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {3 * heartbeat_s} s")],
    ).create()
    made.append(ZOMBIE_AUTOMATION)
    if notify_block:
        from prefect.blocks.core import Block

        block = Block.load(notify_block)
        _drop(NOTIFY_AUTOMATION)
        Automation(
            name=NOTIFY_AUTOMATION,
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                match_related=ResourceSpecification(
                    {"prefect.resource.role": "flow", "prefect.resource.name": ["seedlm", "seedlm-stage"]}
                ),
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                SendNotification(
                    block_document_id=block._block_document_id,
                    subject="seedlm: {{ flow_run.name }} {{ flow_run.state.name }}",
                    body="{{ flow_run.name }} ({{ flow.name }}) ended {{ flow_run.state.name }}: "
                    "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}",
                )
            ],
        ).create()
        made.append(NOTIFY_AUTOMATION)
    return made


def _drop(name: str) -> None:
    """Delete the automations called `name` (so deploying twice replaces them)."""
    from prefect.automations import Automation

    while True:
        try:
            Automation.read(name=name).delete()
        except ValueError:
            return


def main(argv: list[str] | None = None, *, prog: str = "python -m flows.deploy", example: str = "") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], epilog=f"example: {example}" if example else None
    )
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument(
        "--source",
        default=".",
        help="code for every pool: a folder on the workers' machines "
        "(default: this checkout) or a git URL they clone for each run",
    )
    parser.add_argument(
        "--pool-source",
        action="append",
        default=[],
        metavar="POOL=SOURCE",
        help="code for one pool's workers instead (repeatable)",
    )
    parser.add_argument("--branch", help="git branch, with a git URL source")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of every flow run (e.g. MLFLOW_TRACKING_URI=http://host:5000)",
    )
    parser.add_argument("--automations", action="store_true", help="also create the zombie-run automation")
    parser.add_argument("--notify", metavar="BLOCK", help="notification block (type/name) for failed runs")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        per_pool = dict(_pair(x, "--pool-source") for x in args.pool_source)
        env = dict(_pair(x, "--env") for x in args.env)
        ids = deploy_all(params, args.source, per_pool, args.branch, env)
        made = (
            create_automations(params.orchestration.heartbeat_s, args.notify) if args.automations or args.notify else []
        )
    except ConfigError as e:
        print(f"seedlm: error: {e}", file=sys.stderr)
        return 2
    for name, ident in ids.items():
        print(f"deployment {name}: {ident}")
    for name in made:
        print(f"automation: {name}")
    return 0


def _pair(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
    return key, value


if __name__ == "__main__":
    raise SystemExit(main())
