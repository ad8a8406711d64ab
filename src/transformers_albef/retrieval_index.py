"""Corpus-scale image-text retrieval with ALBEF.

- [`RetrievalEngine.build_index`] embeds a corpus of images and/or texts (ITC embeddings, in batches, streamed from any
  iterable) into a [`RetrievalIndex`], which saves to a folder (safetensors + a small json) and loads back.
- [`RetrievalEngine.text_to_image`] / [`RetrievalEngine.image_to_text`] search an index as ALBEF evaluates: the top
  `k` by ITC cosine similarity, re-ranked by the ITM "match" logit (`score="itm"`, the original), by ITM logit + ITC
  similarity (`score="itm+itc"`, LAVIS) or not at all (`score="itc"`). The candidates' tower states are recomputed
  from the items the index refers to (image paths, texts), or read from an on-disk, memory-mapped cache.
- [`RetrievalEngine.evaluate`] and [`chunked_retrieval_score_matrices`] compute the original evaluation's score
  matrices (those of `retrieval.retrieval_score_matrices`) with bounded memory: images are processed in chunks whose
  tower states are computed once, each (image, text) candidate pair is fused once even when both directions select
  it, and under torch.distributed (torchrun, `accelerate launch`) the image chunks are split across processes.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import shutil
import struct
import tempfile
import uuid
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .retrieval import (
    SIMILARITY_BLOCK_SIZE,
    _check_itm_head,
    _check_score_mode,
    _evaluating,
    _fuse_pairs_by_image_chunk,
    _image_tower,
    _progress,
    _score_matrices,
    _text_tower,
    chunked_retrieval_score_matrices,
    recall_at_k,
    retrieval_ranks,
)

logger = logging.get_logger(__name__)

INDEX_FORMAT = "transformers-albef-retrieval-index"
INDEX_VERSION = 1
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
IMAGE_STATES_FILE = "image_states.safetensors"


# ----- results -------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalResult:
    """
    The ranked matches of one query, best first.

    query: the query text, or the query image's path (`None` for an in-memory image).
    ids: the ids of the matched corpus items.
    items: what they refer to: image paths (`None` for an image indexed from memory) or texts.
    scores: the ranking score: ITM "match" logit (`"itm"`), ITM logit + ITC similarity (`"itm+itc"`) or ITC cosine
        similarity (`"itc"`).
    itc_scores: the ITC cosine similarity of each match (what chose the candidates).
    indices: the matches' positions in the index.
    """

    query: str | None
    ids: list
    items: list
    scores: list[float]
    itc_scores: list[float]
    indices: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RetrievalEvaluation:
    """
    The original retrieval evaluation of a corpus.

    score_i2t (`(images, texts)`) / score_t2i (`(texts, images)`): the score matrices, -100 outside each row's top `k`.
    metrics: `itm_eval`'s recall: `txt_r1/5/10` (image -> text), `img_r1/5/10` (text -> image), means, `r_mean`.
    image_ranks / text_ranks: 0-based rank of each image's best caption / each text's image.
    k: the ITC candidates asked for per row (each direction caps it at the number of texts / images).
    score: the re-ranking score (`"itm"`, `"itm+itc"`).
    """

    score_i2t: torch.Tensor
    score_t2i: torch.Tensor
    metrics: dict[str, float]
    image_ranks: np.ndarray = field(repr=False)
    text_ranks: np.ndarray = field(repr=False)
    k: int = 0
    score: str = "itm"

    def recall_curve(self, max_rank: int | None = None) -> dict[str, list[float]]:
        """Recall@K in percent for K = 1..`max_rank` (default: up to `k`, at most 100): `ranks`, `image_to_text`
        (an image is found when any of its captions is in its top K) and `text_to_image`."""
        largest = max(self.score_i2t.shape[1], self.score_t2i.shape[1])
        max_rank = max_rank or max(1, min(self.k or largest, largest, 100))
        ranks = list(range(1, max_rank + 1))
        return {
            "ranks": ranks,
            "image_to_text": [100.0 * float(np.mean(self.image_ranks < r)) for r in ranks],
            "text_to_image": [100.0 * float(np.mean(self.text_ranks < r)) for r in ranks],
        }


# ----- corpus items --------------------------------------------------------------------------------------------------
def image_file_extensions() -> set[str]:
    """The file extensions PIL can open (lower case, with the dot)."""
    return {ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN}


def list_image_files(folder: str | os.PathLike, skip_non_images: bool = False) -> list[str]:
    """
    The image files directly in `folder`, sorted by name (hidden files and subfolders are ignored). Other files raise a
    `ValueError` naming them, unless `skip_non_images` (then they are skipped with a warning).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; expected a folder of images")
    extensions = image_file_extensions()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [str(p) for p in files if p.suffix.lower() in extensions]
    others = [p.name for p in files if p.suffix.lower() not in extensions]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        if not skip_non_images:
            raise ValueError(
                f"{str(folder)!r} holds {len(others)} file(s) that are not images: {shown}; expected only image files "
                f"({', '.join(sorted(e for e in extensions if e in {'.jpg', '.jpeg', '.png', '.webp', '.bmp'}))}, "
                "...). Skip them with skip_non_images=True (--skip-non-images)"
            )
        logger.warning(f"skipping {len(others)} non-image file(s) in {str(folder)!r}: {shown}")
    if not images:
        raise ValueError(f"{str(folder)!r} holds no image files; expected at least one")
    return images


