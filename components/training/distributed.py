"""Data-parallel training across processes with torch.distributed (gloo on CPU, NCCL on CUDA).

`<stage>.devices: N > 1` makes pretrain/sft call `launch`, which starts N local worker processes (one per
GPU, or N CPU processes), runs the same stage function in each, and returns rank 0's result. Only rank 0
writes outputs, checkpoints and metrics; its metric reports travel back to this process, which owns the
tracking run. Under torchrun (WORLD_SIZE set) the processes already exist: `launch` joins the process group
in place. For a cluster, start every node with
`torchrun --nnodes M --nproc-per-node G ... -m components.training.distributed <stage>` (rank 0 tracks the run).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from components.core.context import RUN_ID, StageContext, StageError

log = logging.getLogger("seedlm.distributed")
TIMEOUT = datetime.timedelta(minutes=30)


def info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return info()[0] == 0


def active() -> bool:
    return info()[1] > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum/max over ranks (no-op in one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def reduce_max(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    return float(all_reduce(t, "max").item())


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def _block_classes(model: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def wrap(model: torch.nn.Module, strategy: str, device: torch.device, key: str) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every transformer block, then the root); returns the module to call."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = _block_classes(model)
        if not blocks:
            raise StageError(
                f"{key}.strategy: fsdp needs the model's block class (_no_split_modules) to shard; "
                f"{type(model).__name__} has none; use ddp"
            )
        for m in list(model.modules()):
            if type(m).__name__ in blocks:
                fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


# ---------------------------------------------------------------- starting the processes
def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _bind_device(local_rank: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def _die_with_parent() -> None:
    """A worker must not outlive its launcher (e.g. after a SIGKILL): Linux kills it with its parent, the
    fork server, which exits once no process holds its "alive" pipe; workers let go of theirs, so the
    launcher's death ends the server and with it the workers."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):

        def watch() -> None:
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def _resolve(target: str) -> Callable[..., dict]:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(
    rank: int,
    world: int,
    store: str,
    target: str,
    kwargs: dict,
    msgs: Any,
    threads: int,
    run_id: str | None,
    parent_run_id: str | None,
    progress: bool,
    extra: dict,
) -> None:
    _die_with_parent()
    torch.set_num_threads(threads)
    _bind_device(rank)
    RUN_ID.set(run_id)
    try:
        dist.init_process_group(_backend(), init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
        log_fn = (lambda m, s=None: msgs.put(("log", m, s))) if rank == 0 else (lambda m, s=None: None)
        ctx = StageContext(
            log=log_fn, run_id=run_id, parent_run_id=parent_run_id, progress=progress and rank == 0, extra=extra
        )
        result = _resolve(target)(**kwargs, ctx=ctx)
        if rank == 0:
            msgs.put(("result", result))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, which re-raises it
        msgs.put(("error", rank, type(e).__name__, str(e), traceback.format_exc()))
        raise SystemExit(1) from None


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=30)


def launch(target: str, kwargs: dict[str, Any], *, devices: int, ctx: StageContext, key: str) -> dict:
    """Run the stage function `target` ("module:function") as `f(**kwargs, ctx=...)` on `devices`
    data-parallel processes; return rank 0's result.

    Under torchrun the process group is joined in place (its size must equal `devices`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        world = int(os.environ["WORLD_SIZE"])
        if world != devices:
            raise StageError(
                f"{key}.devices: {devices}, but torchrun started {world} processes; set -S {key}.devices={world}"
            )
        _bind_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(_backend(), timeout=TIMEOUT)
        try:
            if dist.get_rank() != 0:
                ctx = StageContext(progress=False, run_id=ctx.run_id, parent_run_id=ctx.parent_run_id)
            return _resolve(target)(**kwargs, ctx=ctx)
        finally:
            dist.destroy_process_group()
    if torch.cuda.is_available() and torch.cuda.device_count() < devices:
        raise StageError(
            f"{key}.devices: {devices}, but only {torch.cuda.device_count()} GPUs are visible; lower {key}.devices"
        )
    # a fork server (started once per launching process, with the stage modules imported) forks the workers:
    # no fork of this possibly threaded/CUDA-initialised process, and no re-import per launch
    mp = torch.multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["components.pretrain", "components.sft"])
    msgs = mp.Queue()
    threads = max(1, torch.get_num_threads() // devices)
    with tempfile.TemporaryDirectory(prefix="seedlm-dist-") as tmp:
        store = str(Path(tmp) / "store")
        procs = [
            mp.Process(
                target=_worker,
                daemon=False,
                name=f"seedlm-{key}-rank{r}",
                args=(
                    r,
                    devices,
                    store,
                    target,
                    kwargs,
                    msgs,
                    threads,
                    ctx.run_id,
                    ctx.parent_run_id,
                    ctx.progress,
                    dict(ctx.extra),
                ),
            )
            for r in range(devices)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, msgs, ctx, key)
        finally:
            _stop(procs)


def _collect(procs: list, msgs: Any, ctx: StageContext, key: str) -> dict:
    result = None
    while True:
        try:
            msg = msgs.get(timeout=0.2)
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                try:  # a worker that failed said why just before it exited
                    msg = msgs.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError(
                        f"{key}: worker rank {dead[0][0]} died (exit code {dead[0][1]}); the run "
                        "resumes from its last checkpoint when started again"
                    ) from None
            else:
                if result is not None and all(p.exitcode == 0 for p in procs):
                    return result
                continue
        if msg[0] == "log":
            ctx.log(msg[1], msg[2])
        elif msg[0] == "result":
            result = msg[1]
        else:
            _, rank, kind, text, tb = msg
            if kind == "StageError":
                raise StageError(text)
            raise RuntimeError(f"{key}: rank {rank} failed: {kind}: {text}\n{tb}")


# ---------------------------------------------------------------- torchrun entry point
def main(argv: list[str] | None = None) -> int:
    """`torchrun ... -m components.training.distributed <stage> [--params P] [-S k=v]`: rank 0 tracks the run."""
    import importlib

    from components.core.config import load_params
    from components.core.params import ConfigError, parse_overrides
    from components.core.runner import run_stage, stage_resume_key

    parser = argparse.ArgumentParser(prog="python -m components.training.distributed")
    parser.add_argument("stage", choices=["pretrain", "sft"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    module = importlib.import_module(f"components.{args.stage}")
    try:
        params = load_params(args.params, parse_overrides(args.set))
        if int(os.environ.get("RANK", "0")) == 0:
            run_stage(args.stage, params, resume_key=stage_resume_key(args.stage, params))
        else:
            module.run(params, StageContext(progress=False))
    except (ConfigError, StageError) as e:
        print(f"seedlm {args.stage}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
