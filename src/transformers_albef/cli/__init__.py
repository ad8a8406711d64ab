"""The `albef` command line: `albef demo`, `albef vqa`, `albef ground`, `albef convert`, ... (`albef --help`).

Each subcommand is a module of this package named in `SUBCOMMANDS`, exposing `register(subparsers)` and
`run(args) -> int` (see `common.py` for the shared options, loaders and error handling).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from types import ModuleType

from .common import CliError, report_errors

SUBCOMMANDS = ("demo", "retrieve", "evaluate", "vqa", "ground", "convert")


def _load_subcommand(name: str) -> ModuleType | None:
    """The subcommand's module, or None when this installation does not have it. An import error *inside* an
    existing module is a bug and propagates."""
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise
    for attribute in ("register", "run"):
        if not callable(getattr(module, attribute, None)):
            raise ImportError(f"{module_name} must define {attribute}() to be an albef subcommand")
    return module


def _register_missing(subparsers, name: str) -> None:
    """A subcommand whose module is missing still shows up and says so when called, instead of vanishing."""
    parser = subparsers.add_parser(
        name,
        help="(not available in this installation)",
        description=f"`albef {name}` is not available in this installation of transformers-albef.",
    )
    parser.set_defaults(accepts_any_arguments=True)

    def unavailable(args) -> int:
        raise CliError(f"not available in this installation (module {__name__}.{name} is missing)")

    parser.set_defaults(func=unavailable)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="albef",
        description="ALBEF (Align before Fuse) for Hugging Face transformers: image-text retrieval, visual question "
        "answering, Grad-CAM grounding and checkpoint conversion. `albef demo` runs everything on bundled models.",
        epilog="`albef COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"transformers-albef {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load_subcommand(name)
        if module is None:
            _register_missing(subparsers, name)
        else:
            module.register(subparsers)
    for subparser in subparsers.choices.values():  # `albef COMMAND ... --debug` works too
        if "--debug" not in subparser._option_string_actions:
            subparser.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of errors"
            )
    return parser


def run_command(func, args, prog: str, debug: bool = False) -> int:
    """`func(args)` with every error reported as one line on stderr (`<prog>: error: <reason>`) and a non-zero status
    instead of a traceback: user errors (`CliError`, `ValueError`, `OSError`: what was wrong and where) with status 2
    (or the `CliError`'s), anything else with its type and status 1. `debug` (`--debug`, or `ALBEF_DEBUG=1` in the
    environment) re-raises, for the traceback."""
    return report_errors(lambda: func(args), prog, debug=debug)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.command_line = shlex.join(["albef", *argv])
    # transformers' "Loading weights" bars say nothing a user can act on; the commands show their own progress.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return run_command(args.func, args, prog=f"albef {args.command}", debug=args.debug)


__all__ = ["SUBCOMMANDS", "CliError", "build_parser", "main", "report_errors", "run_command"]