def _image_reference(item: Any) -> str | None:
    """The file an image item can be reloaded from (absolute path), or None for an in-memory image."""
    if isinstance(item, (str, os.PathLike)):
        return os.path.abspath(os.fspath(item))
    if isinstance(item, dict) and item.get("bytes") is None and isinstance(item.get("path"), str):
        return os.path.abspath(item["path"])
    if isinstance(item, PIL.Image.Image) and getattr(item, "filename", ""):
        # An image opened from a file (datasets' Image feature decodes paths this way).
        return os.path.abspath(item.filename)
    return None


def _open_image(item: Any, position: int | str) -> PIL.Image.Image:
    """One image item as a PIL image: a PIL image, a file path, or a `datasets` image dict (`{"path", "bytes"}`)."""
    if isinstance(item, PIL.Image.Image):
        return item
    path, data = item, None
    if isinstance(item, dict):
        if not {"path", "bytes"} & item.keys():
            raise ValueError(
                f"image {position}: a dict must be a `datasets` image ({{'path', 'bytes'}}), got keys {sorted(item)}; "
                "pass the image column (e.g. dataset['image']), not whole rows"
            )
        path, data = item.get("path"), item.get("bytes")
    if data is None and not isinstance(path, (str, os.PathLike)):
        raise ValueError(
            f"image {position}: expected a PIL image, a file path or a `datasets` image dict, "
            f"got {type(item).__name__}"
        )
    try:
        with PIL.Image.open(io.BytesIO(data) if data is not None else path) as handle:
            return handle.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image {position}: file {os.fspath(path)!r} not found") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        where = f"file {os.fspath(path)!r}" if data is None else "its bytes"
        raise ValueError(
            f"image {position}: {where} is not an image PIL can read ({type(err).__name__}: {err})"
        ) from None


def _batches(iterable: Iterable, size: int) -> Iterable[list]:
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _is_pixel_tensor(images: Any) -> bool:
    return isinstance(images, torch.Tensor)


def _check_pixel_tensor(pixel_values: torch.Tensor, what: str = "pixel_values") -> torch.Tensor:
    if pixel_values.ndim != 4:
        raise ValueError(
            f"{what} must be a (batch, channels, height, width) tensor, got shape {tuple(pixel_values.shape)}"
        )
    return pixel_values


def _as_text_list(texts: Any, what: str) -> list[str]:
    """A string or a sequence of strings as a checked, non-empty list."""
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, Iterable):
        texts = list(texts)
    else:
        raise ValueError(f"{what} must be a string or a sequence of strings, got {type(texts).__name__}")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what}[{position}] must be a string, got {type(text).__name__} {text!r}")
    if not texts:
        raise ValueError(f"{what} is empty; expected at least one text")
    return texts


def _as_image_list(images: Any, what: str) -> list | torch.Tensor:
    """One image item, a sequence of them, or a pixel tensor, as a non-empty list (or the tensor)."""
    if _is_pixel_tensor(images):
        return _check_pixel_tensor(images if images.ndim == 4 else images[None], what)
    if isinstance(images, (str, os.PathLike, PIL.Image.Image, dict)):
        images = [images]
    elif isinstance(images, Iterable):
        images = list(images)
    else:
        raise ValueError(f"{what} must be an image, a path or a sequence of them, got {type(images).__name__}")
    if not images:
        raise ValueError(f"{what} is empty; expected at least one image")
    return images


def _check_ids(ids: Sequence | None, count: int, what: str) -> list:
    """`ids` checked against the number of items (default: positions); they must be unique json strings or ints."""
    if ids is None:
        return list(range(count))
    ids = list(ids)
    if len(ids) != count:
        raise ValueError(f"got {len(ids)} {what} ids for {count} {what}s; expected one id per {what}")
    for position, item_id in enumerate(ids):
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            raise ValueError(f"{what} id {position} must be a string or an int, got {type(item_id).__name__}")
    if len(set(ids)) != len(ids):
        duplicates = sorted(str(i) for i, count in Counter(ids).items() if count > 1)[:5]
        raise ValueError(f"{what} ids must be unique; repeated: {', '.join(duplicates)}")
    return ids


# ----- text ----------------------------------------------------------------------------------------------------------
class _Tokenizer:
    """ALBEF's retrieval text convention: optional `pre_caption` cleaning, `[CLS] w1 ... wn` (no `[SEP]`), truncated
    and padded to `max_length` (30 in the original evaluation), with a warning naming what was truncated."""

    def __init__(self, processor, max_length: int, clean_text: str | None, max_positions: int):
        if clean_text not in (None, "caption"):
            raise ValueError(f"clean_text must be 'caption' or None, got {clean_text!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and one word piece), got {max_length}")
        if max_length > max_positions:
            logger.warning(
                f"max_length={max_length} is longer than the model's {max_positions} text positions; texts are "
                f"truncated to {max_positions} tokens"
            )
            max_length = max_positions
        self.processor, self.max_length, self.clean_text = processor, max_length, clean_text
        self.max_positions = max_positions

    def __call__(self, texts: list[str], what: str, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.processor(text=texts, clean_text=self.clean_text, padding=False, truncation=False)["input_ids"]
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(texts), self.max_length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        too_long = []
        for row, ids in enumerate(encoded):
            if len(ids) < 2:
                raise ValueError(f"{what} {row} ({texts[row]!r}) is empty after cleaning; expected some words")
            if len(ids) > self.max_length:
                too_long.append(row)
                ids = ids[: self.max_length]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        if too_long and warn:
            shown = ", ".join(str(row) for row in too_long[:5]) + (" ..." if len(too_long) > 5 else "")
            logger.warning(
                f"{len(too_long)} {what}(s) longer than {self.max_length} tokens were truncated to {self.max_length} "
                f"tokens (the retrieval text length; the model has {self.max_positions} positions): {what} {shown}"
            )
        return input_ids, attention_mask


# ----- model identity ------------------------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """A short hash of the ITC projections: tells whether an index was built with these weights."""
    digest = hashlib.sha256()
    for weight in (model.vision_proj.weight, model.text_proj.weight):
        digest.update(weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----- the on-disk tower-state cache ---------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.uint16),  # numpy has no bfloat16: read as uint16, viewed back in torch
    torch.float64: ("F64", np.float64),
}
_TORCH_DTYPES = {code: dtype for dtype, (code, _) in _SAFETENSORS_DTYPES.items()}


