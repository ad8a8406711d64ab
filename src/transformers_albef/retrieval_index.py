"""Corpus-scale image-text retrieval with ALBEF.

- [`RetrievalEngine.build_index`] embeds a corpus of images and/or texts (ITC embeddings, in batches, streamed from any
  iterable) into a [`RetrievalIndex`]: a folder of shards (safetensors embeddings, memory-mapped when read; Arrow
  tables of what each item refers to), written atomically, resumable after an interruption, and split between the
  processes of a torchrun / `accelerate launch` (`retrieval_backends.storage`).
- [`RetrievalEngine.text_to_image`] / [`RetrievalEngine.image_to_text`] search an index as ALBEF evaluates: the top
  `k` by ITC cosine similarity (exact by default: faiss `IndexFlatIP` when faiss is installed, else a streamed torch
  search; approximate faiss indexes are opt-in, `retrieval_backends.search`), re-ranked by the ITM "match" logit
  (`score="itm"`, the original), by ITM logit + ITC similarity (`score="itm+itc"`, LAVIS) or not at all
  (`score="itc"`). The candidates' tower states are recomputed from the items the index refers to (image paths,
  texts), or read from tower states cached in the shards.
- [`RetrievalEngine.evaluate`] and [`chunked_retrieval_score_matrices`] compute the original evaluation's score
  matrices (those of `retrieval.retrieval_score_matrices`) with bounded memory: images are processed in chunks whose
  tower states are computed once, each (image, text) candidate pair is fused once even when both directions select
  it, and under torch.distributed (torchrun, `accelerate launch`) the image chunks are split across processes.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import time
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
from .retrieval_backends.search import (
    ANN_KINDS,
    FaissSearch,
    TorchExactSearch,
    ann_spec,
    build_ann,
    faiss_available,
    flat_index,
    import_faiss,
    recall_against_exact,
)
from .retrieval_backends.storage import (
    ANN_DIR,
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    INDEX_FORMAT,
    MODALITIES,
    EmbeddingColumn,
    IndexFormatError,
    ItemColumn,
    ProcessGroup,
    ShardedBuild,
    check_replaceable,
    corpus_shards,
    move_into_place,
    open_shards,
    read_manifest,
    write_json_atomic,
)

logger = logging.get_logger(__name__)


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


def _check_ids(ids: Sequence | None, count: int | None, what: str) -> list:
    """`ids` checked against the number of items when known (default: positions); they must be unique strings or
    ints."""
    if ids is None:
        return list(range(count))
    ids = list(ids)
    if count is not None and len(ids) != count:
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

    def __call__(
        self, texts: list[str], what: str, warn: bool = True, offset: int = 0, too_long: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of `texts` (positions `offset`... in messages); the positions of truncated
        texts are warned about, or appended to `too_long` when it is given."""
        encoded = self.processor(text=texts, clean_text=self.clean_text, padding=False, truncation=False)["input_ids"]
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(texts), self.max_length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        truncated = []
        for row, ids in enumerate(encoded):
            if len(ids) < 2:
                raise ValueError(
                    f"{what} {offset + row} ({texts[row]!r}) is empty after cleaning; expected some words"
                )
            if len(ids) > self.max_length:
                truncated.append(offset + row)
                ids = ids[: self.max_length]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        if too_long is not None:
            too_long.extend(truncated)
        elif warn:
            self.warn_truncated(truncated, what)
        return input_ids, attention_mask

    def warn_truncated(self, rows: list[int], what: str) -> None:
        if rows:
            shown = ", ".join(str(row) for row in rows[:5]) + (" ..." if len(rows) > 5 else "")
            logger.warning(
                f"{len(rows)} {what}(s) longer than {self.max_length} tokens were truncated to {self.max_length} "
                f"tokens (the retrieval text length; the model has {self.max_positions} positions): {what} {shown}"
            )


