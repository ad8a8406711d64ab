"""Fine-tuning metrics behind the `evaluate` interface, with no Hub access.

`Accuracy` (NLVR2, SNLI-VE) and `VQAAccuracy` are `evaluate.Metric` subclasses: instantiate them directly
(`VQAAccuracy().compute(predictions=..., references=...)`), or combine them with `evaluate.combine`; they keep their
state in memory, so no cache files or locks are written. They are not loaded with `evaluate.load`: that needs one
script file per metric (it takes the first module class it finds in the file) and gains nothing over the import.
`RetrievalRecall` takes two score matrices, which do not fit evaluate's one-row-per-example features (and would be
copied into Arrow tables), so it is a plain class with the same `compute` call.

Accuracies are fractions in [0, 1] (as the original NLVR/VE scripts and `evaluate`'s accuracy); recalls are percents
(as the original `itm_eval`).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

from ..retrieval import recall_at_k


class Accuracy(evaluate.Metric):
    """Fraction of predicted class ids equal to the reference ids (NLVR2: 1 = true; SNLI-VE: 0 contradiction,
    1 neutral, 2 entailment)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description="Classification accuracy: the fraction of predictions equal to the reference.",
            citation="",
            inputs_description="predictions: class ids; references: class ids.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("Accuracy needs at least one prediction")
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


def _normalize_answer(answer: str) -> str:
    return " ".join(answer.lower().split())


def vqa_score(prediction: str, answers: Sequence[str], leave_one_out: bool = False) -> float:
    """Accuracy of one VQA prediction against the human answers of its question (repeats kept: one per annotator).

    Several answers: `min(#annotators who gave the prediction / 3, 1)`; with `leave_one_out`, the official VQA
    average of that score over the subsets that leave one annotator out. A single answer (e.g. Visual Genome):
    exact match. Answers are compared lowercased with whitespace collapsed; the official evaluator's further
    normalisation (number words, articles, punctuation) is not applied: ranked predictions come from the answer
    list, whose answers are already in that form."""
    answers = [_normalize_answer(a) for a in answers]
    if not answers:
        raise ValueError("a VQA reference needs at least one answer")
    prediction = _normalize_answer(prediction)
    if len(answers) == 1:
        return float(prediction == answers[0])
    matches = sum(a == prediction for a in answers)
    if not leave_one_out:
        return min(matches / 3, 1.0)
    # Leaving out annotator j removes one match exactly when j gave the predicted answer.
    left_out = [matches - (a == prediction) for a in answers]
    return float(np.mean([min(m / 3, 1.0) for m in left_out]))


class VQAAccuracy(evaluate.Metric):
    """The VQA accuracy, averaged over questions: see `vqa_score` (`compute(..., leave_one_out=True)` for the
    official leave-one-annotator-out average)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description="VQA accuracy: min(#humans that gave the answer / 3, 1), exact match for one answer.",
            citation="Antol et al., VQA: Visual Question Answering, ICCV 2015.",
            inputs_description="predictions: answer strings; references: the human answers of each question.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, leave_one_out: bool = False):
        if len(predictions) == 0:
            raise ValueError("VQAAccuracy needs at least one prediction")
        scores = [vqa_score(p, r, leave_one_out) for p, r in zip(predictions, references)]
        return {"vqa_accuracy": float(np.mean(scores))}


class RetrievalRecall:
    """Recall@1/5/10 in both directions, as the original `itm_eval` (`transformers_albef.retrieval.recall_at_k`).

    `compute(predictions=(score_i2t, score_t2i), references=(txt2img, img2txt))`: `score_i2t` is (images, texts),
    `score_t2i` (texts, images); `txt2img[t]` is the image of text t and `img2txt[i]` the texts of image i. Returns
    `txt_r1/5/10` (image -> text), `img_r1/5/10` (text -> image), their means and `r_mean`, in percent."""

    name = "retrieval_recall"

    def compute(self, *, predictions, references) -> dict[str, float]:
        score_i2t, score_t2i = (np.asarray(_to_numpy(s), dtype=np.float64) for s in predictions)
        txt2img, img2txt = references
        if score_i2t.shape != score_t2i.shape[::-1]:
            raise ValueError(f"score_i2t {score_i2t.shape} and score_t2i {score_t2i.shape} must be transposes")
        if len(txt2img) != score_t2i.shape[0] or len(img2txt) != score_i2t.shape[0]:
            raise ValueError(
                f"{len(txt2img)} txt2img / {len(img2txt)} img2txt entries for {score_t2i.shape[0]} texts and "
                f"{score_i2t.shape[0]} images"
            )
        return {key: float(value) for key, value in recall_at_k(score_i2t, score_t2i, txt2img, img2txt).items()}


def _to_numpy(x):
    # torch tensors (possibly on a GPU) and array-likes alike
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else x


def accuracy_from_logits(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for Trainer with a classification head: argmax of the logits against the labels."""
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return Accuracy().compute(predictions=np.argmax(logits, axis=-1), references=eval_prediction.label_ids)


__all__ = ["Accuracy", "VQAAccuracy", "RetrievalRecall", "vqa_score", "accuracy_from_logits"]
