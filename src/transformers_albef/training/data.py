"""Image-text pair datasets (pre-training, and any captioned image folder) as `datasets` objects, with checked
records: a bad record raises an error that names it, or is skipped and counted when asked."""

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
from datasets import Dataset, Features, IterableDataset, Value
from transformers.utils import logging

from ..models.albef.processing_albef import pre_caption

logger = logging.get_logger(__name__)

PAIR_FEATURES = Features(
    {
        "image": Value("string"),
        "caption": Value("string"),
        "image_id": Value("int64"),
        "record_index": Value("int64"),
    }
)
# Streaming with several source files numbers images per file; file k's ids start at k * this.
STREAMING_IMAGE_ID_STRIDE = 2**32


class BadRecordError(ValueError):
    """A record that cannot be used; the message names it (source, index, image path) and says why."""

    def __init__(self, reason: str, index: Any = None, path: Any = None, source: Any = None):
        self.reason, self.index, self.path, self.source = reason, index, path, source
        if index is None and path is None and source is None:
            # A bare message (also how DataLoader workers and pickling rebuild the error).
            super().__init__(reason)
            return
        where = [str(source)] if source is not None else []
        where.append(f"record {index}" if index is not None else "record")
        if path is not None:
            where.append(f"(image {str(path)!r})")
        super().__init__(f"{' '.join(where)}: {reason}")

    def __reduce__(self):
        return type(self), (self.reason, self.index, self.path, self.source)


class SkippedRecords:
    """
    Counts the bad records a loader or collator skipped (`count`) and keeps the first `keep` messages. With
    `log_each`, it logs a warning with the running count for each of the first `log_first` records, then for
    every `log_every`-th; otherwise the owner logs `summary()` once.
    """

    def __init__(self, what: str, log_each: bool = True, keep: int = 100, log_first: int = 10, log_every: int = 1000):
        self.what, self.log_each, self.keep = what, log_each, keep
        self.log_first, self.log_every = log_first, log_every
        self.count = 0
        self.messages: list[str] = []

    def add(self, error: BadRecordError) -> None:
        self.count += 1
        if len(self.messages) < self.keep:
            self.messages.append(str(error))
        if self.log_each and (self.count <= self.log_first or self.count % self.log_every == 0):
            logger.warning(f"{self.what}: skipped {error} ({self.count} bad record(s) skipped so far)")

    def summary(self) -> str:
        shown = "; ".join(self.messages[:5]) + ("; ..." if self.count > 5 else "")
        return f"{self.what}: skipped {self.count} bad record(s): {shown}"

    def __int__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"SkippedRecords({self.what!r}, count={self.count})"


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """
    Yields `(index, record)` from an ALBEF annotation file: a json list (`.json`) or json lines (`.jsonl`,
    `metadata.jsonl`). A json-lines line that does not parse is yielded as a `BadRecordError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {str(path)!r} does not exist.")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            index = 0
            for line in handle:
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as err:
                    yield index, BadRecordError(f"not valid json ({err.msg})", index=index, source=path)
                index += 1
        return
    with path.open(encoding="utf-8") as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} is not valid json: {err}") from None
    if not isinstance(records, list):
        raise ValueError(
            f"{str(path)!r} must hold a json list of records (ALBEF's format), got {type(records).__name__}."
        )
    yield from enumerate(records)


def resolve_image_path(image: Any, root: str | Path | None, index: int, source: Any) -> str:
    """The image path of a record (joined to `root` when given and relative); checks it is a non-empty string."""
    if not isinstance(image, str) or not image:
        raise BadRecordError(
            f"the image must be a non-empty path string, got {type(image).__name__} {image!r}",
            index=index,
            source=source,
        )
    return os.path.join(root, image) if root is not None else image


def check_image_file(path: str, index: int, source: Any) -> None:
    if not os.path.isfile(path):
        raise BadRecordError("image file not found", index=index, path=path, source=source)


def check_text(text: Any, field: str, index: int, path: Any, source: Any, cleaner: Callable = pre_caption) -> str:
    """Checks that a caption/sentence/question is a string that is not empty after ALBEF's cleaning."""
    if not isinstance(text, str):
        raise BadRecordError(f"{field} must be a string, got {type(text).__name__} {text!r}", index, path, source)
    if not cleaner(text).strip():
        raise BadRecordError(f"{field} {text!r} is empty after cleaning", index, path, source)
    return text


