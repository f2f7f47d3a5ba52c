"""`make bench-serve` on a tiny model: the server (a real process on 127.0.0.1) under 1 and 2 streaming clients
and the bare model.generate baseline run end to end, save their JSON and end with one JSON line. (No timing is
asserted: speeds belong to the benchmark itself.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--clients", "1,2", "--prompts", "3", "--max-tokens", "8", "--rounds", "1"]


def bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench/serve_bench.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_serve_bench_measures_the_server_against_bare_generate(sft_dir, tmp_path):
    res = bench("--model", str(sft_dir), *TINY, "--results", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["bare_tok_s"] > 0 and last["server_1_tok_s"] > 0 and last["server_2_tok_s"] > 0
    assert last["server_1_vs_bare"] > 0 and last["scaling_2_vs_1"] > 0 and last["p95_ttft_2_s"] > 0
    [saved] = tmp_path.glob("serve_bench-*.json")
    out = json.loads(saved.read_text())
    assert out["config"]["clients"] == [1, 2] and out["config"]["prompts"] == 3
    for c in ("1", "2"):
        s = out["server"][c]
        assert s["latency_p95_s"] >= s["latency_p50_s"] > 0 and s["ttft_p50_s"] > 0
        assert 0 <= s["same_as_bare"] <= 1
    [one] = out["rounds"]
    assert one["server"]["2"]["requests"] == 6 and one["bare"]["requests"] == 3  # each client sends every prompt
    assert "bare generate" in res.stdout and "server_1_vs_bare" in res.stdout


def test_without_a_champion_it_says_what_to_do(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/none.db"}
    res = bench(*TINY, "--results", str(tmp_path), env=env)
    assert res.returncode == 2
    assert "no models:/seedlm@champion" in res.stderr and "make run" in res.stderr
