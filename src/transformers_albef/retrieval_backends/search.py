"""ITC candidate search over an index's embeddings (inner product of L2-normalised vectors = cosine similarity).

- `TorchExactSearch`: exact, no extra dependency; queries are taken `query_batch_size` at a time against blocks of
  the memory-mapped shards, with a running top-k (memory: one block of similarities, never the corpus).
- `FaissSearch`: faiss (`pip install transformers-albef[faiss]`). `IndexFlatIP` is exact (the corpus's embeddings in
  memory); the approximate indexes (`ANN_KINDS`: IVF, HNSW, PQ, IVF-PQ) are built once into the index folder, with
  their recall@k against the exact search measured and recorded when they are built. Whatever chose the candidates,
  their ITC similarity is recomputed exactly from the stored embeddings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .storage import EmbeddingColumn

FAISS_HINT = "install faiss: pip install 'transformers-albef[faiss]' (or faiss-cpu / faiss-gpu)"
RECALL_KS = (16, 256)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(f"this search needs faiss, which is not installed; {FAISS_HINT}") from None
    return faiss


def merge_top_k(best: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor], k: int):
    """The top `k` of two (scores, positions) candidate sets, per row."""
    scores, positions = torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1)
    scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
    return scores, positions.gather(1, order)


class TorchExactSearch:
    """Exact top-k by inner product with torch, streaming the embeddings block by block (at most `block_rows` rows,
    one shard by default) with a running top-k. Memory: one block of similarities (queries x block rows) on
    `device`, whatever the corpus size."""

    name = "torch"
    exact = True

    def __init__(self, column: EmbeddingColumn, device: torch.device | str = "cpu", block_rows: int = 65536):
        self.column, self.device, self.block_rows = column, torch.device(device), block_rows

    def search(self, queries: torch.Tensor, k: int, query_batch_size: int = 1024):
        """(scores (Q, k) float32, positions (Q, k) int64), best first, on the CPU."""
        all_scores, all_positions = [], []
        for q in range(0, len(queries), query_batch_size):
            batch = queries[q : q + query_batch_size].to(self.device, torch.float32)
            best = (
                batch.new_empty((len(batch), 0)),
                torch.empty((len(batch), 0), dtype=torch.long, device=self.device),
            )
            for start, block in self.column.blocks(self.block_rows):
                similarities = batch @ block.to(self.device, non_blocking=True).t()
                values, top = similarities.topk(min(k, similarities.shape[1]), dim=1)
                best = merge_top_k(best, (values, top + start), k)
            all_scores.append(best[0].cpu())
            all_positions.append(best[1].cpu())
        return torch.cat(all_scores), torch.cat(all_positions)


def flat_index(column: EmbeddingColumn):
    """A faiss `IndexFlatIP` holding the column's embeddings (added shard by shard)."""
    faiss = import_faiss()
    index = faiss.IndexFlatIP(column.dim)
    for _, block in column.blocks():
        index.add(np.ascontiguousarray(block.numpy(), dtype=np.float32))
    return index


class FaissSearch:
    """Search with a faiss index; approximate ones get their candidates' scores recomputed exactly."""

    def __init__(self, index, column: EmbeddingColumn, name: str, exact: bool, parameters: dict | None = None):
        self.index, self.column, self.name, self.exact = index, column, name, exact
        self.parameters = dict(parameters or {})

    def _apply_parameters(self, k: int) -> None:
        faiss = import_faiss()
        for key, value in self.parameters.items():
            if key == "efSearch":
                value = max(int(value), k)  # HNSW finds at most efSearch neighbours
            faiss.ParameterSpace().set_index_parameter(self.index, key, value)

    def search(self, queries: torch.Tensor, k: int, query_batch_size: int = 4096):
        """(scores (Q, k), positions (Q, k)) on the CPU, best first; an approximate index may find fewer than `k`
        candidates for a query: the missing slots have position -1 and score -inf."""
        self._apply_parameters(k)
        queries = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        scores, positions = [], []
        for q in range(0, len(queries), query_batch_size):
            values, top = self.index.search(queries[q : q + query_batch_size], k)
            scores.append(torch.from_numpy(values))
            positions.append(torch.from_numpy(top))
        scores, positions = torch.cat(scores), torch.cat(positions).long()
        if not self.exact:
            found = positions >= 0
            embeds = self.column.rows(positions.clamp(min=0))
            exact_scores = (embeds * torch.from_numpy(queries)[:, None, :]).sum(-1)
            scores = torch.where(found, exact_scores, torch.full_like(exact_scores, -math.inf))
            scores, order = scores.sort(dim=1, descending=True, stable=True)
            positions = torch.where(torch.isinf(scores), -1, positions.gather(1, order))
        return scores, positions


