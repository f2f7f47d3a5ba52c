"""Corpus chrF (or chrF++) via sacrebleu (a local, offline `evaluate` module of seedlm).

Scaled to [0, 1] (sacrebleu's 0-100 score divided by 100). Defaults: character 6-grams, no word
n-grams (chrF; `word_order=2` gives chrF++), beta 2.
"""

import functools

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """Corpus-level chrF (sacrebleu), divided by 100 so it lies in [0, 1]."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): one reference per prediction.
    char_order (int): character n-gram order. Default 6.
    word_order (int): word n-gram order (2 = chrF++). Default 0.
    beta (int): recall weight. Default 2.
    lowercase (bool): case-insensitive. Default False.
    return_stats (bool): also return `stats`, sacrebleu's per-item sufficient statistics,
        which add up across items.
Returns:
    chrf (float): in [0, 1].
Examples:
    >>> m = evaluate.load("components/evaluation/metrics/chrf")
    >>> m.compute(predictions=["a b c"], references=["a b c"])["chrf"]
    1.0
"""

_CITATION = """Popovic, Maja. chrF: character n-gram F-score for automatic MT evaluation. WMT 2015."""


@functools.lru_cache(maxsize=16)
def _scorer(char_order=6, word_order=0, beta=2, lowercase=False):
    return sacrebleu.CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
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

    def item_stats(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False):
        """sacrebleu's per-item sufficient statistics; rows add up across items."""
        if not predictions:
            return []
        stats = _scorer(char_order, word_order, beta, lowercase)._extract_corpus_statistics(
            [str(p) for p in predictions], [[str(r) for r in references]]
        )
        return [[float(v) for v in row] for row in stats]

    def score_from_stats(self, stats, char_order=6, word_order=0, beta=2):
        """chrF in [0, 1] from summed item stats."""
        if len(stats) == 0:
            return {"chrf": 0.0}
        score = _scorer(char_order, word_order, beta)._compute_f_score([int(round(v)) for v in stats])
        return {"chrf": min(1.0, float(score) / 100.0)}

    def _compute(
        self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False, return_stats=False
    ):
        rows = self.item_stats(predictions, references, char_order, word_order, beta, lowercase)
        sums = [sum(col) for col in zip(*rows)] if rows else []
        out = self.score_from_stats(sums, char_order, word_order, beta)
        if return_stats:
            out["stats"] = rows
        return out