class _StreamingTensorWriter:
    """Writes one tensor to a safetensors file block of rows by block of rows, when the number of rows is known only
    at the end: the header's space is reserved first (the format allows padding it with spaces) and filled on close."""

    header_bytes = 1024  # 8 + 1024 keeps the data 8-byte aligned

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self.handle = open(path, "wb")
        self.handle.write(b"\0" * (8 + self.header_bytes))
        self.rows, self.row_shape, self.dtype = 0, None, None

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach().contiguous().cpu()
        if self.row_shape is None:
            if rows.dtype not in _SAFETENSORS_DTYPES:
                rows = rows.float()
            self.row_shape, self.dtype = tuple(rows.shape[1:]), rows.dtype
        elif tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} after rows of shape {self.row_shape}")
        self.handle.write(rows.to(self.dtype).view(torch.uint8).numpy().tobytes())
        self.rows += rows.shape[0]

    def close(self, metadata: dict[str, str] | None = None) -> None:
        row_shape, dtype = self.row_shape or (0,), self.dtype or torch.float32
        size = self.rows * math.prod(row_shape) * dtype.itemsize
        header = {self.name: {"dtype": _SAFETENSORS_DTYPES[dtype][0], "shape": [self.rows, *row_shape]}}
        header[self.name]["data_offsets"] = [0, size]
        header["__metadata__"] = metadata or {}
        encoded = json.dumps(header).encode()
        if len(encoded) > self.header_bytes:
            raise ValueError(f"safetensors header of {self.path} is too long ({len(encoded)} bytes)")
        self.handle.seek(0)
        self.handle.write(struct.pack("<Q", self.header_bytes) + encoded.ljust(self.header_bytes, b" "))
        self.handle.close()

    def abort(self) -> None:
        self.handle.close()


class _MemoryMappedTensor:
    """Rows of one tensor in a safetensors file, read on demand through a memory map (nothing is loaded up front)."""

    def __init__(self, path: Path, name: str):
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        if name not in header:
            raise ValueError(f"{path} holds no tensor {name!r}")
        entry = header[name]
        self.dtype = _TORCH_DTYPES[entry["dtype"]]
        self.shape = tuple(entry["shape"])
        numpy_dtype = _SAFETENSORS_DTYPES[self.dtype][1]
        offset = 8 + header_size + entry["data_offsets"][0]
        self.array = np.memmap(path, dtype=numpy_dtype, mode="r", offset=offset, shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(self.array[indices.cpu().numpy()]))
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor


# ----- the index -----------------------------------------------------------------------------------------------------
def _temporary_sibling(path: Path, tag: str) -> Path:
    """A fresh hidden folder next to `path` (same file system, so that a rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def _move_into_place(folder: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished `folder` to `path`; an existing index there is replaced only with `overwrite`."""
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        if path.is_dir() and not (path / INDEX_FILE).is_file() and any(path.iterdir()):
            raise FileExistsError(
                f"{str(path)!r} is a non-empty folder that is not a retrieval index; not replacing it"
            )
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        try:
            os.replace(folder, path)
        except BaseException:
            os.replace(old, path)  # the previous index stays as it was
            raise
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(folder, path)


