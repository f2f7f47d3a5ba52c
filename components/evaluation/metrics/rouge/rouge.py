"""ROUGE-1/2/L F-measures (a local, offline `evaluate` module of seedlm, built on rouge_score).

The corpus score is the mean of the per-item F-measures (no random aggregation), each in [0, 1].
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer, tokenizers

_DESCRIPTION = """ROUGE F-measures (rouge1, rouge2, rougeL) between predictions and references,
averaged over items. Tokens: lowercased Unicode words (`tokenizer="unicode"`, the default) or
rouge_score's ASCII tokenizer (`tokenizer="default"`, which supports `use_stemmer`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): one reference per prediction.
    rouge_types (list of str): subset of ["rouge1", "rouge2", "rougeL"]. Default all three.
    tokenizer (str): "unicode" (default) or "default" (rouge_score's).
    use_stemmer (bool): Porter stemming (only with tokenizer="default"). Default False.
    return_stats (bool): also return `stats`, one [score per type..., 1] row per item.
Returns:
    rouge1, rouge2, rougeL (float): mean F-measure, in [0, 1].
Examples:
    >>> m = evaluate.load("components/evaluation/metrics/rouge")
    >>> m.compute(predictions=["the cat sat"], references=["the cat sat"])["rougeL"]
    1.0
"""

_CITATION = """Lin, Chin-Yew. ROUGE: a Package for Automatic Evaluation of Summaries. 2004."""

TYPES = ("rouge1", "rouge2", "rougeL")


class UnicodeTokenizer(tokenizers.Tokenizer):
    """Lowercased Unicode word tokens (rouge_score's default drops every non-ASCII letter)."""

    def tokenize(self, text):
        return re.findall(r"\w+", str(text).casefold())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
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
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def item_stats(self, predictions, references, rouge_types=TYPES, tokenizer="unicode", use_stemmer=False):
        """One [F(type) for each type..., 1] row per item; rows add up across items."""
        unknown = set(rouge_types) - set(TYPES)
        if unknown:
            raise ValueError(f"unknown rouge_types {sorted(unknown)}; use a subset of {list(TYPES)}")
        tok = UnicodeTokenizer() if tokenizer == "unicode" else None
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer, tokenizer=tok)
        rows = []
        for p, r in zip(predictions, references):
            s = scorer.score(str(r), str(p))
            rows.append([float(s[t].fmeasure) for t in rouge_types] + [1.0])
        return rows

    def score_from_stats(self, stats, rouge_types=TYPES):
        """The metrics from summed item stats."""
        n = stats[-1]
        return {t: float(stats[i] / n) if n else 0.0 for i, t in enumerate(rouge_types)}

    def _compute(
        self, predictions, references, rouge_types=TYPES, tokenizer="unicode", use_stemmer=False, return_stats=False
    ):
        rouge_types = tuple(rouge_types)
        rows = self.item_stats(predictions, references, rouge_types, tokenizer, use_stemmer)
        sums = [sum(col) for col in zip(*rows)] if rows else [0.0] * (len(rouge_types) + 1)
        out = self.score_from_stats(sums, rouge_types)
        if return_stats:
            out["stats"] = rows
        return out
