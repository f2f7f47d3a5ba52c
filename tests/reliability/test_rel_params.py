"""Bad settings: every one fails before any work with one clear line naming the key and the fix, exit 2,
no outputs, no MLflow run, no registry version — through `python -m components.<stage>` and the flow CLI.
Plus property tests of the validation itself (hypothesis)."""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import _harness as h
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.core.config import Params, parse_params
from components.core.params import ConfigError, model_at

# name: (-S overrides, expected substrings of the one error line)
BAD = {
    "unknown_key": (["pretrain.max_step=3"], ["pretrain.max_step: unknown key; did you mean 'max_steps'?"]),
    "unknown_section": (["pretrian.lr=0.1"], ["pretrian: unknown key; did you mean 'pretrain'?"]),
    "unknown_nested": (["model.n_heads=4"], ["model.n_heads: unknown key; did you mean 'n_head'?"]),
    "unknown_in_source": (
        ["ingest.pretrain_sources=[{pth: data/sources}]"],
        ["ingest.pretrain_sources.0.pth: unknown key; did you mean 'path'?"],
    ),
    "type_number": (["pretrain.lr=fast"], ["pretrain.lr", "valid number", "'fast'"]),
    "type_integer": (["model.n_layer=2.5"], ["model.n_layer", "integer"]),
    "type_list": (["ingest.pretrain_sources=data/sources"], ["ingest.pretrain_sources", "list"]),
    "type_section": (["paths=5"], ["paths", "dictionary"]),
    "type_bool": (["pretrain.enabled=maybe"], ["pretrain.enabled", "boolean"]),
    "type_null": (["seed=null"], ["seed", "integer"]),
    "negative_lr": (["pretrain.lr=-0.001"], ["pretrain.lr", "greater than 0", "-0.001"]),
    "zero_batch": (["sft.batch_size=0"], ["sft.batch_size", "greater than or equal to 1"]),
    "nan_lr": (["pretrain.lr=.nan"], ["pretrain.lr", "finite number"]),
    "inf_decay": (["pretrain.weight_decay=.inf"], ["pretrain.weight_decay", "finite number"]),
    "dropout_range": (["model.dropout=1.5"], ["model.dropout", "less than 1"]),
    "val_fraction_range": (["preprocess.val_fraction=0.7"], ["preprocess.val_fraction", "less than 0.5"]),
    "huge_line_limit": (["ingest.max_line_mb=1e300"], ["ingest.max_line_mb", "less than or equal to 1024"]),
    "heads_width": (["model.n_embd=100", "model.n_head=3"], ["model", "n_head (3) must divide n_embd (100)"]),
    "kv_heads_gpt2": (["model.n_kv_head=1"], ["n_kv_head is only used by arch: llama"]),
    "kv_heads_divide": (
        ["model.arch=llama", "model.n_head=4", "model.n_embd=64", "model.n_kv_head=3"],
        ["n_kv_head (3) must divide n_head (4)"],
    ),
    "context_limit": (["model.context_length=200000"], ["model.context_length", "less than or equal to 131072"]),
    "warmup": (
        ["pretrain.warmup_steps=50", "pretrain.max_steps=10"],
        ["warmup_steps (50) must be below max_steps (10)"],
    ),
    "lora_on_noise": (["sft.method=lora", "pretrain.enabled=false"], ["lora", "enable pretrain"]),
    "min_above_max": (
        ["preprocess.min_chars=500", "preprocess.max_chars=100"],
        ["min_chars (500) is above max_chars (100)"],
    ),
    "vocab_too_small": (["preprocess.vocab_size=100"], ["preprocess.vocab_size (100) is below 262", "raise it"]),
    "two_kinds_of_source": (
        ["ingest.pretrain_sources=[{path: a, url: 'https://x.org/y.txt'}]"],
        ["exactly one of synthetic/path/url/hf"],
    ),
    "url_without_sha": (["ingest.sft_sources=[{url: 'https://x.org/y.jsonl'}]"], ["sha256", "sha256sum"]),
    "url_not_http": (
        ["ingest.pretrain_sources=[{url: 'file:///etc/passwd', sha256: '" + "0" * 64 + "'}]"],
        ["url must be http(s)"],
    ),
    "bad_sha_format": (
        ["ingest.pretrain_sources=[{url: 'https://x.org/y.txt', sha256: xyz}]"],
        ["ingest.pretrain_sources.0.sha256", "pattern"],
    ),
    "no_sources": (["ingest.sft_sources=[]"], ["ingest.sft_sources", "at least 1"]),
    "gate_metric": (["register.gate.min={exactmatch: 0.1}"], ["register.gate: unknown metric 'exactmatch'"]),
    "model_name": (["register.model_name=my model"], ["register.model_name", "pattern"]),
    "eval_model_name": (["evaluate.models={sft: /tmp/x}"], ["evaluate.models: bad name 'sft'"]),
    "pools": (["orchestration.pools={ingest: cpu}"], ["pools must name every stage", "preprocess"]),
    "override_into_value": (["seed.x=1"], ["override seed.x: seed is not a section"]),
    "override_into_list": (["ingest.pretrain_sources.path=x"], ["ingest.pretrain_sources is not a section"]),
    "override_syntax": (["pretrain.lr"], ["-S 'pretrain.lr': expected KEY=VALUE"]),
}

