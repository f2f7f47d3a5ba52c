"""Accuracy of classification-style answers given as text (a local, offline `evaluate` module of seedlm).

Labels are compared after normalization (casefold, punctuation removed, whitespace collapsed).
With `labels` (e.g. ["yes", "no"]) an answer counts as the label it starts with, so
"Yes, it is." is "yes". Unlike the hub's `accuracy`, inputs are strings, not class ids.
"""

import unicodedata

import datasets
import evaluate

_DESCRIPTION = """Fraction of predictions whose normalized label equals the reference's."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): gold labels as text.
    labels (list of str or None): the label set; an answer maps to the first label it starts
        with (as whole words). Default None: the whole normalized answer is the label.
    return_stats (bool): also return `stats`, one [correct, 1] row per item.
Returns:
    accuracy (float): in [0, 1].
Examples:
    >>> m = evaluate.load("components/evaluation/metrics/accuracy")
    >>> m.compute(predictions=["Yes, it is."], references=["yes"], labels=["yes", "no"])
    {'accuracy': 1.0}
"""

_CITATION = ""


def normalize(text: str) -> str:
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in str(text))
    return " ".join(text.split()).casefold()


def to_label(text: str, labels=None) -> str:
    """The normalized label an answer denotes."""
    text = normalize(text)
    for label in [normalize(x) for x in labels or ()]:
        if label and (text == label or text.startswith(label + " ")):
            return label
    return text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
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

    def item_stats(self, predictions, references, labels=None):
        """One [correct (0/1), 1] row per item; rows add up across items."""
        return [[float(to_label(p, labels) == to_label(r, labels)), 1.0] for p, r in zip(predictions, references)]

    def score_from_stats(self, stats):
        """The metric from summed item stats."""
        return {"accuracy": float(stats[0] / stats[1]) if len(stats) and stats[1] else 0.0}

    def _compute(self, predictions, references, labels=None, return_stats=False):
        rows = self.item_stats(predictions, references, labels)
        out = self.score_from_stats([sum(r[0] for r in rows), float(len(rows))])
        if return_stats:
            out["stats"] = rows
        return out
