"""The evaluate stage and its local metric modules, on a tiny tokenizer, tiny data and tiny models."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components.common import StageError, read_json  # noqa: E402
from components.config import EvaluateConfig  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NAMES = ["Zorb", "Quill", "Mavo", "Tessa", "Brim", "Kalo", "Fenn", "Orra", "Pim", "Vex", "Luma", "Drax"]
COLORS = ["red", "blue", "green", "amber"]
FOLLOW_UP = "<|user|>\nthanks a lot<|end|>\n"
"""Trained after each answer: what the fitted model goes on to say when generation does not stop."""


# ---------------------------------------------------------------- tiny world helpers
def world() -> list[tuple[list[dict], str, str]]:
    """(prompt messages, reference, task) items: colour questions, facts (longer answers), yes/no questions."""
    items = []
    for i, name in enumerate(NAMES):
        color = COLORS[i % len(COLORS)]
        items.append(([{"role": "user", "content": f"What color is {name}?"}], color, "qa"))
        items.append(([{"role": "user", "content": f"Tell me about {name}."}], f"{name} is {color}, like {name}.", "fact"))
        asked = COLORS[(i + i // 2) % len(COLORS)]
        items.append(([{"role": "system", "content": "Answer yes or no."},
                       {"role": "user", "content": f"Is {name} {asked}?"}], "yes" if asked == color else "no", "yesno"))
    return items


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, min_frequency=1,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|pad|>", extra_special_tokens=SPECIALS[2:])
    tok.chat_template = TEMPLATE
    return tok


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 except the last assistant content + <|end|>)."""
    prompt = tok(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    answer = tok(messages[-1]["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
    tail = tok("\n", add_special_tokens=False)["input_ids"]
    return prompt + answer + tail, [-100] * len(prompt) + answer + [-100] * len(tail)


def make_processed(root: Path, tok, items) -> Path:
    import datasets
    out = root / "processed"
    tok.save_pretrained(out / "tokenizer")
    docs = [f"The color of {n} is {COLORS[i % len(COLORS)]}." for i, n in enumerate(NAMES)] * 3
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    np.asarray(ids, dtype=np.uint16).tofile(out / "val.bin")
    cols = {"input_ids": [], "labels": [], "prompt": [], "reference": [], "task": []}
    for prompt, ref, task in items:
        ids_, labels = encode_chat(tok, prompt + [{"role": "assistant", "content": ref}])
        for key, value in zip(cols, (ids_, labels, json.dumps(prompt), ref, task)):
            cols[key].append(value)
    datasets.Dataset.from_dict(cols).save_to_disk(str(out / "sft_test"))
    (out / "seedlm.json").write_text(json.dumps({"stage": "preprocess", "result": {"dtype": "uint16"}}))
    return out


def make_model(folder: Path, tok, items=(), steps: int = 0, seed: int = 0):
    """A tiny GPT-2 saved with save_pretrained; with `steps`, fitted on the items' conversations."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    if steps:
        seqs = [tok(tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False) + FOLLOW_UP,
                    add_special_tokens=False)["input_ids"] for p, r, _ in items]
        width = max(map(len, seqs))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        y = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and immune to a busy machine
        try:
            for _ in range(steps):
                loss = model(input_ids=x, labels=y).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id],
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    items = world()
    texts = [f"{m['content']}" for p, r, _ in items for m in p] + [r for _, r, _ in items] + \
        [f"The color of {n} is {c}." for n in NAMES for c in COLORS]
    tok = make_tokenizer(texts)
    processed = make_processed(root, tok, items)
    make_model(root / "pretrain", tok, seed=1)
    make_model(root / "sft", tok, items, steps=60, seed=2)
    (root / "plots").mkdir()
    (root / "plots" / "pretrain_loss.csv").write_text("step,train_loss,val_loss,lr\n1,5.0,,0.001\n2,4.0,4.2,0.001\n")
    return {"root": root, "tok": tok, "items": items, "processed": processed,
            "models": {"pretrain": root / "pretrain", "sft": root / "sft"}}


def cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(**{"max_new_tokens": 8, "batch_size": 8, "ppl_batches": 2, "bootstrap": 200,
                             "num_samples": 5, **kw})


def run_eval(tiny, out: str, **kw):
    from components.evaluate import evaluate_models
    root = tiny["root"]
    return evaluate_models(cfg(**kw), tiny["processed"], tiny["models"], root / out, root / f"{out}-metrics.json",
                           root / "plots" / f"{out}-plot.json", seed=7, plots_dir=root / "plots")


# ---------------------------------------------------------------- metric modules
@pytest.fixture(scope="module")
def metrics():
    from components.metrics import load_metric, local_metrics
    return {name: load_metric(name, keep_in_memory=True) for name in local_metrics()}


def test_local_metrics_exist(metrics):
    assert set(metrics) == {"exact_match", "rouge", "bleu", "chrf", "accuracy"}


def test_exact_match_normalization(metrics):
    em = metrics["exact_match"]
    preds, refs = ["  Paris \n is  nice ", "Paris", "Paris!", "Rome"], ["Paris is nice", "paris", "Paris", "Oslo"]
    assert em.compute(predictions=preds, references=refs)["exact_match"] == 0.25
    assert em.compute(predictions=preds, references=refs, ignore_case=True)["exact_match"] == 0.5
    both = em.compute(predictions=preds, references=refs, ignore_case=True, ignore_punctuation=True)
    assert both["exact_match"] == 0.75
    assert em.compute(predictions=["a"], references=["a"], return_stats=True)["stats"] == [[1.0, 1.0]]


def test_rouge_identical_disjoint_partial(metrics):
    rouge = metrics["rouge"]
    same = rouge.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge.compute(predictions=["dog runs fast"], references=["the cat sat"])["rougeL"] == 0.0
    half = rouge.compute(predictions=["the cat", "x"], references=["the cat", "y"])  # mean over items
    assert half["rougeL"] == pytest.approx(0.5)
    assert rouge.compute(predictions=["Äpfel grün"], references=["äpfel GRÜN"])["rougeL"] == 1.0  # Unicode words


def test_bleu_and_chrf(metrics):
    import sacrebleu
    bleu, chrf = metrics["bleu"], metrics["chrf"]
    sent = ["the quick brown fox jumps over the lazy dog"]
    assert bleu.compute(predictions=sent, references=sent)["bleu"] == pytest.approx(1.0)
    assert chrf.compute(predictions=sent, references=sent)["chrf"] == pytest.approx(1.0)
    preds = ["the quick brown fox", "a slow red dog sleeps", "hello there world"]
    refs = ["the quick brown fox jumps", "a fast red dog sleeps", "goodbye"]
    assert bleu.compute(predictions=preds, references=refs)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert chrf.compute(predictions=preds, references=refs)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(preds, [refs]).score / 100)
    assert bleu.compute(predictions=["xyz"], references=["abc def"])["bleu"] == 0.0
    # short answers (no 4-grams anywhere) are not all 0: orders absent from the corpus are skipped
    assert bleu.compute(predictions=["red", "yes"], references=["red", "yes"])["bleu"] == pytest.approx(1.0)
    assert 0 < bleu.compute(predictions=["red", "no"], references=["red", "yes"])["bleu"] < 1


def test_accuracy_labels(metrics):
    acc = metrics["accuracy"]
    preds, refs = ["Yes, it is.", "no", "Nope", "yes"], ["yes", "No.", "no", "no"]
    assert acc.compute(predictions=preds, references=refs, labels=["yes", "no"])["accuracy"] == 0.5
    assert acc.compute(predictions=preds, references=refs)["accuracy"] == 0.25  # whole normalized answers


def test_load_metric_stays_offline(monkeypatch):
    import evaluate
    import evaluate.loading
    from components.metrics import load_metric

    def no_network(*a, **k):
        raise AssertionError("network or hub access attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(evaluate.loading, "HubEvaluationModuleFactory", no_network)
    load_metric.cache_clear()
    for name in ("exact_match", "rouge", "bleu", "chrf", "accuracy"):
        assert isinstance(load_metric(name), evaluate.Metric)
    with pytest.raises(AssertionError, match="network or hub"):  # a name with no local module goes to the hub
        load_metric("squad_v2")


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_ci(metrics):
    from components.metrics.scoring import bootstrap_ci
    em = metrics["exact_match"]
    rng = np.random.default_rng(0)
    small = np.array([[float(v), 1.0] for v in rng.random(40) < 0.4])
    point = em.score_from_stats(small.sum(0))["exact_match"]
    ci = bootstrap_ci(small, em.score_from_stats, resamples=500, confidence=0.95, seed=3)["exact_match"]
    assert ci[0] < point < ci[1]
    assert ci == bootstrap_ci(small, em.score_from_stats, resamples=500, confidence=0.95, seed=3)["exact_match"]
    assert ci != bootstrap_ci(small, em.score_from_stats, resamples=500, confidence=0.95, seed=4)["exact_match"]
    big = np.tile(small, (16, 1))  # same proportion, 16x the items
    ci_big = bootstrap_ci(big, em.score_from_stats, resamples=500, confidence=0.95, seed=3)["exact_match"]
    assert ci_big[0] < point < ci_big[1] and ci_big[1] - ci_big[0] < (ci[1] - ci[0]) / 2
    assert bootstrap_ci(small, em.score_from_stats, resamples=0, confidence=0.95, seed=3) == {}


def test_task_metrics_fast_and_consistent(metrics):
    import time
    from components.metrics.scoring import task_metrics
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta eps zeta eta theta iota kappa".split()
    refs = [" ".join(rng.choice(words, 6)) for _ in range(200)]
    preds = [r if i % 3 == 0 else " ".join(rng.choice(words, 5)) for i, r in enumerate(refs)]
    tasks = ["yesno" if i % 4 == 0 else "qa" for i in range(200)]
    refs = ["yes" if t == "yesno" else r for r, t in zip(refs, tasks)]
    task_metrics(preds[:5], refs[:5], tasks[:5], resamples=10, confidence=0.9, seed=0)  # warm up
    start = time.perf_counter()
    out, correct = task_metrics(preds, refs, tasks, resamples=1000, confidence=0.95, seed=0)
    assert time.perf_counter() - start < 2.0
    assert out["bleu"] == pytest.approx(metrics["bleu"].compute(predictions=preds, references=refs)["bleu"])
    for key in ("exact_match", "rougeL", "bleu", "chrf", "accuracy"):
        assert 0 <= out[f"{key}_ci"][0] <= out[key] <= out[f"{key}_ci"][1] <= 1, key
    assert out["exact_match"] == pytest.approx(np.mean(correct))
    assert set(out["tasks"]) == {"qa", "yesno"} and out["tasks"]["yesno"]["n"] == 50


# ---------------------------------------------------------------- generation
def test_generation_stops_at_end_and_batching_is_exact(tiny):
    import torch
    from components.evaluate import generate, load_model, stop_ids
    model, tok = load_model("sft", tiny["models"]["sft"], tiny["processed"], torch.device("cpu"))
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p, _, _ in tiny["items"]]
    cpu = torch.device("cpu")
    batched, speed = generate(model, tok, prompts, max_new_tokens=12, batch_size=8, device=cpu, amp=False)
    singles = [generate(model, tok, [p], max_new_tokens=12, batch_size=1, device=cpu, amp=False) for p in prompts]
    assert batched == [out[0] for out, _ in singles]
    assert speed["gen_tokens"] == sum(sp["gen_tokens"] for _, sp in singles)  # padding after a stop is not counted
    assert speed["gen_tokens"] < 12 * len(prompts) and speed["gen_tokens_per_s"] > 0  # stopped early
    refs = [r for _, r, _ in tiny["items"]]
    assert all(batched) and sum(b == r for b, r in zip(batched, refs)) >= len(refs) // 5  # answers, then stops
    assert not any("thanks" in b or "user" in b for b in batched)
    # without the stop tokens the same model runs on past <|end|> into the follow-up turn
    x = tok(prompts[0], add_special_tokens=False, return_tensors="pt")
    raw = model.generate(**x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert stop_ids(tok)[0] in raw[0, x["input_ids"].shape[1]:].tolist()
    assert "thanks" in tok.decode(raw[0, x["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------- the stage
def test_evaluate_writes_everything(tiny):
    result = run_eval(tiny, "full")
    root, out = tiny["root"], tiny["root"] / "full"
    assert {p.name for p in out.iterdir()} == {"report.md", "samples.jsonl", "samples_table.json", "metrics.png",
                                               "loss.png", "seedlm.json"}
    assert [Path(a).name for a in result["artifacts"]] == ["report.md", "samples.jsonl", "metrics.png", "loss.png"]
    assert all(Path(a).is_file() for a in result["artifacts"]) and result["tables"] == [str(out / "samples_table.json")]
    table = read_json(out / "samples_table.json")  # the MLflow table: one column per field and model
    assert set(table) == {"id", "task", "prompt", "reference", "answer_pretrain", "correct_pretrain", "answer_sft",
                          "correct_sft"} and all(len(v) == len(tiny["items"]) for v in table.values())
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
    assert {(r["model"], r["metric"]) for r in plot} == {(n, k) for n in ("pretrain", "sft")
                                                        for k in ("exact_match", "rougeL", "bleu", "chrf", "accuracy")}
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
    drop = lambda r: {k: {kk: vv for kk, vv in v.items() if kk != "gen_tokens_per_s"} if isinstance(v, dict) else v
                      for k, v in r.items() if k != "artifacts"}
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
        evaluate_models(cfg(), tiny["processed"], models, tmp_path / "out", tmp_path / "m.json", tmp_path / "p.json",
                        seed=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="empty.*not a model"):
        evaluate_models(cfg(), tiny["processed"], {"sft": tmp_path / "empty"}, tmp_path / "out",
                        tmp_path / "m.json", tmp_path / "p.json", seed=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_empty_sft_test_is_a_note_not_a_crash(tiny, tmp_path):
    import shutil

    import datasets
    from components.evaluate import evaluate_models
    data = tmp_path / "processed"
    shutil.copytree(tiny["processed"], data)
    shutil.rmtree(data / "sft_test")
    empty = datasets.Dataset.from_dict({"input_ids": [], "labels": [], "prompt": [], "reference": [], "task": []},
                                       features=datasets.load_from_disk(str(tiny["processed"] / "sft_test")).features)
    empty.save_to_disk(str(data / "sft_test"))
    result = evaluate_models(cfg(), data, {"sft": tiny["models"]["sft"]}, tmp_path / "out", tmp_path / "m.json",
                             tmp_path / "p.json", seed=1)
    assert result["n_examples"] == 0 and result["sft"]["val_ppl"] > 1
    assert "exact_match" not in result["sft"] and "response_ppl" not in result["sft"]
    assert "sft_test is empty" in (tmp_path / "out" / "report.md").read_text()
    assert read_json(tmp_path / "p.json") == []


def test_run_adapter_uses_params_paths(tiny, tmp_path, monkeypatch):
    from components.common import StageContext
    from components.config import Params, Paths
    from components.evaluate import run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")  # no store: no champion
    root = tiny["root"]
    paths = Paths(processed=str(tiny["processed"]), pretrain=str(root / "pretrain"), sft=str(root / "sft"),
                  evaluate=str(tmp_path / "reports"), metrics=str(tmp_path / "metrics"), plots=str(root / "plots"),
                  checkpoints=str(tmp_path / ".seedlm" / "checkpoints"))
    logged = []
    ctx = StageContext(log=lambda metrics, step=None: logged.append(metrics), progress=False)
    result = run(Params(paths=paths, evaluate=cfg(bootstrap=20, max_examples=6)), ctx)
    assert read_json(tmp_path / "metrics" / "evaluate.json")["sft"] == result["sft"]
    assert (root / "plots" / "evaluate_metrics.json").is_file() and (tmp_path / "reports" / "loss.png").is_file()
    assert {k for m in logged for k in m} == {"pretrain.eval_seconds", "sft.eval_seconds"}
    assert "No champion of 'seedlm' in the registry yet" in (tmp_path / "reports" / "report.md").read_text()
    assert not (tmp_path / "none.db").exists()  # looking for a champion creates no store
    assert not (tmp_path / ".seedlm" / "control").exists()  # no pretrain meta: not a control-experiment run


# ---------------------------------------------------------------- significance
def test_paired_bootstrap_sees_what_separate_intervals_miss(metrics):
    from components.metrics.scoring import bootstrap_ci, paired_bootstrap
    score = metrics["exact_match"].score_from_stats
    rng = np.random.default_rng(5)
    base = (rng.random(120) < 0.5).astype(float)
    better = base.copy()
    better[rng.choice(np.flatnonzero(base == 0), 10, replace=False)] = 1.0  # base's hits plus 10 more
    a, b = np.stack([better, np.ones(120)], 1), np.stack([base, np.ones(120)], 1)
    boot = {"resamples": 1000, "confidence": 0.95, "seed": 0}
    ci_a, ci_b = bootstrap_ci(a, score, **boot)["exact_match"], bootstrap_ci(b, score, **boot)["exact_match"]
    assert ci_a[0] < ci_b[1]  # the two intervals overlap...
    d = paired_bootstrap(a, b, score, **boot)["exact_match"]
    assert d["diff"] == pytest.approx(10 / 120) and d["significant"] and d["ci"][0] > 0  # ...the paired one does not
    worse = paired_bootstrap(b, a, score, **boot)["exact_match"]
    assert worse["significant"] and worse["ci"][1] < 0
    assert paired_bootstrap(a, a, score, **boot)["exact_match"] == {"diff": 0.0, "ci": [0.0, 0.0], "significant": False}
    swapped = b.copy()  # 4 items won, 4 lost: no real difference
    swapped[np.flatnonzero(base == 0)[:4], 0], swapped[np.flatnonzero(base == 1)[:4], 0] = 1.0, 0.0
    tie = paired_bootstrap(swapped, b, score, **boot)["exact_match"]
    assert tie["diff"] == 0 and not tie["significant"] and tie["ci"][0] < 0 < tie["ci"][1]
    assert paired_bootstrap(a, b, score, resamples=0, confidence=0.95, seed=0)["exact_match"]["significant"] is None
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(a, b[:10], score, **boot)


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
    res = evaluate_models(cfg(bootstrap=50), tiny["processed"], models,
                          tmp_path / "out", tmp_path / "m.json", tmp_path / "p.json", seed=1)
    assert "val_ppl" not in res["other"] and res["other"]["response_ppl"] > 1 and "exact_match" in res["other"]
    assert "response_ppl" not in res["compare"]["sft_vs_other"] and "exact_match" in res["compare"]["sft_vs_other"]
    assert "other has its own tokenizer" in (tmp_path / "out" / "report.md").read_text()


def test_control_experiment_table(tiny, tmp_path):
    from components.evaluate import evaluate_models
    control, m = tmp_path / "control", tiny["models"]

    def ev(out: str, sft: Path, enabled: bool):
        return evaluate_models(cfg(bootstrap=200), tiny["processed"], {"sft": sft}, tmp_path / out,
                               tmp_path / f"{out}.json", tmp_path / f"{out}-plot.json", seed=7, control_dir=control,
                               pretrain_enabled=enabled)
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


# ---------------------------------------------------------------- the registry: champion, URIs, the gate
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite tracking store for this file (creating one takes ~5 s); artifacts under tmp."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:  # put URI, experiment and env back for other test files
        mp.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # the runner's set_experiment sets it
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # ... and this
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("seedlm", artifact_location=(root / "artifacts").as_uri())  # the runner's
        yield root


def stage_params(tiny, root: Path, sft: Path, name: str):
    from components.config import GateConfig, Params, Paths, RegisterConfig
    t = tiny["root"]
    paths = Paths(processed=str(tiny["processed"]), pretrain=str(t / "pretrain"), sft=str(sft),
                  evaluate=str(root / "reports" / "evaluate"), register=str(root / "reports" / "register"),
                  metrics=str(root / "metrics"), plots=str(t / "plots"), checkpoints=str(root / ".seedlm" / "ckpt"))
    gate = GateConfig(min={"exact_match": 0.0}, max_regression={"exact_match": 0.0})
    return Params(paths=paths, evaluate=cfg(bootstrap=300),
                  register=RegisterConfig(model_name=name, max_new_tokens=4, gate=gate))


@pytest.fixture(scope="module")
def registered(tiny, store, tmp_path_factory):
    """The fitted model evaluated and registered through the runner: v1, champion."""
    import shutil

    from components.common import write_meta
    from components.runner import run_stage
    root = tmp_path_factory.mktemp("pipeline")
    good = root / "good"
    shutil.copytree(tiny["models"]["sft"], good)
    write_meta(good, "sft", {"seed": 1, "sft": {"method": "full"}}, {"base_pretrained": True}, {})
    name = "seedlm-e2e"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the register stage's repo root
        first = run_stage("evaluate", stage_params(tiny, root, good, name), progress=False)
        reg = run_stage("register", stage_params(tiny, root, good, name), progress=False)
    assert "champion" not in first and reg["version"] == 1 and reg["promoted"]
    return {"root": root, "name": name, "first": first}


def test_worse_model_never_becomes_champion(tiny, registered, monkeypatch):
    """A 1-step model, evaluated beside the registry's champion on the same items, is rejected by the gate."""
    import mlflow
    from mlflow import MlflowClient

    from components.common import write_meta
    from components.runner import run_stage
    root, name, first = registered["root"], registered["name"], registered["first"]
    bad = root / "bad"
    make_model(bad, tiny["tok"], tiny["items"], steps=1, seed=2)
    write_meta(bad, "sft", {"seed": 1, "sft": {"method": "full", "max_steps": 1}}, {"base_pretrained": True}, {})
    monkeypatch.chdir(root)
    second = run_stage("evaluate", stage_params(tiny, root, bad, name), progress=False)
    assert second["sources"]["champion"] == f"models:/{name}/1"
    for key in ("exact_match", "rougeL", "response_ppl", "val_ppl"):  # the downloaded champion = the same weights
        assert second["champion"][key] == pytest.approx(first["sft"][key], rel=1e-5), key
    em = second["compare"]["sft_vs_champion"]["exact_match"]
    assert em["significant"] and em["ci"][1] < 0 and first["sft"]["exact_match"] > 0.2
    res = run_stage("register", stage_params(tiny, root, bad, name), progress=False)
    assert res["version"] == 2 and not res["promoted"] and res["champion_version"] == 1
    client = MlflowClient()
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {"champion": "1",
                                                                                       "challenger": "2"}
    mv = client.get_model_version(name, "2")
    gate = json.loads(mv.tags["gate.report"])
    (rule,) = [r for r in gate["rules"] if r["rule"] == "max_regression"]
    assert gate["paired"] and rule["method"] == "paired bootstrap" and rule["significant"] and not rule["passed"]
    assert rule["drop"] == pytest.approx(first["sft"]["exact_match"] - second["sft"]["exact_match"])
    assert rule["drop_ci"][0] > 0 and "Decision: rejected" in mv.description
    # run without DVC (no dvc.lock): the processed data is identified by its metadata hash, also as a dataset input
    from components.lineage import meta_hash
    assert mv.tags["data.processed.meta_hash"] == meta_hash(tiny["processed"]) and "data.processed.md5" not in mv.tags
    digests = {d.dataset.name: d.dataset.digest for d in client.get_run(mv.run_id).inputs.dataset_inputs}
    assert digests == {"seedlm-processed": meta_hash(tiny["processed"]),
                       "seedlm-tokenizer": mv.tags["data.tokenizer.sha256"][:32]}
    assert "| max_regression | exact_match |" in (root / "reports" / "register" / "gate.md").read_text()
    runs = mlflow.search_runs(experiment_names=["seedlm"], filter_string="attributes.run_name = 'evaluate'",
                              output_format="list")
    assert len(runs) == 2
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "samples.jsonl", "metrics.png", "samples_table.json"} <= arts  # the table, for the UI
    assert runs[0].data.metrics["compare.sft_vs_champion.exact_match.diff"] == pytest.approx(em["diff"])


@pytest.mark.filterwarnings("ignore:'components.evaluate' found in sys.modules")
def test_cli_evaluates_registry_uris_and_folders(tiny, registered, tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    import yaml

    import components.evaluate as ev
    name, first = registered["name"], registered["first"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 7, "paths": {"processed": str(tiny["processed"])},
                                      "evaluate": {"bootstrap": 100, "max_new_tokens": 8, "batch_size": 8,
                                                   "ppl_batches": 2}}))
    monkeypatch.chdir(tmp_path)

    def cli(*models: str) -> int:
        args = [x for m in models for x in ("--model", m)]
        monkeypatch.setattr(sys, "argv", ["evaluate", "--params", str(params), "--no-progress", *args, "--out", "ext"])
        try:
            with pytest.raises(SystemExit) as done:
                runpy.run_module("components.evaluate", run_name="__main__")
        finally:
            ev.EXTERNAL.clear()
        return done.value.code

    assert cli(f"models:/{name}@champion", f"mine={tiny['models']['pretrain']}") == 0
    m = read_json(tmp_path / "ext" / "metrics.json")
    assert m["sources"] == {f"{name}-champion": f"models:/{name}@champion", "mine": str(tiny["models"]["pretrain"])}
    assert m[f"{name}-champion"]["exact_match"] == pytest.approx(first["sft"]["exact_match"])
    assert m["compare"][f"{name}-champion_vs_mine"]["exact_match"]["significant"]
    assert f"| {name}-champion |" in (tmp_path / "ext" / "report.md").read_text()
    assert not (tmp_path / ".seedlm").exists()  # another model's evaluation joins no control history
    capsys.readouterr()
    assert cli(f"models:/{name}/99") == 2
    err = capsys.readouterr().err
    assert f"models:/{name}/99: not found" in err and len(err.strip().splitlines()) == 1
    assert cli(f"models:/{name}@nosuch") == 2 and f"models:/{name}@nosuch: not found" in capsys.readouterr().err
    assert cli(str(tmp_path / "nowhere")) == 2 and "nowhere" in capsys.readouterr().err
