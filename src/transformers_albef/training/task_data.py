"""Loaders for the fine-tuning annotation files of the original ALBEF release (`data.tar.gz`): retrieval (COCO /
Flickr30k Karpathy splits), VQA (+ Visual Genome QA), NLVR2 and SNLI-VE. Each gives a `datasets.Dataset` with
the columns the matching collator reads; records are checked as in `data.load_image_text_pairs` (a bad record
raises `BadRecordError` naming it, or is skipped, counted in `dataset.skipped_records` and logged)."""

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value
from transformers.utils import logging

from ..models.albef.processing_albef import pre_caption, pre_question
from .data import (
    BadRecordError,
    SkippedRecords,
    check_image_file,
    check_text,
    read_records,
    record_captions,
    resolve_image_path,
)

logger = logging.get_logger(__name__)

AnnotationFiles = str | Path | Sequence[str | Path]

RETRIEVAL_FEATURES = Features(
    {"image": Value("string"), "caption": Value("string"), "image_id": Value("int64"), "record_index": Value("int64")}
)
RETRIEVAL_EVAL_FEATURES = Features(
    {
        "image": Value("string"),
        "caption": List(Value("string")),
        "image_id": Value("int64"),
        "record_index": Value("int64"),
    }
)
VQA_TRAIN_FEATURES = Features(
    {
        "image": Value("string"),
        "question": Value("string"),
        "answers": List(Value("string")),
        "weights": List(Value("float32")),
        "question_id": Value("int64"),
        "dataset": Value("string"),
        "record_index": Value("int64"),
    }
)
VQA_TEST_FEATURES = Features(
    {
        "image": Value("string"),
        "question": Value("string"),
        "question_id": Value("int64"),
        "dataset": Value("string"),
        "record_index": Value("int64"),
    }
)
NLVR_FEATURES = Features(
    {
        "images": List(Value("string"), length=2),
        "sentence": Value("string"),
        "label": Value("int64"),
        "record_index": Value("int64"),
    }
)
VE_FEATURES = Features(
    {"image": Value("string"), "sentence": Value("string"), "label": Value("int64"), "record_index": Value("int64")}
)
VE_LABEL_IDS = {"contradiction": 0, "neutral": 1, "entailment": 2}
# The original weighs every Visual Genome answer 0.5 (vqa_dataset.py).
VG_ANSWER_WEIGHT = 0.5
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _as_list(files: AnnotationFiles) -> list:
    return list(files) if isinstance(files, (list, tuple)) else [files]


def _field(record: dict, name: str, index: int, source: Any, path: Any = None) -> Any:
    if name not in record:
        raise BadRecordError(f"no {name!r} field", index, path, source)
    return record[name]


def _resolve(image: Any, root, index: int, source: Any, root_option: str = "--image_root") -> str:
    """The image path of a record: joined to `root`, or used as is when it is absolute. A relative path without a
    root is an error naming the option that gives one (`root_option`)."""
    path = resolve_image_path(image, root, index, source)
    if root is None and not os.path.isabs(path):
        raise BadRecordError(
            f"the image path {image!r} is relative, but no image folder was given to join it to ({root_option}); "
            "pass it, or write absolute paths",
            index,
            None,
            source,
        )
    return path


def _image(
    record: dict,
    key: str,
    root,
    index: int,
    source: Any,
    check_files: bool,
    suffix: str = "",
    root_option: str = "--image_root",
) -> str:
    path = _resolve(_field(record, key, index, source), root, index, source, root_option) + suffix
    if check_files:
        check_image_file(path, index, source)
    return path


def _collect_rows(
    files: AnnotationFiles,
    build: Callable[[int, dict, Path], list[dict]],
    names: Sequence[str],
    what: str,
    skip_bad_records: bool,
    optional: set[str] = frozenset(),
) -> tuple[dict[str, list], SkippedRecords]:
    """Runs every record of `files` through `build` (record -> rows), handling bad records; rows may lack the
    `optional` columns."""
    skipped = SkippedRecords(what, log_each=False)
    rows: dict[str, list] = {name: [] for name in names}
    for source in _as_list(files):
        source = Path(source)
        for index, record in read_records(source):
            try:
                if isinstance(record, BadRecordError):
                    raise record
                if not isinstance(record, dict):
                    raise BadRecordError(f"expected a json object, got {type(record).__name__}", index, None, source)
                built = build(index, record, source)
            except BadRecordError as err:
                if not skip_bad_records:
                    raise
                skipped.add(err)
                continue
            for row in built:
                for name in names:
                    if name in row or name not in optional:
                        rows[name].append(row[name])
    if skipped.count:
        logger.warning(skipped.summary())
    return rows, skipped


