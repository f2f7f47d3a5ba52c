"""Data-parallel training with torch.distributed on CPU (gloo): 2 processes at per-process batch B train like
1 process at batch 2B (the global batch is sharded, not duplicated), with DDP and FSDP, for pretrain and sft;
a crashed 2-process run resumes; only rank 0 reports; killing the launcher takes its workers with it.

Tolerance: the 2-process runs differ from the 1-process run only by float summation order (gradient
all-reduce, smaller matmuls): losses agree to 1e-5 relative, weights to 1e-4 absolute. A wrong global
batch (e.g. each rank training on the same rows) moves the loss by > 1e-2.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from components.core.config import LoraConfig, PretrainConfig, SftConfig
from components.core.context import StageContext, StageError
from components.core.io import read_json
from components.pretrain import pretrain
from components.sft import sft
from components.training import distributed as dd
from tests.test_train import TINY, make_processed

ROOT = Path(__file__).resolve().parents[1]
QUIET = StageContext(progress=False)
REL, ATOL = 1e-5, 1e-4
PT = dict(max_steps=40, warmup_steps=2, lr=3e-3, log_every=3, eval_every=20, checkpoint_every=4, precision="fp32")
"""Long enough that the launcher kills the workers (at step 9) well before they could finish."""


pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]  # conftest: the workers get max(1, threads // devices) = 1 each


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    return make_processed(tmp_path_factory.mktemp("processed"))


def _pretrain(processed: Path, out: Path, ctx: StageContext = QUIET, **cfg) -> dict:
    return pretrain(
        TINY.model_copy(update={"dropout": 0.0}),
        PretrainConfig(**{**PT, **cfg}),
        processed,
        out / "model",
        out / "metrics.json",
        out / "plot.csv",
        out / "ckpt",
        seed=3,
        ctx=ctx,
    )


@pytest.fixture(scope="module")
def one_process(processed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    _pretrain(processed, out, batch_size=8)
    return out


def _close_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < ATOL, worst


class Crash(RuntimeError):
    pass


def test_ddp_pretrain_matches_one_process_and_resumes(processed, one_process, tmp_path):
    ref = read_json(one_process / "model" / "seedlm.json")["result"]
    logs: list[tuple[int, dict]] = []

    def crash_at_9(metrics, step=None):
        logs.append((step, metrics))
        if step == 9 and "train_loss" in metrics:
            raise Crash("the tracking side fails at step 9")

    with pytest.raises(Crash):
        _pretrain(processed, tmp_path, StageContext(log=crash_at_9, progress=False), batch_size=4, devices=2)
    ckpts = list((tmp_path / "ckpt" / "pretrain").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "latest").is_file() and not (tmp_path / "model").exists()
    logs.clear()
    res = _pretrain(
        processed,
        tmp_path,
        StageContext(log=lambda m, s=None: logs.append((s, m)), progress=False),
        batch_size=4,
        devices=2,
    )
    # the workers were killed just after step 9 (step 8's checkpoint, written in the background, may be lost)
    assert res["resumed_from"] in (4, 8, 12) and res["devices"] == 2 and res["tokens"] == ref["tokens"] == 40 * 8 * 32
    assert res["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=REL)
    assert res["val_loss"] == pytest.approx(ref["val_loss"], rel=REL)
    _close_weights(tmp_path / "model", one_process / "model")
    # rank 0 alone reports: one train_loss per log step after the resume, not one per rank
    assert [s for s, m in logs if "train_loss" in m] == [s for s in range(3, 40, 3) if s > res["resumed_from"]] + [40]
    assert read_json(tmp_path / "metrics.json")["devices"] == 2 and res["peak_rss_mb"] > 0
    assert not ckpts[0].exists()
    # the same per-process batch on one process (half the global batch) is measurably another run
    half = _pretrain(processed, tmp_path / "half", batch_size=4)
    assert abs(half["final_train_loss"] - ref["final_train_loss"]) > 1e-2


def test_fsdp_pretrain_matches_one_process_and_resumes(processed, one_process, tmp_path):
    ref = read_json(one_process / "model" / "seedlm.json")["result"]

    def crash_at_9(metrics, step=None):
        if step == 9 and "train_loss" in metrics:
            raise Crash("the tracking side fails at step 9")

    with pytest.raises(Crash):
        _pretrain(
            processed, tmp_path, StageContext(log=crash_at_9, progress=False), batch_size=4, devices=2, strategy="fsdp"
        )
    res = _pretrain(processed, tmp_path, batch_size=4, devices=2, strategy="fsdp")
    assert res["resumed_from"] in (4, 8, 12)  # full weights + optimizer state, loaded back into the shards
    assert res["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=REL)
    assert res["val_loss"] == pytest.approx(ref["val_loss"], rel=REL)
    _close_weights(tmp_path / "model", one_process / "model")  # gathered from the shards, saved unsharded


@pytest.mark.parametrize("method,strategy", [("lora", "ddp"), ("full", "fsdp")])
def test_sft_two_processes_match_one(processed, one_process, tmp_path, method, strategy):
    cfg = SftConfig(
        max_steps=6,
        warmup_steps=1,
        lr=3e-3,
        log_every=3,
        eval_every=3,
        checkpoint_every=3,
        precision="fp32",
        method=method,
        lora=LoraConfig(r=4, alpha=8),
    )

    def run(out: Path, **upd) -> dict:
        return sft(
            cfg.model_copy(update=upd),
            processed,
            one_process / "model",
            out / "model",
            out / "m.json",
            out / "p.csv",
            out / "ckpt",
            seed=3,
            ctx=QUIET,
        )

    one = run(tmp_path / "one", batch_size=4)
    two = run(tmp_path / "two", batch_size=2, devices=2, strategy=strategy)
    # padded rows, response-only targets: the global token-weighted mean is what both runs minimise
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=REL)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=REL)
    _close_weights(tmp_path / "two" / "model", tmp_path / "one" / "model")
    if method == "lora":
        assert (tmp_path / "two" / "model" / "adapter" / "adapter_model.safetensors").is_file()


def test_torchrun_size_must_match_devices(processed, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(StageError, match=r"pretrain\.devices: 2, but torchrun started 4 processes"):
        _pretrain(processed, tmp_path, batch_size=4, devices=2)
    assert dd.info() == (0, 1)


def test_killing_the_launcher_takes_its_workers(processed, tmp_path):
    cfg = PretrainConfig(**{**PT, "max_steps": 100_000, "checkpoint_every": 1, "batch_size": 4, "devices": 2})
    script = (
        f"from pathlib import Path\nfrom components.core.config import PretrainConfig\n"
        f"from components.pretrain import pretrain\nfrom tests.test_train import TINY\n"
        f"if __name__ == '__main__':\n"
        f"    o = Path({str(tmp_path)!r})\n"
        f"    pretrain(TINY, PretrainConfig.model_validate_json({cfg.model_dump_json()!r}), Path({str(processed)!r}),"
        f" o / 'model', o / 'm.json', o / 'p.csv', o / 'ckpt', seed=3)\n"
    )
    (tmp_path / "launch.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "launch.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "ckpt").glob("pretrain/*/latest")):  # both ranks are training
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        family = psutil.Process(proc.pid).children(recursive=True)  # fork server, workers, resource tracker
        workers = [p for p in family if p.ppid() != proc.pid]
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, f"outlived their launcher: {[(p.pid, p.cmdline()[-1][:80]) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in family:  # never leave strays behind, even when the test fails
            with contextlib.suppress(psutil.Error):
                p.kill()
