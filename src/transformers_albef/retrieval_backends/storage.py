"""The on-disk retrieval index: shards of ITC embeddings in safetensors files (memory-mapped when read, through
`safetensors.safe_open`) with what each item refers to in Arrow IPC files, written atomically and resumably by one
or many processes.

An index folder (version 2)::

    index.json                       format marker, model and text settings, per modality: item count, shard sizes,
                                     whether ids / tower states are stored, the approximate search indexes built
    shards/images-000000/            one folder per shard of `shard_size` items (the last one may be shorter)
        shard.json                   its modality, number, first position, count, embedding size, state files
        embeddings.safetensors       `embeds`: (count, embed_dim) float32, L2-normalised
        items.arrow                  `item`: image path (null for an image without a file) or text; `id` (json) if
                                     ids were given
        states-000.safetensors       (optional) `states` (rows, tokens, hidden) and `rows` (their shard rows): cached
                                     image tower states, for images that cannot be reloaded from a file
    ann/images-hnsw.faiss            (optional) approximate search indexes (faiss)

A build writes into `.NAME.build` next to the target: each shard is written into a temporary folder and renamed
when complete, so a build that is killed keeps every finished shard and the next build with the same settings
resumes from them. When every shard is there, `index.json` is written and the build folder is renamed to the target
(the previous index, if any, is moved aside first and removed after the rename).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

INDEX_FORMAT = "transformers-albef-retrieval-index"
INDEX_VERSION = 2
INDEX_FILE = "index.json"
BUILD_FILE = "build.json"
SHARDS_DIR = "shards"
ANN_DIR = "ann"
SHARD_FILE = "shard.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
ITEMS_FILE = "items.arrow"
MODALITIES = ("images", "texts")
DEFAULT_SHARD_SIZE = 4096
# Cached tower states are flushed to a new file of the shard once this many bytes are pending.
STATE_FILE_BYTES = 256 * 2**20
_STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class IndexFormatError(ValueError):
    """A file of an index or of a build is not what this package writes: the message's first line names the path and
    what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str, remedy: str | None = None):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}" + (f"; {remedy}" if remedy else ""))


# ----- atomic writes -------------------------------------------------------------------------------------------------
def _hidden_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as json in `path`, through a temporary sibling renamed over it (readers see the old or the new file)."""
    temporary = _hidden_sibling(path, "tmp")
    try:
        temporary.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_json(path: Path, what: str, remedy: str | None) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(path, f"missing; expected the {what}", remedy) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFormatError(path, f"not valid json ({error}); expected the {what}", remedy) from None
    if not isinstance(data, dict):
        raise IndexFormatError(path, f"holds a json {type(data).__name__}; expected the {what} (an object)", remedy)
    return data


def _has_marker(file: Path) -> bool:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == INDEX_FORMAT


def is_index_folder(path: Path) -> bool:
    """Whether `path` is an index folder this package wrote (any version): its `index.json` says so or, when that is
    damaged, one of its shards' `shard.json` does."""
    if _has_marker(path / INDEX_FILE):
        return True
    shards = path / SHARDS_DIR
    return shards.is_dir() and any(_has_marker(shard / SHARD_FILE) for shard in itertools.islice(shards.iterdir(), 8))


def check_replaceable(path: Path, overwrite: bool) -> None:
    """Raise unless an index may be written at `path`: nothing there, an empty folder, or (with `overwrite`) an index
    this package wrote. Regular files and folders without the index marker are never replaced."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(
            f"{str(path)!r} is a file, not a retrieval index; not replacing it (overwrite only replaces an index "
            "folder written by transformers-albef): remove it yourself or choose another path"
        )
    if not is_index_folder(path):
        raise FileExistsError(
            f"{str(path)!r} is a folder without a transformers-albef {INDEX_FILE}, not a retrieval index; not "
            "replacing it: remove it yourself or choose another path"
        )


def move_into_place(folder: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished index `folder` to `path`. An existing index there (see `check_replaceable`) is renamed
    aside first, restored if the rename fails, and removed after it succeeded."""
    check_replaceable(path, overwrite)
    if not os.path.lexists(path):
        os.replace(folder, path)
        return
    old = _hidden_sibling(path, "old")
    os.replace(path, old)
    try:
        os.replace(folder, path)
    except BaseException:
        os.replace(old, path)  # the previous index stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----- shards --------------------------------------------------------------------------------------------------------
