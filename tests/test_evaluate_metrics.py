"""evaluate's local metric modules (components/evaluation/metrics): the metrics, bootstrap CIs, paired significance."""

from __future__ import annotations

import socket

import numpy as np
import pytest


# ---------------------------------------------------------------- metric modules
@pytest.fixture(scope="module")
def metrics():
    from components.evaluation.metrics import load_metric, local_metrics

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
        sacrebleu.corpus_bleu(preds, [refs]).score / 100
    )
    assert chrf.compute(predictions=preds, references=refs)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(preds, [refs]).score / 100
    )
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

    from components.evaluation.metrics import load_metric

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
    from components.evaluation.scoring import bootstrap_ci

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


def test_task_metrics_consistent(metrics):
    from components.evaluation.scoring import task_metrics

    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    refs = [" ".join(rng.choice(words, 6)) for _ in range(200)]
    preds = [r if i % 3 == 0 else " ".join(rng.choice(words, 5)) for i, r in enumerate(refs)]
    tasks = ["yesno" if i % 4 == 0 else "qa" for i in range(200)]
    refs = ["yes" if t == "yesno" else r for r, t in zip(refs, tasks)]
    out, correct = task_metrics(preds, refs, tasks, resamples=1000, confidence=0.95, seed=0)
    assert out["bleu"] == pytest.approx(metrics["bleu"].compute(predictions=preds, references=refs)["bleu"])
    for key in ("exact_match", "rougeL", "bleu", "chrf", "accuracy"):
        assert 0 <= out[f"{key}_ci"][0] <= out[key] <= out[f"{key}_ci"][1] <= 1, key
    assert out["exact_match"] == pytest.approx(np.mean(correct))
    assert set(out["tasks"]) == {"qa", "yesno"} and out["tasks"]["yesno"]["n"] == 50


# ---------------------------------------------------------------- significance
def test_paired_bootstrap_sees_what_separate_intervals_miss(metrics):
    from components.evaluation.scoring import bootstrap_ci, paired_bootstrap

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
