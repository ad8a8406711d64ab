"""The bundled models: they load offline through the Auto classes, fit the size budget, and keep the quality measured
when they were trained, on data they never saw (emoji drawings held out of pre-training, easy-vqa test questions).

The thresholds sit a little under the measured values (model_cards/bundled-*.md): a regression in the model code,
the processor or the weights fails here."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import transformers_albef as ta
from tests.scripts import load_script
from transformers_albef.retrieval import recall_at_k, retrieval_score_matrices

REPO = Path(__file__).resolve().parent.parent
EVAL_DATA = Path(__file__).parent / "fixtures" / "bundled_eval"
MAX_BUNDLE_BYTES = 40 * 10**6
MAX_FILE_BYTES = 25 * 10**6  # the repository tracks no larger file
# The GPU machines that train and benchmark accept a working tree of at most 64 MiB.
MAX_TRACKED_TREE_BYTES = 60 * 10**6

# Measured with the committed weights (see the model cards); the thresholds sit a little below.
# Text->image R@5 (%) measured: new drawings 66.0 (chance 2.7), unseen emoji 32.0 (chance 2.6); VQA accuracy below.
RETRIEVAL_TEXT_TO_IMAGE_R5 = {"emoji_new_drawings_noto.json": 60.0, "emoji_unseen_twemoji.json": 28.0}
# New drawings, % of pairs: p(match) > 0.5 on true pairs measured 42, < 0.5 on hardest ITC negatives 79 (the issue
# asks 80 / 80: not met yet, see benchmarks/LEARNING.md); pointing game 87.8 as drawn (chance 64.2), 93.6 at half
# size placed at random (chance 16.1).
ITM_TRUE_ABOVE_HALF, ITM_HARDEST_NEGATIVE_BELOW_HALF = 35.0, 72.0
# AUC true pairs vs hardest negatives measured 67.5 %: why no threshold reaches 80 / 80 (best one: 64 / 64).
ITM_HARDEST_AUC = 62.0
POINTING_GAME, POINTING_GAME_PLACED = 80.0, 85.0
VQA_ACCURACY = 0.92  # measured 0.9416 on these 924 questions (0.9514 on the full easy-vqa test split)


def _images(records):
    return [Image.open(EVAL_DATA / "images" / record["image"]).convert("RGB") for record in records]


def test_bundle_size_and_layout():
    total = 0
    for task in ta.bundled.BUNDLED_TASKS:
        folder = ta.bundled_model_path(task)
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "processor_config.json", "README.md"} <= names
        assert "model.safetensors" in names or "model.safetensors.index.json" in names
        assert all(p.stat().st_size < MAX_FILE_BYTES for p in folder.iterdir()), "a bundled file is over 25 MB"
        total += sum(p.stat().st_size for p in folder.iterdir())
    budget = MAX_BUNDLE_BYTES / 1e6
    assert total <= MAX_BUNDLE_BYTES, f"bundled models take {total / 1e6:.1f} MB, budget {budget:.0f} MB"


def test_tracked_tree_fits_the_gpu_machines():
    """Every tracked file together stays under 60 MB (the machines that train and benchmark take at most 64 MiB)."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    files = [REPO / name for name in listing.stdout.decode().split("\0") if name]
    total = sum(f.stat().st_size for f in files if f.is_file())
    assert total < MAX_TRACKED_TREE_BYTES, f"tracked files take {total / 1e6:.1f} MB, budget 60 MB"


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="retrieval"):
        ta.bundled_model_path("captioning")


@pytest.mark.parametrize("task", ta.bundled.BUNDLED_TASKS)
def test_loads_in_float32_through_auto_classes(task):
    path = ta.bundled_model_path(task)
    model = AutoModel.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, ta.AlbefModel) and isinstance(processor, ta.AlbefProcessor)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert processor.image_processor.size["height"] == model.config.vision_config.image_size
    assert model.momentum is None