def _dataset(rows: dict[str, list], features: Features, skipped: SkippedRecords) -> Dataset:
    dataset = Dataset.from_dict({name: rows[name] for name in features}, features=features)
    dataset.skipped_records = skipped
    return dataset


def load_retrieval_train(
    ann_files: AnnotationFiles, image_root: str | Path, skip_bad_records: bool = False, check_files: bool = True
) -> Dataset:
    """
    Retrieval training pairs (`coco_train.json`, `flickr30k_train.json`: `[{"image", "caption", "image_id"}]`)
    -> columns `image, caption, image_id, record_index` for `RetrievalCollator`. The annotation `image_id`
    (a string or int) is renumbered 0, 1, ... by first appearance, as `re_train_dataset`; a caption list expands
    into one row per caption.
    """
    image_ids: dict[Any, int] = {}

    def build(index: int, record: dict, source: Path) -> list[dict]:
        path = _image(record, "image", image_root, index, source, check_files)
        key = _field(record, "image_id", index, source, path)
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise BadRecordError(f"image_id must be a string or int, got {key!r}", index, path, source)
        captions = record_captions(record, index, path, source)
        image_id = image_ids.setdefault(key, len(image_ids))
        return [{"image": path, "caption": c, "image_id": image_id, "record_index": index} for c in captions]

    rows, skipped = _collect_rows(ann_files, build, list(RETRIEVAL_FEATURES), "load_retrieval_train", skip_bad_records)
    return _dataset(rows, RETRIEVAL_FEATURES, skipped)


def load_retrieval_eval(
    ann_files: AnnotationFiles,
    image_root: str | Path,
    max_words: int = 30,
    skip_bad_records: bool = False,
    check_files: bool = True,
) -> Dataset:
    """
    A retrieval val/test split (`coco_test.json`: `[{"image", "caption": [five captions]}]`) -> one row per image
    with columns `image`, `caption` (its raw captions), `image_id` (the row position) and `record_index`. As
    `re_eval_dataset`, the returned dataset also carries `texts` (every caption in order, cleaned with
    `pre_caption(max_words)`), `txt2img` (text index -> image index) and `img2txt` (image index -> text indices);
    `retrieval_eval_index` recomputes them from any such dataset. Images go through `ImageCollator`.
    """

    def build(index: int, record: dict, source: Path) -> list[dict]:
        path = _image(record, "image", image_root, index, source, check_files)
        captions = _field(record, "caption", index, source, path)
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not captions:
            raise BadRecordError(f"caption must be a non-empty list of strings, got {captions!r}", index, path, source)
        captions = [check_text(c, f"caption[{i}]", index, path, source) for i, c in enumerate(captions)]
        return [{"image": path, "caption": captions, "record_index": index}]

    names = ["image", "caption", "record_index"]
    rows, skipped = _collect_rows(ann_files, build, names, "load_retrieval_eval", skip_bad_records)
    rows["image_id"] = list(range(len(rows["image"])))
    dataset = _dataset(rows, RETRIEVAL_EVAL_FEATURES, skipped)
    dataset.texts, dataset.txt2img, dataset.img2txt = retrieval_eval_index(dataset, max_words)
    return dataset


def retrieval_eval_index(
    dataset: Dataset, max_words: int = 30
) -> tuple[list[str], dict[int, int], dict[int, list[int]]]:
    """`(texts, txt2img, img2txt)` of a retrieval evaluation set with one row per image and its caption list."""
    texts: list[str] = []
    txt2img: dict[int, int] = {}
    img2txt: dict[int, list[int]] = {}
    for image_index, captions in enumerate(dataset["caption"]):
        img2txt[image_index] = []
        for caption in captions:
            img2txt[image_index].append(len(texts))
            txt2img[len(texts)] = image_index
            texts.append(pre_caption(caption, max_words))
    return texts, txt2img, img2txt


def vqa_answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """
    VQA v2 training targets as the original: each distinct annotator answer, in order of first appearance, with
    weight count / number of answers (ten annotators: 0.1 per vote).
    """
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return list(counts), [count / len(answers) for count in counts.values()]


