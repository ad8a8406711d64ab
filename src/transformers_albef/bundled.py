"""The small ALBEF models shipped inside the package (trained by this project on offline data; see their model
cards), so that the demo, pipelines and notebooks work without downloading anything."""

from __future__ import annotations

from pathlib import Path

BUNDLED_ROOT = Path(__file__).parent / "bundled_models"
BUNDLED_TASKS = ("retrieval", "vqa")


def bundled_model_path(task: str = "retrieval") -> Path:
    """Folder of the bundled model for `task`: "retrieval" (ITC/ITM, also zero-shot classification and Grad-CAM
    grounding) or "vqa" (answer ranking over its `config.answer_list`). Load it with `from_pretrained`; the processor
    is saved alongside."""
    if task not in BUNDLED_TASKS:
        raise ValueError(f"no bundled model for task {task!r}; expected one of {BUNDLED_TASKS}")
    path = BUNDLED_ROOT / task
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled {task} model is missing from {path}: reinstall transformers-albef")
    return path