class RetrievalIndex:
    """
    ITC embeddings of a corpus of images and/or texts, with what each item refers to, so that candidates can be
    re-ranked later: `images` holds each image's file path (`None` for an image indexed from memory), `texts` the
    texts as given. Build one with [`RetrievalEngine.build_index`]; `save` / `load` use a folder:

    - `index.json`: format, model name and weight fingerprint, text settings, item references and ids;
    - `embeddings.safetensors`: `image_embeds` (images, embed_dim) and `text_embeds` (texts, embed_dim), float32;
    - `image_states.safetensors` (optional): the image tower's last hidden states, memory-mapped when read, for
      images that cannot be reloaded from a file.
    """

    def __init__(
        self,
        image_embeds: torch.Tensor | None,
        text_embeds: torch.Tensor | None,
        images: list[str | None],
        texts: list[str],
        image_ids: list,
        text_ids: list,
        model_name: str = "",
        model_fingerprint: str = "",
        max_length: int = 30,
        clean_text: str | None = "caption",
        image_states_path: Path | None = None,
    ):
        self.image_embeds, self.text_embeds = image_embeds, text_embeds
        self.images, self.texts = images, texts
        self.image_ids, self.text_ids = image_ids, text_ids
        self.model_name, self.model_fingerprint = model_name, model_fingerprint
        self.max_length, self.clean_text = max_length, clean_text
        self.path: Path | None = None
        self._image_states_path = image_states_path
        self._image_states: _MemoryMappedTensor | None = None
        self._checked_fingerprints: set[str] = set()  # models already checked against this index (warn once)
        if self.num_images and image_embeds is None or self.num_texts and text_embeds is None:
            raise ValueError("an index needs the embeddings of its items")
        if image_embeds is not None and image_embeds.shape[0] != len(images):
            raise ValueError(f"{image_embeds.shape[0]} image embeddings for {len(images)} images")
        if text_embeds is not None and text_embeds.shape[0] != len(texts):
            raise ValueError(f"{text_embeds.shape[0]} text embeddings for {len(texts)} texts")

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    @property
    def has_image_states(self) -> bool:
        """Whether the image tower states are cached on disk (re-ranking then needs no image files)."""
        return self._image_states_path is not None

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (
            f"RetrievalIndex(images={self.num_images}, texts={self.num_texts}, model={self.model_name!r}, "
            f"image_states={'cached' if self.has_image_states else 'recomputed'}{where})"
        )

    def image_states(self, indices: torch.Tensor) -> torch.Tensor:
        """Cached image tower states of the images at `indices` (read from the memory map)."""
        if self._image_states is None:
            if self._image_states_path is None:
                raise ValueError("this index keeps no image states")
            self._image_states = _MemoryMappedTensor(self._image_states_path, "image_states")
        return self._image_states.rows(indices)

    def _metadata(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "max_length": self.max_length,
            "clean_text": self.clean_text,
            "image_states": self.has_image_states,
            "images": self.images,
            "image_ids": self.image_ids,
            "texts": self.texts,
            "text_ids": self.text_ids,
        }

    def _write_into(self, folder: Path) -> None:
        tensors = {}
        if self.image_embeds is not None:
            tensors["image_embeds"] = self.image_embeds.float().contiguous()
        if self.text_embeds is not None:
            tensors["text_embeds"] = self.text_embeds.float().contiguous()
        save_file(tensors, folder / EMBEDDINGS_FILE, metadata={"format": INDEX_FORMAT})
        (folder / INDEX_FILE).write_text(json.dumps(self._metadata(), ensure_ascii=False))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the index to the folder `path` atomically: into a temporary folder next to it, then renamed."""
        path = Path(path)
        if self.path is not None and path.resolve() == self.path.resolve():
            return path
        if path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        folder = _temporary_sibling(path, "tmp")
        try:
            if self._image_states_path is not None:
                shutil.copyfile(self._image_states_path, folder / IMAGE_STATES_FILE)
            self._write_into(folder)
            _move_into_place(folder, path, overwrite)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._attach(path)
        return path

    def _attach(self, path: Path) -> None:
        """From now on the index lives in `path` (its state cache included)."""
        self.path = path
        if self._image_states_path is not None:
            self._image_states_path, self._image_states = path / IMAGE_STATES_FILE, None

    @classmethod
    def load(cls, path: str | os.PathLike) -> RetrievalIndex:
        """Load an index saved by `save` (or `build_index(path=...)`); image states stay on disk, memory-mapped."""
        path = Path(path)
        if not (path / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a retrieval index (no {INDEX_FILE}); build one first")
        try:
            meta = json.loads((path / INDEX_FILE).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path / INDEX_FILE)!r} is not valid json ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{str(path / INDEX_FILE)!r} is not a transformers-albef retrieval index")
        if meta.get("version", 0) > INDEX_VERSION:
            raise ValueError(
                f"{str(path)!r} was written by a newer transformers-albef (index version {meta['version']}); "
                f"this one reads version {INDEX_VERSION}"
            )
        missing = [
            key for key in ("images", "texts", "image_ids", "text_ids", "max_length", "clean_text") if key not in meta
        ]
        if missing:
            raise ValueError(
                f"{str(path / INDEX_FILE)!r} lacks {', '.join(missing)}; the index is damaged, rebuild it"
            )
        tensors = load_file(path / EMBEDDINGS_FILE)
        index = cls(
            image_embeds=tensors.get("image_embeds"),
            text_embeds=tensors.get("text_embeds"),
            images=meta["images"],
            texts=meta["texts"],
            image_ids=meta["image_ids"],
            text_ids=meta["text_ids"],
            model_name=meta.get("model_name", ""),
            model_fingerprint=meta.get("model_fingerprint", ""),
            max_length=meta["max_length"],
            clean_text=meta["clean_text"],
            image_states_path=path / IMAGE_STATES_FILE if meta.get("image_states") else None,
        )
        index.path = path
        return index


class _PixelSource:
    """Random access to an image corpus as pixel values: a pixel tensor, or a sequence of image items loaded and
    processed on demand (read twice in an evaluation: ITC embeddings first, tower states per chunk later)."""

    def __init__(self, images, image_processor=None):
        if _is_pixel_tensor(images):
            self.pixel_values, self.items = _check_pixel_tensor(images), None
        else:
            if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")) or isinstance(images, (str, dict)):
                raise ValueError(
                    "the evaluation reads the images twice, so it needs a sequence (a list of paths or PIL images, a "
                    f"`datasets` column, a pixel tensor), got {type(images).__name__}"
                )
            if image_processor is None:
                raise ValueError("image items need an image processor; pass pixel values or use RetrievalEngine")
            self.pixel_values, self.items, self.image_processor = None, images, image_processor

    def __len__(self) -> int:
        return len(self.pixel_values) if self.items is None else len(self.items)

    def get(self, start: int, stop: int) -> torch.Tensor:
        if self.items is None:
            return self.pixel_values[start:stop]
        images = [_open_image(self.items[i], i) for i in range(start, stop)]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]


# ----- the engine ----------------------------------------------------------------------------------------------------
class RetrievalEngine:
    """
    Image-text retrieval over a corpus with an ALBEF model ([`AlbefForRetrieval`] for ITM re-ranking; an
    [`AlbefModel`] can index and search with `score="itc"`) and its [`AlbefProcessor`].

    Args:
        model: the model; it is used in eval mode and no-grad, and restored to its mode afterwards.
        processor: its processor (images are resized to the model's size; texts follow ALBEF's convention).
        batch_size: images or texts per tower forward.
        image_chunk_size: images whose tower states are held at once while re-ranking or evaluating.
        fusion_batch_size: (image, text) pairs per fusion-encoder forward.
        max_length: text length in tokens (30 in the original evaluation); longer texts are truncated, with a
            warning. Capped at the model's text positions.
        clean_text: `"caption"` applies the original `pre_caption` cleaning (30 words); `None` uses texts as given.
        progress: show tqdm progress bars.
        text_state_device: where an evaluation keeps the text-encoder states of the captions it re-ranks (default:
            the model's device; `"cpu"` saves accelerator memory on very large caption sets).

    Example:

    ```python
    >>> from transformers_albef import AlbefForRetrieval, AlbefProcessor
    >>> from transformers_albef.retrieval_index import RetrievalEngine, list_image_files

    >>> engine = RetrievalEngine(AlbefForRetrieval.from_pretrained(path), AlbefProcessor.from_pretrained(path))
    >>> index = engine.build_index(images=list_image_files("photos"), path="photos.index")
    >>> [result] = engine.text_to_image(index, "a dog running on the beach", k=16)
    >>> result.items[:3], result.scores[:3]
    ```
    """

    def __init__(
        self,
        model,
        processor,
        batch_size: int = 64,
        image_chunk_size: int = 256,
        fusion_batch_size: int = 256,
        max_length: int = 30,
        clean_text: str | None = "caption",
        progress: bool = True,
        text_state_device: str | torch.device | None = None,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("image_chunk_size", image_chunk_size),
            ("fusion_batch_size", fusion_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model, self.processor = model, processor
        self.batch_size, self.image_chunk_size, self.fusion_batch_size = (
            batch_size,
            image_chunk_size,
            fusion_batch_size,
        )
        self.progress, self.text_state_device = progress, text_state_device
        max_positions = model.config.text_config.max_position_embeddings
        self.tokenizer = _Tokenizer(processor, max_length, clean_text, max_positions)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    # ----- indexing -------------------------------------------------------------------------------------------------
    def build_index(
        self,
        images: Iterable | torch.Tensor | None = None,
        texts: Iterable[str] | None = None,
        image_ids: Sequence | None = None,
        text_ids: Sequence | None = None,
        path: str | os.PathLike | None = None,
        overwrite: bool = False,
        cache_image_states: bool | None = None,
    ) -> RetrievalIndex:
        """
        Index a corpus: the ITC embedding of every image and text, computed `batch_size` at a time while the items
        are streamed.

        Args:
            images: any iterable of PIL images, image file paths or `datasets` image dicts (e.g. `dataset["image"]`,
                decoded or not), or a `(N, 3, H, W)` pixel tensor. Read once.
            texts: any iterable of strings (captions).
            image_ids / text_ids: an id per item (unique strings or ints); default: positions.
            path: also save the index to this folder. The build writes into a temporary folder next to it and renames
                it at the end, so an interrupted build leaves nothing at `path`.
            overwrite: replace an existing index at `path`.
            cache_image_states: keep the image tower states in `image_states.safetensors` (memory-mapped when read)
                so re-ranking needs no image files. Default: only when some images cannot be reloaded from a file
                (in-memory PIL images, pixel tensors). With `False` such images can only be searched with
                `score="itc"`.
        """
        if images is None and texts is None:
            raise ValueError("the corpus is empty: pass images, texts or both")
        if isinstance(images, (str, os.PathLike)):
            images = list_image_files(images) if os.path.isdir(images) else [images]
        for items, ids, what in ((images, image_ids, "image"), (texts, text_ids, "text")):
            if ids is not None and hasattr(items, "__len__"):
                _check_ids(ids, len(items), what)  # early, before any encoding
        model = self.model
        path = Path(path) if path is not None else None
        if path is not None and path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        folder = _temporary_sibling(path, "tmp") if path is not None else None
        scratch = None
        try:
            with _evaluating(model):
                image_refs, image_embeds, states_file = [], None, None
                if images is not None:
                    if folder is None and cache_image_states is not False:
                        scratch = Path(tempfile.mkdtemp(prefix="albef-index-"))
                    image_refs, image_embeds, states_file = self._embed_images(
                        images, folder or scratch, cache_image_states
                    )
                    if not image_refs:
                        raise ValueError("the image corpus is empty; expected at least one image")
                text_list, text_embeds = [], None
                if texts is not None:
                    text_list = _as_text_list(texts, "texts")
                    input_ids, attention_mask = self.tokenizer(text_list, "text")
                    text_embeds = self._embed_texts(input_ids, attention_mask)
            index = RetrievalIndex(
                image_embeds=image_embeds,
                text_embeds=text_embeds,
                images=image_refs,
                texts=text_list,
                image_ids=_check_ids(image_ids, len(image_refs), "image"),
                text_ids=_check_ids(text_ids, len(text_list), "text"),
                model_name=str(getattr(model, "name_or_path", "") or ""),
                model_fingerprint=model_fingerprint(model),
                max_length=self.max_length,
                clean_text=self.tokenizer.clean_text,
                image_states_path=states_file,
            )
            if states_file is None and scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
                scratch = None
            if path is not None:
                index._write_into(folder)
                _move_into_place(folder, path, overwrite)
                index._attach(path)
        except BaseException:
            # Interrupted or failed: nothing half-written stays behind.
            for leftover in (folder, scratch):
                if leftover is not None:
                    shutil.rmtree(leftover, ignore_errors=True)
            raise
        if scratch is not None:
            # An unsaved index's state cache lives in a temporary folder until the index is garbage-collected.
            weakref.finalize(index, shutil.rmtree, scratch, True)
        return index

    def _embed_images(self, images, folder: Path | None, cache_image_states: bool | None):
        """Stream the images: ITC embeddings, references, and the tower states written to `folder` when cached."""
        model = self.model
        if _is_pixel_tensor(images):
            images = _check_pixel_tensor(images, "images")
            batches = (((None,) * len(b), b) for b in images.split(self.batch_size))
        else:
            batches = self._image_batches(images)
        total = len(images) if hasattr(images, "__len__") else None
        refs, embeds, writer = [], [], None
        bar = _progress(total, "indexing images", "image", self.progress)
        try:
            for batch_refs, pixel_values in batches:
                states, batch_embeds = _image_tower(model, pixel_values)
                if writer is None and folder is not None and cache_image_states is not False:
                    # With cache_image_states=None, states are kept once an image without a file appears; the ones
                    # before it are then recomputed here (they came from files), so the cache covers every image.
                    if cache_image_states or any(r is None for r in batch_refs):
                        writer = _StreamingTensorWriter(folder / IMAGE_STATES_FILE, "image_states")
                        for start in range(0, len(refs), self.batch_size):
                            earlier = [
                                _open_image(r, start + j) for j, r in enumerate(refs[start : start + self.batch_size])
                            ]
                            writer.append(_image_tower(model, self._pixels(earlier))[0])
                if writer is not None:
                    writer.append(states)
                refs.extend(batch_refs)
                embeds.append(batch_embeds.float().cpu())
                bar.update(len(batch_refs))
            if writer is not None:
                writer.close({"format": INDEX_FORMAT})
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            bar.close()
        if writer is None and any(r is None for r in refs):
            logger.warning(
                "some indexed images have no file to reload them from and their tower states are not cached: they can "
                "only be searched with score='itc'"
            )
        image_embeds = torch.cat(embeds) if embeds else None
        return refs, image_embeds, (writer.path if writer is not None else None)

    def _pixels(self, pil_images: list) -> torch.Tensor:
        return self.processor.image_processor(pil_images, return_tensors="pt")["pixel_values"]

    def _image_batches(self, images: Iterable):
        position = 0
        for batch in _batches(images, self.batch_size):
            refs = [_image_reference(item) for item in batch]
            pil_images = [_open_image(item, position + j) for j, item in enumerate(batch)]
            position += len(batch)
            yield refs, self._pixels(pil_images)

    def _embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bar = _progress(len(input_ids), "indexing texts", "text", self.progress)
        embeds = []
        for start in range(0, len(input_ids), self.batch_size):
            end = start + self.batch_size
            embeds.append(_text_tower(self.model, input_ids[start:end], attention_mask[start:end])[1].float().cpu())
            bar.update(len(embeds[-1]))
        bar.close()
        return torch.cat(embeds)

    def load_index(self, path: str | os.PathLike) -> RetrievalIndex:
        """Load a saved index and check that it fits this engine's model (embedding size; a different weight
        fingerprint only warns: the ranking would be meaningless unless it is the same model)."""
        index = RetrievalIndex.load(path)
        self._check_index(index)
        return index

    def _check_index(self, index: RetrievalIndex) -> None:
        embeds = index.image_embeds if index.image_embeds is not None else index.text_embeds
        if embeds is not None and embeds.shape[1] != self.model.config.embed_dim:
            raise ValueError(
                f"the index holds {embeds.shape[1]}-d embeddings but the model's embed_dim is "
                f"{self.model.config.embed_dim}; it was built with another model ({index.model_name!r})"
            )
        fingerprint = model_fingerprint(self.model)
        if fingerprint in index._checked_fingerprints:
            return
        index._checked_fingerprints.add(fingerprint)
        if index.model_fingerprint and index.model_fingerprint != fingerprint:
            logger.warning(
                f"the index was built with different weights ({index.model_name!r}, fingerprint "
                f"{index.model_fingerprint}) than this model ({fingerprint}): rebuild it for "
                "meaningful rankings"
            )
        if index.max_length != self.max_length or index.clean_text != self.tokenizer.clean_text:
            logger.warning(
                f"the index's texts were encoded with max_length={index.max_length}, clean_text={index.clean_text!r}; "
                f"this engine uses {self.max_length}, {self.tokenizer.clean_text!r}"
            )

    # ----- search ---------------------------------------------------------------------------------------------------
    def _resolve_k(self, k: int | None, available: int, what: str) -> int:
        if k is None:
            return min(self.model.config.retrieval_k, available)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > available:
            raise ValueError(f"k={k} is larger than the {available} {what} in the index; expected k <= {available}")
        return k

    def text_to_image(
        self, index: RetrievalIndex, texts: str | Sequence[str], k: int | None = None, score: str = "itm"
    ) -> list[RetrievalResult]:
        """
        Search the index's images for each text: the top `k` images by ITC similarity (default:
        `model.config.retrieval_k`, capped at the corpus size), re-ranked by `score` (`"itm"`: the ITM match logit, as
        the original; `"itm+itc"`: plus the ITC similarity, as LAVIS; `"itc"`: no re-ranking). One result per text.
        """
        _check_score_mode(score)
        _check_itm_head(self.model, score)
        texts = _as_text_list(texts, "texts")
        if index.num_images == 0:
            raise ValueError("the index holds no images; build it with images=... to search text -> image")
        self._check_index(index)
        k = self._resolve_k(k, index.num_images, "images")
        input_ids, attention_mask = self.tokenizer(texts, "query text")
        results = []
        with _evaluating(self.model):
            image_embeds = index.image_embeds.to(self.model.device, torch.float32)
            for start in range(0, len(texts), self.batch_size):
                ids, mask = input_ids[start : start + self.batch_size], attention_mask[start : start + self.batch_size]
                text_states, text_embeds = _text_tower(self.model, ids, mask)
                itc, top = (text_embeds.float() @ image_embeds.t()).topk(k, dim=1)
                itc, top = itc.cpu(), top.cpu()
                scores = itc.clone()
                if score != "itc":
                    queries = torch.arange(len(ids)).repeat_interleave(k)
                    candidates = top.flatten()
                    order = torch.argsort(candidates, stable=True)
                    itm = torch.empty(len(candidates))
                    itm[order] = _fuse_pairs_by_image_chunk(
                        self.model,
                        candidates[order],
                        queries[order],
                        lambda chunk: self._index_image_states(index, chunk),
                        lambda rows, states=text_states: states[rows.to(states.device)],
                        mask,
                        self.image_chunk_size,
                        self.batch_size,
                        self.fusion_batch_size,
                        False,
                    )
                    itm = itm.view(len(ids), k)
                    scores = itm + itc if score == "itm+itc" else itm
                for row in range(len(ids)):
                    results.append(
                        self._result(
                            texts[start + row], top[row], scores[row], itc[row], index.image_ids, index.images
                        )
                    )
        return results

    def image_to_text(
        self, index: RetrievalIndex, images, k: int | None = None, score: str = "itm"
    ) -> list[RetrievalResult]:
        """
        Search the index's texts for each image (a PIL image, a path, a sequence of them, or a pixel tensor): the top
        `k` texts by ITC similarity, re-ranked by `score` as in [`~RetrievalEngine.text_to_image`]. One result per
        image.
        """
        _check_score_mode(score)
        _check_itm_head(self.model, score)
        images = _as_image_list(images, "images")
        if index.num_texts == 0:
            raise ValueError("the index holds no texts; build it with texts=... to search image -> text")
        self._check_index(index)
        k = self._resolve_k(k, index.num_texts, "texts")
        results = []
        with _evaluating(self.model):
            text_embeds = index.text_embeds.to(self.model.device, torch.float32)
            for refs, pixel_values in self._query_image_batches(images):
                image_states, image_embeds = [], []
                for b in range(0, len(pixel_values), self.batch_size):
                    states, embeds = _image_tower(self.model, pixel_values[b : b + self.batch_size])
                    image_states.append(states)
                    image_embeds.append(embeds)
                image_states, image_embeds = torch.cat(image_states), torch.cat(image_embeds)
                itc, top = (image_embeds.float() @ text_embeds.t()).topk(k, dim=1)
                itc, top = itc.cpu(), top.cpu()
                scores = itc.clone()
                if score != "itc":
                    # Only the candidates' texts are encoded again (their truncation was reported when indexing).
                    candidates, candidate_rows = torch.unique(top.flatten(), return_inverse=True)
                    candidate_texts = [index.texts[i] for i in candidates.tolist()]
                    ids, mask = self.tokenizer(candidate_texts, "indexed text", warn=False)
                    queries = torch.arange(len(refs)).repeat_interleave(k)
                    itm = _fuse_pairs_by_image_chunk(
                        self.model,
                        queries,
                        candidate_rows,
                        lambda chunk, states=image_states: states[chunk.to(states.device)],
                        lambda rows, ids=ids, mask=mask: _text_tower(self.model, ids[rows], mask[rows])[0],
                        mask,
                        self.image_chunk_size,
                        self.batch_size,
                        self.fusion_batch_size,
                        False,
                    ).view(len(refs), k)
                    scores = itm + itc if score == "itm+itc" else itm
                for row, ref in enumerate(refs):
                    results.append(self._result(ref, top[row], scores[row], itc[row], index.text_ids, index.texts))
        return results

    def _query_image_batches(self, images: list | torch.Tensor):
        """(references, pixel values) of the query images, `image_chunk_size` at a time."""
        if _is_pixel_tensor(images):
            for batch in images.split(self.image_chunk_size):
                yield (None,) * len(batch), batch
            return
        for start in range(0, len(images), self.image_chunk_size):
            batch = images[start : start + self.image_chunk_size]
            pil_images = [_open_image(item, start + j) for j, item in enumerate(batch)]
            yield [_image_reference(item) for item in batch], self._pixels(pil_images)

    def _index_image_states(self, index: RetrievalIndex, indices: torch.Tensor) -> torch.Tensor:
        """Tower states of the index's images at `indices`: from the cache, or recomputed from their files."""
        if index.has_image_states:
            return index.image_states(indices).to(self.model.device, self.model.dtype)
        refs = [index.images[i] for i in indices.tolist()]
        missing = [i for i, ref in zip(indices.tolist(), refs) if ref is None]
        if missing:
            raise ValueError(
                f"image {missing[0]} of the index has no file and the index keeps no tower states, so it cannot be "
                "re-ranked; rebuild the index with cache_image_states=True (or None), or search with score='itc'"
            )
        states = []
        for start in range(0, len(refs), self.batch_size):
            batch = refs[start : start + self.batch_size]
            pil_images = [_open_image(ref, f"{indices[start + j].item()} of the index") for j, ref in enumerate(batch)]
            states.append(_image_tower(self.model, self._pixels(pil_images))[0])
        return torch.cat(states)

    @staticmethod
    def _result(query, top, scores, itc, ids, items) -> RetrievalResult:
        order = torch.argsort(scores, descending=True, stable=True)
        positions = top[order].tolist()
        return RetrievalResult(
            query=query,
            ids=[ids[p] for p in positions],
            items=[items[p] for p in positions],
            scores=scores[order].tolist(),
            itc_scores=itc[order].tolist(),
            indices=positions,
        )

    # ----- evaluation -----------------------------------------------------------------------------------------------
    def score_matrices(
        self,
        images,
        texts: Sequence[str],
        k: int | None = None,
        score: str = "itm",
        distributed: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original evaluation's `(score_i2t, score_t2i)` for a corpus (images: a sequence of items or a pixel
        tensor, read twice; texts: strings), in bounded memory; see [`chunked_retrieval_score_matrices`]."""
        pixels = _PixelSource(images, self.processor.image_processor)
        texts = _as_text_list(texts, "texts")
        input_ids, attention_mask = self.tokenizer(texts, "text")
        with _evaluating(self.model):
            return _score_matrices(
                self.model,
                pixels,
                input_ids,
                attention_mask,
                self.model.config.retrieval_k if k is None else k,
                score,
                self.batch_size,
                self.image_chunk_size,
                self.fusion_batch_size,
                SIMILARITY_BLOCK_SIZE,
                distributed,
                self.progress,
                self.text_state_device,
            )

    def evaluate(
        self,
        images,
        texts: Sequence[str],
        txt2img: Sequence[int] | dict[int, int],
        img2txt: Sequence[Sequence[int]] | dict[int, Sequence[int]],
        k: int | None = None,
        score: str = "itm",
        distributed: bool | None = None,
    ) -> RetrievalEvaluation:
        """
        The original retrieval evaluation: score matrices (ITC top-`k` re-ranked by ITM, -100 elsewhere; `k` defaults
        to `model.config.retrieval_k` and is capped at the corpus size) and `itm_eval`'s recall@1/5/10 both ways.

        Args:
            images: the distinct images, a sequence of items (paths, PIL images, a `datasets` column) or pixel tensor.
            texts: every caption.
            txt2img: the image of each text; img2txt: the texts of each image (lists or {position: ...} dicts).
            distributed: split the work across torch.distributed processes (default: when initialised); call on
                every process, each returns the full result.
        """
        num_images = len(_PixelSource(images, self.processor.image_processor))
        texts = _as_text_list(texts, "texts")
        _check_ground_truth(txt2img, img2txt, num_images, len(texts))
        score_i2t, score_t2i = self.score_matrices(images, texts, k=k, score=score, distributed=distributed)
        image_ranks, text_ranks = retrieval_ranks(score_i2t, score_t2i, txt2img, img2txt)
        return RetrievalEvaluation(
            score_i2t=score_i2t,
            score_t2i=score_t2i,
            metrics={
                name: float(value) for name, value in recall_at_k(score_i2t, score_t2i, txt2img, img2txt).items()
            },
            image_ranks=image_ranks,
            text_ranks=text_ranks,
            k=self.model.config.retrieval_k if k is None else k,
            score=score,
        )


def _check_ground_truth(txt2img, img2txt, num_images: int, num_texts: int) -> None:
    """Raise a ValueError naming the first inconsistency between the ground truth and the corpus sizes."""
    if len(txt2img) != num_texts:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {num_texts} texts; expected one image per text")
    if len(img2txt) != num_images:
        raise ValueError(f"img2txt has {len(img2txt)} entries for {num_images} images; expected one list per image")
    for t in range(num_texts):
        if isinstance(txt2img, dict) and t not in txt2img:
            raise ValueError(f"txt2img has no entry for text {t}")
        if not 0 <= int(txt2img[t]) < num_images:
            raise ValueError(f"txt2img[{t}] = {txt2img[t]} is not an image position (0..{num_images - 1})")
    for i in range(num_images):
        if isinstance(img2txt, dict) and i not in img2txt:
            raise ValueError(f"img2txt has no entry for image {i}")
        if not img2txt[i]:
            raise ValueError(f"img2txt[{i}] is empty; every image needs at least one caption")
        for t in img2txt[i]:
            if not 0 <= int(t) < num_texts:
                raise ValueError(f"img2txt[{i}] holds {t}, which is not a text position (0..{num_texts - 1})")


__all__ = [
    "RetrievalEngine",
    "RetrievalEvaluation",
    "RetrievalIndex",
    "RetrievalResult",
    "chunked_retrieval_score_matrices",
    "list_image_files",
    "model_fingerprint",
]