def shard_name(modality: str, number: int) -> str:
    return f"{modality}-{number:06d}"


class ShardWriter:
    """Writes one shard into a temporary folder (embeddings and items gathered in memory, cached tower states
    flushed to files of at most `STATE_FILE_BYTES`), renamed into `shards/` by `close`."""

    def __init__(self, shards_dir: Path, modality: str, number: int, start: int, with_ids: bool):
        self.shards_dir, self.modality, self.number, self.start = shards_dir, modality, number, start
        self.with_ids = with_ids
        self.folder = shards_dir / f".{shard_name(modality, number)}.tmp-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir()
        self.embeds: list[torch.Tensor] = []
        self.items: list[str | None] = []
        self.ids: list[str] = []
        self.count = 0
        self.state_files: list[dict] = []
        self.state_shape: list[int] | None = None
        self.state_dtype: str | None = None
        self._pending_states: list[torch.Tensor] = []
        self._pending_rows: list[torch.Tensor] = []
        self._pending_bytes = 0

    def add(
        self,
        embeds: torch.Tensor,
        items: Sequence[str | None],
        ids: Sequence | None = None,
        states: torch.Tensor | None = None,
        state_rows: torch.Tensor | None = None,
    ) -> None:
        """Append rows: their embeddings, items, ids, and the tower states of the rows `state_rows` (batch rows)."""
        if embeds.shape[0] != len(items):
            raise ValueError(f"{embeds.shape[0]} embeddings for {len(items)} items")
        if states is not None and len(state_rows):
            states = states.detach().cpu().contiguous()
            name = str(states.dtype).removeprefix("torch.")
            if name not in _STATE_DTYPES:
                states, name = states.float(), "float32"
            if self.state_shape is None:
                self.state_shape, self.state_dtype = list(states.shape[1:]), name
            elif list(states.shape[1:]) != self.state_shape or name != self.state_dtype:
                raise ValueError(
                    f"tower states of shape {tuple(states.shape[1:])} ({name}) after {tuple(self.state_shape)} "
                    f"({self.state_dtype})"
                )
            self._pending_states.append(states)
            self._pending_rows.append(state_rows.cpu().long() + self.count)
            self._pending_bytes += states.numel() * states.element_size()
            if self._pending_bytes >= STATE_FILE_BYTES:
                self._flush_states()
        self.embeds.append(embeds.detach().float().cpu())
        self.items.extend(items)
        if self.with_ids:
            self.ids.extend(json.dumps(i) for i in ids)
        self.count += len(items)

    def _flush_states(self) -> None:
        if not self._pending_states:
            return
        from safetensors.torch import save_file

        name = f"states-{len(self.state_files):03d}.safetensors"
        rows = torch.cat(self._pending_rows)
        save_file({"states": torch.cat(self._pending_states), "rows": rows}, self.folder / name)
        self.state_files.append({"file": name, "rows": len(rows)})
        self._pending_states, self._pending_rows, self._pending_bytes = [], [], 0

    def close(self) -> Path:
        """Write the shard's files and rename its folder into place; returns the final folder."""
        import pyarrow as pa
        from safetensors.torch import save_file

        self._flush_states()
        embeds = torch.cat(self.embeds).contiguous()
        save_file({"embeds": embeds}, self.folder / EMBEDDINGS_FILE, metadata={"format": INDEX_FORMAT})
        columns = {"item": pa.array(self.items, pa.large_string())}
        if self.with_ids:
            columns["id"] = pa.array(self.ids, pa.large_string())
        table = pa.table(columns)
        with pa.OSFile(str(self.folder / ITEMS_FILE), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        meta = {
            "format": INDEX_FORMAT,
            "modality": self.modality,
            "shard": self.number,
            "start": self.start,
            "count": self.count,
            "embed_dim": int(embeds.shape[1]),
            "ids": self.with_ids,
            "states": self.state_files,
            "state_shape": self.state_shape,
            "state_dtype": self.state_dtype,
        }
        (self.folder / SHARD_FILE).write_text(json.dumps(meta), encoding="utf-8")
        final = self.shards_dir / shard_name(self.modality, self.number)
        try:
            os.replace(self.folder, final)  # a shard is either complete or absent
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(self.folder, ignore_errors=True)  # another process finished the same shard first
        return final

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _check_type(path: Path, meta: dict, key: str, kinds, what: str, remedy: str | None):
    value = meta.get(key, _MISSING)
    if value is _MISSING:
        raise IndexFormatError(path, f"lacks {key!r}; expected {what}", remedy)
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise IndexFormatError(path, f"{key!r} is {value!r}; expected {what}", remedy)
    if not isinstance(value, kinds):
        raise IndexFormatError(path, f"{key!r} is {type(value).__name__} {value!r:.60}; expected {what}", remedy)
    return value


_MISSING = object()


def _open_safetensors(path: Path, what: str, remedy: str | None):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise IndexFormatError(path, f"missing; expected {what}", remedy)
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        raise IndexFormatError(
            path, f"truncated or not a safetensors file ({' '.join(str(error).split())}); expected {what}", remedy
        ) from None


def _tensor(handle, path: Path, name: str, dtype: torch.dtype, shape: tuple, what: str, remedy: str | None):
    """Tensor `name` of an open safetensors file (memory-mapped), checked against `dtype` and `shape` (None: any)."""
    if name not in handle.keys():
        raise IndexFormatError(
            path, f"holds no tensor {name!r} (has {sorted(handle.keys())}); expected {what}", remedy
        )
    tensor = handle.get_tensor(name)
    if (
        tensor.dtype != dtype
        or len(tensor.shape) != len(shape)
        or any(s is not None and s != t for s, t in zip(shape, tensor.shape))
    ):
        shown = tuple("*" if s is None else s for s in shape)
        raise IndexFormatError(
            path,
            f"tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} of shape {tuple(tensor.shape)}; expected "
            f"{what}: {str(dtype).removeprefix('torch.')} of shape {shown}",
            remedy,
        )
    return tensor


@dataclass
class Shard:
    """One shard read back: its embeddings memory-mapped, its items and cached states opened on demand."""

    folder: Path
    modality: str
    number: int
    start: int
    count: int
    embeds: torch.Tensor
    has_ids: bool
    state_files: list[tuple[Path, torch.Tensor]] = field(default_factory=list)
    state_shape: tuple | None = None
    state_dtype: torch.dtype | None = None
    _table: Any = field(default=None, repr=False)
    _state_lookup: torch.Tensor | None = field(default=None, repr=False)

    @property
    def stop(self) -> int:
        return self.start + self.count

    def table(self):
        """The items table (Arrow, memory-mapped)."""
        if self._table is None:
            self._table = _read_items(self.folder / ITEMS_FILE, self.count, self.has_ids, None)
        return self._table

    def column(self, name: str, rows: Sequence[int] | None = None) -> list:
        """Item references / texts (`"item"`) or ids (`"id"`) of the shard rows `rows` (default: all)."""
        import pyarrow as pa

        if name == "id" and not self.has_ids:
            return [self.start + r for r in (range(self.count) if rows is None else rows)]
        values = self.table().column(name)
        if rows is not None:
            values = values.take(pa.array(rows, pa.int64()))
        values = values.to_pylist()
        return [json.loads(v) for v in values] if name == "id" else values

    def state_lookup(self) -> torch.Tensor:
        """(count, 2): for each row, (state file number, position in it), or (-1, -1) when not cached."""
        if self._state_lookup is None:
            lookup = torch.full((self.count, 2), -1, dtype=torch.long)
            for number, (_, rows) in enumerate(self.state_files):
                lookup[rows, 0] = number
                lookup[rows, 1] = torch.arange(len(rows))
            self._state_lookup = lookup
        return self._state_lookup

    def states(self, file_number: int) -> torch.Tensor:
        with _open_safetensors(self.state_files[file_number][0], "cached tower states", None) as handle:
            return handle.get_tensor("states")


def _read_items(path: Path, count: int, has_ids: bool, remedy: str | None):
    import pyarrow as pa

    if not path.is_file():
        raise IndexFormatError(path, f"missing; expected the items of the shard ({count} rows)", remedy)
    try:
        source = pa.memory_map(str(path), "r")
        try:
            table = pa.ipc.open_file(source).read_all()
        finally:
            source.close()  # the table keeps the mapping, not the file descriptor
    except (pa.ArrowException, OSError) as error:
        raise IndexFormatError(
            path,
            f"truncated or not an Arrow IPC file ({' '.join(str(error).split())}); expected {count} items",
            remedy,
        ) from None
    expected = {"item", "id"} if has_ids else {"item"}
    if set(table.column_names) != expected or table.num_rows != count:
        raise IndexFormatError(
            path,
            f"holds columns {table.column_names} and {table.num_rows} rows; expected columns {sorted(expected)} and "
            f"{count} rows",
            remedy,
        )
    for name in expected:
        if not pa.types.is_large_string(table.schema.field(name).type):
            raise IndexFormatError(
                path, f"column {name!r} is {table.schema.field(name).type}; expected large_string", remedy
            )
    return table


def read_shard(
    folder: Path,
    modality: str,
    number: int,
    start: int,
    count: int | None,
    embed_dim: int | None,
    remedy: str | None,
    check_items: bool = True,
) -> Shard:
    """Open and check one shard: every fault raises an `IndexFormatError` naming the file and what was expected."""
    if not folder.is_dir():
        expected = f"{count} items" if count is not None else "items"
        raise IndexFormatError(folder, f"missing shard {number} of the {modality}; expected {expected}", remedy)
    path = folder / SHARD_FILE
    meta = _read_json(path, f"description of shard {number} of the {modality}", remedy)
    if meta.get("format") != INDEX_FORMAT:
        raise IndexFormatError(path, f"format is {meta.get('format')!r}; expected {INDEX_FORMAT!r}", remedy)
    got_modality = _check_type(path, meta, "modality", str, f"{modality!r}", remedy)
    got_number = _check_type(path, meta, "shard", int, f"the shard number {number}", remedy)
    got_start = _check_type(path, meta, "start", int, f"the first position {start}", remedy)
    got_count = _check_type(path, meta, "count", int, "the number of items (an int >= 1)", remedy)
    dim = _check_type(path, meta, "embed_dim", int, "the embedding size (an int)", remedy)
    has_ids = _check_type(path, meta, "ids", bool, "true or false", remedy)
    state_files = _check_type(path, meta, "states", list, "a list of state files", remedy)
    if (got_modality, got_number, got_start) != (modality, number, start):
        raise IndexFormatError(
            path,
            f"describes shard {got_number} of the {got_modality} starting at {got_start}; expected shard {number} of "
            f"the {modality} starting at {start}",
            remedy,
        )
    if got_count < 1 or (count is not None and got_count != count):
        raise IndexFormatError(path, f"'count' is {got_count}; expected {count if count else 'an int >= 1'}", remedy)
    if embed_dim is not None and dim != embed_dim:
        raise IndexFormatError(path, f"'embed_dim' is {dim}; expected {embed_dim}", remedy)
    with _open_safetensors(folder / EMBEDDINGS_FILE, f"float32 embeddings of shape ({got_count}, {dim})", remedy) as f:
        embeds = _tensor(
            f, folder / EMBEDDINGS_FILE, "embeds", torch.float32, (got_count, dim), "the shard's embeddings", remedy
        )
    shard = Shard(folder, modality, number, start, got_count, embeds, has_ids)
    if check_items:
        shard._table = _read_items(folder / ITEMS_FILE, got_count, has_ids, remedy)
    if state_files:
        shape = meta.get("state_shape")
        dtype = _STATE_DTYPES.get(meta.get("state_dtype"))
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise IndexFormatError(path, f"'state_shape' is {shape!r}; expected a list of ints", remedy)
        if dtype is None:
            raise IndexFormatError(
                path, f"'state_dtype' is {meta.get('state_dtype')!r}; expected one of {sorted(_STATE_DTYPES)}", remedy
            )
        shard.state_shape, shard.state_dtype = tuple(shape), dtype
        seen = torch.zeros(got_count, dtype=torch.bool)
        for entry in state_files:
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and type(entry.get("rows")) is int):
                raise IndexFormatError(path, f"state file entry {entry!r:.80}; expected {{'file': str, 'rows': int}}")
            file = folder / Path(entry["file"]).name
            what = f"{entry['rows']} cached tower states of shape {tuple(shape)}"
            with _open_safetensors(file, what, remedy) as f:
                _tensor(f, file, "states", dtype, (entry["rows"], *shape), what, remedy)
                rows = _tensor(f, file, "rows", torch.long, (entry["rows"],), f"{entry['rows']} shard rows", remedy)
            if len(rows) and (rows.min() < 0 or rows.max() >= got_count or seen[rows].any()):
                raise IndexFormatError(file, f"'rows' holds rows outside 0..{got_count - 1} or repeated", remedy)
            seen[rows] = True
            shard.state_files.append((file, rows.clone()))
    return shard