# ----- model identity ------------------------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """A short hash of the ITC projections: tells whether an index was built with these weights."""
    digest = hashlib.sha256()
    for weight in (model.vision_proj.weight, model.text_proj.weight):
        digest.update(weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----- the index -----------------------------------------------------------------------------------------------------
SEARCH_HELP = (
    "'exact' (faiss IndexFlatIP when faiss is installed, else the torch search), 'torch' (exact, streamed from the "
    "memory-mapped shards), 'flat' (faiss IndexFlatIP), or an approximate index built with build_ann ("
    + ", ".join(ANN_KINDS)
    + ")"
)


class RetrievalIndex:
    """
    ITC embeddings of a corpus of images and/or texts, with what each item refers to, so that candidates can be
    re-ranked later: `images` holds each image's file path (`None` for an image indexed from memory), `texts` the
    texts as given. Build one with [`RetrievalEngine.build_index`] (or [`RetrievalIndex.from_embeddings`]); it lives
    in a folder (a temporary one, removed with the object, until `save`) and is read lazily: embeddings are
    memory-mapped safetensors shards, item references and texts Arrow tables (see
    `transformers_albef.retrieval_backends.storage` for the layout).

    Candidate search (`search`): exact by default, faiss `IndexFlatIP` when faiss is installed and the torch search
    otherwise (both give the ranking of the full similarity matrix); approximate faiss indexes (`build_ann`) are
    opt-in, with their recall@k against the exact search measured when built (`ann`).
    """

    def __init__(self, folder: str | os.PathLike, search: str = "exact", **search_options):
        """Open the index in `folder` (prefer [`RetrievalIndex.load`])."""
        self._folder = Path(folder)
        self.path: Path | None = self._folder
        self._checked_fingerprints: set[str] = set()  # models already checked against this index (warn once)
        self._cleanup = None
        self._open()
        self.use_search(search, **search_options)

    def _open(self) -> None:
        meta = read_manifest(self._folder)
        shards = open_shards(self._folder, meta)
        self._meta, self._shards = meta, shards
        size = meta["shard_size"]
        self.model_name, self.model_fingerprint = meta["model_name"], meta["model_fingerprint"]
        self.max_length, self.clean_text = meta["max_length"], meta["clean_text"]
        self.embed_dim, self.shard_size = meta["embed_dim"], size
        self._columns = {m: EmbeddingColumn(shards[m], size) for m in MODALITIES}
        self.images = ItemColumn(shards["images"], size, "item")
        self.image_ids = ItemColumn(shards["images"], size, "id")
        self.texts = ItemColumn(shards["texts"], size, "item")
        self.text_ids = ItemColumn(shards["texts"], size, "id")
        self._searchers: dict = {}

    @classmethod
    def load(cls, path: str | os.PathLike, search: str = "exact", **search_options) -> RetrievalIndex:
        """Open a saved index (`save`, or `build_index(path=...)`): every shard is checked, nothing is read into memory
        but the manifest. `search` picks the candidate search (see `use_search`); `search_options` override an
        approximate index's search parameters (e.g. `nprobe=64`, `efSearch=512`)."""
        path = Path(path)
        if not (path / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a retrieval index (no {INDEX_FILE}); build one first")
        return cls(path, search=search, **search_options)

    @property
    def num_images(self) -> int:
        return self._meta["images"]["count"]

    @property
    def num_texts(self) -> int:
        return self._meta["texts"]["count"]

    @property
    def has_image_states(self) -> bool:
        """Whether image tower states are cached for some images (re-ranking them needs no image file)."""
        return self._meta["images"]["states"]

    def embeddings(self, modality: str) -> EmbeddingColumn:
        """The memory-mapped embeddings of `"images"` or `"texts"`."""
        return self._columns[_modality(modality)]

    @property
    def image_embeds(self) -> torch.Tensor | None:
        """Every image embedding in one tensor (read into memory: num_images x embed_dim floats)."""
        return self._columns["images"].to_tensor() if self.num_images else None

    @property
    def text_embeds(self) -> torch.Tensor | None:
        """Every text embedding in one tensor (read into memory: num_texts x embed_dim floats)."""
        return self._columns["texts"].to_tensor() if self.num_texts else None

    @property
    def ann(self) -> dict[str, dict]:
        """The approximate indexes built for each modality: factory string, search parameters, measured recall."""
        return {m: dict(self._meta[m]["ann"]) for m in MODALITIES}

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (
            f"RetrievalIndex(images={self.num_images}, texts={self.num_texts}, model={self.model_name!r}, "
            f"image_states={'cached' if self.has_image_states else 'recomputed'}, search={self.search_name!r}{where})"
        )

    # ----- cached tower states ------------------------------------------------------------------------------------
    def cached_states(self, indices: torch.Tensor) -> torch.Tensor:
        """Whether the tower states of the images at `indices` are cached (a bool tensor)."""
        cached = torch.zeros(len(indices), dtype=torch.bool)
        if self.has_image_states:
            for where, shard, rows in self._columns["images"]._by_shard(indices.cpu().long()):
                if shard.state_files:
                    cached[where] = shard.state_lookup().index_select(0, rows)[:, 0] >= 0
        return cached

    def image_states(self, indices: torch.Tensor) -> torch.Tensor:
        """Cached image tower states of the images at `indices` (read from the memory-mapped state files)."""
        indices = indices.cpu().long()
        cached = self.cached_states(indices)
        if not cached.all():
            raise ValueError(f"image {indices[~cached][0].item()} of the index has no cached tower states")
        out = None
        for where, shard, rows in self._columns["images"]._by_shard(indices):
            lookup = shard.state_lookup().index_select(0, rows)
            for file_number in torch.unique(lookup[:, 0]).tolist():
                in_file = torch.nonzero(lookup[:, 0] == file_number).flatten()
                states = shard.states(file_number).index_select(0, lookup[in_file, 1])
                if out is None:
                    out = states.new_empty((len(indices), *states.shape[1:]))
                out.index_copy_(0, where.index_select(0, in_file), states)
        return out

    # ----- search -------------------------------------------------------------------------------------------------
    def use_search(self, search: str = "exact", **options) -> RetrievalIndex:
        """Pick the candidate search: `"exact"` (faiss `IndexFlatIP` when faiss is installed, else `"torch"`),
        `"torch"` (exact, streamed from the memory-mapped shards; no dependency), `"flat"` (faiss `IndexFlatIP`,
        the embeddings in memory), or the name of an approximate index built with `build_ann` (`"ivf"`, `"hnsw"`,
        `"pq"`, `"ivfpq"`, ...) for the modality searched; `options` override its search parameters (`nprobe`,
        `efSearch`)."""
        if not isinstance(search, str):
            raise ValueError(f"search must be a string, got {type(search).__name__}")
        known = {"exact", "torch", "flat"} | set(ANN_KINDS) | {n for m in MODALITIES for n in self._meta[m]["ann"]}
        if search not in known:
            raise ValueError(f"unknown search {search!r}; expected {SEARCH_HELP}")
        if search not in ("exact", "torch"):
            import_faiss()
        self.search_name, self._search_options, self._searchers = search, dict(options), {}
        return self

    def _searcher(self, modality: str, device):
        name = self.search_name
        if name == "exact":
            name = "flat" if faiss_available() else "torch"
        key = (modality, name, str(device) if name == "torch" else None)
        if key in self._searchers:
            return self._searchers[key]
        column = self._columns[modality]
        if name == "torch":
            searcher = TorchExactSearch(column, device)
        elif name == "flat":
            searcher = FaissSearch(flat_index(column), column, "flat", exact=True)
        else:
            entry = self._meta[modality]["ann"].get(name)
            if entry is None:
                raise ValueError(
                    f"the index has no approximate search {name!r} for its {modality}; build it with "
                    f"index.build_ann({name!r}) or `albef retrieve --index {self.path or 'DIR'} --build-ann {name}`"
                )
            file = self._folder / ANN_DIR / entry["file"]
            searcher = FaissSearch(
                self._read_ann(file, len(column)),
                column,
                name,
                exact=False,
                parameters={**entry["parameters"], **self._search_options},
            )
        self._searchers = {k: v for k, v in self._searchers.items() if k[0] != modality}  # one per modality
        self._searchers[key] = searcher
        return searcher

    @staticmethod
    def _read_ann(file: Path, count: int):
        faiss = import_faiss()
        if not file.is_file():
            raise IndexFormatError(file, "missing; expected a faiss index file", "build it again with build_ann")
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise IndexFormatError(file, f"not a faiss index ({first})", "build it again with build_ann") from None
        if index.ntotal != count:
            raise IndexFormatError(
                file, f"holds {index.ntotal} vectors; expected {count}", "build it again with build_ann"
            )
        return index

    def search(
        self, modality: str, queries: torch.Tensor, k: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top `k` items of `modality` ("images", "texts") for each query embedding, by ITC similarity (inner
        product), best first: `(scores (Q, k), positions (Q, k))` on the CPU. An approximate search may find fewer
        than `k` for a query (position -1, score -inf)."""
        modality = _modality(modality)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise ValueError(f"queries must be (N, {self.embed_dim}) embeddings, got shape {tuple(queries.shape)}")
        count = len(self._columns[modality])
        if not 1 <= k <= count:
            raise ValueError(f"k={k} is not between 1 and the {count} {modality} in the index")
        return self._searcher(modality, device).search(queries.detach(), k)

    def build_ann(
        self,
        kind: str,
        modalities: str | Sequence[str] | None = None,
        queries: torch.Tensor | None = None,
        recall_queries: int = 512,
        name: str | None = None,
        seed: int = 0,
        **options,
    ) -> dict[str, dict]:
        """
        Build an approximate faiss index (`kind`: `"ivf"`, `"hnsw"`, `"pq"`, `"ivfpq"` (see `ANN_KINDS`; options
        such as `nlist`, `nprobe`, `M`, `efSearch`, `m`), or `factory="..."` with a `name`) over the embeddings of
        `modalities` (default: every modality the index holds) and save it into the index folder (temporary file,
        renamed), with its recall@16 and @256 against the exact search: measured on `queries` (embeddings of the
        other modality), by default up to `recall_queries` embeddings of the other modality of the index (its own
        when it holds one modality). Returns each modality's entry (also in `ann`). Select it with
        `use_search(name)` / `load(path, search=name)`.
        """
        import_faiss()
        name = name or kind
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"name must be letters, digits, - and _, got {name!r}")
        if name in ("exact", "torch", "flat"):
            raise ValueError(f"{name!r} is the name of an exact search; give the approximate index another name")
        if modalities is None:
            modalities = [m for m in MODALITIES if len(self._columns[m])]
        modalities = [_modality(m) for m in ([modalities] if isinstance(modalities, str) else modalities)]
        built = {}
        for modality in modalities:
            column = self._columns[modality]
            if not len(column):
                raise ValueError(f"the index holds no {modality}")
            spec = ann_spec(kind, len(column), column.dim, **options)
            started = time.perf_counter()
            index = build_ann(column, spec, seed=seed)
            seconds = time.perf_counter() - started
            (self._folder / ANN_DIR).mkdir(exist_ok=True)
            file = f"{modality}-{name}.faiss"
            temporary = self._folder / ANN_DIR / f".{file}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                import_faiss().write_index(index, str(temporary))
                os.replace(temporary, self._folder / ANN_DIR / file)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            other = "texts" if modality == "images" else "images"
            sample = queries
            source = "given queries"
            if sample is None:
                source_column = self._columns[other] if len(self._columns[other]) else column
                source = other if source_column is not column else f"{modality} (the index's own)"
                rng = np.random.default_rng(seed)
                rows = rng.choice(len(source_column), min(recall_queries, len(source_column)), replace=False)
                sample = source_column.rows(torch.from_numpy(np.sort(rows)))
            approximate = FaissSearch(index, column, name, exact=False, parameters=spec.parameters)
            recall = recall_against_exact(approximate, TorchExactSearch(column), sample.float())
            entry = {
                "kind": kind,
                "factory": spec.factory,
                "file": file,
                "parameters": spec.parameters,
                "recall": recall,
                "recall_queries": f"{len(sample)} {source}",
                "build_seconds": round(seconds, 2),
                "bytes": (self._folder / ANN_DIR / file).stat().st_size,
            }
            self._meta[modality]["ann"][name] = entry
            write_json_atomic(self._folder / INDEX_FILE, self._meta)
            self._searchers = {}
            built[modality] = entry
        return built

    # ----- saving -------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Copy the index to the folder `path` atomically (into a temporary folder next to it, then renamed); the
        object then reads from there."""
        path = Path(path)
        if path.resolve() == self._folder.resolve():
            return path
        check_replaceable(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(self._folder, folder, ignore=shutil.ignore_patterns(".*"))
            move_into_place(folder, path, overwrite)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._folder = self.path = path
        self._open()
        if self._cleanup is not None:
            self._cleanup()  # the temporary folder it was built in
            self._cleanup = None
        return path

    @classmethod
    def from_embeddings(
        cls,
        path: str | os.PathLike | None = None,
        image_embeds=None,
        text_embeds=None,
        images: Sequence[str | None] | None = None,
        texts: Sequence[str] | None = None,
        image_ids: Sequence | None = None,
        text_ids: Sequence | None = None,
        model_name: str = "",
        model_fingerprint: str = "",
        max_length: int = 30,
        clean_text: str | None = "caption",
        shard_size: int = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        resume: bool = True,
        distributed: bool | None = None,
        search: str = "exact",
    ) -> RetrievalIndex:
        """
        An index of precomputed, L2-normalised embeddings ((N, dim) tensors or numpy arrays, memory-mapped ones
        included), written shard by shard as [`RetrievalEngine.build_index`] does (at `path`, or in a temporary
        folder). `images` (file paths) and `texts` are what the items refer to; without them the index can be
        searched with `score="itc"` only. `model_fingerprint` ties the index to a model (`model_fingerprint(model)`).
        """
        sources = {"images": image_embeds, "texts": text_embeds}
        if all(v is None for v in sources.values()):
            raise ValueError("the corpus is empty: pass image_embeds, text_embeds or both")
        _check_new_search(search)
        for modality, embeds in sources.items():
            if embeds is not None and getattr(embeds, "ndim", None) != 2:
                raise ValueError(
                    f"{modality[:-1]}_embeds must be an (N, dim) tensor or array, got {type(embeds).__name__}"
                )
        dims = {len(v[0]) if len(v) else 0 for v in sources.values() if v is not None}
        if len(dims) != 1 or 0 in dims:
            raise ValueError(f"embeddings must be non-empty (N, dim) arrays of one dim, got dims {sorted(dims)}")
        items = {"images": images, "texts": texts}
        ids = {"images": image_ids, "texts": text_ids}
        for modality, embeds in sources.items():
            if embeds is None:
                continue
            if items[modality] is not None and len(items[modality]) != len(embeds):
                raise ValueError(f"{len(items[modality])} {modality} for {len(embeds)} embeddings")
            if ids[modality] is not None:
                ids[modality] = _check_ids(ids[modality], len(embeds), modality[:-1])
        settings = _build_settings(model_fingerprint, dims.pop(), max_length, clean_text, shard_size, None, ids)
        path = Path(path) if path is not None else None
        build = ShardedBuild(path, settings, overwrite, resume, ProcessGroup(distributed if path else False))
        counts, error = {}, None
        try:
            for modality, embeds in sources.items():
                counts[modality] = 0
                if embeds is None:
                    continue

                def encode(part, refs, shard_ids, writer, embeds=embeds):
                    writer.add(torch.as_tensor(np.asarray(part.items), dtype=torch.float32), refs, shard_ids)

                def refs_of(part, values=items[modality]):
                    return [None] * len(part.items) if values is None else list(values[part.start : part.stop])

                counts[modality] = _fill_modality(build, modality, embeds, ids[modality], refs_of, encode)
        except BaseException as caught:  # every process reports to the others before anyone raises
            error = caught
        meta = {"model_name": model_name, "model_fingerprint": model_fingerprint}
        return _open_built(build, counts, error, meta, search)


def _modality(modality: str) -> str:
    aliases = {"image": "images", "images": "images", "text": "texts", "texts": "texts"}
    if modality not in aliases:
        raise ValueError(f"modality must be 'images' or 'texts', got {modality!r}")
    return aliases[modality]


def _build_settings(fingerprint, embed_dim, max_length, clean_text, shard_size, cache_image_states, ids) -> dict:
    """What the shards of a build depend on: a resumed build must have the same."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    return {
        "format": INDEX_FORMAT,
        "model_fingerprint": fingerprint,
        "embed_dim": int(embed_dim),
        "max_length": max_length,
        "clean_text": clean_text,
        "shard_size": shard_size,
        "cache_image_states": cache_image_states,
        "image_ids": ids["images"] is not None,
        "text_ids": ids["texts"] is not None,
    }


def _fill_modality(build: ShardedBuild, modality: str, source, ids, refs_of, encode) -> int:
    """Write this process's shards of one modality (those an interrupted build finished are checked and kept);
    returns the number of items in the corpus. `refs_of(part)` gives the items' references (paths, texts),
    `encode(part, refs, ids, writer)` writes the rows."""
    what = modality[:-1]
    total = 0
    for part in corpus_shards(source, build.shard_size, build.mine):
        if isinstance(part, int):
            total += part
            continue
        count = len(part.items)
        refs = refs_of(part)
        shard_ids = None
        if ids is not None:
            shard_ids = list(ids[part.start : part.stop])
            if len(shard_ids) != count:
                raise ValueError(f"got {len(ids)} {what} ids for more {what}s; expected one id per {what}")
        done = build.finished_shard(modality, part.number, part.start, count)
        if done is not None:
            _check_resumed_shard(done, refs, shard_ids, what)
        else:
            writer = build.writer(modality, part.number, part.start, ids is not None)
            try:
                encode(part, refs, shard_ids, writer)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        total += count
    if ids is not None and len(ids) != total:
        raise ValueError(f"got {len(ids)} {what} ids for {total} {what}s; expected one id per {what}")
    return total


def _check_resumed_shard(shard, refs: list, ids: list | None, what: str) -> None:
    """A shard kept from an interrupted build must hold the items the corpus has there now."""
    for name, now in (("item", refs), ("id", ids)):
        if now is None:
            continue
        then = shard.column(name)
        if then != now:
            row = next(r for r, (a, b) in enumerate(zip(then, now)) if a != b)
            raise ValueError(
                f"{shard.folder}: the interrupted build wrote this shard for other {what}s ({what} "
                f"{shard.start + row}: {then[row]!r:.80} then, {now[row]!r:.80} now); the corpus changed: pass "
                "resume=False (--no-resume) to start over"
            )


def _open_built(build: ShardedBuild, counts, error, meta: dict, search: str) -> RetrievalIndex:
    """Finish a build on every process and open the index; a temporary one is removed with the object."""
    folder = build.complete(counts, error, meta)
    try:
        index = RetrievalIndex(folder, search=search)
    except BaseException:
        if build.scratch:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if build.scratch:
        index.path = None
        index._cleanup = weakref.finalize(index, shutil.rmtree, folder, True)
    return index


def _check_new_search(search: str) -> None:
    """The search asked for a new index: an exact one or an approximate kind (built later with `build_ann`)."""
    if search not in ("exact", "torch", "flat", *ANN_KINDS):
        raise ValueError(f"unknown search {search!r}; expected {SEARCH_HELP}")


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
        batch_size: images or texts per tower forward (and query texts per search batch).
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

    # ----- indexing -----------------------------------------------------------------------------------------------
    def build_index(
        self,
        images: Iterable | torch.Tensor | None = None,
        texts: Iterable[str] | None = None,
        image_ids: Sequence | None = None,
        text_ids: Sequence | None = None,
        path: str | os.PathLike | None = None,
        overwrite: bool = False,
        cache_image_states: bool | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        resume: bool = True,
        distributed: bool | None = None,
        search: str = "exact",
    ) -> RetrievalIndex:
        """
        Index a corpus: the ITC embedding of every image and text, computed `batch_size` at a time while the items
        are streamed, written in shards of `shard_size` items.

        Args:
            images: any iterable of PIL images, image file paths or `datasets` image dicts (e.g. `dataset["image"]`,
                decoded or not), a folder of images, or a `(N, 3, H, W)` pixel tensor. Read once (per process).
            texts: any iterable of strings (captions).
            image_ids / text_ids: an id per item (unique strings or ints, a sequence); default: positions.
            path: save the index to this folder. The build writes into `.NAME.build` next to it: every finished shard
                stays there if the build is interrupted, and the next build with the same settings resumes from
                them; the folder is renamed to `path` when complete, so `path` never holds a half-written index.
                Without a path the index lives in a temporary folder until it is saved or garbage-collected.
            overwrite: replace an index already at `path` (never a file or a folder that is not an index).
            cache_image_states: keep the image tower states in the shards (memory-mapped when read) so re-ranking
                needs no image file. Default (None): only for the images that cannot be reloaded from a file
                (in-memory PIL images, pixel tensors). With `False` those can only be searched with `score="itc"`.
            shard_size: items per shard (the unit of resumption and of work between processes).
            resume: reuse the shards of an interrupted build at `path` (checked against the corpus); `False` discards
                them.
            distributed: with a `path`, split the shards between the torch.distributed processes (torchrun,
                `accelerate launch`; default: when initialised with several). Call it on every process with the same
                corpus: each embeds every `world_size`-th shard, the main process checks them all and moves the
                index into place, and every process returns it.
            search: the candidate search of the returned index (see [`RetrievalIndex.use_search`]).
        """
        if images is None and texts is None:
            raise ValueError("the corpus is empty: pass images, texts or both")
        _check_new_search(search)
        if isinstance(images, (str, os.PathLike)):
            images = list_image_files(images) if os.path.isdir(images) else [images]
        if isinstance(texts, str):
            texts = [texts]
        ids = {"images": image_ids, "texts": text_ids}
        for items, modality in ((images, "images"), (texts, "texts")):
            if ids[modality] is not None:
                if items is None:
                    raise ValueError(f"{modality[:-1]}_ids without {modality}")
                count = len(items) if hasattr(items, "__len__") else None
                ids[modality] = _check_ids(ids[modality], count, modality[:-1])
        if _is_pixel_tensor(images):
            _check_pixel_tensor(images, "images")
        model = self.model
        fingerprint = model_fingerprint(model)
        settings = _build_settings(
            fingerprint,
            model.config.embed_dim,
            self.max_length,
            self.tokenizer.clean_text,
            shard_size,
            cache_image_states,
            ids,
        )
        path = Path(path) if path is not None else None
        processes = ProcessGroup(distributed if path is not None else False)
        build = ShardedBuild(path, settings, overwrite, resume, processes)
        counts, error = {"images": 0, "texts": 0}, None
        try:
            with _evaluating(model):
                if images is not None:
                    counts["images"] = self._index_images(build, images, ids["images"], cache_image_states)
                    if not counts["images"]:
                        raise ValueError("the image corpus is empty; expected at least one image")
                if texts is not None:
                    counts["texts"] = self._index_texts(build, texts, ids["texts"])
                    if not counts["texts"]:
                        raise ValueError("texts is empty; expected at least one text")
        except BaseException as caught:  # every process reports to the others before anyone raises
            error = caught
        meta = {"model_name": str(getattr(model, "name_or_path", "") or ""), "model_fingerprint": fingerprint}
        return _open_built(build, counts, error, meta, search)

    def _index_images(self, build: ShardedBuild, images, ids, cache_image_states: bool | None) -> int:
        """This process's image shards: ITC embeddings, references, and tower states where they are cached."""
        model, tensor = self.model, _is_pixel_tensor(images)
        show = self.progress and build.processes.rank == 0
        bar = _progress(len(images) if hasattr(images, "__len__") else None, "indexing images", "image", show)
        uncached = []

        def refs_of(part):
            return [None] * len(part.items) if tensor else [_image_reference(item) for item in part.items]

        def encode(part, refs, shard_ids, writer):
            for start in range(0, len(refs), self.batch_size):
                batch = part.items[start : start + self.batch_size]
                if not tensor:
                    batch = self._pixels([_open_image(item, part.start + start + j) for j, item in enumerate(batch)])
                states, embeds = _image_tower(model, batch)
                batch_refs = refs[start : start + len(embeds)]
                if cache_image_states is None:
                    rows = [j for j, ref in enumerate(batch_refs) if ref is None]
                else:
                    rows = list(range(len(batch_refs))) if cache_image_states else []
                    uncached.extend(j for j, ref in enumerate(batch_refs) if ref is None and not cache_image_states)
                batch_ids = shard_ids[start : start + len(embeds)] if shard_ids is not None else None
                rows = torch.tensor(rows, dtype=torch.long)
                writer.add(embeds, batch_refs, batch_ids, states[rows.to(states.device)] if len(rows) else None, rows)
                bar.update(len(embeds))

        try:
            count = _fill_modality(build, "images", images, ids, refs_of, encode)
        finally:
            bar.close()
        if uncached:
            logger.warning(
                "some indexed images have no file to reload them from and their tower states are not cached: they can "
                "only be searched with score='itc'"
            )
        return count

    def _index_texts(self, build: ShardedBuild, texts, ids) -> int:
        show = self.progress and build.processes.rank == 0
        bar = _progress(len(texts) if hasattr(texts, "__len__") else None, "indexing texts", "text", show)
        too_long: list[int] = []

        def refs_of(part):
            for row, text in enumerate(part.items):
                if not isinstance(text, str):
                    raise ValueError(
                        f"texts[{part.start + row}] must be a string, got {type(text).__name__} {text!r:.80}"
                    )
            return list(part.items)

        def encode(part, refs, shard_ids, writer):
            for start in range(0, len(refs), self.batch_size):
                batch = refs[start : start + self.batch_size]
                input_ids, mask = self.tokenizer(batch, "text", offset=part.start + start, too_long=too_long)
                embeds = _text_tower(self.model, input_ids, mask)[1]
                writer.add(embeds, batch, shard_ids[start : start + len(batch)] if shard_ids is not None else None)
                bar.update(len(batch))

        try:
            count = _fill_modality(build, "texts", texts, ids, refs_of, encode)
        finally:
            bar.close()
        self.tokenizer.warn_truncated(too_long, "text")
        return count

    def _pixels(self, pil_images: list) -> torch.Tensor:
        return self.processor.image_processor(pil_images, return_tensors="pt")["pixel_values"]

    def load_index(self, path: str | os.PathLike, search: str = "exact", **search_options) -> RetrievalIndex:
        """Load a saved index and check that it fits this engine's model (embedding size; a different weight
        fingerprint only warns: the ranking would be meaningless unless it is the same model). `search` and
        `search_options`: see [`RetrievalIndex.load`]."""
        index = RetrievalIndex.load(path, search=search, **search_options)
        self._check_index(index)
        return index

    def _check_index(self, index: RetrievalIndex) -> None:
        if (index.num_images or index.num_texts) and index.embed_dim != self.model.config.embed_dim:
            raise ValueError(
                f"the index holds {index.embed_dim}-d embeddings but the model's embed_dim is "
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

    # ----- search -------------------------------------------------------------------------------------------------
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
        `model.config.retrieval_k`, capped at the corpus size; found by the index's search, exact unless an
        approximate one was chosen), re-ranked by `score` (`"itm"`: the ITM match logit, as the original;
        `"itm+itc"`: plus the ITC similarity, as LAVIS; `"itc"`: no re-ranking). One result per text. Queries are
        encoded, searched and re-ranked `batch_size` at a time: memory does not grow with the corpus.
        """
        _check_score_mode(score)
        _check_itm_head(self.model, score)
        texts = _as_text_list(texts, "texts")
        if index.num_images == 0:
            raise ValueError("the index holds no images; build it with images=... to search text -> image")
        self._check_index(index)
        k = self._resolve_k(k, index.num_images, "images")
        too_long: list[int] = []
        results = []
        with _evaluating(self.model):
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                ids, mask = self.tokenizer(batch, "query text", offset=start, too_long=too_long)
                text_states, text_embeds = _text_tower(self.model, ids, mask)
                itc, top = index.search("images", text_embeds.float(), k, device=self.model.device)
                scores = itc.clone()
                if score != "itc":
                    valid = top >= 0
                    queries = torch.arange(len(ids))[:, None].expand_as(top)[valid]
                    candidates = top[valid]
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
                    scores = torch.full_like(itc, -math.inf)
                    scores[valid] = itm + itc[valid] if score == "itm+itc" else itm
                for row in range(len(ids)):
                    results.append(
                        self._result(batch[row], top[row], scores[row], itc[row], index.image_ids, index.images)
                    )
        self.tokenizer.warn_truncated(too_long, "query text")
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
            for refs, pixel_values in self._query_image_batches(images):
                image_states, image_embeds = [], []
                for b in range(0, len(pixel_values), self.batch_size):
                    states, embeds = _image_tower(self.model, pixel_values[b : b + self.batch_size])
                    image_states.append(states)
                    image_embeds.append(embeds)
                image_states, image_embeds = torch.cat(image_states), torch.cat(image_embeds)
                itc, top = index.search("texts", image_embeds.float(), k, device=self.model.device)
                scores = itc.clone()
                if score != "itc":
                    valid = top >= 0
                    # Only the candidates' texts are encoded again (their truncation was reported when indexing).
                    candidates, candidate_rows = torch.unique(top[valid], return_inverse=True)
                    candidate_texts = index.texts.take(candidates.tolist())
                    missing = [int(c) for c, t in zip(candidates, candidate_texts) if t is None]
                    if missing:
                        raise ValueError(
                            f"text {missing[0]} of the index was indexed without its text, so it cannot be re-ranked; "
                            "search with score='itc'"
                        )
                    ids, mask = self.tokenizer(candidate_texts, "indexed text", warn=False)
                    queries = torch.arange(len(refs))[:, None].expand_as(top)[valid]
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
                    )
                    scores = torch.full_like(itc, -math.inf)
                    scores[valid] = itm + itc[valid] if score == "itm+itc" else itm
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
        """Tower states of the index's images at `indices`: cached ones read from the shards, the others recomputed
        from their files."""
        model = self.model
        indices = indices.cpu()
        cached = index.cached_states(indices)
        if cached.all():
            return index.image_states(indices).to(model.device, model.dtype)
        recompute = indices[~cached]
        refs = index.images.take(recompute.tolist())
        missing = [i for i, ref in zip(recompute.tolist(), refs) if ref is None]
        if missing:
            raise ValueError(
                f"image {missing[0]} of the index has no file and the index keeps no tower states, so it cannot be "
                "re-ranked; rebuild the index with cache_image_states=True (or None), or search with score='itc'"
            )
        states = []
        for start in range(0, len(refs), self.batch_size):
            batch = refs[start : start + self.batch_size]
            where = recompute[start : start + len(batch)].tolist()
            pil_images = [_open_image(ref, f"{i} of the index") for i, ref in zip(where, batch)]
            states.append(_image_tower(model, self._pixels(pil_images))[0])
        states = torch.cat(states)
        if not cached.any():
            return states
        out = states.new_empty((len(indices), *states.shape[1:]))
        out[(~cached).to(out.device)] = states
        out[cached.to(out.device)] = index.image_states(indices[cached]).to(out.device, out.dtype)
        return out

    @staticmethod
    def _result(query, top, scores, itc, ids, items) -> RetrievalResult:
        found = top >= 0
        top, scores, itc = top[found], scores[found], itc[found]
        order = torch.argsort(scores, descending=True, stable=True)
        positions = top[order].tolist()
        return RetrievalResult(
            query=query,
            ids=ids.take(positions),
            items=items.take(positions),
            scores=scores[order].tolist(),
            itc_scores=itc[order].tolist(),
            indices=positions,
        )

    # ----- evaluation ---------------------------------------------------------------------------------------------
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
