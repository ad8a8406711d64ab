"""What the benchmark scripts share: each owns a section of BENCHMARKS.md between `<!-- NAME -->` and
`<!-- /NAME -->`, replaced in place (the rest of the file kept) and written atomically; and the commit it measured."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def replace_section(text: str, name: str, block: str, header: str = "") -> str:
    """`text` with the section `name` replaced by `block` (the whole marked block), or `block` appended (after
    `header` when `text` is empty)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", flags=re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if text.strip():
        return text + ("" if text.endswith("\n") else "\n") + "\n" + block
    return (header.rstrip("\n") + "\n\n" if header else "") + block


def atomic_write_text(path: Path, text: str) -> None:
    """Written to a temporary sibling, then moved into place: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_section(path: Path, name: str, body: str, header: str = "") -> None:
    """Replace (or append) the section `name` of the file at `path` with `body`, keeping the rest."""
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->\n"
    atomic_write_text(path, replace_section(path.read_text() if path.exists() else "", name, block, header))


def commit() -> str:
    """The measured commit (`abc1234`, `+ uncommitted changes` when the tree differs), or `unknown`."""
    try:
        run = {"capture_output": True, "text": True, "timeout": 10}
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"
