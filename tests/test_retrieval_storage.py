"""The retrieval index on disk (`retrieval_backends/storage.py`): a build killed midway resumes from the shards it
wrote, damaged shards and manifests give an error naming the file and what was expected, `overwrite` never deletes
what is not an index, and version-1 indexes name the command that rebuilds them."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.cli_helpers import assert_user_error, run_cli
from tests.test_retrieval_engine import captions, engine_for, random_model, write_images
from transformers_albef import AlbefProcessor
from transformers_albef.retrieval_backends.storage import IndexFormatError
from transformers_albef.retrieval_index import RetrievalIndex

NUM_IMAGES = 7


@pytest.fixture(scope="module")
def engine():
    return engine_for(random_model(), AlbefProcessor.from_bert_vocab(image_size=32), batch_size=2)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("storage") / "images", NUM_IMAGES)


def count_image_rows(engine, monkeypatch) -> list[int]:
    """The number of images each image-tower forward embeds, recorded from now on."""
    rows, forward = [], engine.model.vision_model.forward
    monkeypatch.setattr(engine.model.vision_model, "forward", lambda x, *a, **k: rows.append(len(x)) or forward(x))
    return rows


def interrupted_after(items, count):
    """The items, then a KeyboardInterrupt (a killed build) when item `count` is asked for."""
    yield from items[:count]
    raise KeyboardInterrupt


def test_killed_build_resumes_from_its_shards(engine, paths, tmp_path, monkeypatch):
    texts = captions(5)
    fresh = engine.build_index(images=paths, texts=texts, shard_size=2)
    target = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):  # killed while reading image 5: shards 0 and 1 are finished
        engine.build_index(images=interrupted_after(paths, 5), texts=texts, path=target, shard_size=2)
    build = tmp_path / ".index.build"
    assert not target.exists() and sorted(os.listdir(build / "shards")) == ["images-000000", "images-000001"]

    rows = count_image_rows(engine, monkeypatch)
    resumed = engine.build_index(images=paths, texts=texts, path=target, shard_size=2)
    assert sum(rows) == NUM_IMAGES - 4  # only shards 2 and 3 are computed
    assert sorted(os.listdir(tmp_path)) == ["index"]  # the build folder became the index
    assert resumed._meta == {**fresh._meta, "model_name": resumed.model_name}
    assert list(resumed.images) == list(fresh.images) and list(resumed.texts) == list(fresh.texts)
    torch.testing.assert_close(resumed.image_embeds, fresh.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.text_embeds, fresh.text_embeds, atol=1e-6, rtol=0)
    query = engine.text_to_image(fresh, texts[:2], k=3)
    assert [r.indices for r in engine.text_to_image(resumed, texts[:2], k=3)] == [r.indices for r in query]


def test_resume_refuses_other_settings_and_another_corpus(engine, paths, tmp_path):
    target = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        engine.build_index(images=interrupted_after(paths, 5), path=target, shard_size=2)
    with pytest.raises(ValueError, match=r"\.index\.build: an interrupted build with other settings \(shard_size: 2"):
        engine.build_index(images=paths, path=target, shard_size=3)
    changed = paths[1:] + paths[:1]
    with pytest.raises(ValueError, match=r"images-000000: the interrupted build wrote this shard for other images"):
        engine.build_index(images=changed, path=target, shard_size=2)
    index = engine.build_index(images=changed, path=target, shard_size=2, resume=False)
    assert list(index.images) == [os.path.abspath(p) for p in changed]


def test_build_folder_that_is_not_ours_is_left_alone(engine, paths, tmp_path):
    (tmp_path / ".index.build").mkdir()
    (tmp_path / ".index.build" / "notes.txt").write_text("mine")
    for resume in (True, False):
        with pytest.raises(FileExistsError, match="not an index build folder"):
            engine.build_index(images=paths[:2], path=tmp_path / "index", resume=resume)
    assert (tmp_path / ".index.build" / "notes.txt").read_text() == "mine"


# ----- damaged shards and manifests ----------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_cases(shard: Path):
    """(damage done to a shard of 2 images with cached tower states (5 tokens x 32), the expected message)."""
    embeds = shard / "embeddings.safetensors"
    return [
        (lambda: truncate(embeds), rf"{embeds}: truncated or not a safetensors file .*expected float32 embeddings"),
        (
            lambda: save_file({"embeds": torch.zeros(2, 16, dtype=torch.float16)}, embeds),
            rf"{embeds}: tensor 'embeds' is float16 of shape \(2, 16\); expected the shard's embeddings: float32 of "
            r"shape \(2, 16\)",
        ),
        (
            lambda: save_file({"embeds": torch.zeros(3, 16)}, embeds),
            rf"{embeds}: tensor 'embeds' is float32 of shape \(3, 16\); expected .* float32 of shape \(2, 16\)",
        ),
        (lambda: (shard / "shard.json").write_text("{bad json"), rf"{shard / 'shard.json'}: not valid json"),
        (
            lambda: (shard / "shard.json").write_text(
                json.dumps({**json.loads((shard / "shard.json").read_text()), "count": "2"})
            ),
            rf"{shard / 'shard.json'}: 'count' is str '2'; expected the number of items",
        ),
        (lambda: truncate(shard / "items.arrow"), rf"{shard / 'items.arrow'}: truncated or not an Arrow IPC file"),
        (
            lambda: save_file(
                {"states": torch.zeros(1, 5, 32), "rows": torch.zeros(1, dtype=torch.long)},
                shard / "states-000.safetensors",
            ),
            rf"{shard / 'states-000.safetensors'}: tensor 'states' is float32 of shape \(1, 5, 32\); expected 2 "
            r"cached tower states of shape \(5, 32\)",
        ),
    ]


def test_damaged_shard_of_an_interrupted_build(engine, paths, tmp_path):
    """Resuming over a damaged shard stops with the file and what was expected, and says how to recompute it."""
    target = tmp_path / "index"
    shard = tmp_path / ".index.build" / "shards" / "images-000000"
    for number, (damage, message) in enumerate(damage_cases(shard)):
        with pytest.raises(KeyboardInterrupt):
            engine.build_index(
                images=interrupted_after(paths, 3), path=target, shard_size=2, cache_image_states=True, resume=False
            )
        damage()
        with pytest.raises(IndexFormatError, match=message) as caught:
            engine.build_index(images=paths, path=target, shard_size=2, cache_image_states=True)
        assert f"delete {shard} to recompute that shard" in str(caught.value), number
    with pytest.raises(IndexFormatError, match="missing; expected the items of the shard"):
        (shard / "items.arrow").unlink()
        engine.build_index(images=paths, path=target, shard_size=2, cache_image_states=True)


def test_damaged_index(engine, paths, tmp_path):
    """A damaged saved index: the first line of the error names the file and what is wrong."""
    shard = tmp_path / "index" / "shards" / "images-000000"

    def build():
        engine.build_index(images=paths, path=shard.parents[1], shard_size=2, cache_image_states=True, overwrite=True)

    for damage, message in damage_cases(shard):
        build()
        damage()
        with pytest.raises(IndexFormatError, match=message) as caught:
            RetrievalIndex.load(tmp_path / "index")
        assert "rebuild the index: albef retrieve" in str(caught.value)

    manifest = tmp_path / "index" / "index.json"
    for change, message in (
        ({"max_length": "30"}, r"'max_length' is str '30'; expected an int"),
        ({"images": {"count": 7, "shards": [2, 2, 2, 1], "ids": False, "states": "yes", "ann": {}}}, "states"),
        ({"images": {"count": 7, "shards": [2, 2, 2], "ids": False, "states": True, "ann": {}}}, r"do not split 7"),
        ({"version": "2"}, r"'version' is '2'; expected 2"),
        ({"version": 3}, "index version 3 was written by a newer transformers-albef"),
    ):
        build()
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **change}))
        with pytest.raises(IndexFormatError, match=rf"^{manifest}: .*{message}"):
            RetrievalIndex.load(tmp_path / "index")
    truncate(manifest)
    with pytest.raises(IndexFormatError, match=rf"^{manifest}: not valid json"):
        RetrievalIndex.load(tmp_path / "index")
    # A shard with fewer cached rows than its description says.
    build()
    meta = json.loads((shard / "shard.json").read_text())
    meta["states"][0]["rows"] = 3
    (shard / "shard.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match=r"states-000.safetensors: tensor 'states' is float32 of shape \(2, "):
        RetrievalIndex.load(tmp_path / "index")


def test_version_1_index_names_the_rebuild_command(engine, paths, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    meta = {"format": "transformers-albef-retrieval-index", "version": 1, "images": paths, "texts": []}
    (old / "index.json").write_text(json.dumps(meta))
    save_file({"image_embeds": torch.zeros(NUM_IMAGES, 16)}, old / "embeddings.safetensors")
    message = (
        rf"^{old / 'index.json'}: a version-1 retrieval index .* rebuild the index: albef retrieve --images FOLDER "
        rf"--captions FILE --save-index {old} --overwrite"
    )
    with pytest.raises(IndexFormatError, match=message):
        engine.load_index(old)
    rebuilt = engine.build_index(images=paths, path=old, overwrite=True)  # a version-1 index is ours to replace
    assert RetrievalIndex.load(old).num_images == NUM_IMAGES == rebuilt.num_images


# ----- overwrite never deletes what is not an index ------------------------------------------------------------------
def test_overwrite_refuses_what_is_not_an_index(engine, paths, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.txt").write_text("keep me too")
    index = engine.build_index(texts=["a dog"])
    for target, message in ((precious, "is a file, not a retrieval index"), (folder, "is a folder without")):
        with pytest.raises(FileExistsError, match=message):
            engine.build_index(images=paths[:2], path=target, overwrite=True)
        with pytest.raises(FileExistsError, match=message):
            index.save(target, overwrite=True)
        with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
            index.save(target)
    assert precious.read_text() == "keep me" and (folder / "a.txt").read_text() == "keep me too"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "photos"]  # nothing was started either

    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    assert index.save(tmp_path / "empty") == tmp_path / "empty" and RetrievalIndex.load(tmp_path / "empty").num_texts


def test_cli_overwrite_of_a_file_is_a_one_line_error(tmp_path):
    precious = tmp_path / "photos.index"
    precious.write_text("not an index")
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("a red dog\na blue car\n")
    result = run_cli("retrieve", "--captions", captions_file, "--save-index", precious, "--overwrite")
    assert_user_error(result, "is a file, not a retrieval index")
    assert precious.read_text() == "not an index"
