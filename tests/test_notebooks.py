"""The notebooks run top to bottom (their code cells, in one namespace), and leave no temporary files behind."""

import json
import pathlib
import tempfile

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys, monkeypatch, tmp_path):
    # Everything the run puts in the temporary folder lands here; what is still there when the last cell has run is
    # a leak (test runs used to fill /tmp with albef-gradcam-*, albef-shapes-*, albef-vqa-* and tmp* folders).
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    namespace = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    assert capsys.readouterr().out
    # torch's compile cache (torchinductor_<user>) lives in the temporary folder by design, reused by every run
    left = sorted(p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_"))
    assert left == [], f"{path.name} left {left} in the temporary folder"
