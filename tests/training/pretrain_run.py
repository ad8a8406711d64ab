"""Test launcher for `transformers_albef.training.pretrain`: runs the real entry point (`parse_args` and `pretrain`)
with a step callback that, on every process, records the step's batch, local losses, queues and parameter sums to
`--record-dir`, and can kill the process:

- `--kill-after-step K`: SIGKILL right after step K (its checkpoint, if any, is complete);
- `--kill-in-save-after-step K`: from step K on, the next checkpoint save SIGKILLs the process halfway (after the
  model, optimiser, scheduler and RNG files are written, while the registered objects are being saved).

    torchrun --nproc_per_node 2 tests/training/pretrain_run.py --record-dir DIR [--kill-...] -- <pretrain args>
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from transformers_albef.training.pretrain import StepState, parse_args, pretrain


class KillWhenSaved:
    """A checkpointed object whose `state_dict` kills the process: accelerate saves registered objects last."""

    def state_dict(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def load_state_dict(self, state):
        pass


def main():
    argv = sys.argv[1:]
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--record-dir", type=Path, required=True)
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-in-save-after-step", type=int)
    options = parser.parse_args(argv[:split])
    args = parse_args(argv[split + 1 :])
    options.record_dir.mkdir(parents=True, exist_ok=True)

    def record(state: StepState):
        rank = state.accelerator.process_index
        model = state.accelerator.unwrap_model(state.model)
        momentum = model.momentum
        item = {
            "step": state.step,
            "epoch": state.epoch,
            **{k: v.detach().cpu() for k, v in state.batch.items()},
            **{k: getattr(state.output, k).detach().cpu() for k in ("loss", "loss_itc", "loss_itm", "loss_mlm")},
            "image_queue": momentum.image_queue.detach().cpu().clone(),
            "text_queue": momentum.text_queue.detach().cpu().clone(),
            "queue_ptr": momentum.queue_ptr.detach().cpu().clone(),
            "param_sum": torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]),
            "momentum_sum": torch.stack([p.detach().double().sum() for p in momentum.parameters()]),
        }
        torch.save(item, options.record_dir / f"rank{rank}-step{state.step}.pt")
        if options.kill_after_step == state.step:
            os.kill(os.getpid(), signal.SIGKILL)
        if options.kill_in_save_after_step == state.step:
            state.accelerator.register_for_checkpointing(KillWhenSaved())

    pretrain(args, step_callback=record)


if __name__ == "__main__":
    main()