def record_captions(record: dict, index: int, path: str, source: Any) -> list[str]:
    """The checked caption(s) of a record: its `caption` (or imagefolder `text`) string or list of strings."""
    key = "caption" if "caption" in record else "text" if "text" in record else None
    if key is None:
        raise BadRecordError("no 'caption' (or 'text') field", index, path, source)
    value = record[key]
    if isinstance(value, list):
        if not value:
            raise BadRecordError(f"{key} is an empty list", index, path, source)
        return [check_text(text, f"{key}[{i}]", index, path, source) for i, text in enumerate(value)]
    if not isinstance(value, str):
        raise BadRecordError(
            f"{key} must be a string or a list of strings, got {type(value).__name__} {value!r}", index, path, source
        )
    return [check_text(value, key, index, path, source)]


def _pair_source(source: str | Path, image_root: str | Path | None) -> tuple[Path, str | Path | None, str]:
    """(annotation file, image root, image key) of an imagefolder directory or an ALBEF json / jsonl file."""
    source = Path(source)
    if source.is_dir():
        metadata = source / "metadata.jsonl"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"{str(source)!r} is a directory without metadata.jsonl; an imagefolder dataset needs one with "
                "'file_name' and 'text' (or 'caption') per image."
            )
        return metadata, image_root if image_root is not None else source, "file_name"
    if not source.is_file():
        raise FileNotFoundError(f"{str(source)!r} is neither an imagefolder directory nor an annotation file.")
    return source, image_root, "image"


def iter_image_text_pairs(
    annotation: Path,
    image_root: str | Path | None,
    image_key: str,
    skipped: SkippedRecords | None,
    check_files: bool = True,
    first_image_id: int = 0,
    image_ids: dict[str, int] | None = None,
) -> Iterator[dict]:
    """
    Yields the checked rows of one annotation file: one row per caption, images numbered by first appearance
    (continuing `image_ids` when given). Bad records raise `BadRecordError`, or are counted in `skipped`.
    """
    image_ids = {} if image_ids is None else image_ids
    for index, record in read_records(annotation):
        try:
            if isinstance(record, BadRecordError):
                raise record
            if not isinstance(record, dict):
                raise BadRecordError(f"expected a json object, got {type(record).__name__}", index, source=annotation)
            if image_key not in record:
                raise BadRecordError(f"no {image_key!r} field", index, source=annotation)
            path = resolve_image_path(record[image_key], image_root, index, annotation)
            captions = record_captions(record, index, path, annotation)
            if check_files:
                check_image_file(path, index, annotation)
        except BadRecordError as err:
            if skipped is None:
                raise
            skipped.add(err)
            continue
        image_id = image_ids.setdefault(path, first_image_id + len(image_ids))
        for caption in captions:
            yield {"image": path, "caption": caption, "image_id": image_id, "record_index": index}


def _as_list(source) -> list:
    return list(source) if isinstance(source, (list, tuple)) else [source]