FILES = {  # name: (params.yaml bytes, expected substrings)
    "duplicate_key": (b"seed: 1\npretrain:\n  lr: 0.1\n  lr: 0.2\n", ["key 'lr' appears twice (lines 3 and 4)"]),
    "invalid_yaml": (b"pretrain:\n  lr: 0.1\n    max_steps: 3\n", ["not valid YAML"]),
    "tab_indent": (b"pretrain:\n\tlr: 0.1\n", ["not valid YAML"]),
    "not_utf8": ("seed: 1\n# caf\xe9\n".encode("latin-1"), ["not UTF-8 text", "save it as UTF-8"]),
    "top_level_list": (b"- seed\n- 1\n", ["the top level must be a mapping of sections"]),
    "top_level_scalar": (b"42\n", ["the top level must be a mapping of sections"]),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return h.make_repo(tmp_path_factory.mktemp("params") / "repo", git=False)


def _no_work_done(repo: Path) -> None:
    for out in (*h.OUTPUTS.values(), "metrics", "plots", ".seedlm/checkpoints"):
        assert not (repo / out).exists(), out
    assert h.leftovers(repo) == []
    h.assert_clean_failure(repo / "mlflow.db")
    assert h.runs(repo / "mlflow.db") == []  # refused before a tracking run was even opened


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_setting_is_one_clear_line_and_no_work(repo, capsys, name):
    sets, expect = BAD[name]
    stage = h.STAGES[sum(map(ord, name)) % len(h.STAGES)]  # config errors are the same for every stage
    rc, err = h.cli(capsys, repo, stage, *[x for s in sets for x in ("-S", s)])
    assert rc == 2, err
    assert err.startswith(f"seedlm {stage}: error: ") and "Traceback" not in err, err
    for part in expect:
        assert part in err, (part, err)
    _no_work_done(repo)


@pytest.mark.parametrize("name", sorted(FILES))
def test_bad_params_file(repo, capsys, tmp_path, name):
    content, expect = FILES[name]
    bad = tmp_path / "params.yaml"
    bad.write_bytes(content)
    rc, err = h.cli(capsys, repo, "ingest", "--params", str(bad))
    assert rc == 2 and str(bad) in err and "Traceback" not in err, err
    for part in expect:
        assert part in err, (part, err)
    _no_work_done(repo)


def test_missing_params_file(repo, capsys):
    rc, err = h.cli(capsys, repo, "preprocess", "--params", "nope.yaml")
    assert rc == 2 and "nope.yaml: not found" in err and "--params" in err


def test_real_cli_and_flow_exit_2_with_the_key(repo):
    """The same through real processes: a stage's CLI and the Prefect flow's CLI."""
    res = h.stage_cli(repo, "pretrain", "-S", "model.n_embd=100", "-S", "model.n_head=3")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.lstrip().startswith("seedlm pretrain: error: invalid settings:")
    assert "n_head (3) must divide n_embd (100)" in res.stderr and "Traceback" not in res.stderr
    res = h.run(repo, str(h.BIN / "python"), "-m", "flows.pipeline", "-S", "pretrain.max_step=3", timeout=240)
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-3000:])
    assert "pretrain.max_step: unknown key; did you mean 'max_steps'?" in res.stderr
    _no_work_done(repo)
    assert h.runs(repo / "mlflow.db") == []


# ---------------------------------------------------------------- properties of the validation
DEFAULTS = Params().model_dump(mode="json")


def _leaves(data, prefix=()):
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from _leaves(v, (*prefix, k))
    else:
        yield prefix


LEAVES = sorted(p for p in _leaves(DEFAULTS) if p)


def _get(data, path):
    for p in path:
        data = data[p]
    return data


