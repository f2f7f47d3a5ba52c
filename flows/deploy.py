"""Create seedlm's Prefect deployments from params.yaml (`orchestration:`) on a Prefect server.

    python -m flows.deploy                                  # each pool's code: a clone of this checkout's HEAD
    python -m flows.deploy --pool-source gpu=/srv/seedlm    # gpu workers use that clone instead
    python -m flows.deploy --source https://git.example/seedlm.git --branch main   # workers clone per run
    python -m flows.deploy --automations [--notify BLOCK]   # + zombie-run detection (+ notifications)
    python -m flows.deploy --worker-clone cpu               # only create/update the cpu clone, print its path

Deployments: `seedlm/<schedule>` (the pipeline, one per `orchestration.schedules` entry, with its cron
schedule and its params overrides, on `orchestration.pipeline_pool`) and `seedlm-stage/<stage>` (one
stage, on `orchestration.pools[stage]`; the pipeline submits these in `mode: deployments`).
Settings come from params.yaml only; the server is PREFECT_API_URL.

By default a pool's runs work in a clone of this checkout made for that pool's workers,
`.seedlm/workers/<pool>` (`make worker POOL=<pool>` starts a worker there), checked out at this checkout's
committed HEAD: runs rewrite params.yaml (their overrides) and dvc.lock there, never in your checkout, and
uncommitted edits are neither deployed nor touched. Deploy again (or restart the worker) to ship new commits.
The clones share this checkout's DVC cache, so what `seedlm run` made here is reused there.
"""

from __future__ import annotations

import argparse
import subprocess
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
WORKERS = Path(".seedlm") / "workers"
"""Per-pool worker clones of a checkout, inside it (git-ignored): `<checkout>/.seedlm/workers/<pool>`."""


def _git(cwd: Path, *args: str) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise ConfigError(f"{cwd}: git {' '.join(args)} failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


def worker_clone(checkout: str | Path, pool: str) -> Path:
    """The clone of `checkout` where `pool`'s runs work (`.seedlm/workers/<pool>`), created on first use and
    force-checked-out at the checkout's committed HEAD; it shares the checkout's DVC cache."""
    checkout = Path(checkout).resolve()
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=checkout, capture_output=True).returncode:
        raise ConfigError(
            f"{checkout}: not a git checkout with a commit; workers run committed code (commit it, "
            "or pass --source / --pool-source)"
        )
    head = _git(checkout, "rev-parse", "HEAD")
    dest = checkout / WORKERS / pool
    if not (dest / ".git").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _git(checkout, "clone", "--quiet", "--no-checkout", str(checkout), str(dest))
    _git(dest, "fetch", "--quiet", "origin", "HEAD")
    _git(dest, "checkout", "--quiet", "--force", "--detach", head)
    local = dest / ".dvc" / "config.local"
    if (dest / ".dvc").is_dir() and not local.exists():  # one DVC cache: the clone reuses what the checkout made
        from dvc.repo import Repo

        with Repo(str(checkout)) as repo:
            cache = repo.cache.local_cache_dir
        local.write_text(f"[cache]\n    dir = {cache}\n", encoding="utf-8")
    return dest


def _uncommitted(checkout: Path) -> bool:
    res = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout, capture_output=True, text=True
    )
    return bool(res.stdout.strip())


def _source(pool: str, default: str | None, per_pool: dict[str, str], branch: str | None, root: Path) -> Any:
    src = per_pool.get(pool, default)
    if src is None:
        return str(worker_clone(root, pool))
    if "://" in src or src.startswith("git@"):
        from prefect.runner.storage import GitRepository

        return GitRepository(url=src, branch=branch)
    return str(Path(src).resolve())


def _shown(code: Any) -> str:
    return code if isinstance(code, str) else f"{code._url} (cloned for each run)"


