"""Collators: a list of examples (rows of the loaders in `data` / `task_data`) -> a dict of tensors for the
matching model's forward. They open the images, apply the image transform, clean the texts as the original
datasets do (`pre_caption` / `pre_question`) and tokenise them with ALBEF's processor.

A bad example (missing or undecodable image, text of the wrong type or empty after cleaning, a bad label) raises
`BadRecordError` naming its `record_index` and image path, or, with `skip_bad_records=True`, is left out of the
batch, counted in `collator.skipped_records` and logged. With `DataLoader(num_workers > 0)` each worker holds its
own copy of the collator, so its counter stays in the worker; the warnings still reach the log.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models.albef.modeling_albef import mask_tokens
from ..models.albef.processing_albef import AlbefProcessor, pre_caption, pre_question
from .data import BadRecordError, SkippedRecords, check_text, open_image

NLVR_LABELS = {"False": 0, "True": 1}
VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}


class _AlbefCollator:
    """Shared mechanics: per-example preparation with bad-record handling, then batch assembly."""

    def __init__(self, processor: AlbefProcessor, image_transform: Callable, skip_bad_records: bool = False):
        self.processor = processor
        self.image_transform = image_transform
        self.skip_bad_records = skip_bad_records
        self.skipped_records = SkippedRecords(type(self).__name__)

    @property
    def num_skipped(self) -> int:
        return self.skipped_records.count

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        prepared = []
        for position, example in enumerate(examples):
            try:
                if not isinstance(example, dict):
                    raise BadRecordError(f"expected a dict example, got {type(example).__name__}", f"#{position}")
                prepared.append(self.prepare(example, example.get("record_index", f"#{position} of the batch")))
            except BadRecordError as err:
                if not self.skip_bad_records:
                    raise
                self.skipped_records.add(err)
        if not prepared:
            raise BadRecordError(
                f"all {len(examples)} examples of the batch are bad: {'; '.join(self.skipped_records.messages[-3:])}"
            )
        return self.collate(prepared)

    def prepare(self, example: dict, index: Any) -> dict:
        raise NotImplementedError

    def collate(self, prepared: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_image(self, example: dict, index: Any, key: str = "image") -> torch.Tensor:
        if key not in example:
            raise BadRecordError(f"no {key!r} field", index)
        return self.image_transform(open_image(example[key], index))

    def tokenize(self, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
        # Texts are cleaned already; max_length=None is the original's untruncated call.
        encoded = self.processor(
            text=texts,
            padding="longest",
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    @staticmethod
    def _path(example: dict, key: str = "image") -> Any:
        value = example.get(key)
        return value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None

    def _text(self, example: dict, key: str, index: Any, cleaner: Callable, max_words: int) -> str:
        if key not in example:
            raise BadRecordError(f"no {key!r} field", index, self._path(example))
        text = check_text(example[key], key, index, self._path(example), None, lambda t: cleaner(t, max_words))
        return cleaner(text, max_words)

    def _label(self, example: dict, index: Any, names: dict[str, int]) -> int:
        label = example["label"]
        if isinstance(label, str) and label in names:
            return names[label]
        if isinstance(label, bool) or not isinstance(label, int) or label not in names.values():
            raise BadRecordError(
                f"label must be one of {sorted(names.values())} or {list(names)}, got {label!r}",
                index,
                self._path(example),
            )
        return label


class PretrainingCollator(_AlbefCollator):
    """
    Image-caption pairs -> `pixel_values, input_ids, attention_mask, masked_input_ids, mlm_labels` for
    `AlbefForPreTraining(..., return_loss=True)`, as Pretrain.py: `pre_caption` (30 words), `[CLS] caption` padded
    to the longest and truncated to `max_length=25`, and the original MLM masking (`mask_tokens`: 15%, 80/10/10,
    never [PAD]/[CLS]) drawn from torch's global generator. `mask=False` leaves the masking to the model.

    Examples: dicts with `image` (PIL image, path or `datasets` image dict) and `caption` (str).
    """

    def __init__(
        self,
        processor: AlbefProcessor,
        image_transform: Callable,
        max_length: int | None = 25,
        mlm_probability: float = 0.15,
        mask: bool = True,
        max_words: int = 30,
        vocab_size: int | None = None,
        skip_bad_records: bool = False,
    ):
        super().__init__(processor, image_transform, skip_bad_records)
        self.max_length, self.mlm_probability, self.mask, self.max_words = max_length, mlm_probability, mask, max_words
        # Random replacement tokens are drawn from the whole vocabulary, as the original (config.vocab_size).
        self.vocab_size = vocab_size if vocab_size is not None else len(processor.tokenizer)

    def prepare(self, example: dict, index: Any) -> dict:
        text = self._text(example, "caption", index, pre_caption, self.max_words)
        return {"pixel_values": self.load_image(example, index), "text": text}

    def collate(self, prepared: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([item["pixel_values"] for item in prepared])}
        batch.update(self.tokenize([item["text"] for item in prepared], self.max_length))
        if self.mask:
            tokenizer = self.processor.tokenizer
            batch["masked_input_ids"], batch["mlm_labels"] = mask_tokens(
                batch["input_ids"],
                self.vocab_size,
                self.mlm_probability,
                pad_token_id=tokenizer.pad_token_id,
                cls_token_id=tokenizer.cls_token_id,
                mask_token_id=tokenizer.mask_token_id,
            )
        return batch


class RetrievalCollator(_AlbefCollator):
    """
    Image-caption pairs -> `pixel_values, input_ids, attention_mask, image_ids` for
    `AlbefForRetrieval(..., return_loss=True)` (captions of the same `image_id` are ITC positives).
    `pre_caption` (30 words), padded to the longest, truncated to `max_length=30`; `max_length=None` does not
    truncate, which is the original training call (Retrieval.py tokenises with max_length 30 but no truncation).

    Examples: dicts with `image`, `caption` and `image_id` (int).
    """

    def __init__(
        self,
        processor: AlbefProcessor,
        image_transform: Callable,
        max_length: int | None = 30,
        max_words: int = 30,
        skip_bad_records: bool = False,
    ):
        super().__init__(processor, image_transform, skip_bad_records)
        self.max_length, self.max_words = max_length, max_words

    def prepare(self, example: dict, index: Any) -> dict:
        image_id = example.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise BadRecordError(f"image_id must be an int, got {image_id!r}", index, self._path(example))
        text = self._text(example, "caption", index, pre_caption, self.max_words)
        return {"pixel_values": self.load_image(example, index), "text": text, "image_id": image_id}

    def collate(self, prepared: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([item["pixel_values"] for item in prepared])}
        batch.update(self.tokenize([item["text"] for item in prepared], self.max_length))
        batch["image_ids"] = torch.tensor([item["image_id"] for item in prepared], dtype=torch.long)
        return batch


class VQACollator(_AlbefCollator):
    """
    VQA examples -> `pixel_values, input_ids, attention_mask, answer_input_ids, answer_attention_mask,
    answer_weights, answers_per_question` for `AlbefForQuestionAnswering(...)`, as VQA.py's training: questions
    through `pre_question` (`max_words=30`) truncated to `max_length=25`; the answers of all questions
    concatenated in order and encoded as `[CLS] answer [SEP]` (`processor.encode_answers`), with their weights.

    Examples: dicts with `image`, `question`, `answers` (list of str) and `weights` (list of float, one per
    answer; all 1.0 when absent). Examples without `answers` (the test split) give only the question inputs and,
    when the examples carry `question_id`, `question_ids`, which must be popped before calling the model. The
    original test call is `VQACollator(..., max_length=None, max_words=50)`.
    """

    def __init__(
        self,
        processor: AlbefProcessor,
        image_transform: Callable,
        max_length: int | None = 25,
        max_words: int = 30,
        skip_bad_records: bool = False,
    ):
        super().__init__(processor, image_transform, skip_bad_records)
        self.max_length, self.max_words = max_length, max_words

    def prepare(self, example: dict, index: Any) -> dict:
        path = self._path(example)
        item = {"text": self._text(example, "question", index, pre_question, self.max_words)}
        answers = example.get("answers")
        if answers is not None:
            if not isinstance(answers, (list, tuple)) or not answers:
                raise BadRecordError(f"answers must be a non-empty list of strings, got {answers!r}", index, path)
            for answer in answers:
                if not isinstance(answer, str) or not answer.strip():
                    raise BadRecordError(f"answers must be non-empty strings, got {answer!r}", index, path)
            weights = example.get("weights")
            weights = [1.0] * len(answers) if weights is None else weights
            if not isinstance(weights, (list, tuple)) or len(weights) != len(answers):
                raise BadRecordError(f"{len(answers)} answers but weights {weights!r}", index, path)
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                raise BadRecordError(f"weights must be numbers, got {weights!r}", index, path)
            item["answers"], item["weights"] = list(answers), [float(w) for w in weights]
        if "question_id" in example:
            question_id = example["question_id"]
            if isinstance(question_id, bool) or not isinstance(question_id, int):
                raise BadRecordError(f"question_id must be an int, got {question_id!r}", index, path)
            item["question_id"] = question_id
        item["pixel_values"] = self.load_image(example, index)
        return item

    def collate(self, prepared: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([item["pixel_values"] for item in prepared])}
        batch.update(self.tokenize([item["text"] for item in prepared], self.max_length))
        with_answers = ["answers" in item for item in prepared]
        if all(with_answers):
            answers = self.processor.encode_answers(
                [answer for item in prepared for answer in item["answers"]], return_tensors="pt"
            )
            batch["answer_input_ids"] = answers["input_ids"]
            batch["answer_attention_mask"] = answers["attention_mask"]
            batch["answer_weights"] = torch.tensor([w for item in prepared for w in item["weights"]])
            batch["answers_per_question"] = torch.tensor([len(item["answers"]) for item in prepared])
        elif any(with_answers):
            raise ValueError("VQACollator got a batch mixing examples with and without answers.")
        elif all("question_id" in item for item in prepared):
            batch["question_ids"] = torch.tensor([item["question_id"] for item in prepared])
        return batch


class NLVRCollator(_AlbefCollator):
    """
    NLVR2 examples -> `pixel_values` (B, 2, 3, H, W), `input_ids, attention_mask, labels` for
    `AlbefForVisualReasoning`: `pre_caption` (30 words), padded to the longest, not truncated (NLVR.py);
    `max_length` truncates. Examples: dicts with `images` (two images), `sentence` and `label` (1 / "True",
    0 / "False"; optional).
    """

    def __init__(
        self,
        processor: AlbefProcessor,
        image_transform: Callable,
        max_length: int | None = None,
        max_words: int = 30,
        skip_bad_records: bool = False,
    ):
        super().__init__(processor, image_transform, skip_bad_records)
        self.max_length, self.max_words = max_length, max_words

    @staticmethod
    def _path(example: dict, key: str = "images") -> Any:
        images = example.get("images")
        if isinstance(images, (list, tuple)):
            return ", ".join(str(image) for image in images if isinstance(image, str)) or None
        return None

    def prepare(self, example: dict, index: Any) -> dict:
        images = example.get("images")
        if not isinstance(images, (list, tuple)) or len(images) != 2:
            raise BadRecordError(f"images must be a pair of images, got {images!r}", index)
        item = {"text": self._text(example, "sentence", index, pre_caption, self.max_words)}
        if "label" in example:
            item["label"] = self._label(example, index, NLVR_LABELS)
        item["pixel_values"] = torch.stack([self.image_transform(open_image(image, index)) for image in images])
        return item

    def collate(self, prepared: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([item["pixel_values"] for item in prepared])}
        batch.update(self.tokenize([item["text"] for item in prepared], self.max_length))
        if all("label" in item for item in prepared):
            batch["labels"] = torch.tensor([item["label"] for item in prepared])
        return batch


class VECollator(_AlbefCollator):
    """
    SNLI-VE examples -> `pixel_values, input_ids, attention_mask, labels` (0 contradiction, 1 neutral,
    2 entailment) for `AlbefForVisualEntailment`: `pre_caption` (30 words), padded to the longest, not truncated
    (VE.py). Examples: dicts with `image`, `sentence` and `label` (int or name; optional).
    """

    def __init__(
        self,
        processor: AlbefProcessor,
        image_transform: Callable,
        max_length: int | None = None,
        max_words: int = 30,
        skip_bad_records: bool = False,
    ):
        super().__init__(processor, image_transform, skip_bad_records)
        self.max_length, self.max_words = max_length, max_words

    def prepare(self, example: dict, index: Any) -> dict:
        item = {"text": self._text(example, "sentence", index, pre_caption, self.max_words)}
        if "label" in example:
            item["label"] = self._label(example, index, VE_LABELS)
        item["pixel_values"] = self.load_image(example, index)
        return item

    def collate(self, prepared: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([item["pixel_values"] for item in prepared])}
        batch.update(self.tokenize([item["text"] for item in prepared], self.max_length))
        if all("label" in item for item in prepared):
            batch["labels"] = torch.tensor([item["label"] for item in prepared])
        return batch


class ImageCollator(_AlbefCollator):
    """
    Images alone -> `pixel_values, image_ids` (from `image_id`, else `record_index`), for encoding the image side
    of the retrieval evaluation (`model.get_image_features` / `retrieval_scores`). No text, so no processor.
    """

    def __init__(self, image_transform: Callable, skip_bad_records: bool = False):
        super().__init__(None, image_transform, skip_bad_records)

    def prepare(self, example: dict, index: Any) -> dict:
        image_id = example.get("image_id", example.get("record_index"))
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise BadRecordError(f"image_id must be an int, got {image_id!r}", index, self._path(example))
        return {"pixel_values": self.load_image(example, index), "image_id": image_id}

    def collate(self, prepared: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in prepared]),
            "image_ids": torch.tensor([item["image_id"] for item in prepared], dtype=torch.long),
        }


__all__ = [
    "NLVR_LABELS",
    "VE_LABELS",
    "ImageCollator",
    "NLVRCollator",
    "PretrainingCollator",
    "RetrievalCollator",
    "VECollator",
    "VQACollator",
]