@pytest.mark.parametrize("held_out", sorted(RETRIEVAL_TEXT_TO_IMAGE_R5))
def test_retrieval_quality_on_held_out_emoji(held_out):
    """Text->image and image->text retrieval by the original protocol (ITC top-32, ITM re-ranking)."""
    records = json.loads((EVAL_DATA / held_out).read_text())
    path = ta.bundled_model_path("retrieval")
    model = ta.AlbefForRetrieval.from_pretrained(path).eval()
    processor = ta.AlbefProcessor.from_pretrained(path)
    inputs = processor(
        images=_images(records), text=[r["caption"] for r in records],
        clean_text="caption", padding="longest", return_tensors="pt",
    )  # fmt: skip
    score_i2t, score_t2i = retrieval_score_matrices(
        model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], k=32
    )
    ids = list(range(len(records)))
    recalls = recall_at_k(score_i2t.numpy(), score_t2i.numpy(), ids, [[i] for i in ids])
    print(f"{held_out} ({len(records)} pictures, chance R@5 {500 / len(records):.1f}): {recalls}")
    assert recalls["img_r5"] >= RETRIEVAL_TEXT_TO_IMAGE_R5[held_out]


def test_vqa_accuracy_on_easy_vqa_test_questions():
    records = json.loads((EVAL_DATA / "easy_vqa_test_subset.json").read_text())
    path = ta.bundled_model_path("vqa")
    model = ta.AlbefForQuestionAnswering.from_pretrained(path).eval()
    processor = ta.AlbefProcessor.from_pretrained(path)
    answers = model.config.answer_list
    assert answers == json.loads((EVAL_DATA / "easy_vqa_answer_list.json").read_text())
    answer_inputs = processor.encode_answers(answers, return_tensors="pt")
    correct = 0
    for start in range(0, len(records), 128):
        batch = records[start : start + 128]
        inputs = processor(
            images=_images(batch), text=[r["question"] for r in batch], clean_text="question", padding="longest",
            return_tensors="pt",
        )  # fmt: skip
        top_ids, _ = model.rank_answers(
            inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
            answer_inputs["input_ids"], answer_inputs["attention_mask"], k=len(answers),
        )  # fmt: skip
        correct += sum(answers[i] in r["answer"] for i, r in zip(top_ids[:, 0].tolist(), batch))
    accuracy = correct / len(records)
    print(f"easy-vqa test subset ({len(records)} questions): accuracy {accuracy:.4f}")
    assert accuracy >= VQA_ACCURACY


@pytest.fixture(scope="module")
def new_drawings_evaluation():
    """The bundled retrieval model on the 188 held-out Noto drawings: recalls, ITM calibration, pointing game."""
    learn = load_script("benchmarks/learn_emoji_retrieval.py")
    path = ta.bundled_model_path("retrieval")
    model = ta.AlbefForRetrieval.from_pretrained(path).eval()
    processor = ta.AlbefProcessor.from_pretrained(path)
    records = json.loads((EVAL_DATA / "emoji_new_drawings_noto.json").read_text())
    return learn.evaluate(model, processor, records, EVAL_DATA / "images", k=32)


def test_itm_is_calibrated_on_held_out_pairs(new_drawings_evaluation):
    """p(match) > 0.5 for true pairs and < 0.5 for their hardest ITC negatives (both directions)."""
    result = new_drawings_evaluation
    print({key: round(value, 1) for key, value in result.items() if key.startswith("itm_")})
    assert result["itm_true_above_half"] >= ITM_TRUE_ABOVE_HALF
    assert result["itm_hardest_negative_below_half"] >= ITM_HARDEST_NEGATIVE_BELOW_HALF
    assert result["itm_hardest_auc"] >= ITM_HARDEST_AUC
    assert result["itm_best_threshold_rate"] >= min(
        result["itm_true_above_half"], result["itm_hardest_negative_below_half"]
    )


def test_grounding_points_at_the_object(new_drawings_evaluation):
    """The peak of the whole-caption Grad-CAM map falls on the drawing (its alpha channel, masks/), as drawn and at
    half size placed at random on white, far more often than a random point."""
    result = new_drawings_evaluation
    print({key: round(value, 1) for key, value in result.items() if key.startswith("pointing")})
    assert result["pointing_game"] >= POINTING_GAME
    assert result["pointing_game_placed"] >= POINTING_GAME_PLACED
    assert result["pointing_game_placed"] >= 2 * result["pointing_chance_placed"]
