"""bench/gpu_check.sh, the one prepared script for a GPU machine: valid bash, and its dry mode runs every step at
tiny sizes on CPU (QLoRA reported as skipped without CUDA). No number is asserted: speeds belong to the GPU run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_unless_dry():
    res = subprocess.run([str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr and "--dry" in res.stderr


def test_dry_run_covers_every_step(tmp_path):
    res = subprocess.run(
        [str(SCRIPT), "--dry", "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    saved = json.loads(next(tmp_path.glob("gpu_check-*.json")).read_text())
    assert saved["pretrain"]["params"] == report["pretrain"]["params"] and report["dry"] is True
    assert report["pretrain"]["tokens_per_s"] > 0 and report["pretrain"]["tflops"] > 0
    assert report["lora"]["tokens_per_s"] > 0 and report["lora"]["plan_gb"] > 0 and report["lora"]["peak_gb"] > 0
    assert report["lora"]["trainable"] > 0
    if not torch.cuda.is_available():
        assert report["pretrain"]["mfu"] is None and "needs CUDA" in report["qlora"]["skipped"]
    assert report["serve"]["batch1_tokens_per_s"] > 0 and report["serve"]["batch4_tokens_per_s"] > 0
