"""Copy the marked sections (`<!-- NAME -->` ... `<!-- /NAME -->`) of one benchmark file into another: what a GPU
session wrote under $OUT goes into the repository's BENCHMARKS.md.

    python benchmarks/merge_sections.py OUT/BENCHMARKS.md               # into BENCHMARKS.md at the repository root
    python benchmarks/merge_sections.py OUT/BENCHMARKS.md --only speed:gpu-base,pretrain-profile:gpu

Each section of the source replaces the section of the same name in the target, in place; a section the target lacks
is appended. Everything else in the target is kept; so is a measured section where the source holds only speed.py's
"Pending a GPU session" placeholder (unless `--only` names it). Prints the names it copied.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = re.compile(r"<!-- (?!/)(\S+) -->\n(.*?)<!-- /\1 -->\n?", flags=re.S)


def sections(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0).rstrip("\n") + "\n" for m in SECTION.finditer(text)}


def merge(source: str, target: str, only: set[str] | None = None) -> tuple[str, list[str]]:
    copied = []
    for name, block in sections(source).items():
        if only and name not in only:
            continue
        if not only and "Pending a GPU session" in block:
            continue  # speed.py's placeholder, written where no GPU section exists yet: never over a measured one
        pattern = re.compile(re.escape(f"<!-- {name} -->") + r".*?" + re.escape(f"<!-- /{name} -->") + r"\n?", re.S)
        if pattern.search(target):
            target = pattern.sub(lambda _, block=block: block, target, count=1)
        else:
            target = target + ("" if not target or target.endswith("\n") else "\n") + "\n" + block
        copied.append(name)
    return target, copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path, nargs="?", default=REPO / "BENCHMARKS.md")
    parser.add_argument("--only", default="", help="comma list of section names")
    args = parser.parse_args(argv)
    only = {n for n in args.only.split(",") if n} or None
    text, copied = merge(args.source.read_text(), args.target.read_text() if args.target.exists() else "", only)
    temporary = args.target.with_name(f".{args.target.name}.merge-{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, args.target)
    finally:
        temporary.unlink(missing_ok=True)
    print("\n".join(copied) or "no section copied")
    return 0 if copied else 1


if __name__ == "__main__":
    sys.exit(main())
