"""`albef retrieve` and `albef evaluate` through the real entry point, with the bundled retrieval model. (`albef
evaluate` under torchrun is checked by `test_retrieval_engine.py::test_two_processes_match_one`, in the same launch
as the engine's 2-process run.)"""

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import transformers_albef as ta
from transformers_albef.retrieval import recall_at_k, retrieval_score_matrices

from .cli_helpers import assert_user_error, run_cli

NUM_IMAGES, CAPTIONS_PER_IMAGE = 5, 2
WORDS = "red blue green dog cat horse bird man woman child ball tree car boat beach snow".split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A folder of pictures, a caption file and the same set in ALBEF's annotation format."""
    root = tmp_path_factory.mktemp("retrieval_cli")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    records, captions = [], []
    for i in range(NUM_IMAGES):
        name = f"photo_{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (48, 40 + 8 * i, 3), dtype=np.uint8)).save(root / "images" / name)
        texts = [" ".join(rng.choice(WORDS, size=5)) for _ in range(CAPTIONS_PER_IMAGE)]
        records.append({"image": name, "caption": texts})
        captions += texts
    (root / "captions.txt").write_text("\n".join(captions) + "\n\n")
    (root / "test.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def bundled():
    path = ta.bundled_model_path("retrieval")
    return ta.AlbefForRetrieval.from_pretrained(path).eval(), ta.AlbefProcessor.from_pretrained(path)


def test_help():
    for name, options in (
        ("retrieve", ("--images", "--captions", "--index", "--text")),
        ("evaluate", ("--image-root",)),
    ):
        status, out, _ = run_cli(name, "--help")
        assert status == 0
        for option in (*options, "--model", "--device", "--candidates"):
            assert option in out


def test_retrieve_builds_saves_and_searches(dataset, tmp_path):
    index = tmp_path / "photos.index"
    args = ["retrieve", "--images", dataset / "images", "--captions", dataset / "captions.txt", "--json"]
    queries = ["--text", "a red dog", "--text", "two birds", "--image", dataset / "images" / "photo_1.png"]
    status, out, err = run_cli(*args, "--save-index", index, *queries, "--top-k", 3, "--candidates", 4)
    assert status == 0, err
    report = json.loads(out)
    assert report["index"] == {"images": NUM_IMAGES, "texts": NUM_IMAGES * CAPTIONS_PER_IMAGE, "path": str(index)}
    directions = [q["direction"] for q in report["queries"]]
    assert directions == ["text_to_image", "text_to_image", "image_to_text"]
    for query in report["queries"]:
        assert [m["rank"] for m in query["matches"]] == [1, 2, 3]
        scores = [m["score"] for m in query["matches"]]
        assert scores == sorted(scores, reverse=True)
    assert Path(report["queries"][0]["matches"][0]["item"]).parent == (dataset / "images").resolve()
    assert (index / "index.json").is_file()

    # The saved index gives the same answers, and a table by default.
    status, again, _ = run_cli("retrieve", "--index", index, *queries, "--top-k", 3, "--candidates", 4, "--json")
    assert status == 0 and json.loads(again)["queries"] == report["queries"]
    status, table, _ = run_cli("retrieve", "--index", index, "--text", "a red dog", "--top-k", 2)
    assert status == 0
    lines = table.splitlines()
    assert lines[0] == f"index: {NUM_IMAGES} image(s), {NUM_IMAGES * CAPTIONS_PER_IMAGE} caption(s)"
    assert "text -> image: 'a red dog' (best 2 of 5 candidates, score=itm)" in table
    assert lines[-2].lstrip().startswith("1.") and lines[-1].lstrip().startswith("2.") and "photo_" in lines[-1]


def test_retrieve_batched_queries_and_searches(dataset, tmp_path):
    """A file of queries, answered in batches; every search gives the exact search's answers here (`torch` always,
    an approximate index built with --build-ann and selected with --search when faiss is installed)."""
    from transformers_albef.retrieval_backends import faiss_available

    index = tmp_path / "photos.index"
    queries = tmp_path / "queries.txt"
    queries.write_text("a red dog\nblue car on the beach\ntwo birds\n")
    status, _, err = run_cli("retrieve", "--images", dataset / "images", "--save-index", index, "--shard-size", 2)
    assert status == 0, err
    assert sorted(p.name for p in (index / "shards").iterdir()) == [f"images-00000{i}" for i in range(3)]
    answers = {}
    for search in ["exact", "torch"] + (["hnsw"] if faiss_available() else []):
        extra = ["--build-ann", "hnsw"] if search == "hnsw" else []
        args = ["retrieve", "--index", index, "--text-file", queries, "--text", "a cat", "--search", search, *extra]
        status, out, err = run_cli(*args, "--candidates", 4, "--json")
        assert status == 0, err
        report = json.loads(out)
        assert report["search"] == search and len(report["queries"]) == 4 and report["queries"][0]["query"] == "a cat"
        if extra:
            assert report["built"]["hnsw"]["images"]["recall"] == {"16": 1.0, "256": 1.0}  # 5 images: all found
        answers[search] = [[m["id"] for m in q["matches"]] for q in report["queries"]]
    assert all(found == answers["exact"] for found in answers.values())


def test_evaluate_matches_the_original_evaluation(dataset, bundled, tmp_path):
    status, out, err = run_cli(
        "evaluate", dataset / "test.json", "--image-root", dataset / "images", "--output", tmp_path / "result.json",
        "--candidates", 3, "--image-chunk-size", 2,
    )  # fmt: skip
    assert status == 0, err
    report = json.loads((tmp_path / "result.json").read_text())
    assert (report["num_images"], report["num_texts"], report["k"]) == (NUM_IMAGES, NUM_IMAGES * CAPTIONS_PER_IMAGE, 3)

    # The reference: the original loop on the images and captions prepared as the original evaluation does.
    model, processor = bundled
    records = json.loads((dataset / "test.json").read_text())
    images = [PIL.Image.open(dataset / "images" / r["image"]) for r in records]
    texts = [c for r in records for c in r["caption"]]
    inputs = processor(
        images=images, text=texts, clean_text="caption", padding="max_length", max_length=30, return_tensors="pt"
    )
    scores = retrieval_score_matrices(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], 3)
    txt2img = [t // CAPTIONS_PER_IMAGE for t in range(len(texts))]
    img2txt = [list(range(i * CAPTIONS_PER_IMAGE, (i + 1) * CAPTIONS_PER_IMAGE)) for i in range(NUM_IMAGES)]
    expected = recall_at_k(*scores, txt2img, img2txt)
    assert report["metrics"] == pytest.approx(expected, abs=1e-9)
    assert f"{'image -> text':15s} {expected['txt_r1']:7.2f} {expected['txt_r5']:7.2f}" in out
    assert report["recall_curve"]["ranks"] == [1, 2, 3]

    picture = PIL.Image.open(tmp_path / "result.png")
    assert picture.format == "PNG" and picture.size == (900, 560)
    assert len(np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # something was drawn


def test_evaluate_caps_k_and_prints_chance_levels(dataset, tmp_path):
    """k larger than the corpus (the bundled model's retrieval_k is 256, here 5 images and 10 captions) is reported
    capped, and every recall has its chance level: a random ranking's."""
    status, out, err = run_cli(
        "evaluate", dataset / "test.json", "--image-root", dataset / "images", "--output", tmp_path / "r.json",
        "--no-plot",
    )  # fmt: skip
    assert status == 0, err
    assert "k=256" not in out.splitlines()[0]
    assert "the ITC top 10 captions of each image and the top 5 images of each caption (k=256 capped" in out
    lines = out.splitlines()
    chance_rows = [lines[i + 1] for i, line in enumerate(lines) if line.startswith(("image -> text", "text -> image"))]
    # image -> text: 2 of 10 captions are right, found in the top k with 1 - C(8, k) / C(10, k); text -> image: k / 5
    image_to_text = [20.0, 100 * (1 - 56 / 252), 100.0]
    text_to_image = [20.0, 100.0, 100.0]
    assert chance_rows == [
        f"{'  chance':15s} " + " ".join(f"{v:7.2f}" for v in [*row, sum(row) / 3])
        for row in (image_to_text, text_to_image)
    ]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["k"] == 10 and report["candidates"] == {"image_to_text": 10, "text_to_image": 5}
    assert report["chance"]["img_r1"] == pytest.approx(20.0)
    assert report["chance"]["txt_r5"] == pytest.approx(image_to_text[1])
    assert report["recall_curve"]["ranks"] == list(range(1, 11))


def test_evaluate_plot_option(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(
        "evaluate", dataset / "test.json", "--image-root", dataset / "images", "--candidates", 2
    )
    assert status == 0, err
    assert (tmp_path / "recall_curve.png").is_file() and "recall curve drawn in recall_curve.png" in out
    status, _, _ = run_cli(
        "evaluate", dataset / "test.json", "--image-root", dataset / "images", "--plot", "plots/curve.png"
    )
    assert status == 0 and (tmp_path / "plots" / "curve.png").is_file()


def test_recall_curve_without_matplotlib(tmp_path, monkeypatch):
    """The PIL drawing is used when matplotlib is missing (and is what runs on machines without it)."""
    from transformers_albef.cli import evaluate

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    curve = {"ranks": list(range(1, 21)), "image_to_text": [min(100, 30 + 4 * r) for r in range(20)]}
    curve["text_to_image"] = [min(100, 20 + 5 * r) for r in range(20)]
    path = evaluate.draw_recall_curve(curve, tmp_path / "curve.png", "title")
    assert PIL.Image.open(path).size == (900, 560)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["retrieve", "--text", "a dog"], ["nothing to search"]),
        (["retrieve", "--images", "{images}"], ["nothing to do"]),
        (["retrieve", "--index", "{tmp}", "--images", "{images}", "--text", "a"], ["cannot be combined"]),
        (["retrieve", "--index", "{tmp}", "--text", "a"], ["not a retrieval index"]),
        (["retrieve", "--captions", "{tmp}/missing.txt", "--text", "a"], ["caption file not found"]),
        (["retrieve", "--captions", "{tmp}/empty.txt", "--text", "a"], ["holds no captions"]),
        (["retrieve", "--images", "{mixed}", "--text", "a"], ["notes.txt", "--skip-non-images"]),
        (["retrieve", "--images", "{images}", "--text", "a", "--candidates", "9"], ["k=9 is larger than the 5"]),
        (["retrieve", "--images", "{images}", "--image", "{tmp}/none.png"], ["query image not found"]),
        (["retrieve", "--captions", "{captions}", "--text", "a"], ["holds no images"]),
        (["retrieve", "--images", "{images}", "--text", "a", "--candidates", "0"], ["must be at least 1"]),
        (["retrieve", "--images", "{images}", "--build-ann", "hnsw"], ["--build-ann adds to a saved index"]),
        (["retrieve", "--images", "{images}", "--text", "a", "--search", "best"], ["unknown search 'best'"]),
        (["retrieve", "--captions", "{captions}", "--save-index", "{tmp}/empty.txt", "--overwrite"], ["is a file"]),
        (["evaluate", "{tmp}/missing.json"], ["does not exist"]),
        (["evaluate", "{annotation}"], ["image file not found", "photo_0.png"]),
        (["evaluate", "{annotation}", "--image-root", "{tmp}/nowhere"], ["--image-root is not a folder"]),
        (["evaluate", "{bad_json}"], ["not valid json"]),
        (["evaluate", "{no_caption}"], ["no 'caption'"]),
        (["evaluate", "{annotation}", "--image-root", "{images}", "--plot", "x.png", "--no-plot"], ["contradict"]),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_status(args, fragments, dataset, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "no_caption.json").write_text(json.dumps([{"image": "photo_0.png"}]))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("not a picture")
    PIL.Image.new("RGB", (8, 8)).save(mixed / "picture.png")
    values = {
        "tmp": tmp_path,
        "images": dataset / "images",
        "captions": dataset / "captions.txt",
        "annotation": dataset / "test.json",
        "bad_json": tmp_path / "bad.json",
        "no_caption": tmp_path / "no_caption.json",
        "mixed": mixed,
    }
    assert_user_error(run_cli(*[arg.format(**values) for arg in args]), *fragments)