def _set(data, path, value):
    import copy

    data = copy.deepcopy(data)
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return data


SECTIONS = sorted(
    {
        p[:i]
        for p in LEAVES
        for i in range(1, len(p))  # sections, not dict-valued settings
        if model_at(Params, p[:i]) is not None
        and set(_get(DEFAULTS, p[:i])) == set(model_at(Params, p[:i]).model_fields)
    }
)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.integers(min_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _floats(data):
    if isinstance(data, dict):
        for v in data.values():
            yield from _floats(v)
    elif isinstance(data, list):
        for v in data:
            yield from _floats(v)
    elif isinstance(data, float):
        yield data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(LEAVES), value=values)
def test_any_value_anywhere_is_accepted_sanely_or_named(path, value):
    """Never another exception than ConfigError; an error names the key's section; what is accepted is
    finite and survives a dump/parse round trip with the schema's invariants intact."""
    data = _set(DEFAULTS, path, value)
    try:
        p = parse_params(data)
    except ConfigError as e:
        msg = str(e)
        assert path[0] in msg and "Fix these keys" in msg, msg
        return
    dumped = p.model_dump(mode="json")
    assert parse_params(dumped).model_dump(mode="json") == dumped
    assert all(math.isfinite(x) for x in _floats(dumped))
    assert p.model.n_embd % p.model.n_head == 0
    assert p.pretrain.warmup_steps < p.pretrain.max_steps and p.sft.warmup_steps < p.sft.max_steps
    assert p.pretrain.lr > 0 and p.sft.batch_size >= 1 and p.preprocess.min_chars <= p.preprocess.max_chars


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(SECTIONS), key=st.from_regex(r"[a-z][a-z_]{0,14}", fullmatch=True))
def test_unknown_key_is_named_with_its_path(section, key):
    node = _get(DEFAULTS, section)
    if key in node:
        return
    with pytest.raises(ConfigError) as e:
        parse_params(_set(DEFAULTS, (*section, key), 1))
    assert f"{'.'.join(section)}.{key}: unknown key" in str(e.value)


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from([p for p in LEAVES if len(p[-1]) >= 5 and p[:-1] in SECTIONS]), data=st.data())
def test_a_typo_suggests_the_closest_key(path, data):
    """Drop or swap one character of a real key: the error suggests a key of that section at least as
    close to the typo as the intended one (usually the intended one)."""
    key = path[-1]
    i = data.draw(st.integers(0, len(key) - 2))
    typo = data.draw(st.sampled_from([key[:i] + key[i + 1 :], key[:i] + key[i + 1] + key[i] + key[i + 2 :]]))
    parent = _get(DEFAULTS, path[:-1])
    if typo in parent or typo == key:
        return
    bad = _set(DEFAULTS, path[:-1], {**{k: v for k, v in parent.items() if k != key}, typo: parent[key]})
    with pytest.raises(ConfigError) as e:
        parse_params(bad)
    msg = str(e.value)
    assert f"{'.'.join((*path[:-1], typo))}: unknown key; did you mean '" in msg, msg
    said = msg.split(f"{typo}: unknown key; did you mean '")[1].split("'")[0]
    ratio = lambda a: difflib.SequenceMatcher(None, a, typo).ratio()  # noqa: E731
    assert said in parent and ratio(said) >= ratio(key) - 1e-9, (said, key, typo)


@settings(max_examples=100, deadline=None)
@given(
    max_steps=st.integers(1, 10_000),
    warm=st.integers(0, 10_000),
    lr=st.floats(1e-8, 1.0),
    heads=st.integers(1, 16),
    per_head=st.integers(1, 64),
)
def test_valid_training_settings_are_accepted(max_steps, warm, lr, heads, per_head):
    data = {
        "pretrain": {"max_steps": max_steps, "warmup_steps": warm, "lr": lr},
        "model": {"n_head": heads, "n_embd": heads * max(per_head, math.ceil(8 / heads))},
    }
    if warm >= max_steps:
        with pytest.raises(ConfigError, match="warmup_steps"):
            parse_params(data)
    else:
        p = parse_params(data)
        assert (p.pretrain.max_steps, p.pretrain.lr) == (max_steps, lr)


def test_yaml_round_trip_of_params_yaml(tmp_path):
    """params.yaml dumped by yaml and read back through the strict loader is the same settings."""
    from components.core.config import load_params

    text = (h.ROOT / "params.yaml").read_text()
    a = load_params(h.ROOT / "params.yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(yaml.safe_load(text)))
    assert load_params(tmp_path / "p.yaml") == a
