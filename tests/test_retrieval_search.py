"""ITC candidate search (`retrieval_backends/search.py`): the exact searches (torch, faiss IndexFlatIP) give the
ranking of the full similarity matrix, which is what the index computed before; the approximate faiss indexes record
their recall against it; without faiss the torch search is used and the faiss ones say how to install it."""

import sys

import numpy as np
import pytest
import torch

from tests.test_retrieval_engine import captions, engine_for, random_model, write_images
from transformers_albef import AlbefProcessor
from transformers_albef.retrieval_backends import faiss_available
from transformers_albef.retrieval_backends.search import TorchExactSearch
from transformers_albef.retrieval_backends.storage import IndexFormatError
from transformers_albef.retrieval_index import RetrievalIndex

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")
DIM = 32


def clustered(count: int, seed: int, centres: int = 40, noise: float = 0.15) -> torch.Tensor:
    """L2-normalised points around random centres (some structure, as real embeddings have)."""
    g = torch.Generator().manual_seed(seed)
    middle = torch.randn(centres, DIM, generator=g)
    points = middle[torch.randint(0, centres, (count,), generator=g)] + noise * torch.randn(count, DIM, generator=g)
    return torch.nn.functional.normalize(points, dim=-1)


@pytest.fixture(scope="module")
def vectors():
    return clustered(1000, seed=0), clustered(40, seed=1)


@pytest.fixture(scope="module")
def index(vectors, tmp_path_factory):
    images, texts = vectors
    folder = tmp_path_factory.mktemp("search") / "index"
    return RetrievalIndex.from_embeddings(folder, image_embeds=images, text_embeds=texts, shard_size=96)


def without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert not faiss_available()


@pytest.mark.parametrize("search", ["torch", pytest.param("flat", marks=needs_faiss), "exact"])
def test_exact_search_is_the_full_matrix_top_k(index, vectors, search):
    """The candidates the index chose before (top-k of the whole similarity matrix), from any exact search, any
    block size."""
    images, queries = vectors
    index.use_search(search)
    for k in (1, 16, 256, 1000):
        expected_scores, expected = (queries @ images.t()).topk(k, dim=1)
        scores, positions = index.search("images", queries, k)
        assert torch.equal(positions, expected)
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    small_blocks = TorchExactSearch(index.embeddings("images"), block_rows=7)
    assert torch.equal(small_blocks.search(queries, 16, query_batch_size=3)[1], expected[:, :16])


def test_without_faiss_the_torch_search_is_used(index, vectors, monkeypatch):
    images, queries = vectors
    with_faiss = index.use_search("exact").search("images", queries, 16)
    without_faiss(monkeypatch)
    index.use_search("exact")
    assert type(index._searcher("images", "cpu")).__name__ == "TorchExactSearch"
    assert torch.equal(index.search("images", queries, 16)[1], with_faiss[1])
    for call in (lambda: index.use_search("flat"), lambda: index.build_ann("hnsw")):
        with pytest.raises(ImportError, match=r"pip install 'transformers-albef\[faiss\]'"):
            call()


