"""The corpus retrieval engine (`retrieval_index.py`) and the bounded-memory evaluation (`retrieval.py`): parity with
the original evaluation, the on-disk index, search, distributed evaluation and bad inputs.

Run as a script under torchrun, this file is also the worker of the 2-process test."""

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tests.parity_utils import load_fixture
from tests.parity_utils import tiny_config as fixture_config
from tests.tiny_models import tiny_config
from transformers_albef import AlbefForRetrieval, AlbefModel, AlbefProcessor
from transformers_albef.retrieval import (
    chunked_retrieval_score_matrices,
    recall_at_k,
    retrieval_score_matrices,
)
from transformers_albef.retrieval_index import (
    RetrievalEngine,
    RetrievalIndex,
    list_image_files,
)

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
NUM_IMAGES, CAPTIONS_PER_IMAGE = 7, 2
WORDS = "red blue green dog cat horse bird man woman child ball tree car boat beach snow field street".split()


# ----- shared inputs -------------------------------------------------------------------------------------------------
def random_model(seed: int = 0) -> AlbefForRetrieval:
    torch.manual_seed(seed)
    config = tiny_config(text={"vocab_size": 30522}, retrieval_k=4)
    return AlbefForRetrieval(config).eval()


def captions(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(count)]


def write_images(folder: Path, count: int = NUM_IMAGES, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"image_{i:02d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def ground_truth(num_images: int, per_image: int):
    txt2img = [t // per_image for t in range(num_images * per_image)]
    img2txt = [list(range(i * per_image, (i + 1) * per_image)) for i in range(num_images)]
    return txt2img, img2txt


@pytest.fixture(scope="module")
def processor():
    return AlbefProcessor.from_bert_vocab(image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, processor):
    """Image files, their captions, and the same corpus as the original evaluation's tensors."""
    folder = tmp_path_factory.mktemp("corpus")
    paths = write_images(folder / "images")
    texts = captions(NUM_IMAGES * CAPTIONS_PER_IMAGE)
    pixel_values = processor(images=[PIL.Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    tokens = processor(
        text=texts, clean_text="caption", padding="max_length", truncation=True, max_length=30, return_tensors="pt"
    )
    return {
        "folder": folder,
        "paths": paths,
        "texts": texts,
        "pixel_values": pixel_values,
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }


@pytest.fixture(scope="module")
def reference(model, corpus):
    """The original evaluation (row by row, all tower states in memory) at k = 4."""
    return retrieval_score_matrices(model, corpus["pixel_values"], corpus["input_ids"], corpus["attention_mask"], k=4)


def engine_for(model, processor, **kwargs) -> RetrievalEngine:
    kwargs.setdefault("progress", False)
    return RetrievalEngine(model, processor, **kwargs)


# ----- parity with the original evaluation ---------------------------------------------------------------------------
def test_fixture_parity_any_chunking():
    """The original code's score matrices (fixture) from every chunking, down to one image and one pair at a time."""
    folder, inputs, outputs, meta = load_fixture("retrieval")
    config = fixture_config(meta, "retrieval")
    config._attn_implementation = "eager"
    model = AlbefForRetrieval.from_original(folder / "checkpoint.pth", config=config).eval()
    args = inputs["pixel_values"], inputs["eval_input_ids"], inputs["eval_attention_mask"]
    k = meta["config"]["k_test"]
    for chunk, fusion, block in ((256, 256, 4096), (1, 1, 1), (2, 3, 2)):
        score_i2t, score_t2i = chunked_retrieval_score_matrices(
            model, *args, k=k, image_chunk_size=chunk, fusion_batch_size=fusion, similarity_block_size=block
        )
        torch.testing.assert_close(score_i2t, outputs["score_matrix_i2t"], atol=ATOL, rtol=0)
        torch.testing.assert_close(score_t2i, outputs["score_matrix_t2i"], atol=ATOL, rtol=0)
    txt2img = {int(t): i for t, i in meta["txt2img"].items()}
    img2txt = {int(i): t for i, t in meta["img2txt"].items()}
    assert recall_at_k(score_i2t, score_t2i, txt2img, img2txt) == pytest.approx(meta["itm_eval"], abs=1e-9)


@pytest.mark.parametrize(
    "chunk, fusion, block, text_device", [(100, 100, 100, None), (1, 7, 1, None), (3, 5, 2, "cpu")]
)
def test_chunking_matches_the_original_loop(model, corpus, reference, chunk, fusion, block, text_device, monkeypatch):
    """Any chunking gives the original matrices, and fuses each distinct candidate pair once (pairs chosen both ways
    are shared)."""
    pairs, fusion_rows = [], []
    itm_logits_for_pairs, text_forward = model.itm_logits_for_pairs, model.text_model.forward

    def counting_pairs(image_states, text_states, text_mask, image_index, text_index, **kwargs):
        pairs.append(len(image_index))
        return itm_logits_for_pairs(image_states, text_states, text_mask, image_index, text_index, **kwargs)

    def counting_rows(*args, **kwargs):
        if kwargs.get("mode") == "fusion":
            fusion_rows.append(kwargs["text_embeds"].shape[0])
        return text_forward(*args, **kwargs)

    monkeypatch.setattr(model, "itm_logits_for_pairs", counting_pairs)
    monkeypatch.setattr(model.text_model, "forward", counting_rows)
    score_i2t, score_t2i = chunked_retrieval_score_matrices(
        model,
        corpus["pixel_values"],
        corpus["input_ids"],
        corpus["attention_mask"],
        k=4,
        image_chunk_size=chunk,
        fusion_batch_size=fusion,
        batch_size=3,
        similarity_block_size=block,
        text_state_device=text_device,
    )
    torch.testing.assert_close(score_i2t, reference[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(score_t2i, reference[1], atol=ATOL, rtol=0)
    selected_i2t, selected_t2i = reference[0] != -100, reference[1] != -100
    distinct = int((selected_i2t | selected_t2i.t()).sum())
    assert sum(pairs) == distinct < int(selected_i2t.sum() + selected_t2i.sum())
    assert max(fusion_rows) <= fusion  # texts per fusion forward (padding slots of uneven groups included)


def test_lavis_and_itc_scores(model, corpus, reference):
    args = corpus["pixel_values"], corpus["input_ids"], corpus["attention_mask"]
    with torch.no_grad():
        sims = (
            model.get_image_features(args[0]).pooler_output
            @ model.get_text_features(args[1], args[2]).pooler_output.t()
        )
    lavis_i2t, lavis_t2i = chunked_retrieval_score_matrices(model, *args, k=4, score="itm+itc")
    itc_i2t, itc_t2i = chunked_retrieval_score_matrices(model, *args, k=4, score="itc")
    for ours, itm, itc, sim in (
        (lavis_i2t, reference[0], itc_i2t, sims),
        (lavis_t2i, reference[1], itc_t2i, sims.t()),
    ):
        selected = itm != -100
        assert torch.equal(selected, itc != -100)
        torch.testing.assert_close(ours[selected], itm[selected] + sim[selected], atol=ATOL, rtol=0)
        torch.testing.assert_close(itc[selected], sim[selected], atol=ATOL, rtol=0)
        assert (ours[~selected] == -100).all() and (itc[~selected] == -100).all()


def test_engine_evaluate_from_files(model, processor, corpus, reference):
    """Images read from their files, captions cleaned and tokenised by the engine: the original evaluation's result."""
    txt2img, img2txt = ground_truth(NUM_IMAGES, CAPTIONS_PER_IMAGE)
    engine = engine_for(model, processor, image_chunk_size=3, fusion_batch_size=5, batch_size=4)
    result = engine.evaluate(corpus["paths"], corpus["texts"], txt2img, img2txt, k=4)
    torch.testing.assert_close(result.score_i2t, reference[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(result.score_t2i, reference[1], atol=ATOL, rtol=0)
    assert result.metrics == recall_at_k(*reference, txt2img, img2txt)
    curve = result.recall_curve()
    assert curve["ranks"] == [1, 2, 3, 4]
    assert curve["image_to_text"][0] == pytest.approx(result.metrics["txt_r1"])
    assert curve["text_to_image"][0] == pytest.approx(result.metrics["img_r1"])
    assert model.training is False


# ----- the index ----------------------------------------------------------------------------------------------------
def test_search_matches_the_original_scores(model, processor, corpus, reference):
    engine = engine_for(model, processor, batch_size=3, image_chunk_size=2, fusion_batch_size=3)
    index = engine.build_index(images=corpus["paths"], texts=corpus["texts"])
    score_i2t, score_t2i = reference
    for t, result in enumerate(engine.text_to_image(index, corpus["texts"], k=4)):
        expected = score_t2i[t][score_t2i[t] != -100]
        assert sorted(result.indices) == sorted(torch.nonzero(score_t2i[t] != -100).flatten().tolist())
        torch.testing.assert_close(
            torch.tensor(result.scores), expected.sort(descending=True).values, atol=ATOL, rtol=0
        )
        assert result.scores == sorted(result.scores, reverse=True)
        assert result.items == [corpus["paths"][i] for i in result.indices]
    for i, result in enumerate(engine.image_to_text(index, corpus["paths"], k=4)):
        expected = score_i2t[i][score_i2t[i] != -100]
        torch.testing.assert_close(
            torch.tensor(result.scores), expected.sort(descending=True).values, atol=ATOL, rtol=0
        )
        assert result.items == [corpus["texts"][t] for t in result.indices]
        assert result.query == corpus["paths"][i]

    [lavis] = engine.text_to_image(index, corpus["texts"][0], k=4, score="itm+itc")
    [itm] = engine.text_to_image(index, corpus["texts"][0], k=4)
    by_index = dict(zip(itm.indices, zip(itm.scores, itm.itc_scores)))
    for position, value in zip(lavis.indices, lavis.scores):
        assert value == pytest.approx(sum(by_index[position]), abs=ATOL)
    [itc] = engine.text_to_image(index, corpus["texts"][0], k=4, score="itc")
    assert itc.scores == itc.itc_scores == sorted(itm.itc_scores, reverse=True)


def test_index_save_reload_round_trip(model, processor, corpus, tmp_path):
    engine = engine_for(model, processor)
    ids = [f"img-{i}" for i in range(NUM_IMAGES)]
    index = engine.build_index(images=corpus["paths"], texts=corpus["texts"], image_ids=ids, path=tmp_path / "index")
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temporary or build folder left
    assert sorted(os.listdir(tmp_path / "index")) == ["index.json", "shards"]
    assert sorted(os.listdir(tmp_path / "index" / "shards")) == ["images-000000", "texts-000000"]
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["images"]["count"] == NUM_IMAGES and meta["images"]["ids"] and not meta["texts"]["ids"]
    assert list(index.images) == [os.path.abspath(p) for p in corpus["paths"]] and list(index.image_ids) == ids

    reloaded = engine.load_index(tmp_path / "index")
    assert torch.equal(reloaded.image_embeds, index.image_embeds)
    assert torch.equal(reloaded.text_embeds, index.text_embeds)
    assert (reloaded.images, reloaded.texts, reloaded.image_ids, reloaded.text_ids) == (
        index.images,
        index.texts,
        index.image_ids,
        index.text_ids,
    )
    [before] = engine.text_to_image(index, "a red dog on the beach", k=3)
    [after] = engine.text_to_image(reloaded, "a red dog on the beach", k=3)
    assert before.ids == after.ids and before.ids[0].startswith("img-")
    np.testing.assert_allclose(before.scores, after.scores, atol=ATOL)

    copy = reloaded.save(tmp_path / "copy")
    assert RetrievalIndex.load(copy).image_ids == ids
    with pytest.raises(FileExistsError, match="overwrite"):
        index.save(tmp_path / "copy")
    index.save(tmp_path / "copy", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["copy", "index"]


def test_in_memory_images_keep_memory_mapped_states(model, processor, corpus, tmp_path):
    """Images without a file (here: a `datasets` column of PIL images from bytes) cannot be reloaded: their tower
    states are cached on disk and re-ranking reads them back, with the same results as recomputing from files."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    column = Dataset.from_dict({"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in corpus["paths"]]})
    column = column.cast_column("image", ImageFeature())["image"]
    engine = engine_for(model, processor, batch_size=3, image_chunk_size=2)
    cached = engine.build_index(images=column, path=tmp_path / "cached")
    assert list(cached.images) == [None] * NUM_IMAGES and cached.has_image_states
    assert (tmp_path / "cached" / "shards" / "images-000000" / "states-000.safetensors").is_file()
    from_files = engine.build_index(images=corpus["paths"])
    assert not from_files.has_image_states
    # Files first, then in-memory images: the states of the in-memory ones are cached, the others are recomputed.
    in_memory = [PIL.Image.open(p).convert("RGB") for p in corpus["paths"][3:]]
    mixed = engine.build_index(images=iter(corpus["paths"][:3] + in_memory), shard_size=2)
    assert mixed.has_image_states and mixed.images[:3] == from_files.images[:3] and mixed.images[3:] == [None] * 4
    assert mixed.cached_states(torch.arange(NUM_IMAGES)).tolist() == [False] * 3 + [True] * 4
    query = corpus["texts"][:3]
    expected = engine.text_to_image(from_files, query, k=4)
    for index in (cached, RetrievalIndex.load(tmp_path / "cached"), mixed):
        for got, want in zip(engine.text_to_image(index, query, k=4), expected):
            assert got.indices == want.indices
            np.testing.assert_allclose(got.scores, want.scores, atol=ATOL)

    # Pixel tensors have no file either; without a cache they can only be searched by ITC.
    uncached = engine.build_index(images=corpus["pixel_values"], cache_image_states=False)
    with pytest.raises(ValueError, match="no file and the index keeps no tower states"):
        engine.text_to_image(uncached, query, k=2)
    by_itc = engine.text_to_image(from_files, query, k=2, score="itc")
    assert [r.indices for r in engine.text_to_image(uncached, query, k=2, score="itc")] == [r.indices for r in by_itc]


def test_datasets_column_of_files_is_indexed_by_path(model, processor, corpus):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    column = Dataset.from_dict({"image": corpus["paths"]}).cast_column("image", ImageFeature())["image"]
    index = engine_for(model, processor).build_index(images=column)
    assert list(index.images) == [os.path.abspath(p) for p in corpus["paths"]] and not index.has_image_states


def test_interrupted_build_leaves_no_index(model, processor, corpus, tmp_path):
    """An interrupted or failed build leaves nothing at the path (only the build folder of finished shards, for a
    resume, when some were finished), and a failed rebuild keeps the previous index as it was."""

    def interrupted():
        yield from corpus["paths"][:4]
        raise KeyboardInterrupt

    engine = engine_for(model, processor, batch_size=2)
    for images, error in ((interrupted(), KeyboardInterrupt), (corpus["paths"][:3] + [__file__], ValueError)):
        with pytest.raises(error):
            engine.build_index(images=images, texts=corpus["texts"], path=tmp_path / "index", cache_image_states=True)
        assert os.listdir(tmp_path) == []  # no shard was finished: nothing to resume from either
    engine.build_index(texts=corpus["texts"][:2], path=tmp_path / "index")
    with pytest.raises(KeyboardInterrupt):
        engine.build_index(images=interrupted(), path=tmp_path / "index", overwrite=True, shard_size=2)
    assert sorted(os.listdir(tmp_path)) == [".index.build", "index"]
    assert RetrievalIndex.load(tmp_path / "index").num_texts == 2
    assert sorted(os.listdir(tmp_path / ".index.build" / "shards")) == ["images-000000", "images-000001"]


# ----- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_inputs(model, processor, corpus, tmp_path):
    engine = engine_for(model, processor)
    index = engine.build_index(images=corpus["paths"][:3], texts=corpus["texts"][:5])
    cases = [
        (lambda: engine.build_index(), "corpus is empty"),
        (lambda: engine.build_index(images=[]), "image corpus is empty"),
        (lambda: engine.build_index(texts=[]), "texts is empty"),
        (lambda: engine.build_index(texts=["a dog", 3]), r"texts\[1\] must be a string"),
        (lambda: engine.build_index(texts=["a dog", "?!"]), r"text 1 \('\?!'\) is empty after cleaning"),
        (lambda: engine.build_index(texts=["a", "b"], text_ids=[1]), "got 1 text ids for 2 texts"),
        (lambda: engine.build_index(texts=["a", "b"], text_ids=[1, 1]), "text ids must be unique"),
        (lambda: engine.build_index(images=[{"image": "x", "id": 1}]), r"pass the image column"),
        (lambda: engine.build_index(images=[tmp_path / "missing.png"]), "missing.png' not found"),
        (lambda: engine.text_to_image(index, "a dog", k=4), "k=4 is larger than the 3 images in the index"),
        (lambda: engine.image_to_text(index, corpus["paths"][0], k=6), "k=6 is larger than the 5 texts"),
        (lambda: engine.text_to_image(index, "a dog", k=0), "k must be a positive int"),
        (lambda: engine.text_to_image(index, [], k=1), "texts is empty"),
        (lambda: engine.text_to_image(index, "a dog", score="best"), "score must be one of"),
        (lambda: engine.image_to_text(engine.build_index(images=corpus["paths"][:1]), corpus["paths"][0]), "no texts"),
        (lambda: engine.text_to_image(engine.build_index(texts=["a dog"]), "a dog"), "holds no images"),
        (lambda: engine.evaluate(iter(corpus["paths"]), ["a"], [0], [[0]]), "needs a sequence"),
        (lambda: engine.evaluate(corpus["paths"][:2], ["a", "b"], [0], [[0], [1]]), "txt2img has 1 entries for 2"),
        (lambda: engine.evaluate(corpus["paths"][:2], ["a", "b"], [0, 1], [[0]]), "img2txt has 1 entries for 2"),
        (lambda: engine.evaluate(corpus["paths"][:2], ["a", "b"], [0, 2], [[0], [1]]), r"txt2img\[1\] = 2 is not"),
        (lambda: engine.evaluate(corpus["paths"][:2], ["a", "b"], [0, 1], [[0], [5]]), r"img2txt\[1\] holds 5"),
        (lambda: RetrievalEngine(model, processor, max_length=1), "max_length must be at least 2"),
        (lambda: RetrievalEngine(model, processor, batch_size=0), "batch_size must be >= 1"),
        (
            lambda: chunked_retrieval_score_matrices(
                model, corpus["pixel_values"][:0], corpus["input_ids"], None, k=2
            ),
            "needs images and texts",
        ),
        (lambda: RetrievalEngine(AlbefModel(model.config), processor).text_to_image(index, "a"), "ITM head"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(FileNotFoundError, match="not a retrieval index"):
        engine.load_index(tmp_path)


def test_folder_with_non_image_files(tmp_path):
    paths = write_images(tmp_path, count=2)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").write_text("ignored")
    with pytest.raises(ValueError, match=r"1 file\(s\) that are not images: notes.txt.*skip_non_images"):
        list_image_files(tmp_path)
    assert list_image_files(tmp_path, skip_non_images=True) == paths
    (tmp_path / "broken.png").write_text("not a png either")
    with pytest.raises(ValueError, match=r"broken.png' is not an image PIL can read"):
        engine_for(random_model(), AlbefProcessor.from_bert_vocab(IMAGE_SIZE)).build_index(
            images=list_image_files(tmp_path, skip_non_images=True)
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        list_image_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a folder"):
        list_image_files(tmp_path / "notes.txt")


def test_long_texts_are_truncated_with_a_warning(model, processor, corpus, caplog):
    positions = model.config.text_config.max_position_embeddings  # 64 in the tiny config
    long_text = " ".join(["dog"] * 100)
    with caplog.at_level(logging.WARNING):
        engine = engine_for(model, processor, max_length=positions + 10, clean_text=None)
    assert engine.max_length == positions
    assert f"longer than the model's {positions} text positions" in caplog.text
    index = engine.build_index(images=corpus["paths"][:2])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        [result] = engine.text_to_image(index, long_text, k=2)
    assert f"1 query text(s) longer than {positions} tokens were truncated" in caplog.text
    assert len(result) == 2


def test_index_from_another_model(model, processor, corpus, tmp_path, caplog):
    index = engine_for(model, processor).build_index(texts=corpus["texts"][:3], path=tmp_path / "index")
    with caplog.at_level(logging.WARNING):
        engine_for(random_model(seed=1), processor).load_index(tmp_path / "index")
    assert "built with different weights" in caplog.text
    other = AlbefForRetrieval(tiny_config(text={"vocab_size": 30522}, embed_dim=8))
    with pytest.raises(ValueError, match="16-d embeddings but the model's embed_dim is 8"):
        engine_for(other, processor).load_index(tmp_path / "index")
    assert index.num_texts == 3


# ----- two processes -------------------------------------------------------------------------------------------------
def _distributed_worker(folder: Path) -> None:
    """Under torchrun, in one launch (starting processes is the expensive part): the engine's evaluation split across
    the processes (accelerate initialises gloo), then `albef evaluate`, which splits its work the same way, then an
    index built by both processes (engine and `albef retrieve --save-index`). Every rank saves what it got and what
    it printed."""
    from accelerate import PartialState

    from transformers_albef import cli

    state = PartialState(cpu=True)  # on CPU accelerate only sees the torchrun processes when told so
    model = AlbefForRetrieval.from_pretrained(folder / "model").eval()
    processor = AlbefProcessor.from_pretrained(folder / "model")
    paths = sorted(str(p) for p in (folder / "images").iterdir())
    texts = json.loads((folder / "texts.json").read_text())
    txt2img, img2txt = ground_truth(len(paths), CAPTIONS_PER_IMAGE)
    fused = []
    pair_logits = model.itm_logits_for_pairs
    model.itm_logits_for_pairs = lambda *args, **kwargs: fused.append(len(args[3])) or pair_logits(*args, **kwargs)
    engine = engine_for(model, processor, image_chunk_size=2, batch_size=3, fusion_batch_size=4)
    result = engine.evaluate(paths, texts, txt2img, img2txt, k=4)
    torch.save(
        {"score_i2t": result.score_i2t, "score_t2i": result.score_t2i, "metrics": result.metrics, "fused": sum(fused)},
        folder / f"rank{state.process_index}.pt",
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(evaluate_command(folder, "two.json"))
    (folder / f"rank{state.process_index}.txt").write_text(f"{status}\n{printed.getvalue()}")

    # One index, built by both processes: each embeds every other shard, rank 0 moves it into place. The first
    # attempt fails in a shard of rank 1 (a file that is not an image): both processes raise, and the second attempt
    # resumes from the shards both had finished.
    built = []
    image_tower = model.vision_model.forward
    model.vision_model.forward = lambda pixels, *a, **k: built.append(len(pixels)) or image_tower(pixels, *a, **k)
    broken = {**TWO_PROCESS_BUILD, "image_ids": [*TWO_PROCESS_BUILD["image_ids"], "broken"]}
    try:
        engine.build_index(images=[*paths, __file__], texts=texts, path=folder / "two.index", **broken)
        failure = None
    except (ValueError, RuntimeError) as error:
        failure = str(error)
    first = sum(built)
    index = engine.build_index(images=paths, texts=texts, path=folder / "two.index", **TWO_PROCESS_BUILD)
    record = {"failure": failure, "first": first, "resumed": sum(built) - first, "count": index.num_images}
    (folder / f"built{state.process_index}.json").write_text(json.dumps(record))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(retrieve_command(folder, "cli-two.index"))
    (folder / f"retrieve{state.process_index}.txt").write_text(f"{status}\n{printed.getvalue()}")


TWO_PROCESS_BUILD = {"shard_size": 2, "image_ids": [f"img-{i}" for i in range(NUM_IMAGES)], "cache_image_states": True}


def retrieve_command(folder: Path, output: str) -> list[str]:
    return [
        "retrieve", "--images", str(folder / "images"), "--captions", str(folder / "captions.txt"),
        "--model", str(folder / "model"), "--save-index", str(folder / output), "--shard-size", "3",
        "--text", "a red dog", "--candidates", "4", "--json",
    ]  # fmt: skip


def evaluate_command(folder: Path, output: str) -> list[str]:
    return [
        "evaluate", str(folder / "test.json"), "--image-root", str(folder / "images"),
        "--model", str(folder / "model"), "--candidates", "4", "--image-chunk-size", "2",
        "--output", str(folder / output), "--no-plot",
    ]  # fmt: skip


def torchrun(arguments: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ARGUMENTS` (gloo on CPU, one thread per process); on a timeout the whole process
    group is killed, workers included."""
    from tests.training.pretrain_utils import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    process = subprocess.Popen(
        [*command, *arguments], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_two_processes_match_one(model, processor, corpus, reference, tmp_path):
    """2 processes (torchrun): the same score matrices and recall as one, each candidate pair fused by exactly one
    process; `albef evaluate` under torchrun reports once, with the numbers of a one-process run."""
    from transformers_albef import cli

    (tmp_path / "images").symlink_to(Path(corpus["paths"][0]).parent)
    (tmp_path / "texts.json").write_text(json.dumps(corpus["texts"]))
    records = [
        {"image": Path(path).name, "caption": corpus["texts"][i * CAPTIONS_PER_IMAGE : (i + 1) * CAPTIONS_PER_IMAGE]}
        for i, path in enumerate(corpus["paths"])
    ]
    (tmp_path / "test.json").write_text(json.dumps(records))
    (tmp_path / "captions.txt").write_text("\n".join(corpus["texts"]))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    run = torchrun([__file__, str(tmp_path)], cwd=REPO)
    assert run.returncode == 0, run.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    txt2img, img2txt = ground_truth(NUM_IMAGES, CAPTIONS_PER_IMAGE)
    distinct = int(((reference[0] != -100) | (reference[1] != -100).t()).sum())
    assert ranks[0]["fused"] > 0 and ranks[1]["fused"] > 0 and ranks[0]["fused"] + ranks[1]["fused"] == distinct
    for got in ranks:
        torch.testing.assert_close(got["score_i2t"], reference[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got["score_t2i"], reference[1], atol=ATOL, rtol=0)
        assert got["metrics"] == recall_at_k(*reference, txt2img, img2txt)

    printed = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert printed[0].startswith("0\nretrieval on") and "r_mean" in printed[0]
    assert printed[1] == "0\n"  # only the main process reports
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(evaluate_command(tmp_path, "one.json")) == 0
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-9) and two["recall_curve"] == one["recall_curve"]
    assert two["metrics"] == pytest.approx(recall_at_k(*reference, txt2img, img2txt), abs=1e-9)

    # The index built by two processes is the index one process builds: same shards, same embeddings and states.
    built = [json.loads((tmp_path / f"built{r}.json").read_text()) for r in (0, 1)]
    assert built[0]["count"] == built[1]["count"] == NUM_IMAGES
    assert "test_retrieval_engine.py' is not an image" in built[1]["failure"]
    assert built[0]["failure"].endswith("(raised by process 1 of the index build)")
    # Shards 0-2 (6 images) were finished by the first attempt, shard 3 (one image) by the second: each image once.
    assert (built[0]["first"], built[1]["first"]) == (4, 2) and built[0]["resumed"] + built[1]["resumed"] == 1
    # The model as the workers loaded it (from_pretrained picks the attention implementation).
    loaded = AlbefForRetrieval.from_pretrained(tmp_path / "model").eval()
    engine = engine_for(loaded, processor, image_chunk_size=2, batch_size=3, fusion_batch_size=4)
    one = engine.build_index(
        images=sorted(str(p) for p in (tmp_path / "images").iterdir()),
        texts=corpus["texts"],
        path=tmp_path / "one.index",
        **TWO_PROCESS_BUILD,
    )
    assert_same_index(RetrievalIndex.load(tmp_path / "two.index"), one)
    printed = [(tmp_path / f"retrieve{r}.txt").read_text() for r in (0, 1)]
    assert printed[1] == "0\n" and printed[0].startswith("0\n")
    with contextlib.redirect_stdout(io.StringIO()) as output:
        assert cli.main(retrieve_command(tmp_path, "cli-one.index")) == 0
    [two_processes], [one_process] = json.loads(printed[0][2:])["queries"], json.loads(output.getvalue())["queries"]
    assert [m["item"] for m in two_processes["matches"]] == [m["item"] for m in one_process["matches"]]
    for key in ("score", "itc"):
        np.testing.assert_allclose(*([m[key] for m in q["matches"]] for q in (two_processes, one_process)), atol=ATOL)
    assert_same_index(RetrievalIndex.load(tmp_path / "cli-two.index"), RetrievalIndex.load(tmp_path / "cli-one.index"))


def assert_same_index(got: RetrievalIndex, expected: RetrievalIndex) -> None:
    """Same shard layout, items, ids and cached rows; the same embeddings and states up to float rounding (the same
    batches are computed, but a BLAS may round differently in another process, e.g. for another memory alignment:
    seen once at 4e-8)."""
    for modality in ("images", "texts"):
        assert got._meta[modality] == expected._meta[modality]
        torch.testing.assert_close(
            got.embeddings(modality).to_tensor(), expected.embeddings(modality).to_tensor(), atol=1e-6, rtol=0
        )
    assert list(got.images) == list(expected.images) and list(got.texts) == list(expected.texts)
    assert list(got.image_ids) == list(expected.image_ids) and list(got.text_ids) == list(expected.text_ids)
    everything = torch.arange(expected.num_images)
    assert torch.equal(got.cached_states(everything), expected.cached_states(everything))
    if expected.has_image_states:
        cached = everything[expected.cached_states(everything)]
        torch.testing.assert_close(got.image_states(cached), expected.image_states(cached), atol=1e-5, rtol=0)


if __name__ == "__main__":
    _distributed_worker(Path(sys.argv[1]))
