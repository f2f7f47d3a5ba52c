"""Exact match after normalization (a local, offline `evaluate` module of seedlm).

Both strings are stripped and their whitespace collapsed to single spaces; optionally compared
case-insensitively and without punctuation. Returns the fraction of equal pairs, in [0, 1].
"""

import unicodedata

import datasets
import evaluate

_DESCRIPTION = """Fraction of predictions equal to their reference after normalization:
strip, collapse whitespace, and optionally lowercase (`ignore_case`) and drop punctuation
(`ignore_punctuation`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): one reference per prediction.
    ignore_case (bool): compare case-insensitively. Default False.
    ignore_punctuation (bool): remove Unicode punctuation before comparing. Default False.
    return_stats (bool): also return `stats`, one [match, 1] row per item (for bootstrapping
        with `score_from_stats`). Default False.
Returns:
    exact_match (float): in [0, 1].
Examples:
    >>> m = evaluate.load("components/evaluation/metrics/exact_match")
    >>> m.compute(predictions=[" Paris  is "], references=["paris is"], ignore_case=True)
    {'exact_match': 1.0}
"""

_CITATION = ""


def normalize(text: str, ignore_case: bool = False, ignore_punctuation: bool = False) -> str:
    """Strip, collapse whitespace; optionally lowercase and drop punctuation."""
    text = str(text)
    if ignore_punctuation:
        text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
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
        )

    def item_stats(self, predictions, references, ignore_case=False, ignore_punctuation=False):
        """One [match (0/1), 1] row per item; rows add up across items."""
        norm = [
            (normalize(p, ignore_case, ignore_punctuation), normalize(r, ignore_case, ignore_punctuation))
            for p, r in zip(predictions, references)
        ]
        return [[float(p == r), 1.0] for p, r in norm]

    def score_from_stats(self, stats):
        """The metric from summed item stats."""
        return {"exact_match": float(stats[0] / stats[1]) if stats[1] else 0.0}

    def _compute(self, predictions, references, ignore_case=False, ignore_punctuation=False, return_stats=False):
        rows = self.item_stats(predictions, references, ignore_case, ignore_punctuation)
        out = self.score_from_stats([sum(r[0] for r in rows), float(len(rows))])
        if return_stats:
            out["stats"] = rows
        return out
