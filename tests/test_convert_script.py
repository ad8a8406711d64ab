"""The converter command line: every fixture kind converts into a folder that reproduces the original outputs."""

import importlib.util
import pathlib
import pickle

import pytest
import torch

import transformers_albef as ta
from transformers_albef.models.albef.processing_albef import BERT_VOCAB

from .hub_fixtures import hub_fixture  # noqa: F401
from .parity_utils import load_fixture, tiny_config
from .test_parity import EVAL_CHECKS

SCRIPT = pathlib.Path(__file__).parents[1] / "convert" / "convert_albef_original_to_hf.py"


def converter():
    spec = importlib.util.spec_from_file_location("convert_albef_original_to_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# fixture kind -> (checkpoint fixture, --kind, head, config settings)
CASES = {
    "pretrain": ("pretrain", None, ta.AlbefForPreTraining, {}),
    "retrieval": ("retrieval", None, ta.AlbefForRetrieval, {}),
    "grounding": ("grounding", "grounding", ta.AlbefForRetrieval, {}),
    "vqa": ("vqa", None, ta.AlbefForQuestionAnswering, {"distill": True}),
    "nlvr": ("nlvr", None, ta.AlbefForVisualReasoning, {}),
    "ve": ("ve", None, ta.AlbefForVisualEntailment, {"num_labels": 3}),
    "pretrain_nlvr": ("pretrain_nlvr", None, ta.AlbefForTextAssignment, {"num_labels": 3}),
    "retrieval_from_pretrain": ("pretrain", "retrieval", ta.AlbefForRetrieval, {}),
    "vqa_from_pretrain": ("pretrain", "vqa", ta.AlbefForQuestionAnswering, {}),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_converted_folder_reproduces_the_original(kind, tmp_path, capsys):
    source, target, head, settings = CASES[kind]
    _, inputs, outputs, meta = load_fixture(kind)
    config_file = tmp_path / "albef_config.json"
    tiny_config(meta, kind, **settings).to_json_file(config_file)
    args = ["--checkpoint", str(load_fixture(source)[0] / "checkpoint.pth"), "--output-dir", str(tmp_path / "out")]
    args += ["--config", str(config_file), "--tokenizer", str(BERT_VOCAB)]
    args += ["--kind", target] if target else []
    assert converter().main(args) == 0
    log = capsys.readouterr().out
    assert "consumed" in log and "reload check: max abs diff" in log

    model = head.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    for check in EVAL_CHECKS[kind]:
        check(model, inputs, outputs, meta)
    folder = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json"} <= set(folder)
    processor = ta.AlbefProcessor.from_pretrained(tmp_path / "out")
    assert processor(text="a dog")["input_ids"] == [[101, 1037, 3899]]  # [CLS] a dog, no [SEP]


def test_training_state_is_kept_or_dropped_and_said_so(tmp_path, capsys):
    _, _, _, meta = load_fixture("vqa")
    checkpoint = str(load_fixture("vqa")[0] / "checkpoint.pth")
    for name, extra, has_momentum in (("kept", [], True), ("dropped", ["--drop-training-state"], False)):
        config_file = tmp_path / f"{name}.json"
        tiny_config(meta, "vqa", distill=True).to_json_file(config_file)
        args = ["--checkpoint", checkpoint, "--output-dir", str(tmp_path / name), "--config", str(config_file)]
        assert converter().main(args + extra) == 0
        log = capsys.readouterr().out
        model = ta.AlbefForQuestionAnswering.from_pretrained(tmp_path / name)
        assert (model.momentum is not None) == has_momentum
        assert ("training state" in log) != has_momentum


def test_standard_config_from_shapes(tmp_path, capsys):
    """Without --config the configuration comes from the checkpoint's shapes (heads: hidden // 64 = 1 here)."""
    checkpoint = load_fixture("retrieval")[0] / "checkpoint.pth"
    assert converter().main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out")]) == 0
    config = ta.AlbefConfig.from_pretrained(tmp_path / "out")
    assert (config.vision_config.image_size, config.text_config.fusion_layer, config.embed_dim) == (48, 2, 16)


def test_flickr_kind_sets_its_k(tmp_path):
    checkpoint = load_fixture("retrieval")[0] / "checkpoint.pth"
    args = ["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"), "--kind", "retrieval_flickr"]
    assert converter().main(args) == 0
    assert ta.AlbefConfig.from_pretrained(tmp_path / "out").retrieval_k == 128


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("content", ["corrupt", "unsafe", "unknown"])
def test_refuses_what_it_cannot_read(content, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pth"
    if content == "corrupt":
        bad.write_bytes(b"not a checkpoint")
    elif content == "unsafe":
        torch.save(
            {"model": {"temp": torch.tensor(0.07)}, "hook": _RunsCode()}, bad, pickle_protocol=pickle.HIGHEST_PROTOCOL
        )
    else:
        torch.save({"visual_encoder.cls_token": torch.zeros(1, 1, 4), "mystery.weight": torch.zeros(2)}, bad)
    assert converter().main(["--checkpoint", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert {"corrupt": "corrupt", "unsafe": "arbitrary unpickling", "unknown": "closest kind"}[content] in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_original_repo_that_does_not_import_is_reported(tmp_path, capsys):
    """Without the original code importable, the comparison says so instead of failing the conversion."""
    checkpoint = load_fixture("retrieval")[0] / "checkpoint.pth"
    args = ["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out")]
    assert converter().main(args + ["--original-repo", str(tmp_path / "no-such-checkout")]) == 0
    assert "not importable here" in capsys.readouterr().out


def test_push_to_hub_from_the_command_line(hub, tmp_path, capsys):
    """--push-to-hub publishes the converted folder (card included); the server copy computes the same outputs; a
    server error is reported and leaves the converted folder in place."""
    checkpoint = load_fixture("retrieval")[0] / "checkpoint.pth"
    args = ["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"), "--push-to-hub", "user/coco"]
    assert converter().main(args) == 0
    assert "published:" in capsys.readouterr().out
    files = hub.files("user/coco")
    assert files["README.md"] == (tmp_path / "out" / "README.md").read_bytes()
    local = ta.AlbefForRetrieval.from_pretrained(tmp_path / "out").eval()
    remote = ta.AlbefForRetrieval.from_pretrained("user/coco").eval()
    pixel_values, ids = torch.randn(1, 3, 48, 48), torch.tensor([[101, 300, 400]])
    with torch.no_grad():
        assert torch.equal(local(pixel_values, ids).logits_per_image, remote(pixel_values, ids).logits_per_image)

    hub.fail_next("commit", 500)
    args[3] = str(tmp_path / "again")
    assert converter().main(args) == 3
    assert "HTTP 500" in capsys.readouterr().err
    assert (tmp_path / "again" / "model.safetensors").is_file()