def load_vqa(
    ann_files: AnnotationFiles,
    vqa_root: str | Path,
    vg_root: str | Path | None = None,
    split: str = "train",
    skip_bad_records: bool = False,
    check_files: bool = True,
) -> Dataset:
    """
    VQA annotations (`vqa_train.json`, `vqa_val.json`, `vg_qa.json`, `vqa_test.json`: `[{"question_id",
    "question", "answer", "image", "dataset": "vqa" | "vg"}]`) -> a `Dataset` for `VQACollator`.

    - `split="train"`: columns `image, question, answers, weights, question_id, dataset, record_index`. A "vqa"
      record's `answer` list becomes its distinct answers (in order of first appearance) with weight
      count / len(answer), as vqa_dataset.py; a "vg" record's answer (a string) gets weight 0.5.
    - any other split (evaluation): `image, question, question_id, dataset, record_index`, plus `answer` (the
      human answers as written, a list, for VQA accuracy) when every record has one. The collator reads no
      answers there, so it gives the test-time batch.

    `question_id` is -1 where a record has none. Images are `vqa_root / image` for "vqa" records (the default)
    and `vg_root / image` for "vg" ones. Questions are kept raw (the collator applies `pre_question`); answers
    are kept as written (`[SEP]` is added at encoding).
    """
    train = split == "train"
    roots = {"vqa": vqa_root, "vg": vg_root}

    def answers_of(record: dict, index: int, path: str, source: Path) -> list[str]:
        answer = _field(record, "answer", index, source, path)
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise BadRecordError(f"answer must be a string or a list of strings, got {answer!r}", index, path, source)
        return answers

    def build(index: int, record: dict, source: Path) -> list[dict]:
        dataset = record.get("dataset", "vqa")
        if dataset not in roots:
            raise BadRecordError(f"dataset must be 'vqa' or 'vg', got {dataset!r}", index, None, source)
        option = "--vg_root (vg_root=)" if dataset == "vg" else "--image_root (vqa_root=)"
        path = _image(record, "image", roots[dataset], index, source, check_files, root_option=option)
        question = _field(record, "question", index, source, path)
        question = check_text(question, "question", index, path, source, cleaner=pre_question)
        question_id = record.get("question_id", -1)
        if isinstance(question_id, bool) or not isinstance(question_id, int):
            raise BadRecordError(f"question_id must be an int, got {question_id!r}", index, path, source)
        row = {"image": path, "question": question, "question_id": question_id, "dataset": dataset}
        row["record_index"] = index
        if train:
            answers = answers_of(record, index, path, source)
            if dataset == "vqa":
                row["answers"], row["weights"] = vqa_answer_weights(answers)
            else:
                row["answers"] = list(dict.fromkeys(answers))
                row["weights"] = [VG_ANSWER_WEIGHT] * len(row["answers"])
        elif "answer" in record:
            row["answer"] = answers_of(record, index, path, source)
        return [row]

    names = list(VQA_TRAIN_FEATURES if train else VQA_TEST_FEATURES) + ([] if train else ["answer"])
    rows, skipped = _collect_rows(ann_files, build, names, f"load_vqa({split})", skip_bad_records, optional={"answer"})
    features = VQA_TRAIN_FEATURES if train else VQA_TEST_FEATURES
    if not train and rows["answer"]:
        if len(rows["answer"]) != len(rows["image"]):
            raise ValueError(
                f"load_vqa({split}): {len(rows['answer'])} of {len(rows['image'])} records have an 'answer'; an "
                "evaluation set needs answers on every record (validation) or on none (test)."
            )
        features = Features({**features, "answer": List(Value("string"))})
    else:
        rows.pop("answer", None)
    return _dataset(rows, features, skipped)


def load_answer_list(path: str | Path) -> list[str]:
    """The candidate answers of the VQA evaluation (`answer_list.json`: a json list of 3,128 strings). Errors name
    the file and say what is wrong."""
    try:
        with open(path, encoding="utf-8") as handle:
            answers = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"answer list not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid json: {err}") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{str(path)!r} must hold a non-empty json list of answer strings.")
    return answers


def _nlvr_label(label: Any, index: int, path: Any, source: Any) -> int:
    if label in ("True", True):
        return 1
    if label in ("False", False):
        return 0
    raise BadRecordError(f"label must be 'True' or 'False', got {label!r}", index, path, source)


