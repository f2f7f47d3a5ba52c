"""The one stage graph: ask DVC whether a stage is up to date, record what a run produced, share it.

A Prefect run skips a stage that `dvc status` reports unchanged and, after running one, commits it
to dvc.lock, so `dvc repro` and scheduled runs never redo each other's work. A stage's cache key is
DVC's own run-cache key (`stage_key`: cmd + deps + params, the hash `dvc repro` and `dvc exp run`
file their results under), computed from dvc.lock-style hashes so it is known before the stage's
inputs are on the machine. Stages on different machines share data through a DVC remote: `push`
uploads a stage's outputs (metrics too) and its run-cache entry; `materialize` checks the outputs a
dvc.lock entry names out of the local cache or the remote; `restore` reuses a run-cache hit.

    python -m flows.dvcstage push [--remote NAME] [--all-runs] [STAGE ...]   # share results
    python -m flows.dvcstage pull [--remote NAME] [STAGE ...]   # check out the outputs dvc.lock names
    python -m flows.dvcstage key STAGE                          # the stage's cache key
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from dvc.repo import Repo

from components.core.context import StageError
from components.core.io import write_text

logging.getLogger("dvc").setLevel(logging.WARNING)
LOCK = "dvc.lock"


@contextlib.contextmanager
def _repo(root: Path, lock: bool = False) -> Iterator[Repo]:
    """The DVC repo at `root`, entered from inside it (DVC resolves targets against the cwd)."""
    with contextlib.chdir(root), Repo(str(root)) as repo:
        if lock:
            with repo.lock:
                yield repo
        else:
            yield repo


def _stage(repo: Repo, name: str) -> Any:
    return repo.stage.collect(name)[0]


def changes(root: Path, stage: str) -> list:
    """What DVC sees changed for `stage` (empty when its lock entry matches deps, params and outs)."""
    with _repo(root) as repo:
        return repo.status(targets=[stage]).get(stage, [])


def cacheable(root: Path, stage: str) -> bool:
    """DVC's own rule: a stage whose only uncached outputs are metrics/plots may be restored from run-cache."""
    with _repo(root) as repo:
        return all(o.use_cache or o.is_metric or o.is_plot for o in _stage(repo, stage).outs)


def commit(root: Path, stage: str) -> dict:
    """Record the stage's current deps, params and outs in dvc.lock, the DVC cache and (when it is
    restorable) the run-cache; return its lock entry."""
    with _repo(root, lock=True) as repo:
        st = _stage(repo, stage)
        restorable = all(o.use_cache or o.is_metric or o.is_plot for o in st.outs)
        st.save(run_cache=restorable)
        st.commit()
        st.dump(update_pipeline=False)
    return lock_entries(root)[stage]


# ---------------------------------------------------------------- dvc.lock
def lock_entries(root: Path) -> dict[str, dict]:
    """Stage name -> its dvc.lock entry ({} without a lock file)."""
    path = Path(root) / LOCK
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise StageError(f"{path}: not valid YAML ({e}); delete it and run `dvc repro`") from None
    return dict(data.get("stages") or {})


def set_lock_entries(root: Path, entries: dict[str, dict]) -> None:
    """Write these stages' entries into dvc.lock (others kept), e.g. the record of a run done elsewhere."""
    if not entries:
        return
    path = Path(root) / LOCK
    data = {"schema": "2.0", "stages": lock_entries(root)}
    if all(data["stages"].get(k) == v for k, v in entries.items()):
        return
    with _repo(root) as repo:
        order = [s.name for s in repo.index.stages if getattr(s, "name", None)]
    merged = {**data["stages"], **entries}
    data["stages"] = {k: merged[k] for k in sorted(merged, key=lambda k: order.index(k) if k in order else 99)}
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def producers(root: Path, stage: str) -> dict[str, str]:
    """Dep path of `stage` -> the stage whose output it is (from dvc.yaml)."""
    with _repo(root) as repo:
        outs = {o.def_path: s.name for s in repo.index.stages for o in s.outs}
        return {
            d.def_path: outs[d.def_path]
            for d in _stage(repo, stage).deps
            if d.def_path in outs and outs[d.def_path] != stage
        }


