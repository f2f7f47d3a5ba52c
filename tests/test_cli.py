"""The `seedlm` console script: one entry point whose subcommands reach the same code as the modules."""

from __future__ import annotations

import subprocess

import pytest
from repos import BIN, ROOT

from seedlm.cli import COMMANDS


def seedlm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "seedlm"), *args], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True, timeout=300, **kw
    )


def test_help_lists_every_command_with_an_example():
    res = seedlm("--help")
    assert res.returncode == 0, res.stderr
    for name, command in COMMANDS.items():
        assert f"  {name} " in res.stdout and command.example in res.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_help_with_its_example(name):
    res = seedlm(name, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    text = " ".join(res.stdout.split())  # argparse wraps long lines
    assert f"usage: seedlm {name}" in text and " ".join(COMMANDS[name].example.split()) in text


def test_unknown_command_and_unknown_stage_exit_2():
    res = seedlm("trian")
    assert res.returncode == 2 and "invalid choice: 'trian'" in res.stderr
    res = seedlm("stage", "pretrian")
    assert res.returncode == 2 and "unknown stage 'pretrian'; stages are ingest, preprocess" in res.stderr


def test_a_bad_setting_names_the_key_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("pretrain:\n  max_step: 3\n")
    for args in (["stage", "pretrain"], ["run", "--root", str(tmp_path)]):
        res = seedlm(*args, "--params", str(tmp_path / "params.yaml")) if args[0] == "stage" else seedlm(*args)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert "pretrain.max_step: unknown key; did you mean 'max_steps'?" in res.stderr


def test_python_dash_m_seedlm_is_the_same_cli():
    res = subprocess.run([str(BIN / "python"), "-m", "seedlm", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "usage: seedlm" in res.stdout