# ----- columns over the shards ---------------------------------------------------------------------------------------
class EmbeddingColumn:
    """The embeddings of one modality across its shards, memory-mapped (nothing is read until used)."""

    def __init__(self, shards: list[Shard], shard_size: int):
        self.shards, self.shard_size = shards, shard_size
        self.count = sum(s.count for s in shards)
        self.dim = shards[0].embeds.shape[1] if shards else 0

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.dim)

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first position, embeddings) of consecutive blocks of at most `rows` rows (default: one per shard)."""
        for shard in self.shards:
            step = rows or shard.count
            for offset in range(0, shard.count, step):
                yield shard.start + offset, shard.embeds[offset : offset + step]

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The embeddings at `positions` (any shape of ints): a new tensor of shape (*positions.shape, dim)."""
        flat = positions.reshape(-1).cpu().long()
        out = torch.empty((len(flat), self.dim), dtype=torch.float32)
        for where, shard, rows in self._by_shard(flat):
            out.index_copy_(0, where, shard.embeds.index_select(0, rows))
        return out.view(*positions.shape, self.dim)

    def _by_shard(self, positions: torch.Tensor):
        """(slots in `positions`, shard, rows in the shard) for each shard `positions` (1-d, int64) falls in."""
        numbers = positions // self.shard_size
        for number in torch.unique(numbers).tolist():
            where = torch.nonzero(numbers == number).flatten()
            shard = self.shards[number]
            yield where, shard, positions.index_select(0, where) - shard.start

    def to_tensor(self) -> torch.Tensor:
        """Every embedding in one tensor in memory (count x dim x 4 bytes)."""
        if not self.shards:
            return torch.empty((0, self.dim))
        return torch.cat([s.embeds for s in self.shards])


