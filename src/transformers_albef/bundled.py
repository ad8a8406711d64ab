"""The small ALBEF models shipped inside the package (trained by this project on offline data; see their model
cards), so that the demo, pipelines and notebooks work without downloading anything."""

from __future__ import annotations

from pathlib import Path

BUNDLED_ROOT = Path(__file__).parent / "bundled_models"
SAMPLES_ROOT = Path(__file__).parent / "resources" / "samples"
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


def bundled_samples_path(name: str | None = None) -> Path:
    """The sample pictures shipped with the package (`resources/samples/`: Twemoji drawings held out of the bundled
    retrieval model's training and easy-vqa test images; `samples.json` lists them with their captions, questions
    and answers, `NOTICE` their licences): the folder, or the file `name` in it (e.g. `"emoji_blue_heart.png"`)."""
    if not SAMPLES_ROOT.is_dir():
        raise FileNotFoundError(
            f"the bundled sample pictures are missing from {SAMPLES_ROOT}: reinstall transformers-albef"
        )
    if name is None:
        return SAMPLES_ROOT
    path = SAMPLES_ROOT / name
    if Path(name).name != name or not path.is_file():
        available = ", ".join(sorted(p.name for p in SAMPLES_ROOT.iterdir() if p.suffix == ".png"))
        raise FileNotFoundError(f"no bundled sample named {name!r}; the samples are: {available}")
    return path
