"""Trainer callbacks for ALBEF fine-tuning."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)


class AlphaWarmupCallback(TrainerCallback):
    """The distillation weight of the original fine-tuning loops: during the first epoch
    `alpha * min(1, step / steps_in_first_epoch)`, then `alpha` (`warm_up=False`, as SNLI-VE: always `alpha`).

    The callback only computes the value: at the start of every optimizer step it sets `self.alpha`, which
    `AlbefTrainer` passes to the model's forward (`alpha=`) and logs next to the loss. It lives on the trainer
    side, not in the collator, because collation runs ahead of the step (prefetching, dataloader worker processes)
    and would see a stale value. `step` counts optimizer updates, so with gradient accumulation every micro-batch
    of an update uses the same value; `steps_in_first_epoch` is the number of updates per epoch on one process
    (the original's `len(data_loader)`), read from the training dataloader unless given.
    """

    def __init__(self, alpha: float = 0.4, warm_up: bool = True, steps_in_first_epoch: int | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.target_alpha = alpha
        self.warm_up = warm_up
        self._given_steps = steps_in_first_epoch
        self.steps_in_first_epoch = steps_in_first_epoch
        self.alpha = alpha  # outside training (evaluation) the full weight; unused there

    def alpha_at(self, step: int) -> float:
        """The weight used by optimizer step `step` (0-based)."""
        if not self.warm_up:
            return self.target_alpha
        if not self.steps_in_first_epoch:
            raise ValueError("steps_in_first_epoch is unknown: pass it to AlphaWarmupCallback")
        return self.target_alpha * min(1.0, step / self.steps_in_first_epoch)

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not self.warm_up or self._given_steps:
            return
        try:
            batches = len(train_dataloader)
        except TypeError:  # an iterable dataset: no epoch length
            batches = None
        if batches:
            accumulation = args.gradient_accumulation_steps
            self.steps_in_first_epoch = batches // accumulation + int(batches % accumulation > 0)
        else:
            self.steps_in_first_epoch = max(state.max_steps, 1)
            logger.warning(
                "The training data has no length: alpha warms up over all %d steps. Pass steps_in_first_epoch to "
                "AlphaWarmupCallback to warm up over one epoch.",
                self.steps_in_first_epoch,
            )

    def on_step_begin(self, args, state, control, **kwargs):
        self.alpha = self.alpha_at(state.global_step)


__all__ = ["AlphaWarmupCallback"]
