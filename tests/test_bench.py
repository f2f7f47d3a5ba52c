"""`make bench` on a micro config: the three-way comparison runs end to end, saves its JSON, compares with
the previous saved run, and ends with one JSON line scripts can read. (No timing is asserted: speeds belong
to the benchmark itself, README "Speed".)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "--layers",
    "1",
    "--width",
    "32",
    "--heads",
    "2",
    "--context",
    "32",
    "--batch",
    "2",
    "--rounds",
    "1",
    "--threads",
    "1",
]


def bench(results: Path) -> tuple[dict, str]:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench/train_bench.py"), *MICRO, "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stdout


def test_bench_compares_three_ways_and_its_last_run(tmp_path):
    first, _ = bench(tmp_path)
    for key in ("pretrain_tok_s", "bare_tok_s", "trainer_tok_s"):
        assert first[key] > 0, key
    assert first["pretrain_vs_bare"] > 0 and 0 < first["mfu"]["pretrain_fp32"] < 1.5
    assert len(list(tmp_path.glob("train_bench-*.json"))) == 1
    second, table = bench(tmp_path)
    assert "pretrain_fp32" in table and "bare_fp32" in table and "trainer_fp32" in table
    line = next(x for x in table.splitlines() if x.startswith("vs last saved run"))
    assert "compare with care" not in line and "pretrain_tok_s" in line  # the same micro config, found again
    assert second["trainer_tok_s"] > 0 and len(list(tmp_path.glob("train_bench-*.json"))) == 2  # runs take > 1 s
