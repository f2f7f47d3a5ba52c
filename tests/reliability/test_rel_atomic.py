"""Atomic outputs: a kill at every single write of `atomic_dir` / `write_json` leaves the old output or the new
one, never a mix, and the next write sweeps what the kill left. A full disk or a read-only output folder
is one clear error, the previous output untouched. Plus an audit of every write in components/."""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
from pathlib import Path

import _harness as h
import pytest

from components.core import io
from components.core.context import StageError
from components.core.io import atomic_dir, write_json

FILES = ("a.txt", "nested/b.txt", "nested/deeper/c.bin", "seedlm.json")


def _write(out: Path, version: int) -> None:
    with atomic_dir(out) as tmp:
        for name in FILES:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(f"{name} v{version}\n" * 50)
    write_json(out.parent / "metrics.json", {"version": version, "payload": "x" * 500})


def _state(out: Path) -> int | None:
    """The version `out` holds: None if absent; fails on a mix of versions or missing files."""
    if not out.exists():
        return None
    found = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert found == set(FILES), f"incomplete output: {sorted(found)}"
    versions = {(out / n).read_text().split(" v")[1].split("\n")[0] for n in FILES}
    assert len(versions) == 1, f"mixed versions {versions}"
    return int(versions.pop())


def _killed_at(out: Path, version: int, at: int, exchange: bool) -> bool:
    """Write `version` in a forked child that SIGKILLs itself before its write number `at`; True if it died."""
    pid = os.fork()
    if pid == 0:  # the child: count file-system writes, die at number `at`
        try:
            count = [0]
            if not exchange:
                io._exchange = lambda a, b: False

            def hook(name):
                real = getattr(os, name)

                def f(*a, **k):
                    count[0] += 1
                    if count[0] == at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **k)

                setattr(os, name, f)

            for name in ("replace", "rename", "fsync", "mkdir", "unlink", "rmdir", "open"):
                hook(name)
            _write(out, version)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_kill_at_every_write(tmp_path, exchange):
    out = tmp_path / "out"
    _write(out, 1)
    kills = 0
    for at in range(1, 200):
        before = _state(out)
        died = _killed_at(out, before + 1, at, exchange)
        after = _state(out)  # old or new, complete, never a mix
        if after is None and not exchange:  # killed between the two renames: the previous one is set aside
            assert list(tmp_path.glob(".out.old-*")), (at, "output gone and no .old- copy")
            io._sweep(out)  # what the next writer does first: the previous output is back
            after = _state(out)
        assert after in (before, before + 1), (at, before, after)
        metrics = json.loads((tmp_path / "metrics.json").read_text())  # parses: never half-written
        assert metrics["version"] in (before, before + 1)
        if not died:
            assert after == before + 1 and h.leftovers(tmp_path) == []
            break
        kills += 1
        _write(out, after + 1)  # the rerun: a complete new output, and nothing of the killed writer left
        assert _state(out) == after + 1 and h.leftovers(tmp_path) == [], h.leftovers(tmp_path)
    print(f"\n{'rename exchange' if exchange else 'two renames'}: killed at each of {kills} writes, all recovered")
    assert kills >= 15, kills


def test_a_kill_between_the_two_renames_gets_the_previous_output_back(tmp_path):
    """Where there is no rename exchange, a kill after `out -> .old` and before `.tmp -> out` leaves no output:
    the next writer restores the previous one before it starts, so nothing is lost meanwhile."""
    out = tmp_path / "out"
    _write(out, 1)
    stale_pid = 2**22 - 3  # no such process
    os.replace(out, tmp_path / f".out.old-{stale_pid}-{io._HOST}-0000abcd")
    (tmp_path / f".out.tmp-{stale_pid}-{io._HOST}-1111abcd").mkdir()
    io._sweep(out)
    assert _state(out) == 1 and h.leftovers(tmp_path) == []


def test_a_live_writers_temp_folder_is_left_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}-{io._HOST}-2222abcd"
    live.mkdir()
    _write(out, 1)
    assert live.is_dir()


