"""params.yaml, the schema and dvc.yaml agree; bad settings fail at once with the key named."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from components.core.config import Params, load_params, parse_params, section, stage_output
from components.core.params import ConfigError
from components.core.stages import BY_NAME, STAGES

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def leaf_keys(data, prefix=""):
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from leaf_keys(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1]


def test_params_yaml_is_valid_and_spells_out_every_setting():
    params = load_params(ROOT / "params.yaml")
    defaults = Params().model_dump(mode="json")
    # dict-valued settings (gate.min/max_regression) are values, not sections: compare one level up
    written = {k for k in leaf_keys(PARAMS) if not k.startswith("register.gate.")}
    expected = {k for k in leaf_keys(defaults) if not k.startswith("register.gate.")}
    assert written == expected, f"params.yaml vs schema: missing {expected - written}, extra {written - expected}"
    assert params.model_dump(mode="json") == parse_params(PARAMS).model_dump(mode="json")


def test_dvc_stages_match_the_pipeline_and_params():
    assert list(DVC["stages"]) == list(STAGES)
    params = load_params(ROOT / "params.yaml")
    for stage, spec in DVC["stages"].items():
        assert spec["cmd"] == f"python -m components.{stage}"
        declared = list(spec["params"])
        wanted = list(BY_NAME[stage].params)
        assert all(section(params, key) is not None or key == "model.init_from" for key in wanted)
        assert declared == wanted, f"dvc.yaml {stage}.params: missing {wanted - declared}, extra {declared - wanted}"
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"]]
        field = str(stage_output(Params(), stage))
        attr = next(k for k, v in Params().paths.model_dump().items() if v == field)
        assert outs == [f"${{paths.{attr}}}"], f"{stage} writes {outs}"
        for dep in spec["deps"]:
            if not dep.startswith("${"):
                assert (ROOT / dep).exists(), f"dvc.yaml {stage}: dep {dep} does not exist"


INFRA = {"core", "tracking"}
"""Shared plumbing every stage imports (components/core: settings, atomic I/O, the runner; tracking): not a
stage's computation, so not a DVC dependency; a change there that alters results shows up as a params or code
change elsewhere."""


def _module_file(dotted: str) -> Path | None:
    path = ROOT / Path(*dotted.split("."))
    return (
        path.with_suffix(".py")
        if path.with_suffix(".py").is_file()
        else (path / "__init__.py" if (path / "__init__.py").is_file() else None)
    )


def _imports_of(dotted: str) -> set[str]:
    """components.* modules that module `dotted` imports (at any depth of its code), as dotted names."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(_module_file(dotted).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components"):
            for a in node.names:  # `from components.pkg import module` or `from components.pkg.module import name`
                sub = f"{node.module}.{a.name}"
                found.add(sub if _module_file(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("components.")}
    return {m for m in found if _module_file(m)}


def _component_imports(module: str) -> set[str]:
    """The components/ files or sub-packages (as dvc.yaml names them) that stage `module` runs, following its
    imports module by module, minus INFRA."""
    seen, todo, deps = set(), [f"components.{module}"], set()
    while todo:
        for dep in _imports_of(todo.pop()) - seen:
            seen.add(dep)
            top = dep.split(".")[1]
            if top not in INFRA:
                deps.add(top)
                todo.append(dep)
    return deps - {module}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_the_code_a_stage_runs(stage):
    """A stage's result depends on its own module and every components/ module it imports: all must be
    DVC deps, or `dvc repro` reuses a stale output after that code changed."""
    deps = {
        d.removeprefix("components/").removesuffix(".py").split("/")[0]
        for d in DVC["stages"][stage]["deps"]
        if d.startswith("components/")
    }
    wanted = _component_imports(stage) | {stage}
    assert wanted <= deps, f"dvc.yaml {stage}.deps: add {sorted(f'components/{m}' for m in wanted - deps)}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_module_has_run_and_main(stage):
    module = importlib.import_module(f"components.{stage}")
    assert callable(module.run)
    source = Path(module.__file__).read_text()
    assert 'if __name__ == "__main__":' in source and re.search(rf'main\(\s*"{stage}"', source)
    assert "prefect" not in source, "components never import Prefect"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        parse_params({"pretrain": {"learning_rate": 0.1, "max_step": 3}})
    msg = str(e.value)
    assert "pretrain.max_step: unknown key; did you mean 'max_steps'?" in msg
    assert "pretrain.learning_rate: unknown key" in msg


def test_every_problem_is_reported_at_once_with_its_key():
    bad = {"pretrain": {"lr": -1, "batch_size": 0}, "model": {"n_embd": 100, "n_head": 3}, "sedd": 1}
    with pytest.raises(ConfigError) as e:
        parse_params(bad)
    msg = str(e.value)
    for needle in ("pretrain.lr", "pretrain.batch_size", "n_head (3) must divide n_embd (100)", "sedd: unknown key"):
        assert needle in msg
    assert "(got -1" in msg


def test_contradictions_and_sources_are_checked():
    with pytest.raises(ConfigError, match="warmup_steps"):
        parse_params({"sft": {"warmup_steps": 500, "max_steps": 100}})
    with pytest.raises(ConfigError, match="exactly one of synthetic/path/url/hf"):
        parse_params({"ingest": {"pretrain_sources": [{"path": "a", "url": "https://x/y"}]}})
    with pytest.raises(ConfigError, match="sha256"):
        parse_params({"ingest": {"sft_sources": [{"url": "https://example.org/x.jsonl"}]}})
    with pytest.raises(ConfigError, match="lora"):
        parse_params({"pretrain": {"enabled": False}, "sft": {"method": "lora"}})
    with pytest.raises(ConfigError, match="register.gate"):
        parse_params({"register": {"gate": {"min": {"exactmatch": 0.1}}}})


def test_overrides_work_like_dvc_exp_set(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    params = load_params(p, {"pretrain.max_steps": 70, "model.arch": "llama"})
    assert params.pretrain.max_steps == 70 and params.model.arch == "llama"
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["lr", "batch_size", "max_steps", "warmup_steps", "grad_clip"]),
        st.one_of(st.integers(-5, 5000), st.floats(-1, 2, allow_nan=False), st.text(max_size=3)),
    )
)
def test_validation_either_accepts_or_names_the_key(values):
    try:
        params = parse_params({"pretrain": values})
    except ConfigError as e:
        assert any(f"pretrain.{k}" in str(e) for k in values) or "pretrain" in str(e)
    else:
        assert params.pretrain.lr > 0 and params.pretrain.batch_size >= 1
        assert params.pretrain.warmup_steps < params.pretrain.max_steps
