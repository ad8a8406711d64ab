"""The `albef` command line, run through its real entry point (`main`, and `python -m transformers_albef.cli` once)
with the bundled models: exit codes, printed results, pictures written, one-line messages for bad input."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

import transformers_albef as ta
from transformers_albef import cli
from transformers_albef.cli import demo
from transformers_albef.models.albef.processing_albef import pre_caption

from .cli_helpers import assert_user_error, run_cli
from .parity_utils import load_fixture


def shape_picture(path, colour="red", size=64):
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 5, size // 5, size * 4 // 5, size * 4 // 5), fill=colour)
    image.save(path)
    return path


def grid_width(panels, columns, panel_size):
    """`image_grid`'s documented width."""
    margin = max(6, panel_size // 12)
    columns = min(columns, panels)
    return columns * (panel_size + margin) + margin


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    return run_cli("demo", "--output-dir", folder), folder


def test_demo_prints_results_and_writes_pictures(demo_run):
    (status, out, err), folder = demo_run
    assert status == 0, err
    assert "Image -> text retrieval" in out and "Recall@1" in out
    assert "Visual question answering" in out and "Accuracy" in out
    assert "grounding.png" in out and "results.png" in out
    samples = demo.load_samples(None)
    for sample in samples.captioned:
        assert sample.name in out
    for sample in samples.questions:
        assert sample.question.rstrip("?") in out
    if demo.SAMPLES_DIR.exists():
        assert "credits and licences in" in out  # the Twemoji pictures need their attribution

    with Image.open(folder / "grounding.png") as grounding:
        assert grounding.format == "PNG"
        # image + whole text + one panel per word of the first caption, 6 to a row, 192-px panels
        processor = ta.AlbefProcessor.from_pretrained(ta.bundled_model_path("retrieval"))
        pieces = processor.tokenizer.tokenize(pre_caption(samples.captioned[0].caption))
        panels = 2 + sum(not piece.startswith("##") for piece in pieces)
        assert grounding.width == grid_width(panels, 6, 192)
        assert grounding.height > 192 * -(-panels // 6)
    with Image.open(folder / "results.png") as results:
        assert results.format == "PNG"
        results.load()
        columns = min(6, max(len(samples.captioned), len(samples.questions)))
        assert results.width == grid_width(columns, columns, 160)
        rows = -(-len(samples.captioned) // columns) + -(-len(samples.questions) // columns)
        assert results.height > rows * 160


def test_demo_says_what_the_models_and_pictures_are_and_nothing_else_on_stderr(tmp_path):
    """In a fresh process, as a user runs it: the bundled models are said to be toy models (with the command that
    converts a published checkpoint, which the parser accepts), each sample list's split is printed from
    samples.json, scores are probabilities with the chance levels beside the results, and stderr stays empty (no
    "Loading weights" bars, no warnings)."""
    command = [sys.executable, "-m", "transformers_albef.cli", "demo", "--output-dir", str(tmp_path / "out")]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stderr == ""
    out = " ".join(process.stdout.split())  # the notes are wrapped
    assert "small ALBEFs trained by this project" in out and "not ALBEF's published checkpoints" in out
    assert "emoji" in out and "easy-vqa" in out
    commands = re.findall(r"`albef ([^`]+)`", out)
    assert [c.split()[0] for c in commands] == ["convert", "demo"]
    for line in commands:
        cli.build_parser().parse_args(shlex.split(line))  # a usage error would exit
    splits = json.loads((demo.SAMPLES_DIR / "samples.json").read_text())["splits"]
    for name, text in splits.items():
        assert f"{name} samples: {text}" in out
    assert "held out" in splits["retrieval"] and "test" in splits["vqa"]

    lines = process.stdout.splitlines()
    samples = demo.load_samples(None)
    n = len(samples.captioned)
    recall = [line for line in lines if line.startswith("Recall@1:")]
    assert len(recall) == 1 and re.fullmatch(rf"Recall@1: image->text \d+/{n}, text->image \d+/{n}", recall[0])
    assert f"(chance level: 1/{n} each way" in process.stdout
    answers = json.loads((ta.bundled_model_path("vqa") / "config.json").read_text())["answer_list"]
    assert f"(chance level: 1/{len(answers)}," in process.stdout
    probabilities = [float(p) for p in re.findall(r"(?:p\(match\)|\(p) (\d+\.\d+)", process.stdout)]
    assert len(probabilities) == n + len(samples.questions)
    assert all(0 <= p <= 1 for p in probabilities)


def test_demo_note_names_only_the_bundled_model_in_use():
    assert "VQA" in demo.bundled_models_note(False, True) and "emoji" not in demo.bundled_models_note(False, True)
    assert "--vqa-model albef-vqa" in demo.bundled_models_note(False, True)
    assert "--model albef-coco" in demo.bundled_models_note(True, False)
    assert demo.bundled_models_note(False, False) is None


def test_demo_samples_splits_must_be_descriptions(tmp_path):
    shape_picture(tmp_path / "red.png", "red")
    entries = {"splits": {"shapes": "drawn by the test"}, "shapes": [{"file": "red.png", "caption": "a red circle"}]}
    (tmp_path / "samples.json").write_text(json.dumps(entries))
    assert demo.load_samples(tmp_path).splits == {"shapes": "drawn by the test"}
    (tmp_path / "samples.json").write_text(json.dumps({**entries, "splits": ["not", "a", "mapping"]}))
    with pytest.raises(cli.CliError, match="splits"):
        demo.load_samples(tmp_path)


def test_demo_reads_a_samples_folder(tmp_path):
    """samples.json as a plain list; caption-only, question-only and credit fields."""
    (tmp_path / "samples").mkdir()
    shape_picture(tmp_path / "samples" / "red.png", "red")
    shape_picture(tmp_path / "samples" / "blue.png", "blue")
    entries = [
        {"file": "red.png", "caption": "a red circle", "attribution": "drawn by the test"},
        {"file": "blue.png", "caption": "a blue circle"},
        {"file": "blue.png", "question": "what color is the shape?", "answer": "blue"},
    ]
    (tmp_path / "samples" / "samples.json").write_text(json.dumps(entries))
    status, out, err = run_cli("demo", "--samples", tmp_path / "samples", "--output-dir", tmp_path / "out")
    assert status == 0, err
    assert "3 sample pictures" in out and "Sample pictures: drawn by the test" in out
    assert '"a blue circle"' in out and '"what color is the shape?"' in out
    assert "Accuracy: " in out and "/1" in out
    with Image.open(tmp_path / "out" / "grounding.png") as grounding:
        assert grounding.width == grid_width(2 + 3, 6, 192)  # image, whole text, a / red / circle


def test_demo_draws_shapes_only_without_the_samples_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SAMPLES_DIR", tmp_path / "not-installed")
    samples = demo.load_samples(None)
    assert "drawn shapes" in samples.origin
    assert len(samples.captioned) == 3 and len(samples.questions) == 3

    # A folder that is there but broken is an error, not a reason to draw.
    monkeypatch.setattr(demo, "SAMPLES_DIR", tmp_path)
    assert_user_error(run_cli("demo", "--output-dir", tmp_path / "out"), "albef demo: error:", "no samples.json")
    (tmp_path / "samples.json").write_text("[{]")
    assert_user_error(run_cli("demo", "--output-dir", tmp_path / "out"), "not valid JSON")
    (tmp_path / "samples.json").write_text(json.dumps([{"file": "x.png"}]))
    assert_user_error(run_cli("demo", "--output-dir", tmp_path / "out"), "needs a 'caption' or a 'question'")
    (tmp_path / "samples.json").write_text(json.dumps([{"file": "x.png", "caption": "x"}]))
    assert_user_error(run_cli("demo", "--output-dir", tmp_path / "out"), "image not found")


def test_vqa_ranks_the_answer_list(tmp_path):
    image = shape_picture(tmp_path / "shape.png")
    status, out, err = run_cli("vqa", "--image", image, "--question", "What color is the shape?", "--top-k", "3")
    assert status == 0, err
    ranked = [line for line in out.splitlines() if line.strip()[:2] in ("1.", "2.", "3.", "4.")]
    assert len(ranked) == 3
    answer_list = ta.AlbefConfig.from_pretrained(ta.bundled_model_path("vqa")).answer_list
    assert all(line.split()[1] in answer_list for line in ranked)
    probabilities = [float(line.split()[-1]) for line in ranked]
    assert probabilities == sorted(probabilities, reverse=True)

    (tmp_path / "answers.json").write_text(json.dumps(["red", "blue"]))
    (tmp_path / "answers.txt").write_text("red\nblue\n\ngreen\n")
    for answers, count in (("answers.json", 2), ("answers.txt", 3)):
        status, out, _ = run_cli("vqa", "--image", image, "--question", "color?", "--answers", tmp_path / answers)
        assert status == 0 and f"ranked from {count} candidates" in out


def test_vqa_generates_when_the_model_has_no_answer_list(tmp_path):
    model = tmp_path / "vqa"
    shutil.copytree(ta.bundled_model_path("vqa"), model)
    config = json.loads((model / "config.json").read_text())
    config["answer_list"] = None
    (model / "config.json").write_text(json.dumps(config))
    image = shape_picture(tmp_path / "shape.png")
    status, out, err = run_cli("vqa", "--image", image, "--question", "what shape?", "--model", model)
    assert status == 0, err
    assert "answer (generated" in out


def test_ground_writes_the_picture(tmp_path):
    image = shape_picture(tmp_path / "shape.png", size=100)
    output = tmp_path / "pictures" / "ground.png"
    args = ["ground", "--image", image, "--text", "A red, unaffable circle!", "--output", output]
    status, out, err = run_cli(*args, "--panel-size", "64", "--columns", "3", "--layer", "3")
    assert status == 0, err
    assert "words: a red unaffable circle" in out  # cleaned, word pieces (una ##ffa ##ble) merged
    with Image.open(output) as picture:
        assert picture.format == "PNG"
        assert picture.width == grid_width(2 + 4, 3, 64)
        assert picture.height > 2 * 64

    status, out, err = run_cli("ground", "--image", image, "--text", "circle", "--output", output, "--mode", "itc")
    assert status == 0, err
    assert "words:" not in out
    with Image.open(output) as picture:
        assert picture.width == grid_width(2, 6, 192)  # the image and the whole-text map


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["ground", "--image", "{tmp}/missing.png", "--text", "x"], ["albef ground: error:", "image not found"]),
        (["ground", "--image", "{tmp}/not-an-image.png", "--text", "x"], ["cannot read", "as an image"]),
        (["ground", "--image", "{image}", "--text", "x", "--model", "{tmp}/no-model"], ["model folder not found"]),
        (["ground", "--image", "{image}", "--text", "x", "--model", "{vqa}"], ["AlbefForQuestionAnswering", "needs"]),
        (["ground", "--image", "{image}", "--text", "x", "--layer", "0"], ["layer must be in"]),
        (["ground", "--image", "{image}", "--text", "x", "--output", "{tmp}/out.nope"], ["cannot write"]),
        (["ground", "--image", "{image}", "--text", "  "], ["--text", "must not be empty"]),
        (["vqa", "--image", "{image}", "--question", "q", "--device", "nonsense"], ["unknown device"]),
        (["vqa", "--image", "{image}", "--question", "q", "--answers", "{tmp}/none.json"], ["answer file not found"]),
        (["vqa", "--image", "{image}", "--question", "q", "--top-k", "0"], ["--top-k", "at least 1"]),
        (["vqa", "--image", "{image}"], ["--question"]),
        (["vqa", "--image", "{image}", "--question", "q", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["nope"], ["invalid choice"]),
        ([], ["COMMAND"]),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_status(args, fragments, tmp_path):
    image = shape_picture(tmp_path / "shape.png")
    (tmp_path / "not-an-image.png").write_text("plain text")
    values = {"tmp": tmp_path, "image": image, "vqa": ta.bundled_model_path("vqa")}
    assert_user_error(run_cli(*[arg.format(**values) for arg in args]), *fragments)


def test_help_describes_every_command():
    status, out, _ = run_cli("--help")
    assert status == 0
    for name in cli.SUBCOMMANDS:
        assert name in out
    for name, option in (("demo", "--output-dir"), ("vqa", "--top-k"), ("ground", "--layer"), ("convert", "--kind")):
        status, out, _ = run_cli(name, "--help")
        assert status == 0 and option in out
        assert name == "convert" or "--device" in out


def test_missing_subcommand_module_is_listed_and_explained(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, "not_written_yet"))
    status, out, _ = run_cli("--help")
    assert status == 0 and "not_written_yet" in out and "not available" in out
    assert_user_error(run_cli("not_written_yet", "--any", "thing"), "not available in this installation")


def test_import_error_inside_a_subcommand_is_not_hidden(monkeypatch):
    real_import = cli.importlib.import_module

    def broken(name, *args):
        if name == "transformers_albef.cli.vqa":
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        cli.main(["demo", "--help"])


def test_convert_command(tmp_path):
    checkpoint = load_fixture("retrieval")[0] / "checkpoint.pth"
    status, out, err = run_cli("convert", "--checkpoint", checkpoint, "--output-dir", tmp_path / "out")
    assert status == 0, err
    assert "reload check: max abs diff" in out
    assert "albef convert --checkpoint" in (tmp_path / "out" / "README.md").read_text()
    assert ta.AlbefForRetrieval.from_pretrained(tmp_path / "out") is not None

    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    result = run_cli("convert", "--checkpoint", tmp_path / "bad.pth", "--output-dir", tmp_path / "bad")
    assert_user_error(result, "albef convert: error:", "corrupt")
    assert not (tmp_path / "bad").exists()


def test_module_entry_point_runs_in_a_fresh_process(tmp_path):
    """`python -m transformers_albef.cli`: a user error exits 2 with one line and no traceback."""
    missing = tmp_path / "missing.png"
    command = [sys.executable, "-m", "transformers_albef.cli", "ground", "--image", str(missing), "--text", "a dog"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1] == f"albef ground: error: image not found: {missing}"
    assert "Traceback" not in process.stderr