# ---------------------------------------------------------------- the cache key
def stage_key(root: Path, stage: str) -> str | None:
    """DVC's run-cache key of `stage` as dvc.lock describes its inputs: outputs of other stages count
    with the md5 their lock entries record (they need not be on this machine), everything else is
    hashed here. None when an input is missing (nothing to key on yet)."""
    from dvc.dependency import ParamsDependency
    from dvc.dependency.base import DependencyDoesNotExistError
    from dvc.stage.cache import _get_cache_hash
    from dvc.stage.loader import StageLoader
    from dvc.stage.serialize import to_single_stage_lockfile

    lock = lock_entries(root)
    with _repo(root) as repo:
        st = _stage(repo, stage)
        produced = {o.def_path: s.name for s in repo.index.stages for o in s.outs if s.name != stage}
        recorded: list[dict] = []
        for dep in st.deps:
            if dep.def_path in produced:
                entry = next(
                    (
                        o
                        for o in (lock.get(produced[dep.def_path]) or {}).get("outs") or []
                        if o.get("path") == dep.def_path
                    ),
                    None,
                )
                if not entry or not entry.get("md5"):
                    return None
                recorded.append(entry)
        StageLoader.fill_from_lock(st, {"deps": recorded})  # resets the others: hash them below
        for dep in st.deps:
            if dep.def_path not in produced:
                try:
                    dep.save()
                except DependencyDoesNotExistError:
                    return None
                if not isinstance(dep, ParamsDependency) and not dep.hash_info:
                    return None
        return _get_cache_hash(to_single_stage_lockfile(st), key=True)


# ---------------------------------------------------------------- sharing through a remote
def remote_info(root: Path, name: str = "") -> tuple[str, str] | None:
    """(remote name, url/path) of `name` or of the repo's default remote; None when there is none."""
    from dvc.config import NoRemoteError

    with _repo(root) as repo:
        try:
            remote = repo.cloud.get_remote(name or None)
        except NoRemoteError:
            if name:
                raise StageError(
                    f"DVC remote {name!r} is not configured in {root}/.dvc/config; add it with "
                    f"`dvc remote add {name} /shared/path` (or clear orchestration.dvc_remote)"
                ) from None
            return None
        protocol = remote.fs.protocol if isinstance(remote.fs.protocol, str) else remote.fs.protocol[0]
        url = remote.path if protocol in ("local", "file") else f"{protocol}://{remote.path}"
        return remote.name, url


def _entry_stage(repo: Repo, entry: dict) -> Any:
    """A throwaway stage whose outs are exactly those of a lock entry, all treated as cached
    (the way DVC's run-cache handles metrics and other uncached outputs)."""
    return repo.stage_cache._create_stage(entry, wdir=repo.root_dir)


def materialize(root: Path, stages: list[str], remote: str | None = None, entries: dict | None = None) -> None:
    """Check out the outputs of `stages` as dvc.lock (or `entries`) records them: from the local DVC
    cache, else pulled from `remote` (None: the default remote, if any)."""
    lock = {**lock_entries(root), **(entries or {})}
    with _repo(root, lock=True) as repo:
        for name in stages:
            entry = lock.get(name)
            if not entry:
                raise StageError(
                    f"{root}/{LOCK}: no entry for stage {name!r}; run it first (`dvc repro {name}` or the pipeline)"
                )
            st = _entry_stage(repo, entry)
            if not any(o.workspace_status() for o in st.outs):
                continue  # already here
            if not st.outs_cached():
                try:
                    for objs in st.get_used_objs().values():
                        repo.cloud.pull(objs, remote=remote or None)
                except Exception as e:  # noqa: BLE001  (no remote, unreachable, missing objects)
                    raise StageError(
                        f"outputs of {name} ({', '.join(o.def_path for o in st.outs)}) are neither in "
                        f"the local DVC cache nor pullable from the remote ({type(e).__name__}: {e}); "
                        f"push them where they were made (`python -m flows.dvcstage push {name}`) "
                        f"or rerun it (`--force {name}`)"
                    ) from e
                if not st.outs_cached():
                    raise StageError(
                        f"outputs of {name} are missing from the DVC remote; push them where they "
                        f"were made (`python -m flows.dvcstage push {name}`) or rerun it (`--force {name}`)"
                    )
            with repo.stage_cache._cache_type_copy():
                st.checkout(force=True)


