"""The knowledge-cutoff experiment: scoring on the tiny world's index with a scripted reader (every number
checkable by hand), and the evaluate stage running it for sft into metrics, the report and the MLflow table."""

from __future__ import annotations

import re

import pytest
from _retrieval_fixtures import WORLD

from components.core.io import read_json
from components.data.updates import cutoff_questions
from components.evaluation import cutoff, cutoff_report

BOOT = {"resamples": 200, "confidence": 0.95, "seed": 3}


def scripted_reader(questions):
    """Answers right when a passage in the prompt states the answer, else from 'memory': the old value."""
    by_question = {q["question"]: q for q in questions}

    def generate(chats):
        out = []
        for chat in chats:
            user = chat[-1]["content"]
            q = by_question[user.rsplit("Question: ", 1)[-1]]
            passages = re.findall(r"^\[\d+\] (.*)$", user, re.M)
            out.append(q["answer"] if any(cutoff.states_answer(p, q) for p in passages) else q["stale"] or q["answer"])
        return out

    return generate


@pytest.fixture(scope="module")
def experiment(default_index, world):
    from transformers import AutoTokenizer

    out, _ = default_index
    tok = AutoTokenizer.from_pretrained(str(world["processed"] / "tokenizer"))
    questions = cutoff.load_questions(out)
    assert questions == cutoff_questions(WORLD, 5)
    metrics, samples = cutoff.run(questions, out, tok, scripted_reader(questions), budget=120, k=5, boot=BOOT)
    return questions, metrics, samples


def test_the_numbers_follow_from_the_answers(experiment):
    questions, m, samples = experiment
    up, same = m["updated"], m["unchanged"]
    assert up["n"] == sum(q["kind"] == "updated" for q in questions) and same["n"] == len(questions) - up["n"]
    assert up["none"]["exact_match"] == 0 and up["none"]["stale"] == 1  # no retrieval: the old value
    assert up["rag"]["exact_match"] == up["in_context"] and up["rag"]["stale"] == 1 - up["in_context"]
    assert up["oracle"]["exact_match"] == 1 and "stale" not in same["none"]
    assert same["none"]["exact_match"] == same["rag"]["exact_match"] == 1
    assert up["recall_at_k"] >= up["in_context"] >= 0.9
    diff = up["rag_vs_none"]["exact_match"]
    assert diff["diff"] == pytest.approx(up["in_context"]) and diff["significant"] and diff["ci"][0] > 0.5
    assert up["rag_vs_none"]["stale"]["diff"] < 0 and same["rag_vs_none"]["exact_match"]["significant"] is False
    lo, hi = up["rag"]["exact_match_ci"]
    assert lo <= up["rag"]["exact_match"] <= hi
    s = samples[0]
    assert s["answers"]["rag"] == s["answer"] and s["sources"][0]["n"] == 1 and len(s["retrieved"]) == 5


def test_the_report_table_and_samples(experiment, tmp_path):
    _, m, samples = experiment
    m = {**m, "index": {"top_k": 5, "retrieval": "bm25", "path": "data/index", "prompt_budget": 120}}
    text = "\n".join(cutoff_report.lines(m, 0.95, 4, samples))
    assert "## Knowledge cutoff: without and with retrieval" in text
    for row in ("| updated facts |", "stale answers (the old value)", "| unchanged facts |", "recall@5"):
        assert row in text
    assert text.count("**✱**") >= 2  # exact match and stale answers on updated facts
    assert cutoff_report.write(tmp_path, samples) == ["cutoff_samples.jsonl", "cutoff_table.json"]
    table = read_json(tmp_path / "cutoff_table.json")
    assert len(table["question"]) == len(samples) and set(table) >= {"answer_none", "answer_rag", "sources"}


def test_the_evaluate_stage_runs_it_for_sft(tiny, default_index, tmp_path):
    from _evaluate_fixtures import cfg

    from components.evaluate import evaluate_models

    out, _ = default_index
    res = evaluate_models(
        cfg(retrieval_max_new_tokens=6),
        tiny["processed"],
        tiny["models"],
        tmp_path / "ev",
        tmp_path / "metrics.json",
        tmp_path / "plots.json",
        seed=7,
        index_dir=out,
    )
    metrics = read_json(tmp_path / "metrics.json")
    rag = metrics["retrieval"]
    assert rag["index"]["content_sha256"] == read_json(out / "seedlm.json")["result"]["content_sha256"]
    assert rag["updated"]["n"] > 0 and 0 <= rag["updated"]["rag"]["exact_match"] <= 1
    assert "## Knowledge cutoff" in (tmp_path / "ev" / "report.md").read_text()
    assert str(tmp_path / "ev" / "cutoff_table.json") in res["tables"]
    assert read_json(tmp_path / "ev" / "seedlm.json")["inputs"]["index"] == str(out)
    assert "retrieval" not in metrics["pretrain"]  # only the fine-tuned model takes part
