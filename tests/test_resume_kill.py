"""SIGKILL a real `python -m components.<stage>` run mid-training, then run it again: it resumes from its
last checkpoint, ends bit-identical to an uninterrupted run (CPU, fixed seed, one thread), and continues
the same MLflow run (tmp sqlite store), leaving nothing RUNNING. Plus: torn checkpoint writes are ignored,
bf16 + gradient accumulation resume exactly, a failing batch source stops the loop with its checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from components.core.config import TrainConfig, load_params
from components.core.context import StageContext, StageError
from components.core.io import read_json
from components.core.params import parse_overrides
from components.pretrain import pretrain, window_source
from components.sft import sft
from components.training import checkpoint as ck
from components.training.loop import train
from components.training.model import build_model
from tests.test_train import RESUME_PT, TINY, Crash, _assert_same_weights, _pretrain, crash_at, make_processed

ROOT = Path(__file__).resolve().parents[1]
QUIET = StageContext(progress=False)


pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]  # conftest: the subprocesses run with OMP_NUM_THREADS=1: same kernels, same bits


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A tiny workspace: processed data, a pretrained base for sft, params.yaml with every path inside it."""
    root = tmp_path_factory.mktemp("repo")
    make_processed(root / "processed")
    paths = {
        k: str(root / v)
        for k, v in dict(
            sources="sources",
            raw="raw",
            processed="processed",
            pretrain="models/pretrain",
            sft="models/sft",
            evaluate="eval",
            register="register",
            metrics="metrics",
            plots="plots",
            checkpoints="ckpt",
        ).items()
    }
    run = dict(warmup_steps=5, batch_size=4, lr=2e-3, log_every=10, eval_every=50, checkpoint_every=1)
    params = {
        "seed": 7,
        "paths": paths,
        "model": dict(arch="gpt2", n_layer=2, n_embd=64, n_head=2, context_length=32, dropout=0.1),
        "pretrain": dict(max_steps=60, precision="fp32", **run),
        "sft": dict(max_steps=60, precision="fp32", lora=dict(r=4, alpha=8, dropout=0.1), **run),
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    p = load_params(root / "params.yaml")  # the base model sft starts from (a short in-process pretrain)
    short = p.pretrain.model_copy(update={"max_steps": 20, "checkpoint_every": 100})
    pretrain(
        p.model,
        short,
        root / "processed",
        Path(paths["pretrain"]),
        root / "base.json",
        root / "base.csv",
        root / "base-ckpt",
        seed=p.seed,
        ctx=QUIET,
    )
    import mlflow

    mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").create_experiment("seedlm")  # tables, once
    return root


def _cmd(repo: Path, stage: str, overrides: list[str]) -> list[str]:
    sets = [a for o in overrides for a in ("-S", o)]
    return [sys.executable, "-m", f"components.{stage}", "--params", str(repo / "params.yaml"), "--no-progress", *sets]


def _start(repo: Path, stage: str, overrides: list[str]) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        _cmd(repo, stage, overrides), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _kill_after_checkpoints(
    procs: dict[str, subprocess.Popen], ckpts: dict[str, Path], min_step: int = 3
) -> dict[str, int]:
    """SIGKILL each run as soon as its checkpoint of step >= min_step exists; the step each was killed at."""
    killed: dict[str, int] = {}
    deadline = time.monotonic() + 150
    try:
        while len(killed) < len(procs) and time.monotonic() < deadline:
            for name, proc in procs.items():
                if name in killed:
                    continue
                latest = ckpts[name] / "latest"  # replaced atomically: never a torn read
                step = int(latest.read_text().strip().removeprefix("step-")) if latest.is_file() else -1
                if step >= min_step:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed[name] = step
                elif proc.poll() is not None:
                    pytest.fail(
                        f"{name} ended (rc {proc.returncode}) before it could be killed:\n{proc.stderr.read()[-3000:]}"
                    )
            time.sleep(0.005)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert len(killed) == len(procs), f"no checkpoint within 150 s: {sorted(set(procs) - set(killed))}"
    return killed


def _runs(repo: Path, key: str) -> list:
    """The MLflow runs of one stage + settings (the resume key names them)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("seedlm")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`seedlm.resume_key` = '{key}'")


def test_pretrain_and_sft_survive_sigkill(repo, tmp_path):
    """pretrain, sft full and sft LoRA (dropout on: the RNG states must be restored too), killed side by side."""
    from components.core.runner import stage_resume_key

    models = repo / "models"  # models/pretrain holds the base the sft runs start from
    cases = {
        "pretrain": ("pretrain", [f"paths.pretrain={models / 'pretrain-killed'}"]),
        "sft-full": ("sft", ["sft.method=full", f"paths.sft={models / 'sft-full'}"]),
        "sft-lora": ("sft", ["sft.method=lora", f"paths.sft={models / 'sft-lora'}"]),
    }
    params = {n: load_params(repo / "params.yaml", parse_overrides(o)) for n, (_, o) in cases.items()}
    keys = {n: stage_resume_key(stage, params[n]) for n, (stage, _) in cases.items()}
    assert len(set(keys.values())) == 3 and all(keys.values())
    ckpts = {n: repo / "ckpt" / cases[n][0] / keys[n].split(":")[1] for n in cases}
    outs = {"pretrain": models / "pretrain-killed", "sft-full": models / "sft-full", "sft-lora": models / "sft-lora"}

    killed = _kill_after_checkpoints({n: _start(repo, st, o) for n, (st, o) in cases.items()}, ckpts)
    for name, key in keys.items():
        assert not outs[name].exists(), name  # killed mid-training: no output yet
        # what a kill leaves behind: a RUNNING run (KILLED once another stage run reaps it)
        assert [r.info.status for r in _runs(repo, key)] in (["RUNNING"], ["KILLED"]), name
    resumed = {n: _start(repo, st, o) for n, (st, o) in cases.items()}

    # meanwhile, the uninterrupted references, in this process, never checkpointing (saving changes nothing)
    refs = {}
    never = {"checkpoint_every": 10_000}
    p = params["pretrain"]
    refs["pretrain"] = pretrain(
        p.model,
        p.pretrain.model_copy(update=never),
        repo / "processed",
        tmp_path / "pretrain",
        tmp_path / "m.json",
        tmp_path / "p.csv",
        tmp_path / "ck",
        seed=p.seed,
        ctx=QUIET,
    )
    for name in ("sft-full", "sft-lora"):
        p = params[name]
        refs[name] = sft(
            p.sft.model_copy(update=never),
            repo / "processed",
            Path(p.paths.pretrain),
            tmp_path / name,
            tmp_path / "m.json",
            tmp_path / "p.csv",
            tmp_path / "ck",
            seed=p.seed,
            ctx=QUIET,
        )

    for name, proc in resumed.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {out[-2000:]}{err[-3000:]}"
        meta = read_json(outs[name] / "seedlm.json")["result"]
        assert meta["resumed_from"] >= killed[name] > 0, name  # `latest` only points at complete checkpoints
        assert f"resuming from step {meta['resumed_from']}" in err, name
        assert meta["final_train_loss"] == refs[name]["final_train_loss"], name
        assert meta["val_loss"] == refs[name]["val_loss"], name
        got, want = load_file(outs[name] / "model.safetensors"), load_file(tmp_path / name / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
        runs = _runs(repo, keys[name])  # the same MLflow run, now finished
        assert [r.info.status for r in runs] == ["FINISHED"], name
        assert runs[0].data.tags.get("seedlm.resumed") == "true", name
        assert runs[0].data.metrics["final_train_loss"] == pytest.approx(refs[name]["final_train_loss"]), name
        assert not ckpts[name].exists(), name  # checkpoints removed after success


# ---------------------------------------------------------------- torn writes
def _write(ckpt: Path, step: int, value: float) -> None:
    ck.save_checkpoint(ckpt, step, {"w": torch.full((4,), value)}, {"config_hash": "h", "step": step}, keep=5)


def test_torn_checkpoint_writes_are_never_taken_for_valid(tmp_path, monkeypatch):
    ckpt = tmp_path / "ck"
    _write(ckpt, 2, 2.0)
    _write(ckpt, 4, 4.0)
    # a kill in the middle of writing step 6: the temp folder holds a partial state, `latest` never moved
    real_save = torch.save

    def dies_midway(obj, f, *a, **k):
        Path(f).write_bytes(b"\x80\x02partial")
        raise KeyboardInterrupt  # like a signal arriving mid-write

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _write(ckpt, 6, 6.0)
    monkeypatch.setattr(torch, "save", real_save)
    assert (ckpt / "latest").read_text().strip() == "step-000004"
    assert not (ckpt / "step-000006").exists()
    # what a hard kill leaves (no cleanup ran): a temp folder with a torn file, a temp pointer
    torn = ckpt / ".tmp-step-000008-deadbeef"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"torn")
    (ckpt / ".latest-0badc0de").write_text("step-000008")
    found = ck.find_checkpoint(ckpt, "h", print)
    assert found is not None and found[0] == "step-000004" and found[2]["w"][0] == 4.0
    # a step folder damaged after the fact (bad disk, a copy tool): skipped for the previous one
    (ckpt / "step-000004" / "state.pt").write_bytes(b"garbage")
    seen: list[str] = []
    found = ck.find_checkpoint(ckpt, "h", seen.append)
    assert found is not None and found[0] == "step-000002" and found[2]["w"][0] == 2.0
    assert any("unreadable" in s and "step-000004" in s for s in seen)
    (ckpt / "latest").write_text("step-000099\n")  # a pointer to nothing falls back too
    assert ck.find_checkpoint(ckpt, "h", seen.append)[0] == "step-000002"
    assert ck.find_checkpoint(ckpt, "other settings", seen.append) is None
    ck.clean_partial(ckpt)
    assert not torn.exists() and not list(ckpt.glob(".latest-*"))


def test_async_writer_snapshots_and_reports_errors(tmp_path):
    w = torch.zeros(3)
    writer = ck.AsyncWriter(tmp_path / "ck")
    snap = w.clone()
    writer.submit(1, {"w": snap}, {"config_hash": "h", "step": 1})
    w += 5  # training moves on; the checkpoint holds the state of step 1
    writer.wait()
    assert torch.equal(ck.find_checkpoint(tmp_path / "ck", "h", print)[2]["w"], torch.zeros(3))
    (tmp_path / "blocked").write_text("a file where the folder should be")
    bad = ck.AsyncWriter(tmp_path / "blocked")
    bad.submit(1, {"w": snap}, {"config_hash": "h", "step": 1})
    with pytest.raises(Exception, match="writing a checkpoint failed"):
        bad.wait()


# ---------------------------------------------------------------- in-process resumption details
@pytest.fixture(scope="module")
def processed(repo) -> Path:
    return repo / "processed"


def test_bf16_resume_is_exact(tmp_path, processed):
    """bf16 autocast (CPU: with eager attention) with gradient accumulation resumes bit-exactly."""
    cfg = RESUME_PT.model_copy(update={"precision": "bf16", "grad_accum": 2, "batch_size": 2})
    full = _pretrain(processed, tmp_path / "full", cfg)
    with pytest.raises(Crash):
        _pretrain(processed, tmp_path / "cut", cfg, ctx=crash_at(9))
    resumed = _pretrain(processed, tmp_path / "cut", cfg)
    assert resumed["resumed_from"] == 8
    assert resumed["final_train_loss"] == full["final_train_loss"] and resumed["val_loss"] == full["val_loss"]
    _assert_same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
    fp32 = _pretrain(processed, tmp_path / "fp32", cfg.model_copy(update={"precision": "fp32"}))
    assert fp32["final_train_loss"] != full["final_train_loss"]  # bf16 really ran in bf16
    assert abs(fp32["final_train_loss"] - full["final_train_loss"]) < 0.05


def test_batch_source_errors_surface_and_stop_the_loop(tmp_path, processed):
    tok = PreTrainedTokenizerFast.from_pretrained(processed / "tokenizer")
    stream = np.fromfile(processed / "train.bin", dtype=np.uint16)
    good = window_source(stream, 32, 4, 0)

    def flaky(step: int, micro: int):
        if step == 3:
            raise StageError("train.bin: unreadable at step 3")
        return good(step, micro)

    cfg = TrainConfig(max_steps=6, warmup_steps=1, batch_size=4, log_every=1, checkpoint_every=2, precision="fp32")
    seen = []
    with pytest.raises(StageError, match="unreadable at step 3"):
        train(
            build_model(TINY, tok, 0),
            cfg,
            flaky,
            eval_batches_fn=lambda: [],
            ckpt_dir=tmp_path / "c",
            seed=0,
            ctx=StageContext(log=lambda m, s=None: seen.append(s), progress=False),
        )
    assert seen == [1, 2, 3]  # batches are built ahead, yet steps 0-2 trained and the error stopped step 3
    assert (tmp_path / "c" / "latest").read_text().strip() == "step-000002"
    import threading

    assert not [t for t in threading.enumerate() if t.name in ("batches", "checkpoint-2")]
