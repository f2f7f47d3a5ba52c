"""Send saved tracking backlogs: `seedlm replay [FILES]` (to MLFLOW_TRACKING_URI if set)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from components.tracking.client import BACKLOG_DIR
from components.tracking.retries import _short, call, log


# ---------------------------------------------------------------- replay
def replay(path: Path) -> int:
    """Send one backlog file to its run(s); the file is removed when everything went through."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and not lines[-1].rstrip().endswith("}"):  # a kill while the last line was being written
        log.warning("%s: skipping its torn last line", path)
        lines = lines[:-1]
    entries = [json.loads(line) for line in lines if line.strip()]
    for e in entries:
        client, run_id, op = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or e["uri"]), e["run_id"], e["op"]
        args, kwargs = e.get("args", []), e.get("kwargs", {})
        if op == "metrics":
            ms = [Metric(*m) for m in e["metrics"]]
            for i in range(0, len(ms), 1000):
                call(client.log_batch, run_id, metrics=ms[i : i + 1000], what="log_batch")
        elif op == "terminate":
            call(client.set_terminated, run_id, e["status"], what="set_terminated")
        elif op in ("log_params", "set_tags"):
            data = {**(args[0] if args else {}), **kwargs.get("params", {}), **kwargs.get("tags", {})}
            items = [(Param if op == "log_params" else RunTag)(k, str(v)) for k, v in data.items()]
            call(client.log_batch, run_id, **{"params" if op == "log_params" else "tags": items}, what=op)
        else:  # log_param, set_tag, log_artifact, log_table, log_dict: the client's form takes the run id first
            call(getattr(client, op), run_id, *args, what=op, **kwargs)
    shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
    path.unlink()
    return len(entries)


def main(
    argv: list[str] | None = None, *, prog: str = "python -m components.tracking.backlog", example: str = ""
) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], epilog=f"example: {example}" if example else None
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser(
        "replay", help="send saved tracking backlogs", epilog=f"example: {example}" if example else None
    )
    rp.add_argument("files", nargs="*", type=Path, help=f"backlog files (default: {BACKLOG_DIR}/*.jsonl)")
    args = parser.parse_args(argv)
    files = args.files or sorted(BACKLOG_DIR.glob("*.jsonl"))
    failed = 0
    for f in files:
        try:
            print(f"{f}: {replay(f)} item(s) sent")
        except Exception as e:  # noqa: BLE001 - report each file, keep going
            failed += 1
            print(f"{f}: not sent ({_short(e)}); try again later", file=sys.stderr)
    return 1 if failed else 0


def replay_main(argv: list[str], *, prog: str = "seedlm replay", example: str = "") -> int:
    """`seedlm replay [FILES]`: the `replay` subcommand of main."""
    return main(["replay", *argv], prog=prog.removesuffix(" replay"), example=example)


if __name__ == "__main__":
    raise SystemExit(main())
