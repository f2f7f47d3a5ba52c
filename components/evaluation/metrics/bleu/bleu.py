"""Corpus BLEU via sacrebleu (a local, offline `evaluate` module of seedlm).

Scaled to [0, 1] (sacrebleu's 0-100 score divided by 100). Defaults: 13a tokenization,
exponential smoothing, 4-grams, one reference per item, and `effective_order=True`: n-gram orders
that no prediction has are left out, so a corpus of answers shorter than 4 tokens does not score
0 (sacrebleu's corpus_bleu only differs from this when a whole corpus lacks some order).
"""

import functools

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """Corpus-level BLEU (sacrebleu), divided by 100 so it lies in [0, 1]."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): one reference per prediction.
    lowercase (bool): case-insensitive BLEU. Default False.
    tokenize (str): sacrebleu tokenizer name. Default "13a".
    smooth_method (str): "exp" (default), "floor", "add-k" or "none".
    effective_order (bool): skip n-gram orders absent from the whole corpus. Default True.
    return_stats (bool): also return `stats`, sacrebleu's per-item sufficient statistics
        ([hyp_len, ref_len, correct_1..4, total_1..4]), which add up across items.
Returns:
    bleu (float): in [0, 1].
Examples:
    >>> m = evaluate.load("components/evaluation/metrics/bleu")
    >>> m.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])["bleu"]
    1.0
"""

_CITATION = """Post, Matt. A Call for Clarity in Reporting BLEU Scores. WMT 2018."""


@functools.lru_cache(maxsize=16)
def _scorer(lowercase=False, tokenize="13a", smooth_method="exp", effective_order=True):
    return sacrebleu.BLEU(
        lowercase=lowercase, tokenize=tokenize, smooth_method=smooth_method, effective_order=effective_order, force=True
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }
            ),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def item_stats(self, predictions, references, lowercase=False, tokenize="13a", smooth_method="exp"):
        """sacrebleu's per-item sufficient statistics; rows add up across items."""
        if not predictions:
            return []
        stats = _scorer(lowercase, tokenize, smooth_method)._extract_corpus_statistics(
            [str(p) for p in predictions], [[str(r) for r in references]]
        )
        return [[float(v) for v in row] for row in stats]

    def score_from_stats(self, stats, smooth_method="exp", effective_order=True):
        """BLEU in [0, 1] from summed item stats."""
        if len(stats) == 0 or stats[0] == 0 and stats[1] == 0:
            return {"bleu": 0.0}
        scorer = _scorer(smooth_method=smooth_method, effective_order=effective_order)
        score = scorer._compute_score_from_stats([int(round(v)) for v in stats])
        return {"bleu": min(1.0, float(score.score) / 100.0)}

    def _compute(
        self,
        predictions,
        references,
        lowercase=False,
        tokenize="13a",
        smooth_method="exp",
        effective_order=True,
        return_stats=False,
    ):
        rows = self.item_stats(predictions, references, lowercase, tokenize, smooth_method)
        sums = [sum(col) for col in zip(*rows)] if rows else []
        out = self.score_from_stats(sums, smooth_method, effective_order)
        if return_stats:
            out["stats"] = rows
        return out