def load_image_text_pairs(
    source: str | Path | Sequence[str | Path],
    image_root: str | Path | None = None,
    streaming: bool = False,
    skip_bad_records: bool = False,
    check_files: bool = True,
) -> Dataset | IterableDataset:
    """
    Loads image-text pairs as a `datasets.Dataset` (or an `IterableDataset` with `streaming=True`) with columns
    `image` (path string; the collators decode it), `caption` (raw string; the collators clean it),
    `image_id` (int, index of the distinct image by first appearance) and `record_index` (the record's position
    in its annotation file, for error messages).

    Args:
        source: an `imagefolder` directory with `metadata.jsonl` (`file_name` relative to the directory, and `text`
            or `caption`), an original ALBEF annotation file (`[{"image": path, "caption": str | list[str]}]`,
            `.json`, or the same records as json lines, `.jsonl`), or a list of them (like the original's
            `train_file` list). A caption list expands into one row per caption with the same `image_id`.
        image_root: directory that relative image paths are joined to (for an imagefolder: the directory itself).
            Without it, paths in annotation files are used as written, as the original pre-training does.
        streaming: read lazily, one row at a time (records are checked as they are read); a `.jsonl` file or an
            imagefolder is read line by line, a `.json` list is parsed whole when iteration reaches it. Each source
            file is one shard (DataLoader workers split the shards); with several files, file k numbers its images
            from `k * 2**32` (unique, not contiguous).
        skip_bad_records: skip records with a missing image file, an empty caption or fields of the wrong type,
            logging a warning with the count and counting them in the returned object's `skipped_records`
            (`SkippedRecords`, `.count`), instead of raising `BadRecordError`. Undecodable images are found
            when the collators open them (they skip and count the same way).
        check_files: check that every image file exists (one `stat` per record).
    """
    sources = [_pair_source(item, image_root) for item in _as_list(source)]
    if streaming:
        skipped = SkippedRecords("load_image_text_pairs")
        dataset = IterableDataset.from_generator(
            _generate_pairs,
            features=PAIR_FEATURES,
            gen_kwargs={
                "shards": list(enumerate(sources)),
                "numbered_by_file": len(sources) > 1,
                "skipped": skipped if skip_bad_records else None,
                "check_files": check_files,
            },
        )
    else:
        skipped = SkippedRecords("load_image_text_pairs", log_each=False)
        image_ids: dict[str, int] = {}
        rows: dict[str, list] = {name: [] for name in PAIR_FEATURES}
        for annotation, root, key in sources:
            pairs = iter_image_text_pairs(
                annotation, root, key, skipped if skip_bad_records else None, check_files, image_ids=image_ids
            )
            for row in pairs:
                for name in PAIR_FEATURES:
                    rows[name].append(row[name])
        dataset = Dataset.from_dict(rows, features=PAIR_FEATURES)
        if skipped.count:
            logger.warning(skipped.summary())
    dataset.skipped_records = skipped
    return dataset


def _generate_pairs(shards, numbered_by_file: bool, skipped: SkippedRecords | None, check_files: bool):
    # Module level (not a closure) so that DataLoader workers can pickle it under spawn/forkserver.
    for shard_index, (annotation, root, key) in shards:
        first = shard_index * STREAMING_IMAGE_ID_STRIDE if numbered_by_file else 0
        yield from iter_image_text_pairs(annotation, root, key, skipped, check_files, first)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_num_workers(upper: int = 4) -> int:
    """DataLoader workers that fit the machine: at most `upper` (the original's 4), and no more than the cores each
    of the processes launched on this node has left besides itself (torchrun / accelerate set LOCAL_WORLD_SIZE):
    1 on a 2-core machine, 0 on one core."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(upper, available_cpus() // processes - 1))


def open_image(image: Any, index: Any = None, source: Any = None) -> PIL.Image.Image:
    """
    Opens one image as RGB: a PIL image, a path, or a `datasets` image dict (`{"path", "bytes"}`). A missing
    or undecodable file raises `BadRecordError` naming the record. Unlike the original, truncated files are
    errors (it sets PIL's global `LOAD_TRUNCATED_IMAGES`).
    """
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    path, data = image, None
    if isinstance(image, dict):
        path, data = image.get("path"), image.get("bytes")
    if data is None and not isinstance(path, (str, os.PathLike)):
        raise BadRecordError(f"cannot read an image from {type(image).__name__} {image!r}", index, source=source)
    try:
        if data is not None:
            handle = PIL.Image.open(io.BytesIO(data))
        else:
            handle = PIL.Image.open(path)
        with handle:
            return handle.convert("RGB")
    except FileNotFoundError:
        raise BadRecordError("image file not found", index, path, source) from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        # PIL raises UnidentifiedImageError (an OSError) for unknown data, OSError for truncated files.
        raise BadRecordError(f"cannot decode the image ({type(err).__name__}: {err})", index, path, source) from None


__all__ = [
    "PAIR_FEATURES",
    "BadRecordError",
    "SkippedRecords",
    "available_cpus",
    "default_num_workers",
    "load_image_text_pairs",
    "open_image",
    "read_records",
]
