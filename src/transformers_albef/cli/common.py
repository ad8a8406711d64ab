"""What the `albef` subcommands share: the `--model` / `--device` options, loading models and images, user errors
and progress bars.

A subcommand module exposes `register(subparsers)` (adds its parser with a description and
`set_defaults(func=run)`) and `run(args) -> int` (the exit status). `run` raises `CliError` for anything the user can
fix (a missing file, a wrong model kind, a bad value): `albef` prints it as one line on stderr and exits with its
status, without a traceback (`albef --debug ...` shows it). `ValueError` and `OSError` are reported the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class CliError(Exception):
    """A user error: printed as `albef <command>: error: <message>` (one line), exit status `status`."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def one_line(error: BaseException | str) -> str:
    """An error message on one line (transformers' and huggingface_hub's messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def add_model_arguments(parser: argparse.ArgumentParser, task: str | None, what: str = "model") -> None:
    """`--model` (a folder or Hub id; default: the bundled model for `task`) and `--device`."""
    default = f"the bundled {task} model" if task else "required"
    parser.add_argument(
        "--model",
        default=None,
        required=task is None,
        metavar="PATH_OR_ID",
        help=f"{what}: a saved folder or a Hub model id (default: {default})",
    )
    add_device_argument(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None, help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"unknown device {name!r} (expected e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def load_model(name_or_path: str | Path | None, head_class, task: str | None, device=None):
    """`(model, processor)` for `head_class` from a folder or Hub id (default: the bundled model for `task`), in
    eval mode on `device`. Refuses a folder saved for another head (e.g. a VQA model for grounding): loading it
    would leave the head's weights random without a word. A folder without a processor gets the standard one
    (bert-base-uncased vocabulary, the model's image size), with a notice on stderr."""
    from transformers import AutoConfig

    import transformers_albef as ta

    if name_or_path is None:
        if task is None:
            raise CliError("--model is required")
        name_or_path = ta.bundled_model_path(task)
    name_or_path = str(name_or_path)
    # Anything that cannot be a Hub id ("owner/name") is a folder that should be there.
    if not Path(name_or_path).exists() and (name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~"))):
        raise CliError(f"model folder not found: {name_or_path}")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load a model from {name_or_path}: {one_line(error)}") from None
    if not isinstance(config, ta.AlbefConfig):
        raise CliError(f"{name_or_path} is not an ALBEF model (model_type {config.model_type!r})")
    saved_as = [getattr(ta, name, None) for name in config.architectures or []]
    if saved_as and not any(isinstance(c, type) and issubclass(c, head_class) for c in saved_as):
        names = ", ".join(config.architectures)
        raise CliError(f"{name_or_path} is saved as {names}; this command needs a {head_class.__name__} model")
    model = head_class.from_pretrained(name_or_path, config=config).eval()
    if device is not None:
        model.to(device)
    try:
        processor = ta.AlbefProcessor.from_pretrained(name_or_path)
    except OSError:
        print(
            f"note: {name_or_path} has no processor; using the bert-base-uncased vocabulary at "
            f"{config.vision_config.image_size} px",
            file=sys.stderr,
        )
        processor = ta.AlbefProcessor.from_bert_vocab(image_size=config.vision_config.image_size)
    return model, processor


def load_image(path: str | Path):
    """An RGB PIL image, or a `CliError` saying why not."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise CliError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CliError(f"cannot read {path} as an image ({one_line(error)})") from None


def save_picture(picture, path: str | Path) -> Path:
    """Save a PIL picture, creating the folder; the format follows the suffix (PNG if there is none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        picture.save(path, format=None if path.suffix else "PNG")
    except (ValueError, KeyError) as error:  # an extension PIL does not know
        raise CliError(f"cannot write {path}: {one_line(error)}") from None
    return path


def progress(iterable=None, desc: str | None = None, total: int | None = None, **kwargs):
    """A progress bar on stderr for long work; it only draws when stderr is a terminal (logs and tests stay
    clean)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False, file=sys.stderr, **kwargs)


def nonempty(value: str) -> str:
    """argparse type: a string with something in it."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def rank_answer_list(model, processor, inputs, answers: list[str]):
    """`rank_answers` over `answers` with the model's own k (its probabilities are a softmax over those candidates):
    `(ids, probs)`, best first."""
    answer_inputs = processor.encode_answers(answers, return_tensors="pt").to(model.device)
    return model.rank_answers(
        inputs["pixel_values"],
        inputs["input_ids"],
        inputs["attention_mask"],
        answer_inputs["input_ids"],
        answer_inputs["attention_mask"],
        k=min(model.config.answer_rank_k, len(answers)),
    )
