"""Crash-safe training checkpoints through `accelerate` (`save_state` / `load_state`).

A checkpoint is the folder `checkpoint-<step>` holding what `Accelerator.save_state` writes: the model (with the
momentum towers and the MoCo queues and pointer, which are its parameters and buffers), the optimiser, the scheduler,
one RNG file per process and the registered objects (`TrainingProgress`: step, epoch, batches consumed in the epoch).

Writes are atomic: the state goes into `.tmp-checkpoint-<step>`; once every process has written its part, the main
process adds `checkpoint.json` (the completion marker), flushes the files to disk and renames the folder to
`checkpoint-<step>` (`os.replace`, atomic on POSIX). A crash at any point leaves either the previous checkpoints
untouched or a `.tmp-*` folder, which is never loaded and is removed by the next run (`remove_partial_checkpoints`).
`latest_checkpoint` only returns renamed folders that carry the marker.

All processes must call `save_checkpoint` together (it synchronises them). The output folder must be shared by all
processes (one file system), as `accelerate` itself assumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
MARKER = "checkpoint.json"
_CHECKPOINT = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)")


@dataclass
class TrainingProgress:
    """Where training stands; registered with `accelerator.register_for_checkpointing`, so it is saved and restored
    with the rest of the state. `batches_in_epoch` counts the batches each process consumed in `epoch` (skipped on
    resume); `global_batch_size` (pairs per forward over all processes) tells whether that position still means
    the same data when resuming."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    global_batch_size: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _CHECKPOINT.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike) -> bool:
    """A renamed checkpoint folder with the completion marker."""
    path = Path(path)
    return checkpoint_step(path) is not None and path.is_dir() and (path / MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest (smallest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the largest step, or None. Partial (`.tmp-*`) folders are ignored."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete `.tmp-checkpoint-*` folders left by an interrupted save (call on the main process, before training)."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _fsync_tree(path: Path):
    """Flush the files of `path` and the folder entries to disk, so the rename never points at unwritten data."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Save the accelerator's state as `output_dir/checkpoint-<step>`, atomically (module docstring). Keeps the
    newest `total_limit` checkpoints when given. `extra` is stored in the marker (e.g. the run's arguments). Every
    process must call this."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temp = output_dir / f"{TEMP_PREFIX}{step}"
    if is_complete(final):
        # Within a run a step's state is a function of the step: a complete save of it is this save (e.g. the last
        # step of a run resumed from its final checkpoint).
        return final
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
        if final.exists():  # a folder without the marker (not ours to trust): replaced below
            shutil.rmtree(final)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every process has written its RNG state

    if accelerator.is_main_process:
        marker = {
            "step": step,
            "num_processes": accelerator.num_processes,
            "time": time.time(),
            "files": sorted(p.name for p in temp.iterdir()),
            **(extra or {}),
        }
        (temp / MARKER).write_text(json.dumps(marker, indent=1, default=str))
        _fsync_tree(temp)
        os.replace(temp, final)
        _fsync_dir(output_dir)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                (old / MARKER).unlink()  # first, so a deletion cut short never leaves a "complete" partial folder
                shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict:
    """Restore the accelerator's state (model, optimiser, scheduler, RNG, registered objects) from a complete
    checkpoint; returns its marker."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(
            f"{path} is not a complete checkpoint (a `{CHECKPOINT_PREFIX}<step>` folder with {MARKER}); partial saves "
            f"are `{TEMP_PREFIX}*` folders and are never loaded"
        )
    marker = json.loads((path / MARKER).read_text())
    accelerator.load_state(str(path))
    return marker


__all__ = [
    "TrainingProgress",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_partial_checkpoints",
    "is_complete",
    "checkpoint_step",
]
