"""Every head's `save_pretrained` folder loads with `trust_remote_code=True` in a Python where this package cannot be
imported (`python -I`, the package hidden), through the Auto class its `auto_map` names, with identical outputs."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

import transformers_albef as ta

from .hub_fixtures import WITHOUT_THE_PACKAGE
from .tiny_models import TWO_IMAGES, tiny_batch, tiny_config

CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""
import torch
import transformers
from safetensors.torch import load_file, save_file

torch.set_num_threads(int(sys.argv[3]))  # the parent's: same reduction order, same bits
report = {}
for case in json.loads(sys.argv[1]):
    folder = case["folder"]
    auto_map = json.load(open(f"{folder}/config.json"))["auto_map"]
    auto_class = next(name for name, ref in auto_map.items() if ref.endswith("." + case["head"]))
    model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = load_file(f"{folder}/inputs.safetensors")
    with torch.no_grad():
        output = model(**inputs).to_tuple()[0]
    save_file({"output": output.contiguous()}, f"{folder}/child_output.safetensors")
    report[case["head"]] = {
        "auto_class": auto_class,
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "processor": type(processor).__name__,
        "tokenizer": type(transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)).__name__,
        "caption": processor(text="A Man, riding!")["input_ids"][0],
    }
json.dump(report, open(sys.argv[2], "w"))
"""
)


def cases():
    pixel_values, ids, mask = tiny_batch(batch=2)
    pair = {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}
    yield ta.AlbefModel, tiny_config(), pair
    yield ta.AlbefForRetrieval, tiny_config(), pair
    yield ta.AlbefForPreTraining, tiny_config(), pair
    yield ta.AlbefForVisualEntailment, tiny_config(num_labels=3), pair
    two = torch.stack([pixel_values, pixel_values.flip(0)], dim=1)
    yield ta.AlbefForVisualReasoning, tiny_config(text=TWO_IMAGES, num_labels=2), {**pair, "pixel_values": two}
    order = torch.arange(2)
    yield (
        ta.AlbefForTextAssignment,
        tiny_config(text=TWO_IMAGES),
        {
            **pair,
            "image0_index": order,
            "image1_index": order.flip(0),
        },
    )
    yield ta.AlbefForQuestionAnswering, tiny_config(), pair


def test_every_head_loads_as_remote_code_without_the_package(tmp_path):
    vocab_processor = ta.AlbefProcessor.from_bert_vocab(tiny_config().vision_config.image_size)
    children, want = [], {}
    for cls, config, inputs in cases():
        torch.manual_seed(0)
        model = cls(config).eval()
        folder = tmp_path / cls.__name__
        model.save_pretrained(folder)
        vocab_processor.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
        with torch.no_grad():
            want[cls.__name__] = model(**inputs).to_tuple()[0]
        assert {p.name for p in folder.glob("*.py")} == {
            "configuration_albef.py",
            "modeling_albef.py",
            "processing_albef.py",
            "image_processing_albef.py",
            "tokenization_albef.py",
        }
        children.append({"folder": str(folder), "head": cls.__name__})

    report_path = tmp_path / "report.json"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(children), str(report_path), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    expected_caption = list(vocab_processor(text="A Man, riding!")["input_ids"][0])
    for name, got in report.items():
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith("." + name), got
        assert got["processor"] == "AlbefProcessor"
        assert got["caption"] == expected_caption  # [CLS] tokens, no [SEP]: the processor owns the convention
        output = load_file(tmp_path / name / "child_output.safetensors")["output"]
        torch.testing.assert_close(output, want[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert set(report) == {cls.__name__ for cls, _, _ in cases()}
    assert {got["tokenizer"] for got in report.values()} == {"AlbefTokenizer"}


def test_bundled_models_load_through_the_package_and_carry_no_code_copy():
    """The bundles live inside the package (its registrations load them): no stale copy of the model folder's code."""
    for task, cls in (("retrieval", ta.AlbefForRetrieval), ("vqa", ta.AlbefForQuestionAnswering)):
        folder = ta.bundled_model_path(task)
        assert not list(folder.glob("*.py"))
        assert "auto_map" not in json.loads((folder / "config.json").read_text())
        assert type(cls.from_pretrained(folder)) is cls
        assert type(ta.AlbefProcessor.from_pretrained(folder).tokenizer) is ta.AlbefTokenizer
