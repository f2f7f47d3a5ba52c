"""Bad models and registry references: a checkpoint folder that is not a model, pickle-only weights, a
tokenizer that does not belong to the model, a context longer than the model's positions, a registry
URI that does not exist. Each: exit 2 with one line naming the input and the fix, the stage's previous
output untouched, its MLflow run FAILED, no registry version, and no pickle ever executed."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import _harness as h
import pytest

MARKER = Path("/tmp") / f"seedlm-pickle-ran-{os.getpid()}"


class _Payload:
    """Unpickling this runs a shell command: the proof that a loader executed a pickle."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro repo through sft (in process), and a tracking store shared by this module's runs."""
    tmp = tmp_path_factory.mktemp("models")
    repo, db = h.make_repo(tmp / "repo", git=False), tmp / "mlflow.db"
    capsys = _NoCapture()
    for stage in ("ingest", "preprocess", "pretrain", "sft"):
        rc, err = h.cli(capsys, repo, stage, tracking=db)
        assert rc == 0, err
    return repo, db


class _NoCapture:
    def readouterr(self):
        class R:
            err = ""

        return R()


def _model(folder: Path, vocab: int = 300, positions: int = 64, tokenizer: Path | None = None) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(folder)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def _fresh(trained, tmp_path: Path, upto: str = "raw") -> Path:
    """A copy of the trained repo that holds the outputs up to `upto` (so failures there hurt nothing)."""
    repo, _ = trained
    new = h.make_repo(tmp_path / "repo", git=False)
    for out in h.OUTPUTS.values():
        if (repo / out).exists():
            shutil.copytree(repo / out, new / out)
        if out.endswith(upto):
            break
    return new


def _fails(capsys, repo: Path, db: Path, stage: str, parts: list[str], *args: str) -> None:
    out = repo / h.OUTPUTS[stage]
    before = h.tree(out) if out.exists() else None
    rc, err = h.cli(capsys, repo, stage, *args, tracking=db)
    lines = [x for x in err.splitlines() if x.startswith(f"seedlm {stage}: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert (h.tree(out) if out.exists() else None) == before, "a failed stage touched its previous output"
    assert not (repo / "metrics" / f"{stage}.json").exists()
    assert h.leftovers(repo) == []
    assert [s for n, s in h.runs(db) if n == stage][-1] == "FAILED"
    assert [r for r in h.runs(db) if r[1] == "RUNNING"] == [] and h.versions(db) == []
    assert not MARKER.exists(), "a pickle was executed"


def test_init_from_folder_without_a_tokenizer(trained, capsys, tmp_path):
    repo = _fresh(trained, tmp_path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "README.txt").write_text("not a model")
    _fails(
        capsys,
        repo,
        trained[1],
        "preprocess",
        [f"model.init_from: {junk} is not a folder with a tokenizer", "set it to null"],
        "-S",
        f"model.init_from={junk}",
    )
    assert not (repo / "data/processed").exists()


@pytest.mark.parametrize(
    "case", ["tokenizer_only", "pickle_only", "corrupt_safetensors", "short_positions", "foreign_tokenizer"]
)
def test_init_from_checkpoint_that_cannot_serve(trained, capsys, tmp_path, case):
    """preprocess takes the folder's tokenizer; pretrain must then refuse the folder with the reason."""
    repo, db = _fresh(trained, tmp_path), trained[1]
    tok = trained[0] / "data/processed/tokenizer"
    base = tmp_path / "base"
    base.mkdir()
    if case == "tokenizer_only":
        _model(tmp_path / "m", tokenizer=tok)
        shutil.copytree(tok, base, dirs_exist_ok=True)
        expect = ["not a model folder (no config.json)"]
    elif case == "pickle_only":
        _model(base, tokenizer=tok)
        (base / "model.safetensors").unlink()
        (base / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
        expect = ["has only pickle weights (.bin), which are refused", "safetensors"]
    elif case == "corrupt_safetensors":
        _model(base, tokenizer=tok)
        (base / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
        expect = ["cannot load as a causal LM"]
    elif case == "short_positions":
        _model(base, positions=16, tokenizer=tok)
        expect = ["model.context_length: 32 exceeds the position limit (16)", "lower model.context_length"]
    else:  # a tokenizer of 300 tokens beside a model with 50 embeddings
        _model(base, vocab=50, tokenizer=tok)
        expect = ["model's vocabulary (50) is smaller than the tokenizer's (300)", "does not belong to this model"]
    args = ("-S", f"model.init_from={base}")
    rc, err = h.cli(capsys, repo, "preprocess", *args, tracking=db)
    assert rc == 0, err
    _fails(capsys, repo, db, "pretrain", [str(base), *expect], *args)
    assert not (repo / "models/pretrain").exists()


def test_sft_refuses_a_base_whose_vocabulary_the_tokenizer_outgrew(trained, capsys, tmp_path):
    """preprocess rerun with a bigger vocabulary after pretrain: sft must not train on mismatched ids."""
    repo, db = _fresh(trained, tmp_path, upto="pretrain"), trained[1]
    rc, err = h.cli(capsys, repo, "preprocess", "-S", "preprocess.vocab_size=400", tracking=db)
    assert rc == 0, err
    _fails(
        capsys,
        repo,
        db,
        "sft",
        ["paths.pretrain", "smaller than the tokenizer's", "does not belong"],
        "-S",
        "preprocess.vocab_size=400",
    )


def test_sft_on_a_folder_that_is_not_a_pretrain_output(trained, capsys, tmp_path):
    repo, db = _fresh(trained, tmp_path, upto="processed"), trained[1]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    _fails(
        capsys, repo, db, "sft", [f"{fake}/seedlm.json: missing", "dvc repro pretrain"], "-S", f"paths.pretrain={fake}"
    )


def test_evaluate_refuses_missing_registry_versions_and_pickle_models(trained, capsys, tmp_path):
    repo, db = trained
    _fails(
        capsys,
        repo,
        db,
        "evaluate",
        ["models:/nope/7", "not found", "pass a local model folder"],
        "-S",
        "evaluate.models={other: 'models:/nope/7'}",
        "-S",
        "evaluate.champion=false",
    )
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    _fails(
        capsys,
        repo,
        db,
        "evaluate",
        [str(folder), "is not a model", "*.safetensors"],
        "-S",
        f"evaluate.models={{other: '{folder}'}}",
        "-S",
        "evaluate.champion=false",
    )
    assert not (repo / "reports/evaluate").exists()


def test_lineage_of_a_version_that_does_not_exist(trained, capsys):
    from components.registry.lineage import main

    repo, db = trained
    with h.in_repo(repo, db):
        rc = main(["models:/nope/3"])
    err = capsys.readouterr().err
    assert rc == 2 and "seedlm lineage: error:" in err and "Traceback" not in err, err
