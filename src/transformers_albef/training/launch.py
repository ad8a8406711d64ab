"""How a training script was launched, checked before any work: a launch that asked for several processes but runs
one is refused with the command that does what was asked.

`accelerate launch --cpu --num_processes N` starts ONE process (accelerate's simple launcher; it only exports
`ACCELERATE_USE_CPU` and, for N > 1, `MASTER_ADDR` / `MASTER_PORT`), so a script that trusted it would silently train
alone. Several processes on CPU come from `accelerate launch --multi_gpu --num_processes N` (gloo, also without a
GPU) or `torchrun --nproc_per_node N`, which set `WORLD_SIZE`.
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")


def single_process_multi_launch() -> bool:
    """True when `accelerate launch --cpu --num_processes N>1` started this process alone: accelerate's CPU
    launcher set `MASTER_PORT` (it does only for N > 1) but no launcher set `WORLD_SIZE`."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE
    return cpu and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ


def check_launch(module: str) -> None:
    """Raise `ValueError` (one line, with the commands that work) for a multi-process launch that runs one process."""
    if single_process_multi_launch():
        raise ValueError(
            "`accelerate launch --cpu --num_processes N` starts a single process (the N processes asked for would "
            f"not exist and this one would train alone); on CPU run `accelerate launch --multi_gpu --num_processes N "
            f"-m {module} ...` (gloo) or `torchrun --nproc_per_node N -m {module} ...`, or drop --num_processes for "
            "one process"
        )


__all__ = ["check_launch", "single_process_multi_launch"]