def push(root: Path, stages: list[str], remote: str | None = None, all_runs: bool = False) -> int:
    """Upload the outputs of `stages` (metrics and other uncached outputs too) and their run-cache
    entries to `remote` (with `all_runs`: every run-cache entry, e.g. `dvc exp run` results); return
    the number of files sent."""
    lock = lock_entries(root)
    keys = {name: stage_key(root, name) for name in stages}
    sent = 0
    with _repo(root, lock=True) as repo:
        for name in stages:
            if name not in lock:
                raise StageError(f"{root}/{LOCK}: no entry for stage {name!r}; nothing to push")
            st = _entry_stage(repo, lock[name])
            with repo.stage_cache._cache_type_copy():
                for out in st.outs:  # uncached outputs enter the cache the way DVC's run-cache does it
                    if out.changed_cache():
                        if not out.exists:
                            raise StageError(
                                f"{out}: not in this workspace nor in its DVC cache; cannot push {name} from here"
                            )
                        out.commit()
            sent += _push_objects(repo, st, remote)
        runs = _run_cache_keys(repo) if all_runs else [k for k in keys.values() if k]
        for key in runs:
            for value in _transfer_runs(repo, key, remote, upload=True):
                entry = repo.stage_cache._load_cache(key, value)
                if entry and (st := _entry_stage(repo, entry)).outs_cached():
                    sent += 1 + _push_objects(repo, st, remote)
    return sent


def _push_objects(repo: Repo, st: Any, remote: str | None) -> int:
    return sum(len(repo.cloud.push(objs, remote=remote or None).transferred) for objs in st.get_used_objs().values())


def _run_cache_keys(repo: Repo) -> list[str]:
    runs = Path(repo.stage_cache.cache_dir)
    return sorted({p.name for p in runs.glob("*/*") if p.is_dir()}) if runs.is_dir() else []


def _transfer_runs(repo: Repo, key: str, remote: str | None, upload: bool) -> list[str]:
    """Copy the run-cache entries filed under `key` to (or from) the remote; return their names."""
    from dvc import fs as dvcfs

    odb = repo.cloud.get_remote_odb(remote or None, "push --run-cache", hash_name="md5-dos2unix")
    src, dst = (repo.cache.legacy, odb) if upload else (odb, repo.cache.legacy)
    src_dir = src.fs.join(src.path, "runs", key[:2], key)
    if not src.fs.exists(src_dir):
        return []
    names = []
    for path in src.fs.find(src_dir):
        name = src.fs.name(path)
        target = dst.fs.join(dst.path, "runs", key[:2], key, name)
        if not dst.fs.exists(target):
            dvcfs.generic.copy(src.fs, path, dst.fs, target)
        names.append(name)
    return names


def restore(root: Path, stage: str, remote: str | None = None) -> bool:
    """Reuse a run-cache hit for `stage` (this workspace's, or fetched from `remote`): check its outputs
    out and record it in dvc.lock. False when no run with these inputs was ever filed."""
    from dvc.config import NoRemoteError
    from dvc.stage.cache import RunCacheNotFoundError, _can_hash, _get_stage_hash

    with _repo(root, lock=True) as repo:
        st = _stage(repo, stage)
        if not _can_hash(st):
            return False
        st.save_deps()
        if remote is not None:
            with contextlib.suppress(NoRemoteError):
                _transfer_runs(repo, _get_stage_hash(st), remote, upload=False)
        entry = repo.stage_cache._load(st)
    if not entry:
        return False
    try:
        materialize(root, [stage], remote, entries={stage: entry})
    except StageError:
        return False
    with contextlib.suppress(RunCacheNotFoundError):
        commit(root, stage)
    return not changes(root, stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.dvcstage", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("push", "pull", "key"))
    parser.add_argument("stages", nargs="*", help="stages (default: every stage in dvc.lock)")
    parser.add_argument("--remote", default="", help="DVC remote name (default: the repo's default remote)")
    parser.add_argument("--root", default=".", help="repo root")
    parser.add_argument(
        "--all-runs", action="store_true", help="push: every run-cache entry too (results of `dvc exp run` experiments)"
    )
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    stages = args.stages or list(lock_entries(root))
    try:
        if args.action == "key":
            for s in stages:
                print(s, stage_key(root, s))
        elif args.action == "push":
            print(f"pushed {push(root, stages, args.remote or None, args.all_runs)} files")
        else:
            materialize(root, stages, args.remote or None)
            print(f"checked out {', '.join(stages)}")
    except StageError as e:
        print(f"seedlm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
