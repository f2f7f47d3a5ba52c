"""`make bench-data` on tiny corpora: every measurement runs end to end, the table and the saved JSON are written,
and the last line is one JSON object with the numbers issue 13 asks for. (No timing is asserted: speeds belong
to the benchmark itself.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_data_bench_measures_everything_and_ends_with_json(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/data_bench.py"),
            "--sizes",
            "0.3,1",
            "--workers",
            "2",
            "--packing-steps",
            "1",
            "--packing-rounds",
            "1",
            "--results",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("ingest_mb_s", "preprocess_mb_s", "ingest_peak_rss_mb", "preprocess_peak_rss_mb"):
        assert set(out[key]) == {"0.3", "1"} and all(v > 0 for v in out[key].values()), key
    for key in ("encode_upper_bound_mb_s", "preprocess_1_worker_mb_s", "workers_speedup", "packing_gain"):
        assert out[key] > 0, key
    assert "preprocess_memory_growth" in out and out["workers"] == 2
    assert "tokenizers batch encode alone" in res.stdout and "SFT packing" in res.stdout
    saved = json.loads(next(tmp_path.glob("data_bench-*.json")).read_text())
    assert saved["runs"]["1"]["preprocess"]["kept"] > 0
