"""Crash-safe training checkpoints through `accelerate` (`save_state` / `load_state`), which never unpickle code.

A checkpoint is the folder `checkpoint-<step>` holding what `Accelerator.save_state` writes (the model with the
momentum towers and the MoCo queues and pointer, which are its parameters and buffers, as safetensors; the optimiser,
the scheduler and one RNG file per process as torch files), `training_progress.json` (`TrainingProgress`: step, epoch,
batches consumed in the epoch) and `checkpoint.json` (the completion marker).

Writes are atomic: the state goes into `.tmp-checkpoint-<step>`; once every process has written its part, the main
process adds the progress and the marker, flushes the files to disk and renames the folder to `checkpoint-<step>`
(`os.replace`, atomic on POSIX). An exception or an interrupt during the save removes the temporary folder; a crash
(kill, power loss) leaves the previous checkpoints untouched and a `.tmp-*` folder, which is never loaded and is
removed by the next run (`remove_partial_checkpoints`). `latest_checkpoint` only returns renamed folders that carry
the marker.

Loading never runs code from the checkpoint: the training progress is JSON; every torch file is checked with
`torch.load(weights_only=True)` (torch's restricted unpickler, no arbitrary objects) before accelerate reads it, and a
file that needs more is refused, naming it. accelerate itself unpickles the state of objects registered with
`accelerator.register_for_checkpointing` (`custom_checkpoint_<i>.pkl`) with `weights_only=False`, which can run any
code a tampered file carries: `load_checkpoint` refuses to restore such objects unless the caller passes
`trust_pickle=True` for a checkpoint it made itself. Checkpoints of earlier versions kept the progress in
`custom_checkpoint_0.pkl`; that file is read with `weights_only=True` (it is a dict of integers), never unpickled.

All processes must call `save_checkpoint` together (it synchronises them). The output folder must be shared by all
processes (one file system), as `accelerate` itself assumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
MARKER = "checkpoint.json"
PROGRESS = "training_progress.json"
_CHECKPOINT = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)")
_CUSTOM_STATE = re.compile(r"custom_checkpoint_(\d+)\.pkl")
# Files accelerate writes with torch.save (optimizer, scheduler, sampler, RNG, scaler, data-loader states).
_TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that could only be read by unpickling arbitrary objects (which can run code)."""


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

    def load_state_dict(self, state: dict, source: str | os.PathLike = "the training progress"):
        """Restore from `state_dict()`'s dict; anything but the known integer fields is an error naming `source`."""
        if not isinstance(state, dict):
            raise ValueError(f"{source}: expected a JSON object of training progress, got {type(state).__name__}")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training-progress fields {unknown}; expected {sorted(known)}")
        for key, value in state.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{source}: {key} must be a non-negative integer, got {value!r}")
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
    progress: TrainingProgress | None = None,
) -> Path:
    """Save the accelerator's state and `progress` (as JSON) as `output_dir/checkpoint-<step>`, atomically (module
    docstring). Keeps the newest `total_limit` checkpoints when given. `extra` is stored in the marker (e.g. the
    run's arguments). Every process must call this."""
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

    try:
        accelerator.save_state(str(temp))
        accelerator.wait_for_everyone()  # every process has written its RNG state

        if accelerator.is_main_process:
            if progress is not None:
                (temp / PROGRESS).write_text(json.dumps(progress.state_dict(), indent=1))
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
    except BaseException:
        # An error, an interrupt or a full disk: nothing half-written stays behind (a kill leaves `.tmp-*`, which is
        # never loaded and removed by the next run).
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                (old / MARKER).unlink()  # first, so a deletion cut short never leaves a "complete" partial folder
                shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def read_marker(path: str | os.PathLike) -> dict:
    """The completion marker of a checkpoint folder, with errors that name the file."""
    marker_file = Path(path) / MARKER
    try:
        marker = json.loads(marker_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{marker_file} is not valid JSON ({error}): a damaged checkpoint") from None
    if not isinstance(marker, dict):
        raise ValueError(f"{marker_file} must hold a JSON object, got {type(marker).__name__}: a damaged checkpoint")
    return marker


def check_torch_file(path: str | os.PathLike) -> None:
    """Raise `UnsafeCheckpointError` naming `path` unless it loads with `torch.load(weights_only=True)` (numpy arrays
    allowed, as accelerate's RNG files hold them). Memory-mapped: the tensors are not read."""
    import pickle

    from accelerate.utils import load

    try:
        load(str(path), map_location="cpu", mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" (it references `{found.group(1)}`)" if found else ""
        raise UnsafeCheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True){what}: it holds objects that need arbitrary "
            "unpickling, which can run code, or it is damaged; refusing to resume from it"
        ) from None