@needs_faiss
def test_approximate_indexes_record_their_recall(vectors, tmp_path):
    images, queries = vectors
    index = RetrievalIndex.from_embeddings(tmp_path / "index", image_embeds=images, text_embeds=queries)
    options = {"ivf": {"nlist": 16, "nprobe": 4}, "hnsw": {"M": 16}, "pq": {"m": 8}, "ivfpq": {"nlist": 16, "m": 8}}
    for kind, kwargs in options.items():
        [entry] = index.build_ann(kind, modalities="images", **kwargs).values()
        assert set(entry["recall"]) == {"16", "256"} and all(0 <= r <= 1 for r in entry["recall"].values())
        assert entry["recall_queries"] == "40 texts" and (tmp_path / "index" / "ann" / entry["file"]).is_file()
    recall = {kind: RetrievalIndex.load(tmp_path / "index").ann["images"][kind]["recall"] for kind in options}
    assert recall["hnsw"]["16"] >= 0.95 and recall["ivf"]["16"] >= 0.6, recall

    exact = (queries @ images.t()).topk(16, dim=1).indices
    for kind in options:
        loaded = RetrievalIndex.load(tmp_path / "index", search=kind)
        scores, positions = loaded.search("images", queries, 16)
        found = positions >= 0
        # Whatever chose them, the candidates' scores are their exact ITC similarities, best first.
        exact_scores = (images[positions.clamp(min=0)] * queries[:, None]).sum(-1)
        torch.testing.assert_close(scores[found], exact_scores[found], atol=1e-5, rtol=0)
        assert (scores[:, :-1] >= scores[:, 1:]).all()
        hits = np.mean([len(set(a.tolist()) & set(b.tolist())) / 16 for a, b in zip(positions, exact)])
        assert hits == pytest.approx(recall[kind]["16"], abs=0.05), kind  # recorded on these queries
    more = RetrievalIndex.load(tmp_path / "index", search="ivf", nprobe=16)  # every cell: exact
    assert torch.equal(more.search("images", queries, 16)[1], exact)

    with pytest.raises(ValueError, match=r"no approximate search 'hnsw' for its texts; build it"):
        RetrievalIndex.load(tmp_path / "index", search="hnsw").search("texts", images[:2], 4)
    (tmp_path / "index" / "ann" / "images-pq.faiss").write_bytes(b"not faiss")
    with pytest.raises(IndexFormatError, match=r"images-pq.faiss: not a faiss index"):
        RetrievalIndex.load(tmp_path / "index", search="pq").search("images", queries, 4)
    with pytest.raises(ValueError, match="unknown search 'best'"):
        index.use_search("best")


@pytest.fixture(scope="module")
def engine_and_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_search")
    engine = engine_for(random_model(), AlbefProcessor.from_bert_vocab(image_size=32), batch_size=4)
    paths = write_images(folder / "images", 9)
    texts = captions(12)
    return engine, engine.build_index(images=paths, texts=texts, path=folder / "index", shard_size=4), paths, texts


def test_queries_never_read_the_whole_corpus_into_memory(engine_and_index, monkeypatch):
    """The torch search streams blocks of the memory-mapped shards: the embeddings are never concatenated."""
    from transformers_albef.retrieval_backends.storage import EmbeddingColumn

    engine, index, paths, texts = engine_and_index

    def refuse(self):
        raise AssertionError("the whole corpus was read into one tensor")

    monkeypatch.setattr(EmbeddingColumn, "to_tensor", refuse)
    index.use_search("torch")
    assert len(engine.text_to_image(index, texts, k=4)) == len(texts)
    assert len(engine.image_to_text(index, paths[:2], k=4)) == 2
    index.use_search("exact")


@pytest.mark.parametrize(
    "search", ["torch", pytest.param("flat", marks=needs_faiss), pytest.param("hnsw", marks=needs_faiss)]
)
def test_engine_results_do_not_depend_on_the_search(engine_and_index, search):
    """ITM re-ranking stays exact: the results of every search are those of the default one (on 9 images an HNSW
    graph finds every neighbour)."""
    engine, index, paths, texts = engine_and_index
    index.use_search("exact")
    expected = engine.text_to_image(index, texts, k=5), engine.image_to_text(index, paths[:3], k=5)
    if search == "hnsw" and not index.ann["images"].get("hnsw"):
        assert index.build_ann("hnsw")["images"]["recall"] == {"16": 1.0, "256": 1.0}  # capped at 9 and 12
    index.use_search(search)
    got = engine.text_to_image(index, texts, k=5), engine.image_to_text(index, paths[:3], k=5)
    for got_results, expected_results in zip(got, expected):
        for result, reference in zip(got_results, expected_results):
            assert result.indices == reference.indices and result.ids == reference.ids
            np.testing.assert_allclose(result.scores, reference.scores, atol=1e-5)
            np.testing.assert_allclose(result.itc_scores, reference.itc_scores, atol=1e-5)
    index.use_search("exact")
