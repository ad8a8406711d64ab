"""benchmarks/speed.py and benchmarks/one_path.py: tiny runs end to end (into a temporary file, never the repository's
BENCHMARKS.md) and the section bookkeeping of the benchmark file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    return load_script("benchmarks/speed.py")


def test_tiny_run_writes_its_table(tmp_path):
    repo_file = REPO / "BENCHMARKS.md"
    before = repo_file.read_bytes() if repo_file.exists() else None
    output = tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--repeats", "1", "--threads", "1"]
    result = subprocess.run(
        [*command, "--output", str(output)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    text = output.read_text()
    assert "<!-- speed:cpu-tiny -->" in text and "<!-- /speed:cpu-tiny -->" in text
    assert "Pending a GPU session" in text  # the GPU section stays as a placeholder
    for workload in ("image embedding", "text embedding", "ITM re-rank", "VQA (image", "VQA re-score",
                     "pre-training step", "AdamW step", "momentum EMA", "COCO-5K re-rank projection"):  # fmt: skip
        assert workload in text, workload
    # Each re-ranking workload: the original computation against the model's one path.
    for variant in ("| per-pair (original), ", "| grouped (default), ", "| uncached per-candidate, k=",
                    "| rank_answers (default), k=", "| cached decoder (rank_answers, default), k="):  # fmt: skip
        assert variant in text, variant
    assert "fast_itm" not in text and "fast=True" not in text
    table = text.split("Agreement checks:")[1].strip().splitlines()
    checks = [line for line in table[2:] if line.startswith("| ")]
    assert len(checks) >= 10
    for line in checks:
        compared, verdict = line.split(" | ")[1], line.rstrip(" |").split(" | ")[-1]
        if "fp32" in compared.split(" vs ")[0]:
            assert verdict == "ok", line  # fp32 model paths and backends agree with the fp32 originals
        elif compared.split(" vs ")[1].startswith(("per-pair bf16", "uncached bf16")):
            # The model's path against the original computation in bf16: only near-ties may be ordered differently.
            assert verdict == "ok" or "all" in verdict and "near-ties" in verdict, line
        # bf16 against fp32 is what bf16 costs a small model: reported, and signalled by the exit code.
    assert ("FAIL" in text) == (result.returncode == 1)
    assert (repo_file.read_bytes() if repo_file.exists() else None) == before


def test_sections_are_replaced_and_kept(speed, tmp_path):
    path = tmp_path / "B.md"
    speed.update_file(path, "cpu-base", "## cpu-base\n\nRUN-ONE\n")
    speed.update_file(path, "gpu-base", "## gpu-base\n\nmeasured on a GPU\n")
    speed.update_file(path, "cpu-base", "## cpu-base\n\nRUN-TWO\n")
    text = path.read_text()
    assert text.startswith(speed.HEADER)
    assert "RUN-TWO" in text and "RUN-ONE" not in text
    assert "measured on a GPU" in text and "Pending a GPU session" not in text
    assert text.index("cpu-base") < text.index("gpu-base")


def test_split_gpu_runs_keep_their_own_sections(speed, tmp_path):
    """`--section gpu-base-training` and friends: separate runs (the device's per-command time limit) each keep
    their section, and the pending placeholder goes once any GPU section exists."""
    path = tmp_path / "B.md"
    speed.update_file(path, "cpu-base", "## cpu-base\n\nCPU-ROWS\n")
    assert "Pending a GPU session" in path.read_text()
    speed.update_file(path, "gpu-base-towers", "## gpu-base-towers\n\nTOWER-ROWS\n")
    speed.update_file(path, "gpu-base-training", "## gpu-base-training\n\nTRAINING-ROWS\n")
    text = path.read_text()
    assert all(rows in text for rows in ("CPU-ROWS", "TOWER-ROWS", "TRAINING-ROWS"))
    assert "Pending a GPU session" not in text


def test_the_rest_of_the_file_is_kept(speed, tmp_path):
    """Notes under the header and other scripts' sections (one_path.py's) survive a speed run; a stale header is
    rewritten."""
    path = tmp_path / "B.md"
    path.write_text(
        "# Speed benchmarks\n\nOLD INTRO\n\n## Notes\n\nHAND-WRITTEN\n\n"
        "<!-- speed:cpu-base -->\n## cpu-base\n\nRUN-ONE\n<!-- /speed:cpu-base -->\n\n"
        "<!-- one-path:cpu -->\nONE-PATH\n<!-- /one-path:cpu -->\n"
    )
    speed.update_file(path, "cpu-base", "## cpu-base\n\nRUN-TWO\n")
    speed.update_file(path, "cpu-tiny", "## cpu-tiny\n\nTINY\n")
    text = path.read_text()
    assert text.startswith(speed.HEADER) and "OLD INTRO" not in text
    assert all(part in text for part in ("HAND-WRITTEN", "RUN-TWO", "TINY", "ONE-PATH", "Pending a GPU session"))
    assert "RUN-ONE" not in text and text.count("<!-- speed:cpu-base -->") == 1
    assert text.index("HAND-WRITTEN") < text.index("RUN-TWO") < text.index("TINY") < text.index("ONE-PATH")
    assert [p.name for p in tmp_path.iterdir()] == ["B.md"]  # no temporary file left


def test_one_path_tiny_run_writes_its_section(tmp_path):
    """benchmarks/one_path.py end to end on tiny models: its section replaces an older one, the rest of the file
    stays, every row is there and the model's paths give the reference outputs."""
    repo_file = REPO / "BENCHMARKS.md"
    before = repo_file.read_bytes() if repo_file.exists() else None
    output = tmp_path / "BENCHMARKS.md"
    output.write_text(
        "# Speed benchmarks\n\nINTRO\n\n<!-- speed:cpu-base -->\nCPU-ROWS\n<!-- /speed:cpu-base -->\n\n"
        "<!-- one-path:cpu -->\nOLD-ONE-PATH\n<!-- /one-path:cpu -->\n\nTRAILER\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "one_path.py"), "--size", "tiny", "--threads", "1",
               "--repeats", "1", "--slow-repeats", "1", "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = output.read_text()
    assert text.count("<!-- one-path:cpu -->") == 1 and text.count("<!-- /one-path:cpu -->") == 1
    assert "OLD-ONE-PATH" not in text
    assert all(part in text for part in ("INTRO", "CPU-ROWS", "TRAILER"))
    section = text.split("<!-- one-path:cpu -->")[1].split("<!-- /one-path:cpu -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = ["`retrieval_scores`", "`RetrievalEngine.text_to_image`", "`rank_answers`", "`generate`"]
    assert [row.split(" | ")[0][2:] for row in rows] == [names[0], names[1]] + [names[2]] * 6 + [names[3]] * 2
    for setting in ("k=8 of", "k=16 of", "k=32 of", "k=64 of", "k=128 of", "8 questions", "greedy", "3 beams"):
        assert setting in section, setting
    for row in rows:
        agreement = row.rstrip(" |").split(" | ")[-1]
        assert "**" not in agreement, row  # a difference is marked in bold
        assert agreement.startswith(("same candidates", "same order", "same ranked ids", "identical token ids")), row
        assert row.split(" | ")[-2].endswith("x"), row  # the speed-up
    assert (repo_file.read_bytes() if repo_file.exists() else None) == before


def test_synthetic_inputs_look_like_the_real_ones(speed):
    ids, mask = speed.random_texts(16, 30, 30522, "cpu", min_length=8)
    assert ids.shape == (16, 30) and (ids[:, 0] == 101).all()
    assert (mask.sum(1) >= 8).all() and (mask.sum(1) <= 30).all()
    answers, answer_mask = speed.synthetic_answers(300, 30522, "cpu")
    assert len({tuple(row.tolist()) for row in answers}) == 300  # distinct answers
    lengths = answer_mask.sum(1)
    assert (answers[torch.arange(300), lengths - 1] == 102).all()  # [SEP] last
    assert float((lengths == 3).float().mean()) > 0.5  # mostly one word piece
    assert answers[:, 1].unique().numel() < 300  # some answers share their first piece


def test_easy_vqa_captions_come_from_the_training_answers():
    """The caption pre-training of learn_easy_vqa.py reads each image's shape and colour off its own questions and
    answers, negations included ("is no yellow shape present?" -> "yes" says yellow is absent)."""
    module = load_script("benchmarks/learn_easy_vqa.py")
    colours = ["red", "blue", "yellow", "brown"]
    questions, answers, image_ids = zip(
        ("what shape is present?", "rectangle", 0),
        ("is no yellow shape present?", "yes", 0),
        ("is there not a brown shape?", "no", 0),
        ("what color is the triangle?", "blue", 1),
        ("is there a circle?", "no", 1),
        ("does the image not contain a red shape?", "no", 2),
        ("is there a circle in the image?", "yes", 3),
        ("is there not a blue shape?", "yes", 3),
    )
    captions = module.training_captions(questions, answers, image_ids, colours)
    assert captions == {0: "a brown rectangle", 1: "a blue triangle", 2: "a red shape", 3: "a circle"}


def test_itm_separation_is_the_auc_and_the_best_single_threshold():
    """True pairs vs negatives: AUC counts ordered (true, negative) pairs, ties half; the best threshold is the one
    whose worse side is best."""
    separation = load_script("benchmarks/learn_emoji_retrieval.py").separation
    assert separation(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2])) == (100.0, 100.0)
    assert separation(torch.tensor([0.1]), torch.tensor([0.9])) == (0.0, 0.0)
    assert separation(torch.tensor([0.5]), torch.tensor([0.5]))[0] == 50.0
    auc, best = separation(torch.tensor([0.3, 0.6, 0.9]), torch.tensor([0.2, 0.5, 0.7]))
    assert auc == pytest.approx(600 / 9) and best == pytest.approx(200 / 3)  # threshold 0.6: 2/3 on each side


