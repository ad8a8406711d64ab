import pytest

from transformers_albef.cli import main


def test_demo_runs_and_writes_pictures(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in out and "VQA image 0" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["gradcam_0.png", "gradcam_1.png", "gradcam_2.png"]


def test_unknown_command_exits_nonzero():
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code != 0