def load_nlvr(
    ann_files: AnnotationFiles, image_root: str | Path, skip_bad_records: bool = False, check_files: bool = True
) -> Dataset:
    """
    NLVR2 (`nlvr_train.json`, ...: `[{"images": [left, right], "sentence", "label": "True" | "False"}]`) ->
    columns `images` (two paths), `sentence`, `label` (1 True, 0 False), `record_index` for `NLVRCollator`.
    """

    def build(index: int, record: dict, source: Path) -> list[dict]:
        images = _field(record, "images", index, source)
        if not isinstance(images, list) or len(images) != 2:
            raise BadRecordError(f"images must be a list of two paths, got {images!r}", index, None, source)
        paths = [_resolve(image, image_root, index, source) for image in images]
        if check_files:
            for path in paths:
                check_image_file(path, index, source)
        sentence = check_text(_field(record, "sentence", index, source, paths[0]), "sentence", index, paths, source)
        label = _nlvr_label(_field(record, "label", index, source, paths[0]), index, paths, source)
        return [{"images": paths, "sentence": sentence, "label": label, "record_index": index}]

    rows, skipped = _collect_rows(ann_files, build, list(NLVR_FEATURES), "load_nlvr", skip_bad_records)
    return _dataset(rows, NLVR_FEATURES, skipped)


def load_ve(
    ann_files: AnnotationFiles, image_root: str | Path, skip_bad_records: bool = False, check_files: bool = True
) -> Dataset:
    """
    SNLI-VE (`ve_train.json`, ...: `[{"image": flickr30k id, "sentence", "label": "entailment" | "neutral" |
    "contradiction"}]`) -> columns `image, sentence, label` (0 contradiction, 1 neutral, 2 entailment),
    `record_index` for `VECollator`. As the original, the image file is `image_root / (image + ".jpg")`; an
    `image` that already ends in an image suffix is used as is.
    """

    def build(index: int, record: dict, source: Path) -> list[dict]:
        image = _field(record, "image", index, source)
        suffix = "" if isinstance(image, str) and os.path.splitext(image)[1].lower() in _IMAGE_SUFFIXES else ".jpg"
        path = _image(record, "image", image_root, index, source, check_files, suffix)
        sentence = check_text(_field(record, "sentence", index, source, path), "sentence", index, path, source)
        label = _field(record, "label", index, source, path)
        if not isinstance(label, str) or label not in VE_LABEL_IDS:
            raise BadRecordError(f"label must be one of {list(VE_LABEL_IDS)}, got {label!r}", index, path, source)
        return [{"image": path, "sentence": sentence, "label": VE_LABEL_IDS[label], "record_index": index}]

    rows, skipped = _collect_rows(ann_files, build, list(VE_FEATURES), "load_ve", skip_bad_records)
    return _dataset(rows, VE_FEATURES, skipped)


def load_task_dataset(
    task: str,
    files: AnnotationFiles,
    image_root: str | Path | None = None,
    train: bool = True,
    **kwargs,
) -> Dataset:
    """
    The fine-tuning dataset of `task` ("retrieval", "vqa", "nlvr" or "ve") from original annotation files:
    `load_retrieval_train` / `load_retrieval_eval`, `load_vqa` (split "train" or "test"; `image_root` is the
    VQA root, `vg_root=` goes in `kwargs`), `load_nlvr`, `load_ve`. `kwargs` go to the loader
    (`skip_bad_records`, `check_files`, ...).
    """
    if task == "retrieval":
        loader = load_retrieval_train if train else load_retrieval_eval
        return loader(files, image_root, **kwargs)
    if task == "vqa":
        return load_vqa(files, image_root, split="train" if train else "test", **kwargs)
    if task == "nlvr":
        return load_nlvr(files, image_root, **kwargs)
    if task == "ve":
        return load_ve(files, image_root, **kwargs)
    raise ValueError(f"Unknown task {task!r}; expected 'retrieval', 'vqa', 'nlvr' or 've'.")


__all__ = [
    "load_answer_list",
    "load_task_dataset",
    "load_nlvr",
    "load_retrieval_eval",
    "load_retrieval_train",
    "load_ve",
    "load_vqa",
    "retrieval_eval_index",
    "vqa_answer_weights",
]