# ---------------------------------------------------------------- full and read-only disks
@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return h.make_repo(
        tmp_path_factory.mktemp("disk") / "repo",
        {"ingest.synthetic.entities": 4, "ingest.synthetic.paraphrases": 1},
        git=False,
    )


def _ingest(capsys, repo: Path, disk: Path, *args: str) -> tuple[int, str]:
    return h.cli(capsys, repo, "ingest", "-S", f"paths.raw={disk}/raw", *args, tracking=repo / "mlflow.db")


def test_disk_full(repo, capsys, tmp_path, monkeypatch):
    disk = tmp_path / "small"
    with h.mounted("full", disk, size_kb=256) as real:
        rc, err = _ingest(capsys, repo, disk)
        assert rc == 0, err
        before = h.tree(disk / "raw")
        if real:
            (disk / "filler").write_bytes(
                b"\0" * (256 * 1024 - sum((disk / "raw" / f).stat().st_size for f in before) - 16 * 1024)
            )
        else:  # no mount possible here (not root): the disk fills up while the output is written

            def full(root: Path) -> None:
                raise OSError(errno.ENOSPC, "No space left on device", str(root / "pretrain/shard-00000.jsonl"))

            monkeypatch.setattr(io, "_fsync_tree", full)
        rc, err = _ingest(
            capsys, repo, disk, "-S", "ingest.synthetic.entities=200", "-S", "ingest.synthetic.paraphrases=4"
        )
        monkeypatch.undo()
        line = [x for x in err.splitlines() if x.startswith("seedlm ingest: error:")]
        assert rc == 2 and line and "Traceback" not in err, err
        assert f"{disk}/raw: cannot write the output: no space left on the device" in line[0], line
        assert "the previous output is untouched" in line[0]
        assert h.tree(disk / "raw") == before and h.leftovers(disk) == []
        assert [s for n, s in h.runs(repo / "mlflow.db") if n == "ingest"][-1] == "FAILED"


def test_read_only_output_folder(repo, capsys, tmp_path, monkeypatch):
    disk = tmp_path / "ro"
    disk.mkdir()
    rc, err = _ingest(capsys, repo, disk)
    assert rc == 0, err
    before = h.tree(disk / "raw")
    with h.mounted("ro", disk) as real:
        if not real:
            real_mkdir = Path.mkdir

            def ro(self, *a, **k):
                if str(self).startswith(str(disk)) and ".raw.tmp-" in self.name:
                    raise OSError(errno.EROFS, "Read-only file system", str(self))
                return real_mkdir(self, *a, **k)

            monkeypatch.setattr(Path, "mkdir", ro)
        rc, err = _ingest(capsys, repo, disk, "-S", "seed=7")
        monkeypatch.undo()
        line = [x for x in err.splitlines() if x.startswith("seedlm ingest: error:")]
        assert rc == 2 and line and "Traceback" not in err, err
        assert "read-only file system" in line[0] and f"make {disk} writable" in line[0], line
        assert h.tree(disk / "raw") == before


def test_metrics_on_a_full_disk(tmp_path):
    with h.mounted("full", tmp_path / "m", size_kb=4) as real:
        target = tmp_path / "m" / "metrics.json"
        if not real:
            pytest.skip("cannot mount a tmpfs here (not root); test_disk_full covers the simulated case")
        (tmp_path / "m" / "filler").write_bytes(b"\0" * 4096)
        with pytest.raises(StageError, match="no space left on the device"):
            write_json(target, {"x": "y" * 10_000})
        assert not target.exists() and h.leftovers(tmp_path / "m") == []


# ---------------------------------------------------------------- the audit
WRITERS = {
    "write_text",
    "write_bytes",
    "save_pretrained",
    "save_to_disk",
    "tofile",
    "savefig",
    "save_file",
    "save",
    "to_csv",
    "to_parquet",
    "write_table",
    "dump",
}