def test_openclipart_titles_become_emoji_style_captions():
    """OpenClipart's dc:title is free text: prefixes, file-name noise, digits and non-English titles must not become
    captions; flags get the emoji's "<country> flag" form."""
    learn = load_script("benchmarks/learn_emoji_retrieval.py")
    words = {
        "bee",
        "arrow",
        "right",
        "red",
        "rhinoceros",
        "zambia",
        "flag",
        "beach",
        "ball",
        "part",
        "of",
        "the",
        "flat",
    }
    caption = learn.clipart_caption
    assert caption("Clipart by Nicu Buculei - bee", "food/honey.png", words) == "bee"
    assert caption("arrow-right-red", "computer/buttons/arrow.png", words) == "arrow right red"
    assert caption("Rhinoceros 3D", "animals/rhinoceros_3d_01.png", words) == "rhinoceros"
    assert caption("beach_ball (remix) 02", "recreation/toys/beach_ball_01.png", words) == "beach ball"
    assert caption("zambia", "signs_and_symbols/flags/africa/zambia.png", words) == "zambia flag"
    assert caption("Lattine di birra", "food/beverages/lattine.png", words) is None  # not English
    assert caption("01", "x.png", words) is None and caption("", "x.png", words) is None


def test_openclipart_export_drops_collections_and_caps_titles(tmp_path):
    """Titles shared by a whole collection are dropped, one title keeps at most `per_title` pictures, and every kept
    picture is written on white at the training size, listed in clipart.json (original ALBEF format)."""
    import json

    from PIL import Image

    learn = load_script("benchmarks/learn_emoji_retrieval.py")
    root, data = tmp_path / "openclipart", tmp_path / "data"
    titles = {f"theme/icon{i}": "Lemon theme" for i in range(4)}
    titles.update({f"animals/tiger{i}": "Tiger" for i in range(3)})
    titles["animals/owl"] = "Owl on branch"
    titles["animals/goat"] = "Goat"  # an unseen emoji's name: excluded
    for name, title in titles.items():
        (root / "svg" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "png" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "svg" / f"{name}.svg").write_text(f"<svg><metadata><dc:title>{title}</dc:title></metadata></svg>")
        Image.new("RGBA", (30, 20), (200, 0, 0, 255)).save(root / "png" / f"{name}.png")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "lemon", "theme", "tiger", "owl", "on", "branch", "goat", "##s"]))
    count = learn.export_openclipart(root, data, vocab, exclude={"goat"}, per_title=2, collection=3)
    records = json.loads((data / "clipart.json").read_text())
    assert count == len(records) == 3
    assert sorted(r["caption"] for r in records) == ["owl on branch", "tiger", "tiger"]
    for record in records:
        picture = Image.open(data / "images" / record["image"])
        assert picture.size == (learn.IMAGE_SIZE, learn.IMAGE_SIZE) and picture.mode == "RGB"
        assert picture.getpixel((0, 0)) == (255, 255, 255)  # padded on white, not black


@pytest.mark.gpu
def test_gpu_overhead_diagnostic_runs_on_cuda():
    """benchmarks/gpu_overhead.py on the tiny config: every workload gets a row with measured times."""
    script = REPO / "benchmarks" / "gpu_overhead.py"
    result = subprocess.run(
        [sys.executable, str(script), "--size", "tiny", "--repeats", "3"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms |" not in line]
    for workload in ("image embedding", "text embedding", "ITM re-rank grouped", "VQA rank_answers"):
        assert any(row.startswith(f"| {workload}") for row in rows), result.stdout