def _legacy_progress(path: Path) -> dict:
    """`custom_checkpoint_0.pkl` of an earlier version (the progress dict of integers), read without unpickling."""
    check_torch_file(path)
    from accelerate.utils import load

    return load(str(path), map_location="cpu")


def load_checkpoint(
    accelerator: Accelerator,
    path: str | os.PathLike,
    progress: TrainingProgress | None = None,
    trust_pickle: bool = False,
) -> dict:
    """Restore the accelerator's state (model, optimiser, scheduler, RNG) and `progress` from a complete checkpoint;
    returns its marker. Nothing from the folder is unpickled beyond `weights_only=True` (module docstring); objects
    registered with `accelerator.register_for_checkpointing` are refused unless `trust_pickle` (for a checkpoint you
    made yourself: accelerate unpickles them with `weights_only=False`). Errors name the file and say what is wrong."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(
            f"{path} is not a complete checkpoint (a `{CHECKPOINT_PREFIX}<step>` folder with {MARKER}); partial saves "
            f"are `{TEMP_PREFIX}*` folders and are never loaded"
        )
    marker = read_marker(path)
    if trust_pickle:
        _load_state(accelerator, path)
        if progress is not None and (path / PROGRESS).is_file():
            progress.load_state_dict(_read_progress(path / PROGRESS), path / PROGRESS)
        return marker
    if accelerator._custom_objects:
        names = ", ".join(type(obj).__name__ for obj in accelerator._custom_objects)
        raise UnsafeCheckpointError(
            f"cannot restore {path}: objects registered with accelerator.register_for_checkpointing ({names}) are "
            "restored by unpickling custom_checkpoint_*.pkl with weights_only=False, which can run code from the "
            "checkpoint; save their state in JSON or safetensors instead, or pass trust_pickle=True for a checkpoint "
            "you made yourself"
        )
    custom = sorted(p.name for p in path.iterdir() if _CUSTOM_STATE.fullmatch(p.name))
    legacy_state = None
    if (path / PROGRESS).is_file():
        state = _read_progress(path / PROGRESS)
        source = path / PROGRESS
    elif custom == ["custom_checkpoint_0.pkl"] and progress is not None:
        legacy_state = state = _legacy_progress(path / custom[0])
        source = path / custom[0]
    elif progress is not None:
        raise ValueError(f"{path} has no {PROGRESS}: not a checkpoint written by transformers_albef's pre-training")
    if custom and legacy_state is None:
        raise UnsafeCheckpointError(
            f"{path} holds {', '.join(custom)}: pickled objects accelerate would unpickle with weights_only=False, "
            "which can run code; this training run registers none, so the folder was not written by it. Refusing to "
            "resume from it (pass trust_pickle=True only for a checkpoint you made yourself)"
        )
    if progress is not None:
        TrainingProgress().load_state_dict(state, source)  # checked before anything is restored
    for file in sorted(path.iterdir()):
        if file.suffix in _TORCH_SUFFIXES and not _CUSTOM_STATE.fullmatch(file.name):
            check_torch_file(file)
    if custom:
        # accelerate counts custom_checkpoint_*.pkl files against the registered objects: load from a view without
        # the legacy progress file (read above without unpickling).
        with tempfile.TemporaryDirectory(prefix="albef-resume-") as view:
            for file in path.iterdir():
                if file.name not in custom:
                    os.symlink(file.resolve(), Path(view) / file.name)
            _load_state(accelerator, Path(view), shown=path)
    else:
        _load_state(accelerator, path)
    if progress is not None:
        progress.load_state_dict(state, source)
    return marker


def _read_progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): a damaged checkpoint") from None


def _load_state(accelerator: Accelerator, path: Path, shown: Path | None = None) -> None:
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors, torch and accelerate raise many types; named here
        message = " ".join(str(error).split())
        raise ValueError(
            f"cannot restore the training state from {shown or path}: {message[:500]}"
            f"{' ...' if len(message) > 500 else ''} (a damaged checkpoint, or one of another model configuration)"
        ) from error


__all__ = [
    "TrainingProgress",
    "UnsafeCheckpointError",
    "check_torch_file",
    "save_checkpoint",
    "load_checkpoint",
    "read_marker",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_partial_checkpoints",
    "is_complete",
    "checkpoint_step",
]
