"""ADGEN metrics: BLEU-4 and ROUGE-1/2/L exactly as the reference ptuning/main.py computes them (spec §7.3).

Per (prediction, reference) pair:

* ROUGE: both texts are segmented into words with jieba (accurate mode, HMM on), joined with spaces
  and scored with `rouge_chinese.Rouge().get_scores`; rouge-1/2/l are the F values.
* BLEU-4: nltk `sentence_bleu` on *characters* (`list(text)`), uniform 4-gram weights, smoothing
  method 3.

Each value is multiplied by 100 and rounded to 4 decimals; the reported score is the plain mean
over pairs. These are the published ChatGLM-6B ADGEN numbers' recipe, so our scores compare.

One deliberate difference: the reference crashes (rouge_chinese raises "Hypothesis is empty." or
"Reference is empty.") when a text is empty or only whitespace; here such a pair scores 0 for every
metric. Punctuation-only texts need nothing special: rouge_chinese 1.0.3 does not filter punctuation,
so they score like any other text.
"""

from __future__ import annotations

import logging

import numpy as np

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")

_scorers = None  # (jieba module, Rouge instance, sentence_bleu, smoothing function); built on first use


def _load_scorers():
    """Import jieba / rouge_chinese / nltk once, silencing jieba's dictionary-loading messages."""
    global _scorers
    if _scorers is None:
        from ..extras import import_extra

        jieba = import_extra("jieba", "eval", "BLEU-4 / ROUGE scoring")
        bleu = import_extra("nltk.translate.bleu_score", "eval", "BLEU-4 / ROUGE scoring")
        Rouge = import_extra("rouge_chinese", "eval", "BLEU-4 / ROUGE scoring").Rouge
        sentence_bleu, SmoothingFunction = bleu.sentence_bleu, bleu.SmoothingFunction

        jieba.setLogLevel(logging.WARNING)  # jieba logs "Building prefix dict ..." to stderr at DEBUG
        _scorers = (jieba, Rouge(), sentence_bleu, SmoothingFunction().method3)
    return _scorers


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """The four scores (×100, rounded to 4 decimals) of one prediction against its reference.

    Args:
        prediction: generated text.
        reference: target text.

    Returns:
        {"bleu-4", "rouge-1", "rouge-2", "rouge-l"} -> float. All 0.0 when either text is empty or
        only whitespace (where the reference recipe raises instead).
    """
    if not prediction.strip() or not reference.strip():
        # rouge_chinese drops whitespace-only sentences and raises when none is left.
        return {name: 0.0 for name in METRIC_NAMES}
    jieba, rouge, sentence_bleu, smoothing = _load_scorers()
    hypothesis_words = list(jieba.cut(prediction))
    reference_words = list(jieba.cut(reference))
    rouge_scores = rouge.get_scores(" ".join(hypothesis_words), " ".join(reference_words))[0]
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)
    return {
        "bleu-4": float(round(bleu * 100, 4)),  # nltk returns the int 0 when no character matches
        "rouge-1": float(round(rouge_scores["rouge-1"]["f"] * 100, 4)),
        "rouge-2": float(round(rouge_scores["rouge-2"]["f"] * 100, 4)),
        "rouge-l": float(round(rouge_scores["rouge-l"]["f"] * 100, 4)),
    }


def compute_metrics(predictions: list[str], references: list[str]) -> dict:
    """BLEU-4 and ROUGE-1/2/L of predictions against references, as the reference compute_metrics.

    Args:
        predictions: generated texts.
        references: target texts, one per prediction.

    Returns:
        {"bleu-4": mean, "rouge-1": mean, "rouge-2": mean, "rouge-l": mean, "per_example": [...]}:
        each mean is float(numpy.mean) of the per-example values (already ×100 and rounded to 4
        decimals); "per_example" holds one {"bleu-4", "rouge-1", "rouge-2", "rouge-l"} dict per pair.

    Raises:
        ValueError: the lists differ in length or are empty.
        TypeError: an item is not a string.
    """
    if len(predictions) != len(references):
        raise ValueError(f"compute_metrics: {len(predictions)} predictions but {len(references)} references; "
                         f"they must pair up one to one")
    if not predictions:
        raise ValueError("compute_metrics: no predictions to score (the lists are empty)")
    for kind, texts in (("prediction", predictions), ("reference", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"compute_metrics: {kind} {index} is a {type(text).__name__}, expected a str")
    per_example = [score_pair(p, r) for p, r in zip(predictions, references)]
    result: dict = {name: float(np.mean([scores[name] for scores in per_example])) for name in METRIC_NAMES}
    result["per_example"] = per_example
    return result
