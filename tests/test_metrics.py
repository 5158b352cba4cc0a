"""ADGEN metrics against the reference recipe (spec §7.3) and the golden `metrics` case."""

import logging
import warnings

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

import glm6b
from glm6b.eval.metrics import METRIC_NAMES, compute_metrics, score_pair
from helpers import golden_cases

jieba.setLogLevel(logging.WARNING)

# Hand-picked pairs: ADGEN-style ads, partial overlaps, multi-sentence texts (rouge_chinese splits
# sentences at 。！？), mixed Chinese/ASCII, repeated words, one-character texts, punctuation only.
PAIRS = [
    ("这款连衣裙采用宽松版型，穿着舒适。", "这款连衣裙版型宽松，穿着很舒适。"),
    ("简约的圆领设计，修饰脸型。袖口的荷叶边，甜美可爱！", "圆领的设计简约大方，荷叶边袖口增添了甜美气息。"),
    ("这款牛仔裤采用直筒版型，显瘦又显高，搭配白色T恤就很好看", "直筒牛仔裤，显高显瘦，搭配T恤休闲又时尚。"),
    ("复古复古复古的风格", "复古风格的印花衬衫"),
    ("好", "好"),
    ("好的", "好"),
    ("。", "这款连衣裙。"),
    ("！！！", "好！"),
    ("...", "好."),
    ("型", "类型#裙*版型#宽松*风格#复古"),
    ("A字裙摆，\n遮肉显瘦", "A字版型的裙摆，遮肉又显瘦"),
]


def reference_scores(pred: str, label: str) -> dict[str, float]:
    """ptuning/main.py compute_metrics for one pair, written out literally."""
    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(label))
    rouge = Rouge()
    scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
    result = {k: round(v["f"] * 100, 4) for k, v in scores[0].items()}
    bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    result["bleu-4"] = round(bleu_score * 100, 4)
    return result


def test_exported_from_package():
    assert glm6b.compute_metrics is compute_metrics


def test_golden_pairs_and_means():
    case = golden_cases()["metrics"]
    preds = [p["pred"] for p in case["pairs"]]
    labels = [p["label"] for p in case["pairs"]]
    for pair in case["pairs"]:  # same segmentation as the reference's jieba
        assert list(jieba.cut(pair["pred"])) == pair["pred_words"]
        assert list(jieba.cut(pair["label"])) == pair["label_words"]
    result = compute_metrics(preds, labels)
    for pair, ours in zip(case["pairs"], result["per_example"]):
        assert set(ours) == set(METRIC_NAMES)
        for name in METRIC_NAMES:
            assert ours[name] == pair[name], (pair["pred"], name)
            assert isinstance(ours[name], float)
    for name in METRIC_NAMES:
        assert result[name] == case["mean"][name], name
        assert isinstance(result[name], float)


@pytest.mark.parametrize("pred,label", PAIRS)
def test_pair_equals_reference_recipe(pred, label):
    assert score_pair(pred, label) == reference_scores(pred, label)


def test_means_equal_reference_recipe():
    preds, labels = [p for p, _ in PAIRS], [l for _, l in PAIRS]
    result = compute_metrics(preds, labels)
    expected = [reference_scores(p, l) for p, l in PAIRS]
    assert result["per_example"] == expected
    for name in METRIC_NAMES:
        assert result[name] == float(np.mean([e[name] for e in expected]))


def test_known_numbers():
    assert score_pair("一模一样的文本", "一模一样的文本") == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0,
                                                     "rouge-l": 100.0}
    # One character, one word: unigram matches only; BLEU-4 smoothed by method 3 = (1 * 1/2 * 1/4 * 1/8)^(1/4).
    assert score_pair("好", "好") == {"bleu-4": 35.3553, "rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0}
    assert score_pair("好的", "好") == {"bleu-4": 29.7302, "rouge-1": 66.6667, "rouge-2": 0.0, "rouge-l": 66.6667}
    assert score_pair("完全不相关的句子", "这款上衣采用棉质面料") == {name: 0.0 for name in METRIC_NAMES}


@pytest.mark.parametrize("pred,label", [("", "这款连衣裙"), ("这款连衣裙", ""), ("", ""), ("   ", "好"),
                                        ("\n", "好"), ("\u3000", "好"), ("好", " \t\n")])
def test_empty_or_blank_text_scores_zero(pred, label):
    # The reference raises here (rouge_chinese: "Hypothesis is empty." / "Reference is empty.").
    with pytest.raises(ValueError, match="is empty"):
        reference_scores(pred, label)
    assert score_pair(pred, label) == {name: 0.0 for name in METRIC_NAMES}


def test_empty_prediction_in_a_set_counts_as_zero():
    result = compute_metrics(["一模一样的文本", ""], ["一模一样的文本", "这款连衣裙"])
    assert result["per_example"][1] == {name: 0.0 for name in METRIC_NAMES}
    assert result["rouge-1"] == 50.0 and result["bleu-4"] == 50.0


@pytest.mark.parametrize("pred", ["。", "！！！", "，。？", "...", "!?"])
def test_punctuation_only_prediction_does_not_crash(pred):
    # rouge_chinese 1.0.3 keeps punctuation as words, so these score like any text (no special case).
    label = "这款连衣裙很好看！是不是？"
    assert score_pair(pred, label) == reference_scores(pred, label)
    assert score_pair(pred, pred) == reference_scores(pred, pred)


def test_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics([p for p, _ in PAIRS] + [""], [l for _, l in PAIRS] + ["好"])


def test_length_mismatch_and_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], [])
    with pytest.raises(TypeError, match="prediction 0"):
        compute_metrics([None], ["a"])
