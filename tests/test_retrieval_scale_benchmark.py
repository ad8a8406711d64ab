"""benchmarks/retrieval_scale.py: the tiny run end to end, into a temporary file (never the repository's
BENCHMARKS.md), keeping the file's other sections. (The two-process build it can measure is tested by
test_retrieval_engine.py::test_two_processes_match_one; it is skipped here to keep the suite fast.)"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from transformers_albef.retrieval_backends import faiss_available

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "retrieval_scale.py"
OTHER = "# Benchmarks\n\n<!-- speed:cpu-base -->\nkept\n<!-- /speed:cpu-base -->\n"


def test_tiny_run_writes_its_section(tmp_path):
    repo_file = REPO / "BENCHMARKS.md"
    before = repo_file.read_bytes() if repo_file.exists() else None
    output = tmp_path / "BENCHMARKS.md"
    output.write_text(OTHER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--threads", "1", "--no-two-processes"]
    result = subprocess.run(
        [*command, "--output", str(output)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = output.read_text()
    assert text.startswith(OTHER + "\n<!-- retrieval-scale -->\n") and text.endswith("<!-- /retrieval-scale -->\n")
    for row in ("| 1k |", "| 4k |", "(projected)", "| `torch` |", "recall@16"):
        assert row in text, row
    for search in ("flat", "ivf", "hnsw", "pq", "ivfpq") if faiss_available() else ():
        assert f"| `{search}` |" in text
    assert (repo_file.read_bytes() if repo_file.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md"]  # no temporary file left

    # A later run replaces its own section and keeps the others.
    spec = importlib.util.spec_from_file_location("albef_retrieval_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_section(output, "new numbers\n")
    assert output.read_text() == OTHER + "\n<!-- retrieval-scale -->\nnew numbers\n<!-- /retrieval-scale -->\n"