# ----- approximate indexes -------------------------------------------------------------------------------------------
@dataclass
class AnnSpec:
    """A faiss index factory string, the search parameters it is used with, and the training sample size."""

    factory: str
    parameters: dict
    train_size: int
    build: dict = field(default_factory=dict)


def _nlist(count: int) -> int:
    """IVF cells: about sqrt(N), a power of two, with >= 39 training points per cell (faiss's minimum)."""
    cells = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(count)))))
    return max(1, min(cells, count // 39))


def _pq_codes(dim: int) -> int:
    """PQ sub-quantisers: one byte per 8 dimensions (a divisor of dim)."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def ann_spec(kind: str, count: int, dim: int, **options) -> AnnSpec:
    """The faiss index for `kind` on `count` vectors of `dim`: ivf (`nlist`, `nprobe`), hnsw (`M`, `efConstruction`,
    `efSearch`), pq (`m`), ivfpq (`nlist`, `nprobe`, `m`), or `factory=` any faiss factory string (with
    `parameters=`)."""
    if "factory" in options:
        return AnnSpec(options["factory"], dict(options.get("parameters", {})), options.get("train_size", 65536))
    nlist = int(options.get("nlist", _nlist(count)))
    nprobe = int(options.get("nprobe", max(1, min(nlist, max(8, nlist // 16)))))
    m = int(options.get("m", _pq_codes(dim)))
    # k-means wants >= 39 points per centroid; PQ trains 256 centroids per sub-quantiser.
    if kind == "ivf":
        return AnnSpec(f"IVF{nlist},Flat", {"nprobe": nprobe}, max(39 * nlist, 4096))
    if kind == "hnsw":
        links = int(options.get("M", 32))
        parameters = {"efSearch": int(options.get("efSearch", 128))}
        return AnnSpec(f"HNSW{links}", parameters, 0, {"efConstruction": int(options.get("efConstruction", 40))})
    # "np": no polysemous training (codes reordered for Hamming filtering, which is not used; it was 30x slower).
    if kind == "pq":
        return AnnSpec(f"PQ{m}np", {}, 39 * 256)
    if kind == "ivfpq":
        return AnnSpec(f"IVF{nlist},PQ{m}np", {"nprobe": nprobe}, max(39 * nlist, 39 * 256))
    raise ValueError(f"unknown approximate index {kind!r}; expected one of {sorted(ANN_KINDS)} or factory=...")


ANN_KINDS = {
    "ivf": "inverted file (k-means cells), exact vectors: about sqrt(N) cells, nprobe = cells / 16 searched",
    "hnsw": "HNSW graph (M=32, efSearch >= max(128, k)); no training, the slowest to build",
    "pq": "product quantisation, dim / 8 bytes per vector, scanned exhaustively",
    "ivfpq": "inverted file over product-quantised vectors: the smallest and fastest, the least exact",
}


def build_ann(column: EmbeddingColumn, spec: AnnSpec, seed: int = 0, progress: Callable[[str], None] | None = None):
    """Train (on a uniform sample of at most `spec.train_size` rows) and fill a faiss index; returns it."""
    faiss = import_faiss()
    index = faiss.index_factory(column.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if "efConstruction" in spec.build:
        faiss.downcast_index(index).hnsw.efConstruction = spec.build["efConstruction"]
    if not index.is_trained:
        rows = min(len(column), max(spec.train_size, 1))
        sample = torch.from_numpy(np.random.default_rng(seed).choice(len(column), rows, replace=False))
        index.train(np.ascontiguousarray(column.rows(torch.sort(sample).values).numpy()))
    for _, block in column.blocks():
        index.add(np.ascontiguousarray(block.numpy(), dtype=np.float32))
        if progress:
            progress(f"{index.ntotal}/{len(column)}")
    return index


def recall_against_exact(
    approximate: FaissSearch, exact, queries: torch.Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """Mean |approximate top-k ∩ exact top-k| / k over `queries`, for each k (capped at the corpus size; keyed by
    the k asked for)."""
    recall = {}
    for k in ks:
        capped = min(k, len(approximate.column))
        _, truth = exact.search(queries, capped)
        _, found = approximate.search(queries, capped)
        hits = [len(set(t.tolist()) & set(f.tolist()) - {-1}) for t, f in zip(truth, found)]
        recall[str(k)] = float(np.mean(hits) / capped)
    return recall


def timed(function: Callable, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start
