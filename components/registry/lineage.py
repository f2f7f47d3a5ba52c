"""Where a registered model came from, and how to get it back.

Shared helpers (git state, DVC hashes from dvc.lock, registry look-ups, the registry lock, turning a
model URI into a local HF folder) and the `lineage` command:

    python -m components.registry.lineage models:/seedlm/3            # how to reproduce v3, what changed vs champion
    python -m components.registry.lineage models:/seedlm@challenger --against 2 --json

The tracking store is MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db` (as the runner uses)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from components.core.context import StageError
from components.core.params import flat
from components.registry.models import alias_version, parse_model_uri, tracking_uri, version_record
from components.registry.provenance import FLOW_RUN_TAG, LINEAGE_TAGS, _git


def compare(this: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Params that differ (key -> [other, this]) and lineage hashes that differ."""
    a, b = flat(other["params"]), flat(this["params"])
    params = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    keys = [*LINEAGE_TAGS, "git_commit", *sorted(k for k in {**this["tags"], **other["tags"]} if k.startswith("dvc."))]
    hashes = {
        k: [other["tags"].get(k), this["tags"].get(k)]
        for k in dict.fromkeys(keys)
        if other["tags"].get(k) != this["tags"].get(k)
    }
    return {"against": other["version"], "params": params, "hashes": hashes}


def reproduce_steps(rec: dict[str, Any], uri: str) -> list[str]:
    t, run = rec["tags"], rec["run_id"]
    steps = [
        f"export MLFLOW_TRACKING_URI={uri}",
        f"git checkout {t.get('git_commit', '<unknown commit>')}",
        f"mlflow artifacts download -r {run} -a register/params.yaml -d .   # the exact params (overrides included)",
    ]
    steps += [
        f"mlflow artifacts download -r {run} -a register/dvc.lock -d .   # the data/model hashes at registration",
        "dvc checkout   # data/raw, data/processed, models/* from the DVC cache (`dvc pull` with a remote)",
        "dvc repro      # recompute whatever the cache lacks (seeded: the same hashes come back)",
    ]
    if t.get("lora_base.path"):
        steps.append(
            f"# LoRA adapter: its base must hash to {t.get('lora_base.sha256', '?')[:16]}… (was {t['lora_base.path']})"
        )
    return steps


def lineage(ref: str, against: str | None = "champion", uri: str | None = None) -> dict[str, Any]:
    uri = uri or tracking_uri()
    name, ver = parse_model_uri(ref, uri)
    rec = version_record(name, ver, uri)
    out: dict[str, Any] = {"model_uri": f"models:/{name}/{ver}", **rec, "reproduce": reproduce_steps(rec, uri)}
    other = alias_version(name, against, uri) if against and not against.isdigit() else against
    if other and str(other) != ver:
        out["changes"] = compare(rec, version_record(name, str(other), uri))
        out["changes"]["against_ref"] = against
        if (a := rec["tags"].get("git_commit")) and (b := out["changes"]["hashes"].get("git_commit", [None])[0]):
            out["changes"]["code"] = (_git(Path.cwd(), "diff", "--stat", b, a) or "").strip() or None
    return out


def render(info: dict[str, Any]) -> str:
    t = info["tags"]
    lines = [
        f"{info['model_uri']}  aliases: {', '.join(info['aliases']) or '-'}  gate: {t.get('gate.decision', '?')}",
        f"  run {info['run_id']}  parent {t.get('parent_run_id', '-')}  flow run {t.get(FLOW_RUN_TAG, '-')}",
        f"  git {t.get('git_commit', '?')} (dirty: {t.get('git_dirty', '?')})  params {t.get('params_hash', '?')}",
    ]
    lines += [f"  {k}: {t[k]}" for k in LINEAGE_TAGS if k in t and k != "params_hash"]
    lines += ["", "Reproduce:", *(f"  {s}" for s in info["reproduce"])]
    ch = info.get("changes")
    if ch:
        lines += ["", f"Changes against {ch['against_ref']} (v{ch['against']}):"]
        lines += [f"  param {k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in ch["params"].items()] or [
            "  params: identical"
        ]
        lines += [f"  {k}: {a} -> {b}" for k, (a, b) in ch["hashes"].items()] or ["  data/code hashes: identical"]
        if ch.get("code"):
            lines += ["  code:", *(f"    {x}" for x in ch["code"].splitlines())]
    else:
        lines += ["", "No other version to compare with (it is the champion, or there is none)."]
    return "\n".join(lines)


def main(
    argv: list[str] | None = None, *, prog: str = "python -m components.registry.lineage", example: str = ""
) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], epilog=f"example: {example}" if example else None
    )
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
