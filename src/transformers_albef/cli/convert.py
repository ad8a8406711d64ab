"""`albef convert`: an original salesforce/ALBEF checkpoint into a Hub-ready transformers model folder.

    albef convert --checkpoint mscoco.pth --output-dir albef-retrieval-coco

(`python convert/convert_albef_original_to_hf.py` takes the same arguments.) The folder gets the model
(safetensors, native names), the processor (image size + tokenizer), the code files for `trust_remote_code=True`,
and a model card; the folder is then reloaded with the Auto classes and checked to compute what the in-memory
conversion computes. `--push-to-hub REPO_ID` publishes the folder.

The conversion itself is `transformers_albef.conversion` (a declarative key map); this command picks the head and
the configuration, saves, verifies and reports.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .common import positive_int

# Target kind -> the name of its head class in transformers_albef. The checkpoint's own kind is the default target.
HEAD_NAMES = {
    "pretrain": "AlbefForPreTraining",
    "retrieval": "AlbefForRetrieval",
    "grounding": "AlbefForRetrieval",
    "vqa": "AlbefForQuestionAnswering",
    "nlvr": "AlbefForVisualReasoning",
    "text_assignment": "AlbefForTextAssignment",
    "ve": "AlbefForVisualEntailment",
    "itc": "AlbefModel",
}
# Settings of a target kind that the checkpoint's shapes cannot tell.
KIND_OVERRIDES = {"retrieval_flickr": {"retrieval_k": 128}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="original .pth (or .safetensors) file")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to write the converted model to")
    parser.add_argument(
        "--kind",
        choices=sorted([*HEAD_NAMES, *KIND_OVERRIDES]),
        help="target head (default: the checkpoint's own kind); e.g. a pre-training checkpoint into vqa",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        help="resolution to convert to, a multiple of the patch size (position embeddings interpolated)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output-dir when it holds a model folder this tool wrote (never a folder with other files)",
    )
    parser.add_argument(
        "--tokenizer", help="vocab.txt, tokenizer folder or Hub name (default: bundled bert-base-uncased)"
    )
    parser.add_argument("--config", type=Path, help="an AlbefConfig JSON to use instead of the standard configuration")
    parser.add_argument(
        "--drop-training-state",
        action="store_true",
        help="leave out momentum towers and queues even if the checkpoint has them (an inference model)",
    )
    parser.add_argument(
        "--card", help="model card to write (default: the one for this released file, or a generic one)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the folder to this Hub repository")
    parser.add_argument("--original-repo", help="path to a salesforce/ALBEF checkout, to compare against it")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an original ALBEF checkpoint into a transformers folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Convert, save, verify and report (`converting.run`, imported only now)."""
    from .converting import run as run_conversion

    return run_conversion(args)


def __getattr__(name: str):
    """The implementation's names (`HEADS`, `verify_reload`, `RELOAD_TOLERANCE`, ...) stay reachable from here."""
    if name.startswith("__"):
        raise AttributeError(name)
    from . import converting

    try:
        return getattr(converting, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


SCRIPT = "python convert/convert_albef_original_to_hf.py"


def main(argv: list[str] | None = None) -> int:
    """The standalone converter script (`convert/convert_albef_original_to_hf.py`): the same arguments as
    `albef convert`; errors are printed as `error: <reason>`."""
    from . import run_command

    parser = argparse.ArgumentParser(
        prog=SCRIPT.split()[-1], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.command_line = SCRIPT + " " + shlex.join(argv)
    return run_command(run, args, prog="")