def _check_pools(pools: set[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in sorted(pools):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                raise ConfigError(
                    f"work pool {pool!r} does not exist: create it first (`make pools`, or "
                    f"`prefect work-pool create {pool} --type process`)"
                ) from None


def deploy_all(
    params: Params,
    source: str | None = None,
    per_pool: dict[str, str] | None = None,
    branch: str | None = None,
    env: dict[str, str] | None = None,
    root: str | Path = ".",
) -> dict[str, dict[str, str]]:
    """Create or update every deployment; return {"<flow>/<deployment>": {"id", "pool", "code", "schedule"}}.

    `source` (None: each pool's worker clone of the checkout at `root`) is the code of every pool but those
    named in `per_pool`."""
    from prefect import flow
    from prefect.schedules import Cron

    orch, per_pool, root = params.orchestration, per_pool or {}, Path(root).resolve()
    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(orch.heartbeat_s), **(env or {})}
    _check_pools({orch.pipeline_pool, *(orch.pools[s] for s in STAGES)})
    code = {pool: _source(pool, source, per_pool, branch, root) for pool in {orch.pipeline_pool, *orch.pools.values()}}
    made: dict[str, dict[str, str]] = {}

    def apply(entry: str, name: str, pool: str, schedule: str = "", **kw: Any) -> None:
        deployment = flow.from_source(code[pool], entry).to_deployment(name=name, work_pool_name=pool, **kw)
        ident = deployment.apply(work_pool_name=pool)  # no console output (flow.deploy prints a table per call)
        made[deployment.full_name] = {"id": str(ident), "pool": pool, "code": _shown(code[pool]), "schedule": schedule}

    for name, sched in orch.schedules.items():
        check_overrides(params, sched.overrides, name)
        apply(
            PIPELINE_ENTRY,
            name,
            orch.pipeline_pool,
            f"{sched.cron} ({sched.timezone})",
            schedules=[Cron(sched.cron, timezone=sched.timezone)],
            parameters={"overrides": sched.overrides},
            job_variables={"env": env},
            concurrency_limit=1,
            tags=["seedlm"],
            description=f"seedlm pipeline, {sched.cron} ({sched.timezone}); overrides {sched.overrides or 'none'}",
        )
    for stage in STAGES:
        pool = orch.pools[stage]
        apply(
            STAGE_ENTRY,
            stage,
            pool,
            parameters={"stage": stage},
            job_variables={"env": env},
            tags=["seedlm", f"stage:{stage}"],
            description=f"seedlm stage {stage} on pool {pool}; submitted by the pipeline in mode: deployments",
        )
    return made


def summary(made: dict[str, dict[str, str]], automations: list[str]) -> str:
    """What `python -m flows.deploy` made, once: a line per deployment, then how to run it."""
    width = max(len(n) for n in made) if made else 0
    lines = ["seedlm deployments:"]
    for name, d in made.items():
        when = f", cron {d['schedule']}" if d["schedule"] else ""
        lines.append(f"  {name:<{width}}  pool {d['pool']}{when}; code {d['code']}")
    lines += [f"automation: {a}" for a in automations]
    pools = sorted({d["pool"] for d in made.values()})
    if pipelines := [n for n in made if n.startswith("seedlm/")]:
        lines += [
            "next: a worker per pool (" + ", ".join(f"`make worker POOL={p}`" for p in pools) + "), then "
            f"`prefect deployment run {pipelines[0]} --watch` (its last line says how the run ended)"
        ]
    return "\n".join(lines)


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
        help="code for every pool: a folder on the workers' machines or a git URL they clone for each run "
        "(default: a clone of this checkout per pool, .seedlm/workers/<pool>, at its committed HEAD)",
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
    parser.add_argument(
        "--worker-clone",
        metavar="POOL",
        help="only create or update POOL's worker clone of this checkout and print its path (`make worker`)",
    )
    args = parser.parse_args(argv)
    root = Path(args.params).resolve().parent
    try:
        if args.worker_clone:
            print(worker_clone(root, args.worker_clone))
            return 0
        params = load_params(args.params)
        per_pool = dict(_pair(x, "--pool-source") for x in args.pool_source)
        env = dict(_pair(x, "--env") for x in args.env)
        made = deploy_all(params, args.source, per_pool, args.branch, env, root)
        autos = (
            create_automations(params.orchestration.heartbeat_s, args.notify) if args.automations or args.notify else []
        )
    except ConfigError as e:
        print(f"seedlm: error: {e}", file=sys.stderr)
        return 2
    print(summary(made, autos))
    if args.source is None and _uncommitted(root):
        print(f"note: uncommitted changes in {root} are not deployed; the workers run its last commit", file=sys.stderr)
    return 0


def _pair(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
    return key, value


if __name__ == "__main__":
    raise SystemExit(main())
