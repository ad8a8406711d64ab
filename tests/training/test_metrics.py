"""Fine-tuning metrics against hand-computed values."""

import evaluate
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from transformers_albef.training.metrics import (
    Accuracy,
    RetrievalRecall,
    VQAAccuracy,
    accuracy_from_logits,
    vqa_score,
)

TEN = ["cat", "cat"] + ["dog"] * 8  # ten annotators


def test_accuracy():
    assert Accuracy().compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    assert isinstance(Accuracy(), evaluate.EvaluationModule)  # a real evaluate module, built without the Hub


def test_accuracy_accumulates_batches():
    metric = Accuracy()
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=[0], references=[0])
    assert metric.compute() == {"accuracy": pytest.approx(2 / 3)}


def test_accuracy_from_logits_takes_the_argmax():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5], [1.0, 0.0]])
    # the prediction loop may give (logits, other outputs): the first is used
    prediction = EvalPrediction(predictions=(logits, np.zeros((4, 3))), label_ids=np.array([1, 0, 0, 0]))
    assert accuracy_from_logits(prediction) == {"accuracy": 0.75}


@pytest.mark.parametrize(
    "prediction, answers, simple, leave_one_out",
    [
        # 2 of 10 said "cat": min(2/3, 1); leaving one out: 2 subsets keep 1 cat (1/3), 8 keep 2 (2/3)
        ("cat", TEN, 2 / 3, (2 * 1 / 3 + 8 * 2 / 3) / 10),
        ("dog", TEN, 1.0, 1.0),  # 8 votes, 7 in every subset
        ("bird", TEN, 0.0, 0.0),
        # 3 votes: 1; leaving one of the three out (3 of the 10 subsets) leaves 2 votes: 2/3
        ("cat", ["cat"] * 3 + ["dog"] * 7, 1.0, (3 * 2 / 3 + 7 * 1.0) / 10),
        ("Yes ", ["yes"], 1.0, 1.0),  # one answer: exact match (after lowercasing / stripping)
        ("no", ["yes"], 0.0, 0.0),
    ],
)
def test_vqa_score(prediction, answers, simple, leave_one_out):
    assert vqa_score(prediction, answers) == pytest.approx(simple)
    assert vqa_score(prediction, answers, leave_one_out=True) == pytest.approx(leave_one_out)


def test_vqa_accuracy_averages_questions():
    metric = VQAAccuracy()
    result = metric.compute(predictions=["cat", "dog", "no"], references=[TEN, TEN, ["yes"]])
    assert result == {"vqa_accuracy": pytest.approx((2 / 3 + 1 + 0) / 3)}
    official = metric.compute(predictions=["cat"], references=[TEN], leave_one_out=True)
    assert official == {"vqa_accuracy": pytest.approx(0.6)}


def test_vqa_accuracy_combines_with_evaluate():
    combined = evaluate.combine([VQAAccuracy()])
    assert combined.compute(predictions=["dog"], references=[TEN]) == {"vqa_accuracy": 1.0}


def test_vqa_score_needs_answers():
    with pytest.raises(ValueError, match="at least one answer"):
        vqa_score("cat", [])


# 3 images with 2 captions each (texts 0-1, 2-3, 4-5)
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]
SCORE_I2T = [
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],  # caption 0 first: rank 0
    [0.5, 0.6, 0.1, 0.2, 0.9, 0.8],  # captions 3 (0.2) and 2 (0.1) at positions 4 and 5: rank 4
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.05],  # caption 4 first: rank 0
]
SCORE_T2I = [
    [0.9, 0.1, 0.2],  # image 0 first: rank 0
    [0.1, 0.9, 0.2],  # image 0 last: rank 2
    [0.3, 0.2, 0.1],  # image 1 second: rank 1
    [0.0, 1.0, 0.5],  # rank 0
    [0.2, 0.1, 0.7],  # rank 0
    [0.6, 0.5, 0.4],  # image 2 last: rank 2
]


def test_retrieval_recall_by_hand():
    result = RetrievalRecall().compute(predictions=(SCORE_I2T, SCORE_T2I), references=(TXT2IMG, IMG2TXT))
    expected = {
        "txt_r1": 200 / 3,
        "txt_r5": 100.0,
        "txt_r10": 100.0,
        "txt_r_mean": (200 / 3 + 200) / 3,
        "img_r1": 50.0,
        "img_r5": 100.0,
        "img_r10": 100.0,
        "img_r_mean": 250 / 3,
    }
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    assert result == pytest.approx(expected)


def test_retrieval_recall_at_5_and_10():
    # 6 images with one caption each, torch tensors; text 0's image ranked last (rank 5): missed by R@1 and R@5
    score_t2i = torch.eye(6)
    score_t2i[0] = torch.tensor([-1.0, 5, 4, 3, 2, 1])
    result = RetrievalRecall().compute(
        predictions=(torch.eye(6), score_t2i), references=(list(range(6)), [[i] for i in range(6)])
    )
    assert result["txt_r1"] == 100.0
    assert (result["img_r1"], result["img_r5"], result["img_r10"]) == pytest.approx((500 / 6, 500 / 6, 100.0))


def test_retrieval_recall_checks_shapes():
    with pytest.raises(ValueError, match="transposes"):
        RetrievalRecall().compute(predictions=(SCORE_I2T, SCORE_I2T), references=(TXT2IMG, IMG2TXT))
    with pytest.raises(ValueError, match="txt2img"):
        RetrievalRecall().compute(predictions=(SCORE_I2T, SCORE_T2I), references=(TXT2IMG[:5], IMG2TXT))
