"""The evaluate stage on a tiny tokenizer, tiny data and tiny models (conftest's `tiny`): generation, the
outputs, bad inputs, a model with its own tokenizer, the control experiment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _evaluate_fixtures import NAMES, cfg, make_model, make_tokenizer, run_eval  # noqa: E402

from components.core.context import StageError  # noqa: E402
from components.core.io import read_json  # noqa: E402


# ---------------------------------------------------------------- generation
def test_generation_stops_at_end_and_batching_is_exact(tiny):
    import torch

    from components.data.chat import stop_ids
    from components.evaluate import generate, load_model

    model, tok = load_model("sft", tiny["models"]["sft"], tiny["processed"], torch.device("cpu"))
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p, _, _ in tiny["items"]]
    cpu = torch.device("cpu")
    batched, speed = generate(model, tok, prompts, max_new_tokens=12, batch_size=8, device=cpu)
    singles = [generate(model, tok, [p], max_new_tokens=12, batch_size=1, device=cpu) for p in prompts]
    assert batched == [out[0] for out, _ in singles]
    assert speed["gen_tokens"] == sum(sp["gen_tokens"] for _, sp in singles)  # padding after a stop is not counted
    assert speed["gen_tokens"] < 12 * len(prompts) and speed["gen_tokens_per_s"] > 0  # stopped early
    refs = [r for _, r, _ in tiny["items"]]
    assert all(batched) and sum(b == r for b, r in zip(batched, refs)) >= len(refs) // 5  # answers, then stops
    assert not any("thanks" in b or "user" in b for b in batched)
    # without the stop tokens the same model runs on past <|end|> into the follow-up turn
    x = tok(prompts[0], add_special_tokens=False, return_tensors="pt")
    raw = model.generate(**x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert stop_ids(tok)[0] in raw[0, x["input_ids"].shape[1] :].tolist()
    assert "thanks" in tok.decode(raw[0, x["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- the stage
def test_evaluate_writes_everything(tiny):
    result = run_eval(tiny, "full")
    root, out = tiny["root"], tiny["root"] / "full"
    assert {p.name for p in out.iterdir()} == {
        "report.md",
        "samples.jsonl",
        "samples_table.json",
        "metrics.png",
        "loss.png",
        "seedlm.json",
    }
    assert [Path(a).name for a in result["artifacts"]] == ["report.md", "samples.jsonl", "metrics.png", "loss.png"]
    assert all(Path(a).is_file() for a in result["artifacts"]) and result["tables"] == [str(out / "samples_table.json")]
    table = read_json(out / "samples_table.json")  # the MLflow table: one column per field and model
    assert set(table) == {
        "id",
        "task",
        "prompt",
        "reference",
        "answer_pretrain",
        "correct_pretrain",
        "answer_sft",
        "correct_sft",
    } and all(len(v) == len(tiny["items"]) for v in table.values())
    metrics = read_json(root / "full-metrics.json")
    assert metrics["n_examples"] == len(tiny["items"])
    for name in ("pretrain", "sft"):
        m = metrics[name]
        assert m["val_ppl"] > 1 and m["response_ppl"] > 1 and m["val_loss"] > 0
        for key in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "accuracy"):
            lo, hi = m[f"{key}_ci"]
            assert 0 <= lo <= hi <= 1 and 0 <= m[key] <= 1, key
            assert lo <= m[key] <= hi or key in ("bleu", "chrf"), key  # corpus scores: percentile CI may skew
        assert set(m["tasks"]) == {"qa", "fact", "yesno"} and m["tasks"]["qa"]["n"] == len(NAMES)
        assert m["response_ppl_ci"][0] <= m["response_ppl"] <= m["response_ppl_ci"][1]
    # the fitted model is better than the random one
    assert metrics["sft"]["response_ppl"] < metrics["pretrain"]["response_ppl"] / 5
    assert metrics["sft"]["exact_match"] > metrics["pretrain"]["exact_match"]
    assert {k: result[k] for k in metrics} == metrics
    # the significance column: sft vs pretrain, paired on the same items
    diff = metrics["compare"]["sft_vs_pretrain"]
    assert set(diff) == {"exact_match", "rougeL", "bleu", "chrf", "accuracy", "response_ppl"}
    em = diff["exact_match"]
    assert em["diff"] == pytest.approx(metrics["sft"]["exact_match"] - metrics["pretrain"]["exact_match"])
    assert em["significant"] and em["ci"][0] > 0
    assert diff["response_ppl"]["significant"] and diff["response_ppl"]["ci"][1] < 0  # lower perplexity
    assert metrics["sources"] == {"pretrain": str(tiny["models"]["pretrain"]), "sft": str(tiny["models"]["sft"])}
    plot = read_json(root / "plots" / "full-plot.json")
    assert {(r["model"], r["metric"]) for r in plot} == {
        (n, k) for n in ("pretrain", "sft") for k in ("exact_match", "rougeL", "bleu", "chrf", "accuracy")
    }
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(tiny["items"])
    s = samples[0]
    assert set(s) >= {"prompt", "reference", "task", "predictions", "correct"}
    assert set(s["predictions"]) == set(s["correct"]) == {"pretrain", "sft"}
    assert sum(x["correct"]["sft"] for x in samples) / len(samples) == pytest.approx(metrics["sft"]["exact_match"])
    report = (out / "report.md").read_text()
    assert "| sft |" in report and "## Sample generations" in report and report.count("\n| ") >= 5 + 2
    assert "| sft − pretrain | " in report and "**✱**" in report
    assert "![metrics](metrics.png)" in report and "![loss](loss.png)" in report
    meta = read_json(out / "seedlm.json")
    assert meta["stage"] == "evaluate" and set(meta["inputs"]["models"]) == {"pretrain", "sft"}
    # deterministic for a seed (generation tokens/s aside)
    again = run_eval(tiny, "full")
    drop = lambda r: {
        k: {kk: vv for kk, vv in v.items() if kk != "gen_tokens_per_s"} if isinstance(v, dict) else v
        for k, v in r.items()
        if k != "artifacts"
    }
    assert drop(again) == drop(result)


def test_perfect_model_scores_one(tiny, monkeypatch):
    import components.evaluate as ev

    refs = {p[-1]["content"]: r for p, r, _ in tiny["items"]}

    def oracle(model, tokenizer, prompts, **kw):
        out = [next(r for q, r in refs.items() if q in p) for p in prompts]
        return out, {"gen_tokens": len(out), "gen_tokens_per_s": 1.0}

    monkeypatch.setattr(ev, "generate", oracle)
    result = run_eval(tiny, "perfect", bootstrap=50, max_examples=10)
    assert result["n_examples"] == 10  # a seeded subset of the 36 items
    rows = [json.loads(line)["row"] for line in (tiny["root"] / "perfect" / "samples.jsonl").read_text().splitlines()]
    assert rows == sorted(rows) and len(set(rows)) == 10 and rows != list(range(10))
    for name in ("pretrain", "sft"):
        m = result[name]
        assert m["exact_match"] == m["accuracy"] == m["rougeL"] == 1.0
        assert m["exact_match_ci"] == [1.0, 1.0]
        assert m["bleu"] == pytest.approx(1.0) and m["chrf"] == pytest.approx(1.0)
        assert all(t["exact_match"] == 1.0 for t in m["tasks"].values())


def test_bad_model_folders_name_themselves(tiny, tmp_path):
    from components.evaluate import evaluate_models

    models = {"pretrain": tiny["models"]["pretrain"], "sft": tmp_path / "no-such-model"}
    with pytest.raises(StageError, match="no-such-model.*'sft'"):
        evaluate_models(
            cfg(), tiny["processed"], models, tmp_path / "out", tmp_path / "m.json", tmp_path / "p.json", seed=1
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="empty.*not a model"):
        evaluate_models(
            cfg(),
            tiny["processed"],
            {"sft": tmp_path / "empty"},
            tmp_path / "out",
            tmp_path / "m.json",
            tmp_path / "p.json",
            seed=1,
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_empty_sft_test_is_a_note_not_a_crash(tiny, tmp_path):
    import shutil

    import datasets

    from components.evaluate import evaluate_models

    data = tmp_path / "processed"
    shutil.copytree(tiny["processed"], data)
    shutil.rmtree(data / "sft_test")
    empty = datasets.Dataset.from_dict(
        {"input_ids": [], "labels": [], "prompt": [], "reference": [], "task": []},
        features=datasets.load_from_disk(str(tiny["processed"] / "sft_test")).features,
    )
    empty.save_to_disk(str(data / "sft_test"))
    result = evaluate_models(
        cfg(), data, {"sft": tiny["models"]["sft"]}, tmp_path / "out", tmp_path / "m.json", tmp_path / "p.json", seed=1
    )
    assert result["n_examples"] == 0 and result["sft"]["val_ppl"] > 1
    assert "exact_match" not in result["sft"] and "response_ppl" not in result["sft"]
    assert "sft_test is empty" in (tmp_path / "out" / "report.md").read_text()
    assert read_json(tmp_path / "p.json") == []


def test_run_adapter_uses_params_paths(tiny, tmp_path, monkeypatch):
    from components.core.config import Params, Paths
    from components.core.context import StageContext
    from components.evaluate import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")  # no store: no champion
    root = tiny["root"]
    paths = Paths(
        processed=str(tiny["processed"]),
        pretrain=str(root / "pretrain"),
        sft=str(root / "sft"),
        evaluate=str(tmp_path / "reports"),
        metrics=str(tmp_path / "metrics"),
        plots=str(root / "plots"),
        checkpoints=str(tmp_path / ".seedlm" / "checkpoints"),
    )
    logged = []
    ctx = StageContext(log=lambda metrics, step=None: logged.append(metrics), progress=False)
    result = run(Params(paths=paths, evaluate=cfg(bootstrap=20, max_examples=6)), ctx)
    assert read_json(tmp_path / "metrics" / "evaluate.json")["sft"] == result["sft"]
    assert (root / "plots" / "evaluate_metrics.json").is_file() and (tmp_path / "reports" / "loss.png").is_file()
    assert {k for m in logged for k in m} == {"pretrain.eval_seconds", "sft.eval_seconds"}
    assert "No champion of 'seedlm' in the registry yet" in (tmp_path / "reports" / "report.md").read_text()
    assert not (tmp_path / "none.db").exists()  # looking for a champion creates no store
    assert not (tmp_path / ".seedlm" / "control").exists()  # no pretrain meta: not a control-experiment run


# ---------------------------------------------------------------- another tokenizer, the control experiment
def test_model_with_its_own_tokenizer(tiny, tmp_path):
    from components.evaluate import encode_items, evaluate_models

    items = tiny["items"]
    ids, labels = encode_items(tiny["tok"], [p for p, _, _ in items], [r for _, r, _ in items])
    test = __import__("datasets").load_from_disk(str(tiny["processed"] / "sft_test"))
    for lab, ref_lab in zip(labels, test["labels"]):  # same answer tokens as preprocess's encoding
        assert [t for t in lab if t != -100] == [t for t in ref_lab if t != -100]
    other = make_tokenizer([r for _, r, _ in items][::3] + ["completely different words here"] * 3)
    assert other.get_vocab() != tiny["tok"].get_vocab()
    make_model(tmp_path / "other", other, seed=3)
    models = {"sft": tiny["models"]["sft"], "other": tmp_path / "other"}
    res = evaluate_models(
        cfg(bootstrap=50), tiny["processed"], models, tmp_path / "out", tmp_path / "m.json", tmp_path / "p.json", seed=1
    )
    assert "val_ppl" not in res["other"] and res["other"]["response_ppl"] > 1 and "exact_match" in res["other"]
    assert "response_ppl" not in res["compare"]["sft_vs_other"] and "exact_match" in res["compare"]["sft_vs_other"]
    assert "other has its own tokenizer" in (tmp_path / "out" / "report.md").read_text()


def test_control_experiment_table(tiny, tmp_path):
    from components.evaluate import evaluate_models

    control, m = tmp_path / "control", tiny["models"]

    def ev(out: str, sft: Path, enabled: bool):
        return evaluate_models(
            cfg(bootstrap=200),
            tiny["processed"],
            {"sft": sft},
            tmp_path / out,
            tmp_path / f"{out}.json",
            tmp_path / f"{out}-plot.json",
            seed=7,
            control_dir=control,
            pretrain_enabled=enabled,
        )

    on = ev("on", m["sft"], True)  # the pipeline with pretraining
    assert "control" not in on
    text = (tmp_path / "on" / "control.md").read_text()
    assert "Only the `pretrain.enabled: true` run" in text and "dvc exp run -S pretrain.enabled=false" in text
    rec = read_json(control / "true.json")
    assert rec["metrics"]["response_ppl"] == on["sft"]["response_ppl"] and rec["n_examples"] == len(tiny["items"])
    off = ev("off", m["pretrain"], False)  # the control: SFT without pretraining (stood in by the unfitted model)
    c = off["control"]
    assert c == read_json(tmp_path / "off.json")["control"] and c["paired"]
    assert c["response_ppl_ratio"] == pytest.approx(off["sft"]["response_ppl"] / on["sft"]["response_ppl"])
    assert c["response_ppl_ratio"] > 2
    assert c["exact_match"]["diff"] == pytest.approx(on["sft"]["exact_match"] - off["sft"]["exact_match"])
    assert c["exact_match"]["significant"] and c["response_ppl"]["significant"] and c["response_ppl"]["diff"] < 0
    table = (tmp_path / "off" / "control.md").read_text()
    assert "| response_ppl (held-out) |" in table and "pretrained − none" in table
    assert f"**{c['response_ppl_ratio']:.2f}×**" in table and "Only the" not in table
    assert "control.md" in [Path(a).name for a in off["artifacts"]]
    assert {p.name for p in control.iterdir()} == {"true.json", "false.json"}
