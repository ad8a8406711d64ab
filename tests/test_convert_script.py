import importlib.util
import pathlib

import torch

import transformers_albef as ta

from .conftest import FIXTURES
from .fixtures.synth import read_keys_tsv, synth_state_dict

SCRIPT = pathlib.Path(__file__).parents[1] / "convert" / "convert_albef_original_to_hf.py"


def load_script():
    spec = importlib.util.spec_from_file_location("convert_albef", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converts_a_checkpoint_into_a_reloadable_folder(tmp_path, capsys):
    # The training state of the tiny retrieval fixture; its config is derived from the shapes.
    state_dict = synth_state_dict(read_keys_tsv(FIXTURES / "tiny" / "retrieval" / "keys.tsv"))
    checkpoint = tmp_path / "mscoco.pth"
    torch.save(state_dict, checkpoint)
    assert load_script().main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "retrieval -> retrieval" in out and "reload check: max abs diff" in out
    model = ta.AlbefForRetrieval.from_pretrained(tmp_path / "out")
    processor = ta.AlbefProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_processor.size["height"] == model.config.vision_config.image_size == 48


def test_refuses_what_it_cannot_read(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert load_script().main(["--checkpoint", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
