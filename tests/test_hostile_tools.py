"""Hostile input and faults for the tools (the `albef` command, the converter, training data, resumption, Hub folders).

Each table row is an input a careless or malicious user could give; the test asserts the error class and what its
one-line message says (what was wrong, where, what was expected), that no traceback is printed, and that nothing
from a checkpoint is unpickled (payloads below create a marker file when unpickled; the tests check it never
appears). The fault-injection tests make every writer fail mid-write (an exception, KeyboardInterrupt, a full disk)
and check that the previous target is intact and that no temporary sibling is left.
"""

from __future__ import annotations

import builtins
import errno
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers_albef as ta
from transformers_albef import cli
from transformers_albef.cli.common import save_picture
from transformers_albef.conversion import load_config_file, load_original_checkpoint
from transformers_albef.hub import OutputFolderError, atomic_folder, save_for_hub
from transformers_albef.training import finetune, pretrain
from transformers_albef.training.checkpointing import (
    TrainingProgress,
    UnsafeCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from transformers_albef.training.data import BadRecordError, default_num_workers, load_image_text_pairs, open_image
from transformers_albef.training.task_data import load_answer_list, load_nlvr, load_retrieval_train, load_ve, load_vqa

from .cli_helpers import assert_user_error, run_cli
from .conftest import FIXTURES
from .tiny_models import tiny_config
from .training.pretrain_utils import cli_args, fresh_accelerate, write_config, write_pairs

REPO = Path(__file__).resolve().parents[1]
RETRIEVAL_CHECKPOINT = FIXTURES / "tiny" / "retrieval" / "checkpoint.pth"
VOCAB = ta.models.albef.processing_albef.BERT_VOCAB


class Payload:
    """Unpickling this calls `open(marker, "w")`: any code path that unpickles it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def fault(kind: str) -> BaseException:
    return {
        "error": RuntimeError("injected failure"),
        "interrupt": KeyboardInterrupt(),
        "disk full": OSError(errno.ENOSPC, "No space left on device"),
    }[kind]


FAULTS = ["error", "interrupt", "disk full"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(target: Path) -> list[str]:
    """Temporary siblings of `target` (`.name.tmp-*`, `.name.old-*`, `.tmp-name`)."""
    return sorted(
        p.name
        for p in target.parent.iterdir()
        if p.name.startswith((f".{target.name}.", f".tmp-{target.name}")) or p.name.startswith(".tmp-")
    )


def bomb_png(path: Path) -> Path:
    """A PNG whose header claims 30000 x 30000 pixels (a decompression bomb: PIL refuses it when opening)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, 30000, 30000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def small_vocab(path: Path, size: int = 200) -> Path:
    path.write_text("".join(VOCAB.read_text(encoding="utf-8").splitlines(keepends=True)[:size]), encoding="utf-8")
    return path


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ----- the `albef` command: bad arguments and files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pictures and model folders, good and broken, shared by the command-line tables."""
    root = tmp_path_factory.mktemp("hostile")
    picture = root / "shape.png"
    Image.new("RGB", (48, 48), "red").save(picture)
    (root / "text.png").write_text("plain text, not a picture")
    data = picture.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    bomb_png(root / "bomb.png")
    (root / "folder.png").mkdir()
    (root / "answers-bad.json").write_text('["red", ')
    (root / "answers-object.json").write_text('{"a": 1}')
    (root / "answers-empty.txt").write_text("\n  \n")

    vqa = ta.bundled_model_path("vqa")

    def model_folder(name, change):
        folder = root / name
        shutil.copytree(vqa, folder)
        change(folder)
        return folder

    def no_tokenizer(folder):
        for file in folder.glob("tokenizer*"):
            file.unlink()

    def smaller_vocab(folder):
        no_tokenizer(folder)
        ta.AlbefProcessor.from_bert_vocab(64, vocab_file=small_vocab(root / "vocab200.txt")).save_pretrained(folder)

    def nan_weights(folder):
        weights = load_file(folder / "model.safetensors")
        key = sorted(weights)[0]
        weights[key] = torch.full_like(weights[key], float("nan"))
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    def misshaped(folder):
        weights = load_file(folder / "model.safetensors")
        key = "vision_model.embeddings.cls_token"
        weights[key] = torch.zeros(1, 1, weights[key].shape[-1] + 2, dtype=weights[key].dtype)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    def truncated_weights(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:500])

    folders = {
        "no-tokenizer": model_folder("no-tokenizer", no_tokenizer),
        "small-vocab": model_folder("small-vocab", smaller_vocab),
        "bad-json": model_folder("bad-json", lambda f: (f / "config.json").write_text('{"model_type": "albef",')),
        "invalid": model_folder(
            "invalid", lambda f: edit_json(f / "config.json", lambda c: c["text_config"].update(hidden_size=-3))
        ),
        "string-size": model_folder(
            "string-size", lambda f: edit_json(f / "config.json", lambda c: c["vision_config"].update(image_size="x"))
        ),
        "bert": model_folder("bert", lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="bert"))),
        "nan": model_folder("nan", nan_weights),
        "misshaped": model_folder("misshaped", misshaped),
        "truncated": model_folder("truncated", truncated_weights),
        "no-config": model_folder("no-config", lambda f: (f / "config.json").unlink()),
        "size": model_folder(
            "size",
            lambda f: edit_json(f / "processor_config.json", lambda c: c["image_processor"]["size"].update(height=32)),
        ),
    }
    samples = root / "samples"
    samples.mkdir()
    shutil.copy(picture, samples / "shape.png")
    return {"root": root, "image": picture, "vqa": vqa, **{f"model-{k}": v for k, v in folders.items()}}


VQA = ["vqa", "--question", "what colour is it?"]
CLI_CASES = [
    # (id, argv, fragments of the one error line)
    ("image missing", [*VQA, "--image", "{root}/none.png"], ["image not found", "none.png"]),
    ("image is a folder", [*VQA, "--image", "{root}/folder.png"], ["folder.png", "is a folder"]),
    ("image is text", [*VQA, "--image", "{root}/text.png"], ["cannot read", "text.png", "as an image"]),
    ("image truncated", [*VQA, "--image", "{root}/truncated.png"], ["cannot read", "truncated.png"]),
    ("decompression bomb", [*VQA, "--image", "{root}/bomb.png"], ["refusing to read", "bomb.png", "pixels"]),
    ("answers not json", [*VQA, "--image", "{image}", "--answers", "{root}/answers-bad.json"], ["not valid JSON"]),
    ("answers not a list", [*VQA, "--image", "{image}", "--answers", "{root}/answers-object.json"], ["JSON list"]),
    ("answers empty", [*VQA, "--image", "{image}", "--answers", "{root}/answers-empty.txt"], ["holds no answers"]),
    ("top-k 0", [*VQA, "--image", "{image}", "--top-k", "0"], ["--top-k", "at least 1"]),
    ("top-k text", [*VQA, "--image", "{image}", "--top-k", "many"], ["--top-k", "expected an integer"]),
    ("blank question", ["vqa", "--image", "{image}", "--question", "  "], ["--question", "must not be empty"]),
    ("unknown device", [*VQA, "--image", "{image}", "--device", "gpu9"], ["unknown device", "gpu9"]),
    ("model is a file", [*VQA, "--image", "{image}", "--model", "{image}"], ["is a file", "model folder"]),
    ("model missing", [*VQA, "--image", "{image}", "--model", "./nowhere"], ["model folder not found"]),
    ("no tokenizer files", [*VQA, "--image", "{image}", "--model", "{model-no-tokenizer}"], ["no-tokenizer", "token"]),
    (
        "smaller vocabulary",
        [*VQA, "--image", "{image}", "--model", "{model-small-vocab}"],
        ["small-vocab", "the tokenizer has 200 tokens", "30522"],
    ),
    (
        "config not json",
        [*VQA, "--image", "{image}", "--model", "{model-bad-json}"],
        ["config.json", "not valid JSON"],
    ),
    (
        "config invalid",
        [*VQA, "--image", "{image}", "--model", "{model-invalid}"],
        ["invalid/config.json", "hidden_size must be at least 1"],
    ),
    (
        "config type",
        [*VQA, "--image", "{image}", "--model", "{model-string-size}"],
        ["vision_config.image_size must be an integer", "'x'"],
    ),
    ("config of bert", [*VQA, "--image", "{image}", "--model", "{model-bert}"], ["'bert' model", "not an ALBEF"]),
    ("NaN weights", [*VQA, "--image", "{image}", "--model", "{model-nan}"], ["nan", "NaN or infinite"]),
    (
        "mis-shaped weights",
        [*VQA, "--image", "{image}", "--model", "{model-misshaped}"],
        ["model.safetensors", "vision_model.embeddings.cls_token", "expected (1, 1, 128)"],
    ),
    (
        "truncated weights",
        [*VQA, "--image", "{image}", "--model", "{model-truncated}"],
        ["truncated/model.safetensors"],
    ),
    ("no config.json", [*VQA, "--image", "{image}", "--model", "{model-no-config}"], ["has no config.json"]),
    ("processor size", [*VQA, "--image", "{image}", "--model", "{model-size}"], ["resizes to 32x64", "64x64"]),
    (
        "wrong head",
        ["ground", "--image", "{image}", "--text", "red", "--model", "{vqa}"],
        ["AlbefForQuestionAnswering", "needs a AlbefForRetrieval"],
    ),
    ("picture format", ["ground", "--image", "{image}", "--text", "red", "--output", "{root}/g.xyz"], ["'.xyz'"]),
    ("picture into a folder", ["ground", "--image", "{image}", "--text", "red", "--output", "{root}"], ["a folder"]),
    ("layer out of range", ["ground", "--image", "{image}", "--text", "red", "--layer", "99"], ["layer", "99"]),
    ("samples folder empty", ["demo", "--samples", "{root}/samples", "--output-dir", "{root}/d"], ["no samples.json"]),
    ("unknown option", [*VQA, "--image", "{image}", "--colour"], ["unrecognized arguments: --colour"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_hostile_input_is_one_line(argv, fragments, world):
    values = {key: str(value) for key, value in world.items()}
    result = run_cli(*[arg.format(**values) for arg in argv])
    assert_user_error(result, *fragments)
    assert "Class validation error" not in result[2]


@pytest.mark.parametrize(
    "content, fragments",
    [
        ("[{]", ["samples.json is not valid JSON"]),
        ('"a string"', ["must hold a list of samples"]),
        ('[{"caption": "x"}]', ["sample 0 needs a 'file' field"]),
        ("[]", ["lists no samples"]),
    ],
    ids=["not json", "not a list", "no file", "empty"],
)
def test_demo_samples_file(content, fragments, tmp_path):
    (tmp_path / "samples.json").write_text(content)
    assert_user_error(run_cli("demo", "--samples", tmp_path, "--output-dir", tmp_path / "out"), *fragments)
    assert not (tmp_path / "out").exists()


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(world, monkeypatch):
    from transformers_albef.cli import vqa

    def broken(path):
        raise ZeroDivisionError("division by zero in a bug")

    monkeypatch.setattr(vqa, "read_answers", broken)
    argv = [*VQA, "--image", world["image"], "--answers", world["root"] / "answers-bad.json"]
    status, _, err = run_cli(*argv)
    assert status == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("albef vqa: error: ZeroDivisionError: division by zero in a bug")
    assert "--debug" in err
    with pytest.raises(ZeroDivisionError):  # `--debug` after the subcommand works too
        cli.main([str(a) for a in [*argv, "--debug"]])


# ----- the converter: hostile checkpoints and options ----------------------------------------------------------------


@pytest.fixture(scope="module")
def original():
    return load_original_checkpoint(RETRIEVAL_CHECKPOINT)


def tamper(state_dict, how, tmp_path):
    """A hostile variant of the tiny retrieval checkpoint written to tmp_path; returns its path."""
    path = tmp_path / "hostile.pth"
    sd = dict(state_dict)
    if how == "truncated":
        data = RETRIEVAL_CHECKPOINT.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        return path
    if how == "pickled object":
        torch.save({"model": sd, "optimizer": Payload(tmp_path / "pwned")}, path)
        return path
    if how == "pickled object in safetensors name":
        path = tmp_path / "hostile.safetensors"
        torch.save({"model": sd, "x": Payload(tmp_path / "pwned")}, path)
        return path
    if how == "nan":
        sd["itm_head.weight"] = torch.full_like(sd["itm_head.weight"], float("nan"))
    elif how == "inf":
        sd["text_proj.bias"] = torch.full_like(sd["text_proj.bias"], float("inf"))
    elif how == "mis-shaped":
        sd["itm_head.weight"] = torch.zeros(3, sd["itm_head.weight"].shape[1])
    elif how == "mis-shaped qkv":
        key = "visual_encoder.blocks.0.attn.qkv.weight"
        sd[key] = sd[key][:-3]
    elif how == "scalar where a matrix belongs":
        sd["visual_encoder.cls_token"] = torch.tensor(0.5)
    elif how == "not a state dict":
        torch.save(torch.zeros(3), path)
        return path
    elif how == "not tensors":
        sd["temp"] = 0.07
        torch.save(sd, path)
        return path
    elif how == "empty":
        sd = {}
    elif how == "unknown keys":
        sd["my_extra_head.weight"] = torch.zeros(2)
    elif how == "fine-tuned kind mismatch":
        pass
    torch.save({"model": sd}, path)
    return path


CONVERT_CASES = [
    # (id, how the checkpoint is tampered with, extra arguments, fragments)
    ("truncated file", "truncated", [], ["hostile.pth", "corrupt or truncated"]),
    ("pickled object", "pickled object", [], ["hostile.pth", "weights_only=True", "arbitrary unpickling"]),
    ("pickle named safetensors", "pickled object in safetensors name", [], ["not a readable safetensors file"]),
    ("NaN weights", "nan", [], ["hostile.pth", "NaN or infinite", "itm_head.weight"]),
    ("infinite weights", "inf", [], ["NaN or infinite", "text_proj.bias"]),
    ("mis-shaped key", "mis-shaped", [], ["itm_head.weight (3, 32)", "expected shape", "(2, 32)"]),
    ("mis-shaped fused qkv", "mis-shaped qkv", [], ["visual_encoder.blocks.0.attn.qkv.weight", "shape"]),
    ("scalar for a matrix", "scalar where a matrix belongs", [], ["shapes", "cannot be read"]),
    ("not a state dict", "not a state dict", [], ["state dict", "Tensor"]),
    ("entries not tensors", "not tensors", [], ["not tensors", "temp"]),
    ("empty state dict", "empty", [], ["holds no tensors"]),
    ("unknown keys", "unknown keys", [], ["closest kind is 'retrieval'", "my_extra_head.weight"]),
    ("kind it cannot become", "fine-tuned kind mismatch", ["--kind", "vqa"], ["retrieval checkpoint cannot", "vqa"]),
    ("image size 0", "fine-tuned kind mismatch", ["--image-size", "0"], ["--image-size", "at least 1"]),
    ("image size -16", "fine-tuned kind mismatch", ["--image-size", "-16"], ["--image-size", "at least 1"]),
    ("image size off-grid", "fine-tuned kind mismatch", ["--image-size", "50"], ["50", "multiple", "patch size 16"]),
]


@pytest.mark.parametrize("how, extra, fragments", [c[1:] for c in CONVERT_CASES], ids=[c[0] for c in CONVERT_CASES])
def test_converter_refuses_hostile_checkpoints(how, extra, fragments, original, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = tamper(original, how, tmp_path)
    result = run_cli("convert", "--checkpoint", checkpoint, "--output-dir", tmp_path / "out", *extra)
    assert_user_error(result, "albef convert: error:", *fragments)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


def config_file(tmp_path, text):
    (tmp_path / "cfg.json").write_text(text)
    return tmp_path / "cfg.json"


CONFIG_CASES = [
    ("not json", '{"text_config": ', ["cfg.json is not valid JSON", "line 1"]),
    ("a list", "[1, 2]", ["cfg.json must hold a JSON object", "list"]),
    ("another model type", '{"model_type": "bert"}', ["cfg.json", "'bert' model"]),
    (
        "negative size",
        '{"text_config": {"hidden_size": -3}}',
        ["cfg.json", "text_config.hidden_size must be at least 1"],
    ),
    ("string size", '{"vision_config": {"image_size": "big"}}', ["vision_config.image_size must be an integer"]),
    ("zero queue", '{"queue_size": 0}', ["queue_size must be at least 1, got 0"]),
    ("alpha above 1", '{"alpha": 2}', ["alpha must be between 0 and 1"]),
    ("flag as number", '{"distill": 1}', ["distill must be true or false"]),
    ("validator", '{"text_config": {"hidden_size": 30, "num_attention_heads": 4}}', ["30", "num_attention_heads"]),
    ("sub-config not an object", '{"text_config": 5}', ["cfg.json is not a valid ALBEF configuration", "text_config"]),
]


@pytest.mark.parametrize("text, fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_file_errors_name_the_file_and_the_field(text, fragments, tmp_path):
    path = config_file(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        load_config_file(path)
    message = str(caught.value)
    assert "\n" not in message and not message.startswith("Class validation error")
    for fragment in fragments:
        assert fragment in message, message
    # The same through the converter's --config: one line, the folder not written.
    result = run_cli(
        "convert", "--checkpoint", RETRIEVAL_CHECKPOINT, "--output-dir", tmp_path / "out", "--config", path
    )
    assert_user_error(result, *fragments)
    assert not (tmp_path / "out").exists()


OPTION_CASES = [
    # (id, arguments after `albef convert`, fragments); {ckpt} is the tiny retrieval checkpoint
    ("small vocab", ["--tokenizer", "{tmp}/vocab.txt"], ["tokenizer has 200 tokens", "512"]),
    ("no vocab", ["--tokenizer", "{tmp}/empty.txt"], ["--tokenizer", "no vocabulary"]),
    ("missing tokenizer", ["--tokenizer", "{tmp}/no-such-tokenizer"], ["--tokenizer", "no-such-tokenizer"]),
    ("user folder", ["--output-dir", "{tmp}/mine"], ["mine is not empty", "notes.txt", "--overwrite"]),
    ("user folder, --overwrite", ["--output-dir", "{tmp}/mine", "--overwrite"], ["notes.txt", "even with"]),
    ("output is a file", ["--output-dir", "{tmp}/notes.txt"], ["notes.txt exists and is not a folder"]),
    ("other model, --overwrite", ["--output-dir", "{tmp}/bert", "--overwrite"], ["no config.json of model_type"]),
]


@pytest.mark.parametrize("extra, fragments", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_converter_options_and_output_folders(extra, fragments, tmp_path):
    small_vocab(tmp_path / "vocab.txt")
    (tmp_path / "empty.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    (tmp_path / "mine" / "config.json").write_text('{"model_type": "albef"}')
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    before = {name: snapshot(tmp_path / name) for name in ("mine", "bert")}
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    output = [] if "--output-dir" in extra else ["--output-dir", tmp_path / "out"]
    result = run_cli("convert", "--checkpoint", RETRIEVAL_CHECKPOINT, *output, *extra)
    assert_user_error(result, *fragments)
    assert {name: snapshot(tmp_path / name) for name in ("mine", "bert")} == before
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")


def test_overwrite_replaces_only_its_own_folder(tmp_path):
    args = ["convert", "--checkpoint", RETRIEVAL_CHECKPOINT, "--output-dir", tmp_path / "out"]
    assert run_cli(*args)[0] == 0
    (tmp_path / "out" / "config.json").write_text(
        json.dumps({**json.loads((tmp_path / "out" / "config.json").read_text()), "retrieval_k": 7})
    )
    assert_user_error(run_cli(*args), "is not empty", "--overwrite")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["retrieval_k"] == 7
    status, out, err = run_cli(*args, "--overwrite")
    assert status == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["retrieval_k"] != 7
    assert not leftovers(tmp_path / "out")


def test_reload_check_fails_on_nan(tmp_path):
    """The reload check compares probe outputs; NaN on both sides must fail it (NaN > tolerance is False)."""
    from transformers_albef.cli.convert import RELOAD_TOLERANCE, verify_reload

    model = ta.AlbefForRetrieval(tiny_config()).eval()
    with torch.no_grad():
        model.itm_head.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    diff = verify_reload(model, tmp_path / "nan")
    assert not diff <= RELOAD_TOLERANCE


# ----- training data: hostile records ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (24, 24), colour).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    bomb_png(root / "bomb.png")
    return root


RECORD_CASES = [
    # (id, loader, records, fragments)
    ("no image field", "retrieval", [{"caption": "a", "image_id": 1}], ["record 0", "no 'image' field"]),
    ("caption a number", "retrieval", [{"image": "red.png", "caption": 3, "image_id": 1}], ["caption", "int 3"]),
    ("caption cleans to nothing", "retrieval", [{"image": "red.png", "caption": "!!!", "image_id": 1}], ["empty"]),
    ("image id a bool", "retrieval", [{"image": "red.png", "caption": "a", "image_id": True}], ["image_id must be"]),
    (
        "image file missing",
        "retrieval",
        [{"image": "gone.png", "caption": "a", "image_id": 1}],
        ["gone.png", "not found"],
    ),
    ("image empty string", "retrieval", [{"image": "", "caption": "a", "image_id": 1}], ["non-empty path"]),
    ("record not an object", "retrieval", [["red.png", "a"]], ["record 0", "expected a json object, got list"]),
    (
        "vqa relative path, no root",
        "vqa-no-root",
        [{"image": "red.png", "question": "q?", "answer": ["a"], "dataset": "vqa"}],
        ["'red.png' is relative", "--image_root"],
    ),
    (
        "vg relative path, no vg root",
        "vqa",
        [{"image": "red.png", "question": "q?", "answer": "a", "dataset": "vg"}],
        ["'red.png' is relative", "--vg_root"],
    ),
    (
        "vqa unknown dataset",
        "vqa",
        [{"image": "red.png", "question": "q?", "answer": "a", "dataset": "coco"}],
        ["'vg'"],
    ),
    ("vqa answer a number", "vqa", [{"image": "red.png", "question": "q?", "answer": 4}], ["answer must be a string"]),
    ("vqa empty answers", "vqa", [{"image": "red.png", "question": "q?", "answer": []}], ["answer must be"]),
    (
        "vqa question id text",
        "vqa",
        [{"image": "red.png", "question": "q?", "answer": "a", "question_id": "7"}],
        ["int"],
    ),
    ("vqa no question", "vqa", [{"image": "red.png", "answer": "a"}], ["no 'question' field"]),
    ("nlvr one image", "nlvr", [{"images": ["red.png"], "sentence": "s", "label": "True"}], ["list of two paths"]),
    ("nlvr label", "nlvr", [{"images": ["red.png", "blue.png"], "sentence": "s", "label": "Maybe"}], ["'True'"]),
    ("ve label", "ve", [{"image": "red.png", "sentence": "s", "label": "yes"}], ["label must be one of"]),
    ("ve sentence a list", "ve", [{"image": "red.png", "sentence": ["s"], "label": "neutral"}], ["sentence must be"]),
]


def load_records(loader: str, records, root: Path, tmp_path: Path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    if loader == "retrieval":
        return load_retrieval_train(path, root)
    if loader == "vqa":
        return load_vqa(path, root)
    if loader == "vqa-no-root":
        return load_vqa(path, None)
    if loader == "nlvr":
        return load_nlvr(path, root)
    if loader == "ve":
        return load_ve(path, root)
    raise ValueError(loader)


@pytest.mark.parametrize("loader, records, fragments", [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES])
def test_bad_training_records_are_named(loader, records, fragments, images, tmp_path):
    with pytest.raises(BadRecordError) as caught:
        load_records(loader, records, images, tmp_path)
    message = str(caught.value)
    assert "records.json" in message and "record 0" in message
    for fragment in fragments:
        assert fragment in message, message


def test_absolute_paths_need_no_image_root(images, tmp_path):
    """A new user's VQA file with absolute paths and no --image_root loads (it used to ask for vg_root)."""
    records = [{"image": str(images / "red.png"), "question": "what colour?", "answer": ["red"], "dataset": "vqa"}]
    dataset = load_records("vqa-no-root", records, None, tmp_path)
    assert dataset[0]["image"] == str(images / "red.png")
    nlvr = [{"images": [str(images / "red.png"), str(images / "blue.png")], "sentence": "s", "label": "True"}]
    assert len(load_records("nlvr", nlvr, None, tmp_path)) == 1


@pytest.mark.parametrize(
    "name, content, error, fragments",
    [
        (
            "pairs.jsonl",
            '{"image": "red.png", "caption": "a"}\n{not json\n',
            BadRecordError,
            ["record 1", "not valid"],
        ),
        ("pairs.json", '[{"image": "red.png", "caption": "a"}', ValueError, ["pairs.json", "is not valid json"]),
        ("pairs.json", '{"image": "red.png"}', ValueError, ["pairs.json", "must hold a json list"]),
        ("pairs.json", '[{"image": "red.png"}]', BadRecordError, ["no 'caption' (or 'text') field"]),
        ("pairs.json", '[{"image": "red.png", "caption": []}]', BadRecordError, ["caption is an empty list"]),
    ],
    ids=["bad json line", "truncated json", "object not list", "no caption", "empty caption list"],
)
def test_bad_pretraining_files_are_named(name, content, error, fragments, images, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(error) as caught:
        load_image_text_pairs(tmp_path / name, image_root=images)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    "content, fragments",
    [
        ("[", ["answers.json", "not valid json"]),
        ('[1, "a"]', ["answers.json", "list of answer strings"]),
        ("[]", ["non-empty"]),
    ],
    ids=["not json", "not strings", "empty"],
)
def test_answer_list_errors_name_the_file(content, fragments, tmp_path):
    (tmp_path / "answers.json").write_text(content)
    with pytest.raises(ValueError) as caught:
        load_answer_list(tmp_path / "answers.json")
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize("name, fragment", [("broken.png", "cannot decode"), ("bomb.png", "DecompressionBombError")])
def test_undecodable_training_images_are_named(name, fragment, images):
    with pytest.raises(BadRecordError) as caught:
        open_image(str(images / name), index=3, source="train.json")
    assert fragment in str(caught.value) and name in str(caught.value) and "record 3" in str(caught.value)


# ----- training command lines: a new user's mistakes and expectations ------------------------------------------------


@pytest.fixture(scope="module")
def ft_files(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("finetune")
    (root / "train.json").write_text(json.dumps([{"image": "red.png", "caption": "a", "image_id": 1}]))
    return root


FINETUNE_CASES = [
    ("k_test 0", ["--k_test", "0"], ["--k_test must be at least 1, got 0"]),
    ("alpha 2", ["--alpha", "2"], ["--alpha must be between 0 and 1"]),
    ("image root missing", ["--image_root", "{root}/none"], ["--image_root", "not a folder"]),
    ("train data missing", ["--train_data", "{root}/none.json"], ["annotation file not found", "none.json"]),
    ("config missing", ["--config", "{root}/none.json"], ["--config", "not found"]),
    ("config not json", ["--config", "{root}/train.json"], ["train.json must hold a JSON object"]),
    (
        "scheduler conflict",
        ["--lr_scheduler_type", "linear", "--lr_schedule", "cosine"],
        ["--lr_scheduler_type", "--lr_schedule cosine"],
    ),
]


@pytest.mark.parametrize("extra, fragments", [c[1:] for c in FINETUNE_CASES], ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_command_line_errors_are_one_line(extra, fragments, ft_files, capsys):
    argv = ["--task", "retrieval", "--output_dir", str(ft_files / "out"), "--use_cpu", "--report_to", "none"]
    argv += [arg.format(root=ft_files) for arg in extra]
    status = finetune.console_main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("albef-finetune: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def zero_cases():
    from transformers_albef.training.trainer import RetrievalEvaluator, VQAEvaluator

    from .training.finetune_helpers import processor, tiny_model

    return {
        "RetrievalEvaluator k_test=0": lambda: RetrievalEvaluator(processor(), k_test=0),
        "VQAEvaluator k_test=0": lambda: VQAEvaluator(processor(), ["red"], k_test=0),
        "build_trainer k_test=0": lambda: finetune.build_trainer("ve", tiny_model("ve"), processor(), k_test=0),
        "from_original image_size=0": lambda: ta.AlbefForRetrieval.from_original(RETRIEVAL_CHECKPOINT, image_size=0),
        "from_original image_size=-32": lambda: ta.AlbefModel.from_original(RETRIEVAL_CHECKPOINT, image_size=-32),
    }


@pytest.mark.parametrize(
    "case",
    [
        "RetrievalEvaluator k_test=0",
        "VQAEvaluator k_test=0",
        "build_trainer k_test=0",
        "from_original image_size=0",
        "from_original image_size=-32",
    ],
)
def test_zero_is_an_error_not_the_default(case):
    with pytest.raises(ValueError, match=r"(k_test|image_size) must be a positive integer, got -?\d+"):
        zero_cases()[case]()


def test_explicit_options_win_over_the_recipe():
    ft, args = finetune.parse_args(["--task", "vqa", "--output_dir", "x", "--save_steps", "7", "--eval_steps", "3"])
    assert (args.save_strategy, args.save_steps) == ("steps", 7)  # the recipe saves per epoch
    assert args.eval_strategy == "steps"
    ft, args = finetune.parse_args(["--task", "ve", "--output_dir", "x", "--lr_scheduler_type", "linear"])
    assert ft.lr_schedule == "trainer" and args.lr_scheduler_type == "linear"
    ft, args = finetune.parse_args(["--task", "ve", "--output_dir", "x", "--learning_rate", "3e-4"])
    assert (args.learning_rate, args.save_strategy, ft.lr_schedule) == (3e-4, "epoch", "cosine")


def test_help_shows_the_recipe_and_workers_fit_the_machine(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "per --task: retrieval 1e-05, vqa 2e-05, nlvr 2e-05, ve 2e-05" in out
    assert "retrieval 32, vqa 32, nlvr 16, ve 32" in out and "retrieval 5 (flickr 10), vqa 8" in out
    assert "(default: 5e-05)" not in out and "(default: 3.0)" not in out
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "nlvr", "--help"])
    assert "(default: 2e-05)" in " ".join(capsys.readouterr().out.split())
    _, args = finetune.parse_args(["--task", "vqa", "--output_dir", "x"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert args.dataloader_num_workers == default_num_workers() <= max(0, cores - 1)
    assert default_num_workers() <= 4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return write_pairs(root / "data", count=8), write_config(root / "tiny.json", queue_size=8)


PRETRAIN_CASES = [
    ("image size 0", {"image_size": 0}, ["--image-size must be at least 1, got 0"]),
    ("queue size 0", {"queue_size": 0}, ["--queue-size must be at least 1"]),
    ("momentum above 1", {"momentum": 1.5}, ["--momentum must be between 0 and 1"]),
    ("batch size 0", {"batch_size": 0}, ["--batch-size must be at least 1"]),
    ("negative workers", {"num_workers": -1}, ["--num-workers must be at least 0"]),
    ("resume folder missing", {"resume": "{root}/none"}, ["--resume", "none"]),
    ("unknown preset", {"config": None, "preset": "huge"}, ["--preset 'huge'"]),
    ("invalid config", {"config": "{root}/bad.json"}, ["bad.json", "queue_size must be at least 1"]),
    ("data file missing", {"train_data": "{root}/none.json"}, ["none.json", "neither an imagefolder"]),
    (
        "final folder not ours",
        {"output_dir": "{root}/taken", "save_final_model": True},
        ["final-model folder", "notes.txt"],
    ),
]


@pytest.mark.parametrize("options, fragments", [c[1:] for c in PRETRAIN_CASES], ids=[c[0] for c in PRETRAIN_CASES])
def test_pretrain_command_line_errors_are_one_line(options, fragments, pairs, tmp_path, capsys):
    data, config = pairs
    (tmp_path / "bad.json").write_text('{"queue_size": 0}')
    (tmp_path / "taken" / "final").mkdir(parents=True)
    (tmp_path / "taken" / "final" / "notes.txt").write_text("mine")
    values = {"train_data": data, "config": config, "output_dir": tmp_path / "out", "max_steps": 1, "batch_size": 2}
    values.update({k: v.format(root=tmp_path) if isinstance(v, str) else v for k, v in options.items()})
    with fresh_accelerate():
        status = pretrain.main(
            cli_args(values.pop("train_data"), values.pop("config"), values.pop("output_dir"), **values)
        )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("albef-pretrain: error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert (tmp_path / "taken" / "final" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_accelerate_cpu_multi_process_launch_is_refused(script, pairs, tmp_path, monkeypatch, capsys):
    """What `accelerate launch --cpu --num_processes 2` exports (one process, MASTER_PORT, no WORLD_SIZE)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data, config = pairs
    if script == "pretrain":
        status = pretrain.main(cli_args(data, config, tmp_path / "out", max_steps=1))
    else:
        status = finetune.console_main(["--task", "ve", "--config", str(config), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "starts a single process" in err and "--multi_gpu --num_processes N" in err and "torchrun" in err
    assert not (tmp_path / "out").exists()


def test_real_accelerate_cpu_launch_is_refused(pairs, tmp_path):
    """The real launcher, so that the detection follows what accelerate does, not what we think it does."""
    data, config = pairs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "transformers_albef.training.pretrain", *map(str, cli_args(data, config, tmp_path / "out"))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode != 0
    assert "albef-pretrain: error: `accelerate launch --cpu --num_processes N` starts a single process" in done.stderr


# ----- resumption: checkpoints that would run code ------------------------------------------------------------------


def prepared(accelerator):
    from transformers_albef.training.optim import create_optimizer

    torch.manual_seed(0)
    model = ta.AlbefForPreTraining(tiny_config(queue_size=8))
    return accelerator.prepare(model, create_optimizer(model))


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    from accelerate import Accelerator

    root = tmp_path_factory.mktemp("checkpoints")
    with fresh_accelerate():
        accelerator = Accelerator(cpu=True)
        prepared(accelerator)
        progress = TrainingProgress(step=3, epoch=1, batches_in_epoch=2, samples_seen=24, global_batch_size=8)
        return save_checkpoint(accelerator, root / "run", step=3, progress=progress)


def tamper_checkpoint(folder: Path, how: str, marker: Path) -> None:
    if how == "payload custom state":
        torch.save(Payload(marker), folder / "custom_checkpoint_0.pkl")
        (folder / "training_progress.json").unlink()
    elif how == "extra custom state":
        torch.save({"step": 1}, folder / "custom_checkpoint_1.pkl")
    elif how == "payload optimizer":
        torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, folder / "optimizer.bin")
    elif how == "payload rng":
        torch.save({"random_state": Payload(marker)}, folder / "random_states_0.pkl")
    elif how == "legacy pickle progress payload":
        (folder / "training_progress.json").unlink()
        torch.save({"step": Payload(marker)}, folder / "custom_checkpoint_0.pkl")
    elif how == "progress not json":
        (folder / "training_progress.json").write_text('{"step": ')
    elif how == "progress wrong type":
        (folder / "training_progress.json").write_text('{"step": "3"}')
    elif how == "progress unknown field":
        (folder / "training_progress.json").write_text('{"step": 3, "__class__": 1}')
    elif how == "progress missing":
        (folder / "training_progress.json").unlink()
    elif how == "marker not json":
        (folder / "checkpoint.json").write_text("{")
    elif how == "weights truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:300])
    elif how == "optimizer truncated":
        data = (folder / "optimizer.bin").read_bytes()
        (folder / "optimizer.bin").write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(how)


RESUME_CASES = [
    ("payload custom state", UnsafeCheckpointError, ["custom_checkpoint_0.pkl", "weights_only=True"]),
    ("extra custom state", UnsafeCheckpointError, ["custom_checkpoint_1.pkl", "weights_only=False", "can run code"]),
    ("payload optimizer", UnsafeCheckpointError, ["optimizer.bin", "weights_only=True", "run code"]),
    ("payload rng", UnsafeCheckpointError, ["random_states_0.pkl", "weights_only=True"]),
    ("legacy pickle progress payload", UnsafeCheckpointError, ["custom_checkpoint_0.pkl"]),
    ("progress not json", ValueError, ["training_progress.json is not valid JSON"]),
    ("progress wrong type", ValueError, ["training_progress.json", "step must be a non-negative integer", "'3'"]),
    ("progress unknown field", ValueError, ["unknown training-progress fields ['__class__']"]),
    ("progress missing", ValueError, ["has no training_progress.json"]),
    ("marker not json", ValueError, ["checkpoint.json is not valid JSON"]),
    ("weights truncated", ValueError, ["cannot restore the training state", "checkpoint-3"]),
    ("optimizer truncated", UnsafeCheckpointError, ["optimizer.bin", "damaged"]),
]


@pytest.mark.parametrize("how, error, fragments", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_never_unpickles_and_names_the_file(how, error, fragments, saved_checkpoint, tmp_path):
    from accelerate import Accelerator

    folder = tmp_path / "checkpoint-3"
    shutil.copytree(saved_checkpoint, folder)
    tamper_checkpoint(folder, how, tmp_path / "pwned")
    with fresh_accelerate():
        accelerator = Accelerator(cpu=True)
        prepared(accelerator)
        progress = TrainingProgress()
        with pytest.raises(error) as caught:
            load_checkpoint(accelerator, folder, progress=progress)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "pwned").exists()
    assert progress.step == 0  # nothing restored from a refused checkpoint


def test_checkpoints_hold_no_pickled_objects_and_legacy_progress_still_loads(saved_checkpoint, tmp_path):
    from accelerate import Accelerator

    assert not list(saved_checkpoint.glob("custom_checkpoint_*"))
    assert json.loads((saved_checkpoint / "training_progress.json").read_text())["step"] == 3
    # A checkpoint of an earlier version: the progress dict in custom_checkpoint_0.pkl, read with weights_only=True.
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(saved_checkpoint, folder)
    state = json.loads((folder / "training_progress.json").read_text())
    (folder / "training_progress.json").unlink()
    torch.save(state, folder / "custom_checkpoint_0.pkl")
    with fresh_accelerate():
        accelerator = Accelerator(cpu=True)
        prepared(accelerator)
        progress = TrainingProgress()
        load_checkpoint(accelerator, folder, progress=progress)
    assert (progress.step, progress.epoch, progress.batches_in_epoch, progress.samples_seen) == (3, 1, 2, 24)


def test_resume_auto_refuses_a_tampered_checkpoint(pairs, tmp_path, capsys):
    """`--resume auto` (the default) picks up the latest checkpoint folder: a payload there is refused, not run."""
    data, config = pairs
    args = cli_args(data, config, tmp_path / "run", batch_size=4, max_steps=1, save_steps=1)
    with fresh_accelerate():
        assert pretrain.main(args) == 0
    capsys.readouterr()
    checkpoint = latest_checkpoint(tmp_path / "run")
    torch.save({"state": {}, "param_groups": [], "x": Payload(tmp_path / "pwned")}, checkpoint / "optimizer.bin")
    more = cli_args(data, config, tmp_path / "run", batch_size=4, max_steps=2, save_steps=1)
    with fresh_accelerate():
        status = pretrain.main(more)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"{checkpoint / 'optimizer.bin'} cannot be loaded with torch.load(weights_only=True)" in err
    assert not (tmp_path / "pwned").exists()
    assert latest_checkpoint(tmp_path / "run") == checkpoint  # nothing trained, nothing saved


# ----- fault injection: every writer, mid-write ---------------------------------------------------------------------


def failing_save(kind):
    """A processor `save_pretrained` that writes half a file, then fails as `kind` (as a full disk leaves it)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        Path(save_directory, "tokenizer.json").write_text('{"truncated": ')
        raise fault(kind)

    return save_pretrained


def expect_fault(kind, call):
    error = type(fault(kind))
    with pytest.raises(error):
        call()


@pytest.fixture(scope="module")
def tiny_retrieval():
    return ta.AlbefForRetrieval(tiny_config()).eval(), ta.AlbefProcessor.from_bert_vocab(32)


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_save_for_hub(kind, tiny_retrieval, tmp_path, monkeypatch):
    model, processor = tiny_retrieval
    target = save_for_hub(model, processor, tmp_path / "albef", card="first")
    before = snapshot(target)
    monkeypatch.setattr(ta.AlbefProcessor, "save_pretrained", failing_save(kind))
    expect_fault(kind, lambda: save_for_hub(model, processor, target, card="second", overwrite=True))
    assert snapshot(target) == before and not leftovers(target)


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_convert(kind, tmp_path, monkeypatch):
    args = ["convert", "--checkpoint", RETRIEVAL_CHECKPOINT, "--output-dir", tmp_path / "out"]
    assert run_cli(*args)[0] == 0
    before = snapshot(tmp_path / "out")
    monkeypatch.setattr(ta.AlbefProcessor, "save_pretrained", failing_save(kind))
    status, _, err = run_cli(*args, "--overwrite")
    assert status == {"error": 1, "interrupt": 130, "disk full": 2}[kind] and "Traceback" not in err
    if kind == "disk full":
        assert "No space left on device" in err and "left as it was" in err
    assert snapshot(tmp_path / "out") == before and not leftovers(tmp_path / "out")


def export_module():
    spec = importlib.util.spec_from_file_location("export_bundled", REPO / "scripts" / "export_bundled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_bundled_export(kind, tmp_path, monkeypatch):
    target = tmp_path / "retrieval"
    shutil.copytree(ta.bundled_model_path("retrieval"), target)
    before = snapshot(target)
    monkeypatch.setattr(ta.AlbefProcessor, "save_pretrained", failing_save(kind))
    expect_fault(kind, lambda: export_module().export("retrieval", ta.bundled_model_path("retrieval"), target))
    assert snapshot(target) == before and not leftovers(target)


def test_bundled_export_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    status = export_module().main(
        ["--task", "retrieval", "--model", str(ta.bundled_model_path("retrieval")), "--output", str(tmp_path / "mine")]
    )
    assert status == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_training_checkpoint(kind, tmp_path):
    from accelerate import Accelerator

    with fresh_accelerate():
        accelerator = Accelerator(cpu=True)
        prepared(accelerator)
        first = save_checkpoint(accelerator, tmp_path, step=1, progress=TrainingProgress(step=1))
        before = snapshot(first)
        real_save = accelerator.save_state

        def save_then_fail(output_dir=None, **kwargs):
            real_save(output_dir, **kwargs)  # the model, optimiser and RNG files are written...
            raise fault(kind)  # ... then the disk fills / the user presses Ctrl-C

        accelerator.save_state = save_then_fail
        expect_fault(kind, lambda: save_checkpoint(accelerator, tmp_path, step=2, progress=TrainingProgress(step=2)))
    assert snapshot(first) == before and latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_final_model(kind, tiny_retrieval, tmp_path, monkeypatch):
    from accelerate import Accelerator

    model, processor = tiny_retrieval
    with fresh_accelerate():
        accelerator = Accelerator(cpu=True)
        final = pretrain._save_final_model(model, processor, tmp_path, accelerator)
        before = snapshot(final)
        monkeypatch.setattr(ta.AlbefProcessor, "save_pretrained", failing_save(kind))
        expect_fault(kind, lambda: pretrain._save_final_model(model, processor, tmp_path, accelerator))
    assert snapshot(final) == before and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An AlbefTrainer after one step, with its checkpoint-1."""
    from .training.finetune_helpers import processor, tiny_model, train_rows, training_args, write_images

    root = tmp_path_factory.mktemp("trainer")
    images = write_images(root / "images", count=4)
    args = training_args("ve", root / "out", max_steps=1, save_strategy="steps", save_steps=1)
    trainer = finetune.build_trainer("ve", tiny_model("ve"), processor(), train_rows("ve", images), None, args)
    trainer.train()
    return trainer, root / "out"


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_trainer_checkpoint(kind, trained, monkeypatch):
    from transformers import Trainer

    trainer, output = trained
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-1"]
    before = snapshot(output / "checkpoint-1")

    def fail(self, output_dir):
        raise fault(kind)

    monkeypatch.setattr(Trainer, "_save_rng_state", fail)  # after the model, optimiser and scheduler are written
    monkeypatch.setattr(trainer.state, "global_step", 2)
    expect_fault(kind, lambda: trainer._save_checkpoint(trainer.model, None))
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-1"]
    assert snapshot(output / "checkpoint-1") == before


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_picture(kind, tmp_path, monkeypatch):
    target = save_picture(Image.new("RGB", (8, 8), "red"), tmp_path / "picture.png")
    before = target.read_bytes()
    real_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as handle:
            handle.truncate(10)
        raise fault(kind)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    error = cli.CliError if kind == "disk full" else type(fault(kind))
    with pytest.raises(error):
        save_picture(Image.new("RGB", (8, 8), "blue"), target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["picture.png"]


@pytest.mark.parametrize(
    "content, overwrite, fragment",
    [
        ({"notes.txt": "mine"}, False, "is not empty"),
        ({"notes.txt": "mine", "config.json": '{"model_type": "albef"}'}, True, "notes.txt"),
        ({"config.json": '{"model_type": "clip"}'}, True, "no config.json of model_type 'albef'"),
        ({"sub/config.json": '{"model_type": "albef"}', "config.json": '{"model_type": "albef"}'}, True, "sub"),
    ],
    ids=["not empty", "foreign file", "other model", "sub-folder"],
)
def test_atomic_folder_refuses_what_is_not_ours(content, overwrite, fragment, tmp_path):
    target = tmp_path / "target"
    for name, text in content.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    before = snapshot(target)
    with pytest.raises(OutputFolderError, match=fragment):
        with atomic_folder(target, overwrite=overwrite):
            raise AssertionError("never reached")
    assert snapshot(target) == before and not leftovers(target)
