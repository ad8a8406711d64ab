"""ALBEF's optimiser and learning-rate schedule.

- `create_optimizer`: AdamW with the original parameter grouping (timm `create_optimizer`, ALBEF
  `optim/optim_factory.py`): weight decay on every trainable parameter except 1-D ones and `*.bias`. The original's
  skip list lives on its ViT, not on the ALBEF module, so it is never consulted: the 0-D `temp`, the ViT
  `cls_token` and position embeddings, and every embedding matrix **are** decayed. Momentum towers
  (`requires_grad=False`) are not optimised.
- `AlbefLRSchedule`: the original cosine schedule, either made per-step (`"cosine"`, the default) or reproduced
  exactly (`"original"`). A `LambdaLR` over it (`create_scheduler`) is stepped once per optimiser step.

The original schedule (timm `CosineLRScheduler`, `warmup_prefix=True`, driven by Pretrain.py) in optimiser steps:

- epoch 0: `scheduler.step(i // 100)` after iteration `i` for `i <= 100 * warmup_epochs`, i.e. a *staircase*
  warm-up from `warmup_lr` to `lr` over `100 * warmup_epochs` iterations (2000 for pre-training: 20 "epochs" of
  100), then `lr` until the end of epoch 0;
- epoch `e > 0`: `min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2`, constant over the epoch.

`"cosine"` keeps the endpoints and replaces both staircases by their continuous versions: linear warm-up over
`warmup_steps` (the original's `100 * warmup_epochs` = 2000), then a per-step cosine from `lr` to `min_lr` over the
remaining steps. Epoch-sized plateaus are not meaningful for streaming data or `--max-steps` runs; the per-step
curve is. `"original"` is there to reproduce a paper run step for step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "original")


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """The original rule: no weight decay on 1-D parameters (LayerNorm weights, biases) and on `*.bias`."""
    return not (param.ndim == 1 or name.endswith(".bias"))


def weight_decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters `(decayed, not decayed)`; each shared (tied) parameter is listed once."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param) else no_decay).append(name)
    return decay, no_decay


def create_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.02,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over two groups (decayed / not decayed, see `weight_decay_groups`). `fused=None` picks the fused
    kernel when every parameter is on CUDA or the CPU (on CPU it measured 3.6x the for-loop and 6x foreach,
    BENCHMARKS.md) and the multi-tensor (foreach) one otherwise."""
    decay, no_decay = weight_decay_groups(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = all(params[n].device.type in ("cuda", "cpu") for n in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True)


class AlbefLRSchedule:
    """Learning rate at optimiser step `step` (0-based: the rate used by the `step`-th update).

    schedule `"cosine"`: `warmup_lr -> lr` linearly over `warmup_steps`, then cosine `lr -> min_lr` until
        `total_steps` (and `min_lr` after).
    schedule `"original"`: the original epoch-based schedule (module docstring); needs `steps_per_epoch` and
        `epochs`; warm-up is a staircase of `step_size`-step stairs, `warmup_steps // step_size` of them.
    """

    def __init__(
        self,
        lr: float = 1e-4,
        min_lr: float = 1e-5,
        warmup_lr: float = 1e-5,
        warmup_steps: int = 2000,
        total_steps: int | None = None,
        schedule: str = "cosine",
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
        step_size: int = 100,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and total_steps is None:
            raise ValueError('the "cosine" schedule needs total_steps')
        if schedule == "original" and (not steps_per_epoch or not epochs):
            raise ValueError('the "original" schedule is epoch-based: it needs steps_per_epoch and epochs')
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.warmup_steps, self.total_steps, self.schedule = warmup_steps, total_steps, schedule
        self.steps_per_epoch, self.epochs, self.step_size = steps_per_epoch, epochs, step_size

    def _cosine(self, progress: float) -> float:
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))

    def __call__(self, step: int) -> float:
        if self.schedule == "cosine":
            if step < self.warmup_steps:
                return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
            return self._cosine((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        epoch = step // self.steps_per_epoch
        if epoch > 0:
            return self._cosine(epoch / self.epochs)
        # Iteration i of epoch 0 runs with the value the scheduler got after iteration i - 1 (the initial warmup_lr
        # for i = 0); the scheduler is stepped with i // step_size at multiples of step_size up to the warm-up end.
        stairs = self.warmup_steps // self.step_size
        stair = min(max(step - 1, 0), stairs * self.step_size) // self.step_size
        if stair < stairs:
            return self.warmup_lr + stair * (self.lr - self.warmup_lr) / stairs
        return self.lr


def create_scheduler(optimizer: torch.optim.Optimizer, schedule: AlbefLRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` that sets the optimiser's lr to `schedule(step)`; step it once per optimiser step. (The base lr
    is 1 and the "factor" is the rate itself, so any schedule, lr = 0 included, is followed exactly.)"""
    for group in optimizer.param_groups:
        group["initial_lr"] = 1.0

    # A plain function: LambdaLR then keeps only the step count in its state_dict, so a resumed run follows the
    # schedule of its own arguments (e.g. a longer --max-steps) from the restored step.
    def rate(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
