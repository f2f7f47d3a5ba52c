"""evaluate.sets: your own JSONL sets scored beside the held-out split (exact match, ROUGE-L, BLEU, chrF with CIs),
in metrics.json, the report and the stage result (what MLflow logs), usable by the gate, with their overlap
with the SFT training data counted."""

from __future__ import annotations

import json
import shutil

import pytest
from _evaluate_fixtures import NAMES, run_eval, world

from components.core.config import GateConfig, parse_params
from components.core.context import StageError
from components.core.io import read_json
from components.core.params import ConfigError
from components.core.runner import numeric
from components.evaluation.gate import evaluate_gate


def set_rows() -> list[dict]:
    """The colour questions in three forms: Alpaca, chat, ShareGPT."""
    items = [it for it in world() if it[2] == "qa"]
    rows = []
    for i, (prompt, ref, _) in enumerate(items):
        q = prompt[0]["content"]
        if i % 3 == 0:
            rows.append({"instruction": q, "output": ref})
        elif i % 3 == 1:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ref}]})
        else:
            rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ref}]})
    return rows


@pytest.fixture(scope="module")
def with_sets(tiny, tmp_path_factory):
    """A processed folder whose sft_train holds 3 of the set's items verbatim and 1 prompt with another answer."""
    import datasets

    root = tmp_path_factory.mktemp("sets")
    processed = root / "processed"
    shutil.copytree(tiny["processed"], processed)
    qa = [it for it in world() if it[2] == "qa"]
    train = [(p, r) for p, r, _ in qa[:3]] + [(qa[3][0], "a different answer")]
    cols = {"prompt": [json.dumps(p, ensure_ascii=False) for p, _ in train], "reference": [r for _, r in train]}
    datasets.Dataset.from_dict(cols).save_to_disk(str(processed / "sft_train"))
    path = root / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in set_rows()), encoding="utf-8")
    local = {**tiny, "processed": processed, "root": root}
    (root / "plots").mkdir()
    result = run_eval(local, "out", sets={"colors": str(path)})
    return {"root": root, "result": result, "metrics": read_json(root / "out-metrics.json"), "path": path}


def test_set_metrics_with_intervals_for_every_model(with_sets):
    m = with_sets["metrics"]
    for name in ("pretrain", "sft"):
        for key in ("exact_match", "rougeL", "bleu", "chrf"):
            v, (lo, hi) = m[name][f"colors/{key}"], m[name][f"colors/{key}_ci"]
            assert 0 <= lo <= hi <= 1 and 0 <= v <= 1, (name, key)
    assert m["sft"]["colors/exact_match"] > m["pretrain"]["colors/exact_match"]  # the fitted model knows colours
    diff = m["compare"]["sft_vs_pretrain"]["colors/exact_match"]
    assert diff["ci"] and diff["significant"] in (True, False)
    assert m["sft"]["exact_match"] >= 0 and "colors/tasks" not in m["sft"]  # the held-out split is still there


def test_overlap_with_training_rows_is_counted(with_sets):
    s = with_sets["metrics"]["sets"]["colors"]
    assert (s["n"], s["exact_duplicates"], s["prompts_in_training"]) == (len(NAMES), 3, 4)
    assert s["path"] == str(with_sets["path"]) and len(s["sha256"]) == 64


def test_report_samples_and_mlflow_metrics(with_sets):
    out, result = with_sets["root"] / "out", with_sets["result"]
    report = (out / "report.md").read_text()
    assert "## Your evaluation sets" in report and "### colors (" in report
    assert "3 item(s) are exact duplicates of training rows" in report and "sft − pretrain" in report
    rows = [json.loads(x) for x in (out / "sets_samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(NAMES) and set(rows[0]["predictions"]) == {"pretrain", "sft"}
    assert str(out / "sets_samples.jsonl") in result["artifacts"]
    logged = numeric(result)  # what the runner logs to MLflow
    assert {"sft.colors/exact_match", "sft.colors/rougeL", "sft.colors/bleu", "sft.colors/chrf"} <= set(logged)


def test_the_gate_can_name_a_set_metric(with_sets):
    sft = {k: v for k, v in with_sets["metrics"]["sft"].items() if not isinstance(v, dict)}
    gate = GateConfig(metric="colors/exact_match", min={"colors/exact_match": 0.01}, max_regression={})
    res = evaluate_gate(gate, sft, {"colors/exact_match": 0.0}, "1")
    assert res["passed"] and {r["metric"] for r in res["rules"]} == {"colors/exact_match"}
    ok = {"evaluate": {"sets": {"colors": "c.jsonl"}}, "register": {"gate": {"metric": "colors/exact_match"}}}
    assert parse_params(ok).register.gate.metric == "colors/exact_match"
    with pytest.raises(ConfigError, match="evaluate.sets name"):
        parse_params({"register": {"gate": {"metric": "colors/exact_match"}}})  # no such set


def test_bad_sets_name_the_file_and_line(tiny, tmp_path):
    with pytest.raises(StageError, match=r"evaluate.sets.nope: .* is not a file"):
        run_eval({**tiny, "root": tmp_path}, "x", sets={"nope": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Q?", "output": "A"}) + "\n" + json.dumps({"instruction": "Q?"}) + "\n")
    with pytest.raises(StageError, match=r"bad.jsonl:2: Alpaca row with missing or empty 'output'.*fix the row"):
        run_eval({**tiny, "root": tmp_path}, "x", sets={"bad": str(bad)})
    with pytest.raises(ConfigError, match="evaluate.sets: bad name"):
        parse_params({"evaluate": {"sets": {"a/b": "x.jsonl"}}})
