"""Tiny real fine-tuning data for the tests: PNG images written with PIL, rows in the columns the task collators
read, tiny task models with the real bert-base-uncased vocabulary size, and CPU TrainingArguments."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from transformers_albef import (
    AlbefForQuestionAnswering,
    AlbefForRetrieval,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    AlbefProcessor,
)
from transformers_albef.training.finetune import finetuning_arguments

from ..tiny_models import TWO_IMAGES, tiny_config

IMAGE_SIZE = 32
VOCAB = {"vocab_size": 30522}  # the bundled processor's ids
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
ANSWER_LIST = ["red", "blue", "green", "yellow", "yes", "no", "two", "a cat"]


def write_images(folder: Path, count: int = 8, size: int = 40) -> list[str]:
    """`count` distinct PNGs: a flat colour with a random-noise square, so crops and flips differ."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        pixels[4 : 4 + size // 2, 4 : 4 + size // 2] = rng.integers(0, 256, (size // 2, size // 2, 3))
        path = folder / f"image_{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def processor() -> AlbefProcessor:
    return AlbefProcessor.from_bert_vocab(image_size=IMAGE_SIZE)


def tiny_model(task: str, **config):
    if task == "retrieval":
        return AlbefForRetrieval(tiny_config(text=VOCAB, **config))
    if task == "vqa":
        return AlbefForQuestionAnswering(tiny_config(text=VOCAB, **config))
    if task == "nlvr":
        return AlbefForVisualReasoning(tiny_config(text={**VOCAB, **TWO_IMAGES}, num_labels=2, **config))
    if task == "ve":
        return AlbefForVisualEntailment(tiny_config(text=VOCAB, num_labels=3, **config))
    raise ValueError(task)


def train_rows(task: str, images: list[str], count: int = 8) -> datasets.Dataset:
    """Training rows in the collator columns (`count` rows; image i of the list has colour COLORS[i])."""
    n = len(images)
    if task == "retrieval":  # two captions per image, so image ids repeat inside a batch
        rows = [
            (images[i // 2 % n], f"A {COLORS[i // 2 % n]} picture, number {i % 2}!", i // 2 % n) for i in range(count)
        ]
        return datasets.Dataset.from_dict(
            {"image": [r[0] for r in rows], "caption": [r[1] for r in rows], "image_id": [r[2] for r in rows]}
        )
    if task == "vqa":  # one or two answers per question, VQA-style weights
        answers = [[COLORS[i % n]] if i % 2 else [COLORS[i % n], "yes"] for i in range(count)]
        weights = [[1.0] if len(a) == 1 else [0.7, 0.3] for a in answers]
        return datasets.Dataset.from_dict(
            {
                "image": [images[i % n] for i in range(count)],
                "question": [f"What colour is picture {i}?" for i in range(count)],
                "answers": answers,
                "weights": weights,
            }
        )
    if task == "nlvr":
        return datasets.Dataset.from_dict(
            {
                "images": [[images[i % n], images[(i + 1) % n]] for i in range(count)],
                "sentence": [f"The left image is {COLORS[i % n]}." for i in range(count)],
                "label": [i % 2 for i in range(count)],
            }
        )
    if task == "ve":
        return datasets.Dataset.from_dict(
            {
                "image": [images[i % n] for i in range(count)],
                "sentence": [f"Something {COLORS[i % n]} is shown." for i in range(count)],
                "label": [i % 3 for i in range(count)],
            }
        )
    raise ValueError(task)


def eval_rows(task: str, images: list[str]) -> datasets.Dataset:
    """Evaluation rows: retrieval in the original val/test layout (one row per image, all its captions), VQA with
    the human answers (`answer`) and question ids, NLVR2/VE as for training."""
    if task == "retrieval":
        return datasets.Dataset.from_dict(
            {"image": images[:4], "caption": [[f"a {c} picture", f"something {c}"] for c in COLORS[:4]]}
        )
    if task == "vqa":
        return datasets.Dataset.from_dict(
            {
                "image": images[:3],
                "question": ["What colour is it?", "Is it red?", "How many?"],
                "question_id": [11, 12, 13],
                "answer": [["red", "red", "blue"], ["yes"], ["two", "two", "two", "no"]],
            }
        )
    return train_rows(task, images, count=6)


def training_args(task: str, output_dir, **overrides):
    """The task's recipe on CPU, a few steps, logged every step, no checkpoints."""
    options = dict(
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return finetuning_arguments(task, str(output_dir), **options)
