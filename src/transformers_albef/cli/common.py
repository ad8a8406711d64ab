"""What the `albef` subcommands share: the `--model` / `--device` options, loading models and images, user errors
and progress bars.

A subcommand module exposes `register(subparsers)` (adds its parser with a description and
`set_defaults(func=run)`) and `run(args) -> int` (the exit status). `run` raises `CliError` for anything the user can
fix (a missing file, a wrong model kind, a bad value): `albef` prints it as one line on stderr and exits with its
status, without a traceback (`albef --debug ...` shows it). `ValueError` and `OSError` are reported the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class CliError(Exception):
    """A user error: printed as `albef <command>: error: <message>` (one line), exit status `status`."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def one_line(error: BaseException | str) -> str:
    """An error message on one line (transformers' and huggingface_hub's messages span several)."""
    if isinstance(error, BaseException) and type(error).__name__.startswith("StrictDataclass"):
        from ..conversion import config_error_reason

        return config_error_reason(error)
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and error.args:  # str(KeyError) is only the quoted key
        text = f"missing key {text}"
    return text or type(error).__name__


USER_ERRORS = (CliError, ValueError, OSError)


def debugging() -> bool:
    """`ALBEF_DEBUG=1` (or true/yes) in the environment: show tracebacks instead of one-line errors."""
    return os.environ.get("ALBEF_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def report_errors(call, prog: str, debug: bool = False) -> int:
    """The exit status of `call()`, with every error printed as ONE line on stderr instead of a traceback:
    `<prog>: error: <what, where, expected>` with status 2 for user errors (`CliError` (its own status),
    `ValueError`, `OSError`), `<prog>: error: <Type>: <message> (... --debug ...)` with status 1 for anything else;
    KeyboardInterrupt prints `<prog>: interrupted` (130). With `debug` or `ALBEF_DEBUG=1` errors propagate."""
    prefix = f"{prog}: " if prog else ""
    debug = debug or debugging()
    try:
        status = call()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prefix}error: {one_line(error)}", file=sys.stderr)
        return error.status if isinstance(error, CliError) else 2
    except Exception as error:  # noqa: BLE001 - a one-line report is the contract; --debug shows the traceback
        if debug:
            raise
        print(
            f"{prefix}error: {type(error).__name__}: {one_line(error)} (unexpected; rerun with --debug or "
            "ALBEF_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0 if status is None else int(status)


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
    (bert-base-uncased vocabulary, the model's image size), with a notice on stderr. Every problem is a `CliError`
    naming the folder: an invalid config.json, unreadable or NaN weights, a tokenizer whose vocabulary does not
    match the model's (e.g. tokenizer files missing: only the special tokens left), another image size."""
    import transformers_albef as ta

    if name_or_path is None:
        if task is None:
            raise CliError("--model is required")
        name_or_path = ta.bundled_model_path(task)
    name_or_path = str(name_or_path)
    local = Path(name_or_path).exists()
    # Anything that cannot be a Hub id ("owner/name") is a folder that should be there.
    if not local and (name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~"))):
        raise CliError(f"model folder not found: {name_or_path}")
    if local and not Path(name_or_path).is_dir():
        raise CliError(f"--model {name_or_path} is a file; expected a model folder (save_pretrained) or a Hub id")
    config = _load_model_config(name_or_path, local)
    saved_as = [getattr(ta, name, None) for name in config.architectures or []]
    if saved_as and not any(isinstance(c, type) and issubclass(c, head_class) for c in saved_as):
        names = ", ".join(config.architectures)
        raise CliError(f"{name_or_path} is saved as {names}; this command needs a {head_class.__name__} model")
    if local:
        _check_weight_shapes(Path(name_or_path), head_class, config)
    try:
        model = head_class.from_pretrained(name_or_path, config=config).eval()
    except Exception as error:  # noqa: BLE001 - corrupt or mis-shaped weights raise many types; named here
        raise CliError(f"cannot load the {head_class.__name__} weights of {name_or_path}: {one_line(error)}") from None
    from ..conversion import non_finite_keys

    broken = non_finite_keys(dict(model.state_dict()))
    if broken:
        raise CliError(
            f"{name_or_path}: {len(broken)} weight tensor(s) hold NaN or infinite values ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}); the model would answer nonsense"
        )
    if device is not None:
        model.to(device)
    processor = load_processor(name_or_path, config)
    return model, processor


def _check_weight_shapes(folder: Path, head_class, config) -> None:
    """Every tensor of the folder's safetensors file(s) has the shape config.json gives the model (read from the
    headers only, the model built on the meta device); a mismatch is a `CliError` naming the file, the key and both
    shapes (transformers would print a report and raise a message pointing at it)."""
    import json

    import torch
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CliError(f"{index} is not a valid weight index: {one_line(error)}") from None
    else:
        return  # no safetensors weights: from_pretrained says what it misses
    try:
        with torch.device("meta"):
            expected = {key: tuple(value.shape) for key, value in head_class(config).state_dict().items()}
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is checked by from_pretrained
        return
    for name in files:
        path = folder / name
        try:
            with safe_open(path, "pt") as weights:
                shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
        except (SafetensorError, OSError) as error:
            raise CliError(f"cannot read the weights file {path}: {one_line(error)} (damaged or truncated?)") from None
        wrong = [
            f"{key} {shape} (expected {expected[key]})"
            for key, shape in shapes.items()
            if key in expected and shape != expected[key]
        ]
        if wrong:
            raise CliError(
                f"{path}: {len(wrong)} tensor(s) do not have the shape config.json gives the model: "
                f"{'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}"
            )


def _load_model_config(name_or_path: str, local: bool):
    import transformers_albef as ta

    if local:
        from ..conversion import load_config_file

        config_file = Path(name_or_path) / "config.json"
        if not config_file.is_file():
            raise CliError(f"{name_or_path} is not a model folder: it has no config.json")
        try:
            return load_config_file(config_file)
        except (OSError, ValueError) as error:
            raise CliError(one_line(error)) from None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # noqa: BLE001 - Hub, JSON and validation errors alike: one line naming the model
        raise CliError(f"cannot load a model from {name_or_path}: {one_line(error)}") from None
    if not isinstance(config, ta.AlbefConfig):
        raise CliError(f"{name_or_path} is not an ALBEF model (model_type {config.model_type!r})")
    return config


def load_processor(name_or_path: str, config):
    """The processor saved with a model (the standard one, with a notice, when there is none), checked against the
    model: a vocabulary of another size (missing tokenizer files leave only the special tokens) or another image
    size would make the model answer anyway, wrongly. Errors are `CliError`s naming the folder."""
    import transformers_albef as ta

    try:
        processor = ta.AlbefProcessor.from_pretrained(name_or_path)
    except OSError:
        print(
            f"note: {name_or_path} has no processor; using the bert-base-uncased vocabulary at "
            f"{config.vision_config.image_size} px",
            file=sys.stderr,
        )
        processor = ta.AlbefProcessor.from_bert_vocab(image_size=config.vision_config.image_size)
    except ValueError as error:
        raise CliError(f"cannot load the processor of {name_or_path}: {one_line(error)}") from None
    words, vocab_size = len(processor.tokenizer), config.text_config.vocab_size
    if words != vocab_size:
        missing = [name for name in ("tokenizer.json", "vocab.txt") if (Path(name_or_path) / name).is_file()] == []
        hint = " (its tokenizer files, tokenizer.json or vocab.txt, are missing)" if missing else ""
        raise CliError(
            f"{name_or_path}: the tokenizer has {words} tokens but the model's vocabulary (text_config.vocab_size) "
            f"has {vocab_size}{hint}; save the model's own tokenizer with it (processor.save_pretrained)"
        )
    size = processor.image_processor.size
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    expected = config.vision_config.image_size
    if (height, width) != (expected, expected) and height is not None:
        raise CliError(
            f"{name_or_path}: the image processor resizes to {height}x{width} but the model takes "
            f"{expected}x{expected} images (vision_config.image_size); fix processor_config.json or the config"
        )
    return processor


def load_image(path: str | Path):
    """An RGB PIL image, or a `CliError` that names the file and says why not (missing, not an image, truncated,
    a decompression bomb over PIL's pixel limit)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise CliError(f"image not found: {path}" if not path.exists() else f"not an image file: {path} is a folder")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise CliError(f"refusing to read {path}: {one_line(error)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        # UnidentifiedImageError (an OSError) for unknown data, OSError for truncated files, SyntaxError/ValueError
        # for damaged headers: the message alone does not say which file.
        raise CliError(f"cannot read {path} as an image ({type(error).__name__}: {one_line(error)})") from None


def save_picture(picture, path: str | Path) -> Path:
    """Save a PIL picture, creating the folder; the format follows the suffix (PNG if there is none). Written to a
    temporary sibling and renamed: a failure (a full disk, an interrupt) leaves any earlier picture as it was.
    Problems are `CliError`s naming the file."""
    from ..visualization import save_image_atomically

    path = Path(path)
    if path.is_dir():
        raise CliError(f"cannot write {path}: it is a folder")
    try:
        return save_image_atomically(picture, path)
    except (OSError, ValueError, KeyError) as error:
        message = one_line(error)
        raise CliError(message if message.startswith("cannot write") else f"cannot write {path}: {message}") from None


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