class ItemColumn(Sequence):
    """Item references, texts or ids of one modality across its shards, read on demand from the Arrow files."""

    def __init__(self, shards: list[Shard], shard_size: int, name: str):
        self.shards, self.shard_size, self.name = shards, shard_size, name
        self.count = sum(s.count for s in shards)

    def __len__(self) -> int:
        return self.count

    def take(self, positions: Iterable[int]) -> list:
        """The values at `positions`, in that order."""
        positions = [int(p) for p in positions]
        by_shard: dict[int, list[int]] = {}
        for slot, position in enumerate(positions):
            if not 0 <= position < self.count:
                raise IndexError(f"position {position} outside 0..{self.count - 1}")
            by_shard.setdefault(position // self.shard_size, []).append(slot)
        out: list = [None] * len(positions)
        for number, slots in by_shard.items():
            shard = self.shards[number]
            values = shard.column(self.name, [positions[s] - shard.start for s in slots])
            for slot, value in zip(slots, values):
                out[slot] = value
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.take(range(*key.indices(self.count)))
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"positions are ints or slices, got {type(key).__name__}")
        if key < 0:
            key += self.count
        return self.take([key])[0]

    def __iter__(self):
        for shard in self.shards:
            yield from shard.column(self.name)

    def __eq__(self, other) -> bool:
        if isinstance(other, (ItemColumn, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        shown = self.take(range(min(3, self.count)))
        return f"ItemColumn({self.name}, {self.count} values: {shown}{' ...' if self.count > 3 else ''})"


# ----- the manifest --------------------------------------------------------------------------------------------------
def rebuild_hint(path: Path) -> str:
    return (
        f"rebuild the index: albef retrieve --images FOLDER --captions FILE --save-index {path} --overwrite "
        "(or RetrievalEngine.build_index(..., path=..., overwrite=True))"
    )


def read_manifest(path: Path) -> dict:
    """index.json of the index folder `path`, with its types checked (an `IndexFormatError` names what is wrong)."""
    file = path / INDEX_FILE
    remedy = rebuild_hint(path)
    meta = _read_json(file, "index description", remedy)
    if meta.get("format") != INDEX_FORMAT:
        raise IndexFormatError(file, f"format is {meta.get('format')!r}; not a transformers-albef retrieval index")
    version = meta.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > INDEX_VERSION:
        raise IndexFormatError(
            file,
            f"index version {version} was written by a newer transformers-albef; this one reads version "
            f"{INDEX_VERSION}",
            "upgrade transformers-albef or rebuild the index",
        )
    if version == 1:
        raise IndexFormatError(
            file,
            "a version-1 retrieval index (one embeddings.safetensors); this transformers-albef reads version "
            f"{INDEX_VERSION} (sharded, resumable)",
            remedy,
        )
    if version != INDEX_VERSION:
        raise IndexFormatError(file, f"'version' is {version!r}; expected {INDEX_VERSION}", remedy)
    for key, kinds, what in (
        ("model_name", str, "a string"),
        ("model_fingerprint", str, "a string"),
        ("max_length", int, "an int"),
        ("clean_text", (str, type(None)), "'caption' or null"),
        ("embed_dim", int, "an int"),
        ("shard_size", int, "an int >= 1"),
    ):
        _check_type(file, meta, key, kinds, what, remedy)
    if meta["shard_size"] < 1:
        raise IndexFormatError(file, f"'shard_size' is {meta['shard_size']}; expected an int >= 1", remedy)
    for modality in MODALITIES:
        entry = _check_type(file, meta, modality, dict, f"an object describing the {modality}", remedy)
        where = f"{modality}."
        count = _check_type(file, entry, "count", int, f"{where}count: the number of {modality}", remedy)
        shards = _check_type(file, entry, "shards", list, f"{where}shards: the shard sizes", remedy)
        _check_type(file, entry, "ids", bool, f"{where}ids: true or false", remedy)
        _check_type(file, entry, "states", bool, f"{where}states: true or false", remedy)
        _check_type(file, entry, "ann", dict, f"{where}ann: an object", remedy)
        for name, ann in entry["ann"].items():
            if not (
                isinstance(ann, dict) and isinstance(ann.get("file"), str) and isinstance(ann.get("parameters"), dict)
            ):
                raise IndexFormatError(
                    file,
                    f"{where}ann.{name} is {ann!r:.80}; expected {{'file': str, 'parameters': {{...}}, ...}}",
                    remedy,
                )
        if not all(type(s) is int and s >= 1 for s in shards):
            raise IndexFormatError(file, f"{where}shards is {shards!r:.80}; expected a list of ints >= 1", remedy)
        expected = _shard_counts(count, meta["shard_size"])
        if shards != expected:
            raise IndexFormatError(
                file,
                f"{where}shards {shards!r:.80} do not split {count} items into shards of {meta['shard_size']}; "
                f"expected {expected!r:.80}",
                remedy,
            )
    return meta


def _shard_counts(count: int, shard_size: int) -> list[int]:
    return [min(shard_size, count - start) for start in range(0, count, shard_size)]


def open_shards(path: Path, meta: dict) -> dict[str, list[Shard]]:
    """Every shard of the index at `path`, checked against its manifest."""
    remedy = rebuild_hint(path)
    shards = {}
    for modality in MODALITIES:
        counts = meta[modality]["shards"]
        shards[modality] = [
            read_shard(
                path / SHARDS_DIR / shard_name(modality, number),
                modality,
                number,
                number * meta["shard_size"],
                count,
                meta["embed_dim"],
                remedy,
                check_items=True,
            )
            for number, count in enumerate(counts)
        ]
    return shards


# ----- processes -----------------------------------------------------------------------------------------------------
class ProcessGroup:
    """The processes building one index: torch.distributed when it is initialised with several processes (torchrun,
    `accelerate launch` once a `PartialState` exists) and `distributed` allows it, else this process alone."""

    def __init__(self, distributed: bool | None):
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not active:
            raise ValueError(
                "distributed=True but torch.distributed is not initialised with several processes; launch with "
                "torchrun or `accelerate launch` and create the Accelerator / PartialState first"
            )
        self.active = active and distributed is not False
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    def all_gather(self, value) -> list:
        if not self.active:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def from_main(self, value):
        """Rank 0's `value` on every process."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, function: Callable[[], Any]):
        """`function()` on rank 0; its result on every process, its exception raised on every process."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = function()
            except Exception as caught:  # re-raised below, once every process has heard of it
                error = caught
        shared = self.from_main((result, _portable(error)))
        if error is not None:
            raise error
        if shared[1] is not None:
            raise _rebuilt(shared[1], 0)
        return shared[0]


def _portable(error: BaseException | None):
    """An exception as (type name, message), which pickles whatever the exception holds."""
    if error is None:
        return None
    for kind in (IndexFormatError, FileExistsError, FileNotFoundError, ValueError, OSError, KeyboardInterrupt):
        if isinstance(error, kind):
            return kind.__name__, str(error)
    return "RuntimeError", f"{type(error).__name__}: {error}"


def _rebuilt(portable: tuple[str, str], rank: int) -> BaseException:
    kind, message = portable
    cls = {
        "FileExistsError": FileExistsError,
        "FileNotFoundError": FileNotFoundError,
        "ValueError": ValueError,
        "IndexFormatError": ValueError,
        "OSError": OSError,
        "KeyboardInterrupt": RuntimeError,
    }.get(kind, RuntimeError)
    return cls(f"{message} (raised by process {rank} of the index build)")


# ----- the build -----------------------------------------------------------------------------------------------------
@dataclass
class CorpusShard:
    """This process's part of one shard of the corpus."""

    number: int
    start: int
    items: Any  # a list of items, or a slice of a tensor / array

    @property
    def stop(self) -> int:
        return self.start + len(self.items)


def corpus_shards(source, shard_size: int, mine: Callable[[int], bool]) -> Iterator[CorpusShard | int]:
    """Cut `source` into shards of `shard_size` items: a `CorpusShard` for this process's shards, the item count of
    the others (their items are skipped, not materialised). A sequence (len + indexing: a list, a `datasets` column,
    a tensor) is sliced; any other iterable is read once, in order."""
    if isinstance(source, (torch.Tensor, np.ndarray)) or (
        hasattr(source, "__len__") and hasattr(source, "__getitem__") and not isinstance(source, (str, bytes, dict))
    ):
        total = len(source)
        for number, start in enumerate(range(0, total, shard_size)):
            stop = min(start + shard_size, total)
            if not mine(number):
                yield stop - start
            elif isinstance(source, (torch.Tensor, np.ndarray)):
                yield CorpusShard(number, start, source[start:stop])
            else:
                yield CorpusShard(number, start, [source[i] for i in range(start, stop)])
        return
    iterator, number, start = iter(source), 0, 0
    while True:
        if mine(number):
            items = []
            for item in iterator:
                items.append(item)
                if len(items) == shard_size:
                    break
            if not items:
                return
            yield CorpusShard(number, start, items)
            size = len(items)
        else:
            size = 0
            for _ in iterator:
                size += 1
                if size == shard_size:
                    break
            if not size:
                return
            yield size
        number, start = number + 1, start + size
        if size < shard_size:
            return


class ShardedBuild:
    """
    The folder an index is built in, shared by the processes of a launch: `.NAME.build` next to `path` (a fresh
    temporary folder when there is no path). It keeps `build.json` (the settings every shard was computed with) and
    the finished shards; a build with the same settings resumes from them, one with other settings is refused until
    the folder is removed or `resume=False` discards it. `complete` writes `index.json` and renames the folder to
    `path` once every process is done.
    """

    def __init__(
        self,
        path: Path | None,
        settings: dict,
        overwrite: bool,
        resume: bool,
        processes: ProcessGroup,
    ):
        self.path, self.settings, self.overwrite, self.processes = path, settings, overwrite, processes
        self.shard_size = settings["shard_size"]
        if path is None:
            self.folder = Path(tempfile.mkdtemp(prefix="albef-index-"))
            self.scratch = True
        else:
            self.folder = path.parent / f".{path.name}.build"
            self.scratch = False
        self.shards_dir = self.folder / SHARDS_DIR
        self.resumed: dict[str, list[int]] = {m: [] for m in MODALITIES}
        self.written: dict[str, list[int]] = {m: [] for m in MODALITIES}
        if not self.scratch:
            self.resuming = processes.run_on_main(lambda: self._prepare(resume))
        else:
            self.shards_dir.mkdir()
            self.resuming = False
        if processes.active:
            processes.all_gather(None)  # nobody writes a shard before the folder is ready

    def _prepare(self, resume: bool) -> bool:
        check_replaceable(self.path, self.overwrite)  # refuse early, before any work
        build_file = self.folder / BUILD_FILE
        resuming = False
        if os.path.lexists(self.folder):
            if not (self.folder.is_dir() and build_file.is_file()):
                raise FileExistsError(
                    f"{str(self.folder)!r} exists but is not an index build folder of transformers-albef (no "
                    f"{BUILD_FILE}); not touching it: remove it yourself"
                )
            previous = _read_json(build_file, "settings of an interrupted build", f"remove {self.folder}")
            if previous.get("format") != INDEX_FORMAT:
                raise FileExistsError(f"{str(build_file)!r} was not written by transformers-albef; not touching it")
            if not resume:
                shutil.rmtree(self.folder)
            elif previous != self.settings:
                changed = sorted(
                    k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k)
                )
                details = ", ".join(f"{k}: {previous.get(k)!r} then, {self.settings.get(k)!r} now" for k in changed)
                raise ValueError(
                    f"{self.folder}: an interrupted build with other settings ({details}) is there; pass "
                    "resume=False (--no-resume) to discard its shards, or build with the same settings to resume it"
                )
            else:
                resuming = True
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            write_json_atomic(build_file, self.settings)
        for leftover in self.shards_dir.glob(".*.tmp-*"):  # shards a killed process was writing
            shutil.rmtree(leftover, ignore_errors=True)
        return resuming

    def mine(self, number: int) -> bool:
        """Shards are dealt round-robin: the same shard boundaries and contents whatever the number of processes."""
        return number % self.processes.world_size == self.processes.rank

    def finished_shard(self, modality: str, number: int, start: int, count: int) -> Shard | None:
        """The shard if an earlier (interrupted) build wrote it, checked; None if it is still to be computed."""
        folder = self.shards_dir / shard_name(modality, number)
        if not self.resuming or not folder.exists():
            return None
        remedy = f"delete {folder} to recompute that shard, or pass resume=False (--no-resume) to start over"
        shard = read_shard(folder, modality, number, start, count, self.settings.get("embed_dim"), remedy)
        self.resumed[modality].append(number)
        return shard

    def writer(self, modality: str, number: int, start: int, with_ids: bool) -> ShardWriter:
        self.written[modality].append(number)
        return ShardWriter(self.shards_dir, modality, number, start, with_ids)

    def complete(self, counts: dict[str, int] | None, error: BaseException | None, meta: dict) -> Path:
        """Every process calls this, failed or not: raises if any process failed (finished shards stay for a
        resume), else rank 0 checks every shard, writes index.json and moves the folder into place. Returns the
        index folder."""
        statuses = self.processes.all_gather((_portable(error), counts))
        if error is not None or any(s[0] is not None for s in statuses):
            self._abandon()
            if error is not None:
                raise error
            rank, (failure, _) = next((r, s) for r, s in enumerate(statuses) if s[0] is not None)
            raise _rebuilt(failure, rank)
        if any(s[1] != counts for s in statuses):
            raise ValueError(
                "the processes read different corpora (item counts per process: "
                f"{[s[1] for s in statuses]}); the corpus must be the same on every process"
            )
        try:
            self.processes.run_on_main(lambda: self._finish(counts, meta))
        except BaseException:
            if self.scratch:
                shutil.rmtree(self.folder, ignore_errors=True)
            raise
        return self.path if self.path is not None else self.folder

    def _finish(self, counts: dict[str, int], meta: dict) -> None:
        remedy = f"delete that shard folder and run the build again to recompute it ({self.folder})"
        manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **meta}
        for key in ("max_length", "clean_text", "embed_dim", "shard_size", "model_fingerprint"):
            manifest.setdefault(key, self.settings.get(key))
        for modality in MODALITIES:
            sizes = _shard_counts(counts.get(modality, 0), self.shard_size)
            has_ids, has_states = False, False
            for number, size in enumerate(sizes):
                shard = read_shard(
                    self.shards_dir / shard_name(modality, number),
                    modality,
                    number,
                    number * self.shard_size,
                    size,
                    manifest["embed_dim"],
                    remedy,
                )
                has_ids, has_states = shard.has_ids, has_states or bool(shard.state_files)
            for extra in self.shards_dir.glob(f"{modality}-*"):  # shards of a longer corpus in an earlier attempt
                number = extra.name.removeprefix(f"{modality}-")
                if number.isdigit() and int(number) >= len(sizes):
                    shutil.rmtree(extra)
            manifest[modality] = {"count": counts.get(modality, 0), "shards": sizes, "ids": has_ids}
            manifest[modality].update(states=has_states, ann={})
        write_json_atomic(self.folder / INDEX_FILE, manifest)
        (self.folder / BUILD_FILE).unlink(missing_ok=True)
        if self.path is not None:
            move_into_place(self.folder, self.path, self.overwrite)

    def _abandon(self) -> None:
        """After a failure: a scratch folder goes; a build folder stays for a resume unless it holds no shard."""
        if self.scratch:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.processes.rank == 0 and self.shards_dir.is_dir() and not any(self.shards_dir.iterdir()):
            shutil.rmtree(self.folder, ignore_errors=True)
