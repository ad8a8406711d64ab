"""The GPU session's scripts on tiny configs on the CPU (CI never has a GPU): speed.py's compiled, checkpointing and
combo options, the pre-training profile and batch search, the section merge, and (slow) the whole session script.
Every file is written to a temporary folder, never the repository's BENCHMARKS.md."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"albef_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def untouched():
    repo_file = REPO / "BENCHMARKS.md"
    before = repo_file.read_bytes() if repo_file.exists() else None
    yield
    assert (repo_file.read_bytes() if repo_file.exists() else None) == before


def test_merge_sections_replaces_in_place_and_appends(tmp_path, untouched):
    merge = load("merge_sections")
    source = tmp_path / "out.md"
    target = tmp_path / "B.md"
    source.write_text(
        "# x\n\n<!-- speed:gpu-base -->\nNEW GPU\n<!-- /speed:gpu-base -->\n\n"
        "<!-- pretrain-batch:cuda -->\nBATCH\n<!-- /pretrain-batch:cuda -->\n"
        "<!-- speed:gpu-other -->\n_Pending a GPU session: ..._\n<!-- /speed:gpu-other -->\n"
    )
    target.write_text("HEAD\n\n<!-- speed:gpu-base -->\nOLD GPU\n<!-- /speed:gpu-base -->\n\nTAIL\n")
    assert merge.main([str(source), str(target)]) == 0
    text = target.read_text()
    assert "OLD GPU" not in text and text.index("NEW GPU") < text.index("TAIL") < text.index("BATCH")
    assert text.startswith("HEAD") and text.count("<!-- speed:gpu-base -->") == 1
    assert "gpu-other" not in text  # a placeholder never goes over (or next to) measured sections
    assert merge.main([str(source), str(target), "--only", "nothing"]) == 1


def test_speed_compiled_checkpointing_and_combos(tmp_path, untouched):
    """The variants the GPU session adds, with the "eager" compile backend (the wiring, not inductor: fast)."""
    speed = load("speed")
    output = tmp_path / "B.md"
    argv = ["--size", "tiny", "--device", "cpu", "--workloads", "text,itm,vqa,pretrain", "--combos",
            "fp32/eager,fp32/sdpa", "--compile", "default", "--compile-backend", "eager", "--checkpointing",
            "--no-checks", "--repeats", "1", "--threads", "1", "--incremental", "--section", "cpu-tiny-x",
            "--output", str(output)]  # fmt: skip
    assert speed.main(argv) == 0
    section = output.read_text().split("<!-- speed:cpu-tiny-x -->")[1].split("<!-- /speed:cpu-tiny-x -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "variant" not in line]
    assert not [row for row in rows if "failed" in row], rows
    for name in ("6 layers, 30 tokens, compiled (default)", "fusion compiled (default)",
                 "rank_answers (default), k=16 of 60, compiled (default)", "AdamW fused, gradient checkpointing",
                 "AdamW fused, forward compiled (default)"):  # fmt: skip
        assert any(name in row for row in rows), name
    assert not any("| bf16 |" in row or "| eager | 2 | " in row and "compiled" in row for row in rows)
    # Compiled outputs against eager (the same dtype and attention).
    assert "relative error vs eager" in section and "top answer as eager for 100.0%" in section
    assert "Default path against the original computation" in section
    assert "partial:" not in section  # the final write replaced the incremental ones


def test_pretrain_profile_and_batch_write_their_sections(tmp_path, untouched):
    profile, batch = load("pretrain_profile"), load("pretrain_batch")
    output = tmp_path / "B.md"
    output.write_text("KEEP\n")
    assert profile.main(["--size", "tiny", "--output", str(output)]) == 0
    assert batch.main(["--size", "tiny", "--device", "cpu", "--batches", "2,4", "--output", str(output)]) == 0
    text = output.read_text()
    assert text.startswith("KEEP")
    section = text.split("<!-- pretrain-profile:cpu -->")[1].split("<!-- /pretrain-profile:cpu -->")[0]
    for phase in ("| step |", "| forward |", "| backward |", "| optimizer step |", "| online vision tower |",
                  "| momentum vision tower |", "| online text model [fusion] |", "| momentum EMA update |",
                  "| queue enqueue |", "forward outside those ranges"):  # fmt: skip
        assert phase in section, phase
    assert "`aten::" in section and "GFLOP" in section
    section = text.split("<!-- pretrain-batch:cpu -->")[1].split("<!-- /pretrain-batch:cpu -->")[0]
    assert section.count("| no | ") == 2 and section.count("| yes | ") == 2


@pytest.mark.slow
def test_gpu_session_script_runs_on_a_cpu(tmp_path, untouched):
    """benchmarks/gpu_session.sh --size tiny --device cpu: every step runs (inductor compiles C++: minutes)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "WHEELS": str(tmp_path / "none")}
    result = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), "--size", "tiny", "--device", "cpu", "--budget",
                             "900"], capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    # speed.py exits 1 when an agreement check fails: bf16 against fp32 does on the small bundled models.
    assert "speed-gpu: exit 0" in summary or "speed-gpu: exit 1" in summary, summary
    for step in ("compile-host-bound", "pretrain-profile", "pretrain-batch", "compile-device-bound", "host-overhead"):
        assert f"{step}: exit 0" in summary, summary
    results = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    for marker in ("speed:cpu-tiny", "speed:cpu-tiny-compiled", "speed:cpu-tiny-compiled-2", "pretrain-profile:cpu",
                   "pretrain-batch:cpu", "host-overhead:cpu-host"):  # fmt: skip
        assert f"<!-- {marker} -->" in results, marker