def _writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) of every file write: open(..., 'w'/'a'/'x'), and the writer methods above."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if (
            name == "open"
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and any(c in str(node.args[1].value) for c in "wax")
        ):
            out.append((node.lineno, "open"))
        elif name in WRITERS and not (
            name == "dump"
            and isinstance(f, ast.Attribute)
            and getattr(f.value, "id", "") in ("json", "yaml")
            and len(node.args) < 2
        ):
            out.append((node.lineno, name))
    return out


def _safe_lines(tree: ast.AST) -> set[int]:
    """Lines inside `with atomic_dir(...)` blocks, in functions that write a temp name and os.replace it after
    an fsync, in write_json, and in functions of the module called only from such lines (transitively)."""
    safe: set[int] = set()
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any("atomic_dir" in ast.unparse(i.context_expr) for i in node.items):
            safe |= set(range(node.lineno, node.end_lineno + 1))
    for name, node in funcs.items():
        src = ast.unparse(node)
        if ("os.replace(" in src and "fsync" in src) or name == "write_json":
            safe |= set(range(node.lineno, node.end_lineno + 1))
    calls: dict[str, list[int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in funcs:
                calls.setdefault(name, []).append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in funcs and isinstance(node.ctx, ast.Load):
            calls.setdefault(node.id, []).append(node.lineno)  # passed as a value (e.g. a generator factory)
    changed = True
    while changed:
        changed = False
        for name, node in funcs.items():
            body = set(range(node.lineno, node.end_lineno + 1))
            sites = [ln for ln in calls.get(name, []) if ln not in body]
            if sites and all(ln in safe for ln in sites) and not body <= safe:
                safe |= body
                changed = True
    return safe


MINE = (
    "core/io.py",
    "core/config.py",
    "ingest.py",
    "data/fetch.py",
    "preprocess.py",
    "data/chat.py",
    "data/synthetic.py",
    "tracking/client.py",
    "tracking/retries.py",
    "tracking/backlog.py",
)
WORK_FILES = {("client.py", "open")}
"""Writes that are not outputs: retry appends to its backlog (each line fsynced; the replay skips a torn last line)."""


def _unsafe(name: str) -> list[str]:
    tree = ast.parse((h.ROOT / name).read_text())
    safe = _safe_lines(tree)
    return [
        f"{name}:{line} {call}"
        for line, call in _writes(tree)
        if line not in safe and (Path(name).name, call) not in WORK_FILES
    ]


def test_every_write_in_my_components_is_atomic():
    assert [u for n in MINE for u in _unsafe(f"components/{n}")] == []


SNIPPET = """
def outside(p):
    p.write_text("x")
def inside(out):
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("x")
        helper(tmp)
def helper(tmp):
    open(tmp / "b", "w").write("x")
def swap(p):
    with open(p.with_suffix(".tmp"), "w") as f:
        f.write("x"); f.flush(); os.fsync(f.fileno())
    os.replace(p.with_suffix(".tmp"), p)
"""


def test_the_audit_tells_safe_writes_from_unsafe_ones():
    """The auditor itself: a bare write is flagged; writes inside atomic_dir, in helpers only called from there,
    and temp+fsync+rename functions are not. Then the report of other issues' code (printed, for the report)."""
    tree = ast.parse(SNIPPET)
    safe = _safe_lines(tree)
    flagged = [line for line, _ in _writes(tree) if line not in safe]
    assert flagged == [3], flagged
    others = sorted(
        str(p.relative_to(h.ROOT))
        for pattern in ("components/**/*.py", "flows/*.py")
        for p in h.ROOT.glob(pattern)
        if str(p.relative_to(h.ROOT)).removeprefix("components/") not in MINE
    )
    found = [u for n in others for u in _unsafe(n)]
    print(
        "\nwrites outside atomic_dir / temp+fsync+rename (helpers called from another module's atomic_dir "
        "show up too):\n  " + "\n  ".join(found or ["none"])
    )
