"""ALBEF pre-training with `accelerate` (the original `Pretrain.py`): ITC + ITM + MLM with momentum distillation.

Launch on one or many processes (the same command; `accelerate launch` or `torchrun`):

    accelerate launch -m transformers_albef.training.pretrain --train-data coco.json vg.json --image-root images/ \
        --output-dir runs/albef --preset pretrain --bf16 --batch-size 64
    torchrun --nproc_per_node 8 -m transformers_albef.training.pretrain --train-data data/ --output-dir runs/albef
    python -m transformers_albef.training.pretrain --train-data data/ --config tiny.json --output-dir /tmp/x \
        --max-steps 10 --batch-size 4 --image-size 32 --queue-size 16

`--help` lists every option. Defaults are the paper's (configs/Pretrain.yaml): AdamW lr 1e-4, weight decay 0.02 with
the original grouping (`optim.py`), cosine schedule from `warmup_lr` 1e-5 with 2000 warm-up steps down to `min_lr`
1e-5 (per step; `--lr-schedule original` gives the original epoch-wise curve), 30 epochs, 64 pairs per device,
256 px, momentum 0.995, queue 65536, alpha 0.4 ramped linearly over the first epoch
(`alpha * min(1, step / steps_per_epoch)`), seed 42 + process index.

What a run does:
- data: `load_image_text_pairs` over the `--train-data` sources (imagefolder with metadata.jsonl, or original ALBEF
  json files); `PretrainingCollator` applies the training transform and the MLM masking. The random draws of a
  batch (augmentation, masking) come from a seed derived from (`--seed`, epoch, the batch's sample indices) and
  leave the training RNG alone, so a batch is the same whether or not the run was resumed and whatever the number
  of data workers (streaming: from (seed, epoch, process, worker, batch number), the same for the same launch).
- the queue size must be divisible by the global batch (`--batch-size` x processes): checked before anything is
  built, with the batch sizes that would fit.
- checkpoints (`checkpointing.py`): every `--save-steps` optimiser steps, at each epoch end (as the original) and at
  the end, atomically (temp folder + rename). A run whose output folder holds a complete checkpoint resumes from the
  latest one (`--resume auto`, the default): model with momentum towers and queues, optimiser, scheduler, the RNG of
  every process and the data position (map-style data: the consumed batches of the epoch are skipped without being
  loaded; streaming: they are read again and dropped). With the same number of processes and batch size, a resumed
  run continues exactly as the uninterrupted one would have (tested on CPU with 2 processes: the same batches,
  losses, queues and weights). Resuming never runs code from the folder: the progress is JSON and every torch file
  is read with `weights_only=True` (a file that needs more is refused, naming it).
- errors: one line on stderr (`albef-pretrain: error: ...`, what, where, what was expected), exit status 2 for a
  user error; `ALBEF_DEBUG=1` shows the traceback. Explicit values are checked (`--image-size 0` is an error, not
  the default).
- logging: a tqdm bar on the main process; loss, loss_itc/itm/mlm (means over processes and micro-batches), lr,
  alpha and temp every `--logging-steps` to accelerate trackers (`--report-to`, default `jsonl`:
  `<output>/logs/metrics.jsonl`, offline, no extra dependency; `tensorboard`, `wandb`, ... when installed); a
  summary at the end (printed and `summary.json`: steps, samples, wall time, samples/s, last losses) and the final
  model (`<output>/final`: `save_pretrained` of the model, momentum towers and queues included, and the processor;
  written to `.tmp-final` and renamed into place, and an existing `final` is replaced only if it is a model folder
  this tool wrote, checked before training starts).
- weights: random by default (the model's init); `--vision-init` loads a timm/DeiT ViT state dict (the original
  starts from DeiT-B/16, `deit_base_patch16_224`), position embeddings interpolated to the image size (14x14 ->
  16x16 at 256 px); `--text-init` loads an HF BERT folder (bert-base-uncased) into the text tower: embeddings,
  self-attention and feed-forward of every layer, fusion layers included, and the MLM head when the folder has one;
  cross-attention stays random, as in the original. The momentum towers are then re-copied from the online ones.
- the schedule and alpha ramp count optimiser steps; with gradient accumulation every micro-batch is still a forward
  of the model, so it updates the momentum towers and enqueues its features (per-device batch x processes columns).

Distributed training (the momentum towers and queues are parameters and buffers of the model):
- DDP (tested: 2 processes, gloo on CPU, against a 1-process run). Every process computes the same EMA update from
  the same all-reduced weights and writes the same all-gathered features into its queue, so queues are identical on
  every rank by construction; DDP's per-step buffer broadcast is switched off (`broadcast_buffers=False`), which
  would otherwise send both queues (2 x 256 x 65536 floats) every step for nothing. As in the original, a rank's ITC
  positives and in-batch negatives are its local batch and other ranks' features of the step arrive only through
  the queue (no gradient-carrying gather), so losses differ from a 1-process run at the global batch size while
  the queue contents do not. On CPU launch with `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu
  --num_processes N` (gloo; accelerate is switched to its CPU mode here). `accelerate launch --cpu --num_processes N`
  starts a single process, so it is refused with those commands instead of silently training alone.
  `--num-workers` defaults to what the cores allow (at most 4 per process).
- DeepSpeed ZeRO-1/2: parameters stay whole on every rank, so the EMA and the queues behave as under DDP. Not
  tested here.
- DeepSpeed ZeRO-3: not supported. Parameters are sharded placeholders outside forward, so `momentum.update` (one
  foreach lerp over the full tensors, called inside forward but on other modules' parameters) would read empty
  shards; it would need `deepspeed.zero.GatheredParameters` around the update. Not tested.
- FSDP: the momentum towers must be wrapped exactly like the online towers (same units, same sharding) so that every
  EMA pair is shard against shard; the EMA pairs parameters by name, so FSDP1 needs `use_orig_params=True`. Not
  tested here.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from ..models.albef.configuration_albef import ALBEF_PRESETS, AlbefConfig
from ..models.albef.modeling_albef import AlbefForPreTraining
from ..models.albef.processing_albef import AlbefProcessor
from .checkpointing import (
    TrainingProgress,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from .launch import check_launch
from .optim import SCHEDULES, AlbefLRSchedule, create_optimizer, create_scheduler


# ----- arguments ----------------------------------------------------------------------------------------------------
@dataclass
class PretrainingArguments:
    """Options of `pretrain` / the command line (`--option-name` or `--option_name`)."""

    train_data: list[str] = field(
        default=None,
        metadata={"help": "Training sources: imagefolder directories (metadata.jsonl) or original ALBEF json files."},
    )
    output_dir: str = field(default=None, metadata={"help": "Checkpoints, logs, summary and the final model."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the json files' image paths are under."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (datasets IterableDataset)."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip (and count) unreadable records."})
    config: str | None = field(
        default=None, metadata={"help": "AlbefConfig json file or folder (instead of --preset)."}
    )
    preset: str = field(default="pretrain", metadata={"help": "AlbefConfig preset when --config is not given."})
    image_size: int | None = field(default=None, metadata={"help": "Image size (default: the config's, 256)."})
    queue_size: int | None = field(default=None, metadata={"help": "MoCo queue length (default: config, 65536)."})
    momentum: float | None = field(default=None, metadata={"help": "EMA factor (default: config, 0.995)."})
    alpha: float | None = field(default=None, metadata={"help": "Distillation weight (default: config, 0.4)."})
    alpha_warmup_steps: int | None = field(
        default=None, metadata={"help": "Steps of the linear alpha ramp (default: one epoch, as the original)."}
    )
    vision_init: str | None = field(default=None, metadata={"help": "timm/DeiT ViT state dict (.pth/.safetensors)."})
    text_init: str | None = field(default=None, metadata={"help": "HF BERT folder (e.g. bert-base-uncased)."})
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Start from a pre-trained ALBEF (a checkpoint-N or final folder of this tool): every weight, "
            "momentum towers and queues included; the schedule starts anew (the original's --checkpoint without "
            "--resume)."
        },
    )
    vocab_file: str | None = field(default=None, metadata={"help": "WordPiece vocab (default: bundled bert-base)."})
    max_length: int = field(default=25, metadata={"help": "Caption length in tokens ([CLS] included)."})
    augment: bool = field(default=True, metadata={"help": "Random crop/flip/RandAugment (--no-augment: resize)."})
    crop_scale: list[float] = field(
        default_factory=lambda: [0.2, 1.0],
        metadata={
            "help": "Area range of the random crop (the original's pre-training: 0.2 1.0; fine-tuning: 0.5 1.0)."
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Pairs per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    epochs: int = field(default=30, metadata={"help": "Epochs (ignored when --max-steps is set)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    steps_per_epoch: int | None = field(
        default=None, metadata={"help": "Streaming only: optimiser steps that count as one epoch."}
    )
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    min_lr: float = field(default=1e-5, metadata={"help": "Final learning rate of the cosine."})
    warmup_lr: float = field(default=1e-5, metadata={"help": "Learning rate at step 0."})
    warmup_steps: int = field(default=2000, metadata={"help": "Linear warm-up steps (original: 20 x 100)."})
    lr_schedule: str = field(
        default="cosine", metadata={"help": "Per-step cosine or the original epoch-wise one.", "choices": SCHEDULES}
    )
    weight_decay: float = field(default=0.02, metadata={"help": "AdamW weight decay (not on 1-D params / biases)."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients (the original does not)."})
    hard_negatives: str = field(
        default="sample",
        metadata={"help": "ITM negatives: sampled (original) or hardest.", "choices": ("sample", "hardest")},
    )
    bf16: bool = field(
        default=False,
        metadata={"help": "bf16 mixed precision (the original trains in fp32); else accelerate's launch setting."},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU (multi-process: gloo), even with a GPU."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flex_attention, ..."})
    num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader worker processes (default: what fits the machine's cores, at most 4)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed (process i trains with seed + i, as the original)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimiser steps."})
    report_to: list[str] = field(
        default_factory=lambda: ["jsonl"], metadata={"help": "Trackers: jsonl, tensorboard, wandb, ... or none."}
    )
    save_steps: int = field(default=2000, metadata={"help": "Checkpoint every N steps (0: epoch ends + end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the newest N checkpoints (0: all)."})
    resume: str = field(
        default="auto",
        metadata={"help": "auto (latest complete checkpoint in --output-dir), never, or a checkpoint folder."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "With --resume never: delete checkpoints."})
    save_final_model: bool = field(default=True, metadata={"help": "save_pretrained the model into <output>/final."})

    def __post_init__(self):
        if not self.train_data:
            raise ValueError("--train-data is required (one or more sources)")
        if not self.output_dir:
            raise ValueError("--output-dir is required")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {SCHEDULES}")
        # 0 is never "the default": every explicit value is checked.
        at_least = {
            "max_steps": 1,
            "image_size": 1,
            "queue_size": 1,
            "alpha_warmup_steps": 0,
            "max_length": 2,
            "batch_size": 1,
            "gradient_accumulation_steps": 1,
            "epochs": 1,
            "steps_per_epoch": 1,
            "warmup_steps": 0,
            "num_workers": 0,
            "logging_steps": 1,
            "save_steps": 0,
            "save_total_limit": 0,
        }
        for name, lowest in at_least.items():
            value = getattr(self, name)
            if value is not None and value < lowest:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {lowest}, got {value}")
        for name in ("momentum", "alpha"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"--{name} must be between 0 and 1, got {value}")
        for name in ("lr", "min_lr", "warmup_lr"):
            if not getattr(self, name) >= 0:  # NaN included; 0 freezes the weights (used to test the queues)
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm < 0):
            raise ValueError("--weight-decay and --max-grad-norm must not be negative")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop-scale must be two numbers 0 < low <= high <= 1, got {self.crop_scale}")
        if self.init_from is not None:
            if self.vision_init is not None or self.text_init is not None:
                raise ValueError("--init-from already holds every weight: give it without --vision-init / --text-init")
            find_model_weights(self.init_from)  # a missing or empty folder is an error now, not after the data loads
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ValueError(f"--resume {self.resume}: expected auto, never, or a checkpoint folder (not found)")


# ----- configuration and weights ------------------------------------------------------------------------------------
def build_config(args: PretrainingArguments) -> AlbefConfig:
    if args.config:
        from ..conversion import load_config_file

        config = load_config_file(args.config)
    else:
        if args.preset not in ALBEF_PRESETS:
            raise ValueError(f"--preset {args.preset!r}: expected one of {sorted(ALBEF_PRESETS)}")
        config = AlbefConfig.from_preset(args.preset)
    if args.image_size is not None:
        config.vision_config.image_size = args.image_size
        if args.image_size % config.vision_config.patch_size:
            raise ValueError(
                f"--image-size {args.image_size} is not a multiple of the patch size {config.vision_config.patch_size}"
            )
    for name in ("queue_size", "momentum", "alpha"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.distill = True
    return config


def check_queue_size(queue_size: int, batch_size: int, num_processes: int):
    """Every forward writes the momentum features of the global batch (all processes) into the queue; the original
    asserts that they tile it exactly. Checked before training, with the per-device batch sizes that would fit."""
    global_batch = batch_size * num_processes
    if queue_size % global_batch:
        fitting = [b for b in range(1, 2 * batch_size + 1) if queue_size % (b * num_processes) == 0][-4:]
        raise ValueError(
            f"queue_size ({queue_size}) must be divisible by the global batch size ({global_batch} = {num_processes} "
            f"process(es) x --batch-size {batch_size}); per-device batch sizes that fit: {fitting}, or change "
            "--queue-size"
        )


def load_text_init(model: AlbefForPreTraining, folder: str | os.PathLike) -> dict[str, list[str]]:
    """Load an HF BERT folder (BertModel / BertForMaskedLM / BertForPreTraining weights) into the text tower, as the
    original's `BertForMaskedLM.from_pretrained('bert-base-uncased')`: embeddings and, for every layer, the
    self-attention and feed-forward weights (fusion layers included); the MLM head when the folder has it.
    Cross-attention stays as initialised. Returns `{"loaded", "random", "unused"}` key lists."""
    from transformers import BertForMaskedLM

    bert, info = BertForMaskedLM.from_pretrained(folder, output_loading_info=True)
    missing = set(info["missing_keys"])
    source = {k: v for k, v in bert.state_dict().items() if k not in missing}
    target = model.state_dict()
    loaded, unused = [], []
    for key, tensor in source.items():
        if key.startswith("bert."):
            new_key = "text_model." + key[len("bert.") :]
        elif key.startswith("cls.predictions.") and not key.startswith("cls.predictions.decoder."):
            new_key = "mlm_head." + key[len("cls.predictions.") :]
        else:  # the decoder is tied to the word embeddings in both; pooler / NSP heads are not part of ALBEF
            unused.append(key)
            continue
        if new_key not in target:
            unused.append(key)  # e.g. layers beyond this text tower's depth
            continue
        if target[new_key].shape != tensor.shape:
            raise ValueError(
                f"{folder}: {key} has shape {tuple(tensor.shape)} but {new_key} is {tuple(target[new_key].shape)}; "
                "the BERT and the text config differ (hidden size, vocabulary, positions)"
            )
        with torch.no_grad():
            target[new_key].copy_(tensor)
        loaded.append(new_key)
    del bert
    text_keys = [k for k in target if k.startswith(("text_model.", "mlm_head.")) and not k.endswith("position_ids")]
    random_keys = [k for k in text_keys if k not in loaded and k != "mlm_head.decoder.weight"]
    model.momentum.copy_from(model)
    return {"loaded": loaded, "random": random_keys, "unused": unused}


_VIT_HEAD_KEYS = ("head.", "head_dist.", "fc_norm.")


def load_vision_init(model: AlbefForPreTraining, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a timm ViT/DeiT state dict (`deit_base_patch16_224`: `{"model": state_dict}` .pth or safetensors) into
    the image tower: `qkv` split into q/k/v, position embeddings interpolated bicubically to the model's grid (the
    original's `interpolate_pos_embed`), the classifier dropped. Returns `{"loaded", "random", "unused"}`."""
    from ..conversion import interpolate_pos_embed, load_original_checkpoint, rename_key

    state_dict = load_original_checkpoint(path)
    if "dist_token" in state_dict:
        raise ValueError(f"{path} is a distilled DeiT (two prefix tokens); ALBEF starts from the plain DeiT-B/16")
    target = model.state_dict()
    grid = model.config.vision_config.grid_size
    loaded, unused, unknown = [], [], []
    for key, tensor in state_dict.items():
        if key.startswith(_VIT_HEAD_KEYS):
            unused.append(key)
            continue
        new_key = rename_key("visual_encoder." + key)
        if new_key is None or not new_key.startswith("vision_model."):
            unknown.append(key)
            continue
        if key == "pos_embed":
            tensor = interpolate_pos_embed(tensor, grid)
        parts = (
            {new_key.format(n): t for n, t in zip("qkv", tensor.chunk(3, dim=0))}
            if "{}" in new_key
            else {new_key: tensor}
        )
        for name, part in parts.items():
            if name not in target:
                unused.append(key)
                continue
            if target[name].shape != part.shape:
                raise ValueError(
                    f"{path}: {key} gives {name} of shape {tuple(part.shape)}, the model has "
                    f"{tuple(target[name].shape)}; the ViT and the vision config differ"
                )
            with torch.no_grad():
                target[name].copy_(part)
            loaded.append(name)
    if unknown:
        raise ValueError(f"{path}: keys that are not part of a plain ViT/DeiT: {unknown[:10]}")
    random_keys = [k for k in target if k.startswith("vision_model.") and k not in loaded]
    model.momentum.copy_from(model)
    return {"loaded": loaded, "random": random_keys, "unused": unused}


def find_model_weights(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a model's weights in a checkpoint or `save_pretrained` folder (sharded or
    not)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--init-from {folder}: not a folder (expected a checkpoint-N or final folder of a run)")
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"--init-from {folder}: the index names shards that are missing: {missing}")
        return [folder / name for name in shards]
    raise ValueError(f"--init-from {folder}: no model.safetensors (or its sharded index) in the folder")


def load_init_from(model: AlbefForPreTraining, folder: str | os.PathLike) -> dict[str, list[str]]:
    """Every weight of a pre-trained ALBEF, momentum towers and queues included (strict: a key or shape that does not
    match the configured model is an error naming it)."""
    from safetensors.torch import load_file

    state = {}
    for path in find_model_weights(folder):
        state.update(load_file(path))
    expected = model.state_dict()
    # Tied weights (the MLM decoder is the word embeddings) are saved once; the other name shares its storage.
    loaded_storage = {expected[k].data_ptr() for k in state if k in expected}
    missing = sorted(k for k in set(expected) - set(state) if expected[k].data_ptr() not in loaded_storage)
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} in the folder, {tuple(v.shape)} here" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise ValueError(
            f"--init-from {folder} does not fit the configured model (--config / --preset): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, shapes {shapes[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return {"loaded": sorted(state), "random": [], "unused": []}


def build_model(args: PretrainingArguments, config: AlbefConfig) -> AlbefForPreTraining:
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = AlbefForPreTraining._from_config(config, **kwargs) if kwargs else AlbefForPreTraining(config)
    reports = {}
    if args.init_from:
        reports["init_from"] = load_init_from(model, args.init_from)
    if args.vision_init:
        reports["vision_init"] = load_vision_init(model, args.vision_init)
    if args.text_init:
        reports["text_init"] = load_text_init(model, args.text_init)
    model.init_reports = reports
    if args.gradient_checkpointing:
        # Non-reentrant: works under DDP and with the no-grad momentum forwards.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----- data ---------------------------------------------------------------------------------------------------------
class IndexedDataset(torch.utils.data.Dataset):
    """`(index, example)` items, so the collate function knows which samples it gets (map-style data)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]

    def __getitems__(self, indices):
        if hasattr(self.dataset, "__getitems__"):
            return list(zip(indices, self.dataset.__getitems__(list(indices))))
        return [(i, self.dataset[i]) for i in indices]


class SeededCollator:
    """Runs `collate` (augmentation + MLM masking) with torch's CPU generator, `random` and `numpy` seeded from
    (seed, epoch, sample indices) and restored afterwards: a batch's random draws do not depend on what ran before
    it (resumption, number of workers) and leave the training RNG untouched. Items without indices (streaming) are
    seeded from (seed, epoch, process, worker, running batch number)."""

    def __init__(self, collate: Callable, seed: int, process_index: int = 0):
        self.collate = collate
        self.seed = seed
        self.process_index = process_index
        self.epoch = 0
        self._count = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self._count = 0

    def __call__(self, items):
        if items and isinstance(items[0], tuple):
            keys = [int(i) for i, _ in items]
            examples = [e for _, e in items]
        else:
            worker = torch.utils.data.get_worker_info()
            keys = [self.process_index, worker.id if worker else 0, self._count]
            examples = items
        self._count += 1
        seed = int(np.random.SeedSequence([self.seed, self.epoch, *keys]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.collate(examples)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def build_dataset(args: PretrainingArguments):
    """All `--train-data` sources as one dataset (`load_image_text_pairs`; records with a missing image file or a bad
    caption are skipped and counted with `--skip-bad-records`)."""
    from .data import load_image_text_pairs

    return load_image_text_pairs(
        args.train_data, image_root=args.image_root, streaming=args.streaming, skip_bad_records=args.skip_bad_records
    )


def build_collator(args: PretrainingArguments, processor: AlbefProcessor, config: AlbefConfig):
    """`PretrainingCollator` with the training transform (or the plain resize with `--no-augment`). Bad images are
    errors here even with `--skip-bad-records`: a shorter batch would break the queue tiling and the cross-process
    gathers, which need the same batch size on every process."""
    from .collators import PretrainingCollator
    from .transforms import albef_eval_transform, albef_train_transform

    size = config.vision_config.image_size
    transform = (
        albef_train_transform(size, scale=tuple(args.crop_scale)) if args.augment else albef_eval_transform(size)
    )
    return PretrainingCollator(
        processor,
        transform,
        max_length=args.max_length,
        mlm_probability=config.mlm_probability,
        vocab_size=config.text_config.vocab_size,
    )


# ----- logging ------------------------------------------------------------------------------------------------------
def _jsonl_tracker_class():
    from accelerate.tracking import GeneralTracker, on_main_process

    class JSONLinesTracker(GeneralTracker):
        """accelerate tracker writing one JSON object per `log` call to `<logging_dir>/metrics.jsonl` (and the run
        configuration to `config.json`); offline, no dependency. On resume from step k, lines of steps > k (written
        by the interrupted run after its last checkpoint) are dropped, so each step appears once."""

        name = "jsonl"
        requires_logging_directory = True

        def __init__(self, logging_dir: str | os.PathLike, resume_step: int | None = None):
            super().__init__()
            self.logging_dir = Path(logging_dir)
            self.resume_step = resume_step
            self.path = self.logging_dir / "metrics.jsonl"
            self._file = None

        @on_main_process
        def start(self):
            self.logging_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_step is not None and self.path.exists():
                kept = [
                    line
                    for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.resume_step
                ]
                self.path.write_text("".join(line + "\n" for line in kept))
            elif self.resume_step is None and self.path.exists():
                self.path.unlink()
            self._file = open(self.path, "a")

        @property
        def tracker(self):
            return self._file

        @on_main_process
        def store_init_configuration(self, values: dict):
            (self.logging_dir / "config.json").write_text(json.dumps(values, indent=1, default=str))

        @on_main_process
        def log(self, values: dict, step: int | None = None, **kwargs):
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()

        @on_main_process
        def finish(self):
            if self._file is not None:
                self._file.close()

    return JSONLinesTracker


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The logged rows of a run (`<output>/logs/metrics.jsonl`)."""
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class StepState:
    """What `step_callback` sees after each optimiser step (on every process)."""

    step: int
    epoch: int
    logs: dict
    batch: dict
    output: object
    model: torch.nn.Module
    accelerator: object


# ----- training -----------------------------------------------------------------------------------------------------
def pretrain(
    args: PretrainingArguments,
    dataset=None,
    collate_fn: Callable | None = None,
    step_callback: Callable[[StepState], None] | None = None,
) -> dict:
    """Run (or resume) pre-training; returns the summary. `dataset` / `collate_fn` replace the ones built from
    `args.train_data` (a dataset of examples and a collate function returning the model's inputs).
    `step_callback(StepState)` runs on every process after each optimiser step (after logging and checkpointing)."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    check_launch("transformers_albef.training.pretrain")
    output_dir = Path(args.output_dir)
    resume_from = _resume_path(args, output_dir)
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Without this, accelerate treats a multi-process CPU launch (torchrun) as N independent 1-process runs.
        cpu=args.cpu or (launched_processes > 1 and not torch.cuda.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else None,  # None: accelerate's own setting (launch config / env)
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,  # stepped once per optimiser step, below
        # Every process reads its own share of the data (streaming too: accelerate's default there is to read on the
        # main process and dispatch, whose loader draws from the global RNG at each iterator creation).
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=args.seed, dispatch_batches=False
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        log_with=_trackers(args, output_dir, checkpoint_step(resume_from) if resume_from else None),
    )
    if accelerator.num_processes != launched_processes:
        raise RuntimeError(
            f"launched as {launched_processes} processes (WORLD_SIZE) but accelerate runs {accelerator.num_processes}:"
            " each process would train alone. On CPU pass --cpu (or launch with `accelerate launch --multi_gpu`)."
        )
    config = build_config(args)
    check_queue_size(config.queue_size, args.batch_size, accelerator.num_processes)
    _prepare_output_dir(args, output_dir, accelerator)

    # The same initial weights and queues on every process (and in a 1-process run); then seed + rank for training.
    set_seed(args.seed)
    model = build_model(args, config)
    set_seed(args.seed, device_specific=True)
    processor = AlbefProcessor.from_bert_vocab(config.vision_config.image_size, vocab_file=args.vocab_file)
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(processor.tokenizer)} tokens, the text model {config.text_config.vocab_size}"
        )
    if dataset is None:
        dataset = build_dataset(args)
    if collate_fn is None:
        collate_fn = build_collator(args, processor, config)
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    collator = SeededCollator(collate_fn, args.seed, accelerator.process_index)
    from .data import default_num_workers

    loader = DataLoader(
        dataset if streaming else IndexedDataset(dataset),
        batch_size=args.batch_size,
        shuffle=not streaming,
        drop_last=True,  # every forward feeds the queue a full global batch
        collate_fn=collator,
        num_workers=args.num_workers if args.num_workers is not None else default_num_workers(),
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG out of iterator creation
    )

    model.to(accelerator.device)
    model.train()
    optimizer = create_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    batches_per_epoch = None if streaming else len(loader)  # per process
    if batches_per_epoch == 0:
        raise ValueError(
            f"the data ({len(dataset)} pairs) does not fill one global batch ({args.batch_size} x "
            f"{accelerator.num_processes} processes)"
        )
    if batches_per_epoch:
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    else:
        steps_per_epoch = args.steps_per_epoch
    if args.max_steps is None and not batches_per_epoch:
        raise ValueError("streaming data has no length: pass --max-steps (and --steps-per-epoch for the alpha ramp)")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch) if steps_per_epoch else None
    alpha_ramp = args.alpha_warmup_steps if args.alpha_warmup_steps is not None else steps_per_epoch
    if alpha_ramp is None:
        raise ValueError("streaming data: pass --steps-per-epoch or --alpha-warmup-steps for the alpha ramp")
    schedule = AlbefLRSchedule(
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_steps=args.warmup_steps,
        total_steps=total_steps,
        schedule=args.lr_schedule,
        steps_per_epoch=steps_per_epoch,
        epochs=args.epochs if args.max_steps is None else epochs,
    )
    scheduler = accelerator.prepare(create_scheduler(optimizer.optimizer, schedule))
    progress = TrainingProgress(global_batch_size=args.batch_size * accelerator.num_processes)
    if resume_from is not None:
        _resume(accelerator, resume_from, progress)

    accelerator.init_trackers("albef-pretrain", config=_flat(args, config, accelerator, steps_per_epoch, total_steps))
    bar = tqdm(
        total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="pretrain"
    )
    logged: dict[str, list[float]] = {}
    last_saved = progress.step if resume_from else None
    start_time, start_step, start_samples = time.perf_counter(), progress.step, progress.samples_seen

    def checkpoint():
        nonlocal last_saved
        if last_saved != progress.step:
            save_checkpoint(
                accelerator, output_dir, progress.step, args.save_total_limit, _marker(args), progress=progress
            )
            last_saved = progress.step

    while progress.step < total_steps:
        epoch = progress.epoch
        loader.set_epoch(epoch)
        collator.set_epoch(epoch)
        skip = progress.batches_in_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        micro_losses: dict[str, list[torch.Tensor]] = {}
        batches_before = progress.batches_in_epoch
        for batch in batches:
            # The original ramps alpha over the first epoch's iterations: alpha * min(1, i / len(data_loader)).
            alpha = config.alpha * min(1.0, progress.step / alpha_ramp) if alpha_ramp else config.alpha
            lr = scheduler.get_last_lr()[0]
            with accelerator.accumulate(model):
                output = model(**batch, return_loss=True, alpha=alpha, hard_negatives=args.hard_negatives)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for name in LOSSES:
                micro_losses.setdefault(name, []).append(getattr(output, name).detach().float())
            progress.batches_in_epoch += 1
            progress.samples_seen += progress.global_batch_size
            if not accelerator.sync_gradients:
                continue

            scheduler.step()
            progress.step += 1
            if batches_per_epoch and progress.batches_in_epoch >= batches_per_epoch:
                progress.epoch, progress.batches_in_epoch = epoch + 1, 0
            logs = {}
            if progress.step % args.logging_steps == 0 or progress.step == total_steps:
                means = torch.stack([torch.stack(micro_losses[name]).mean() for name in LOSSES])
                logs = dict(zip(LOSSES, accelerator.reduce(means, "mean").tolist()))
                temp = accelerator.unwrap_model(model).temp.item()
                fraction = progress.batches_in_epoch / batches_per_epoch if batches_per_epoch else 0.0
                logs.update(lr=lr, alpha=alpha, temp=temp, epoch=progress.epoch + fraction)
                accelerator.log(logs, step=progress.step)
                for name, value in logs.items():
                    logged.setdefault(name, []).append(value)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}", alpha=f"{alpha:.3f}")
            micro_losses = {}
            bar.update(1)
            if progress.step == total_steps or (args.save_steps and progress.step % args.save_steps == 0):
                checkpoint()
            if step_callback is not None:
                step_callback(StepState(progress.step, epoch, logs, batch, output, model, accelerator))
            if progress.step >= total_steps:
                break
        else:  # the data ran out: an epoch ended (the original saves a checkpoint at every epoch end)
            if streaming and progress.batches_in_epoch == batches_before == 0:
                raise ValueError("the streamed data gave no batch in a whole pass (fewer pairs than one batch?)")
            if progress.epoch == epoch:  # streaming data, or a trailing partial accumulation
                progress.epoch, progress.batches_in_epoch = epoch + 1, 0
            checkpoint()
    bar.close()
    checkpoint()

    elapsed = time.perf_counter() - start_time
    unwrapped = accelerator.unwrap_model(model)
    summary = {
        "steps": progress.step,
        "epochs_completed": progress.epoch,
        "samples_seen": progress.samples_seen,
        "resumed_from": str(resume_from) if resume_from else None,
        "steps_this_run": progress.step - start_step,
        "wall_time_s": round(elapsed, 2),
        "samples_per_s": round((progress.samples_seen - start_samples) / elapsed, 2) if elapsed > 0 else None,
        "num_processes": accelerator.num_processes,
        "global_batch_size": progress.global_batch_size * args.gradient_accumulation_steps,
        "last_logged": {name: values[-1] for name, values in logged.items()},
        "checkpoint": str(latest_checkpoint(output_dir)),
        "weights_init": {
            part: {kind: len(keys) for kind, keys in report.items()} for part, report in unwrapped.init_reports.items()
        },
    }
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.save_final_model:
        summary["final_model"] = str(_save_final_model(unwrapped, processor, output_dir, accelerator))
    if accelerator.is_main_process:
        _write_text_atomically(output_dir / "summary.json", json.dumps(summary, indent=1))
        accelerator.print(_format_summary(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


LOSSES = ("loss", "loss_itc", "loss_itm", "loss_mlm")


def _resume_path(args: PretrainingArguments, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (read-only; every process gets the same answer from the shared folder)."""
    if args.resume == "never":
        return None
    if args.resume == "auto":
        return latest_checkpoint(output_dir)
    return Path(args.resume)


FINAL = "final"
FINAL_STAGING = ".tmp-final"


def _save_final_model(model, processor, output_dir: Path, accelerator) -> Path:
    """`<output>/final` (save_pretrained of the model and the processor), written into `.tmp-final` by every process
    and renamed into place by the main one: an error, an interrupt or a full disk leaves the previous `final` as it
    was (and no temporary folder)."""
    from ..hub import replace_folder

    final, staging = output_dir / FINAL, output_dir / FINAL_STAGING
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        model.save_pretrained(staging, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
        if accelerator.is_main_process:
            processor.save_pretrained(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_folder(staging, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def _write_text_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _prepare_output_dir(args: PretrainingArguments, output_dir: Path, accelerator):
    if accelerator.is_main_process:
        if output_dir.exists() and not output_dir.is_dir():
            raise ValueError(f"--output-dir {output_dir} exists and is not a folder")
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_partial_checkpoints(output_dir):
            accelerator.print(f"Removed {path}: a partial checkpoint left by an interrupted save")
        shutil.rmtree(output_dir / FINAL_STAGING, ignore_errors=True)
        final = output_dir / FINAL
        if args.save_final_model and final.exists():
            # Checked now, not after hours of training: only a model folder this tool wrote is replaced.
            from ..hub import check_output_folder

            check_output_folder(final, overwrite=True, what="the final-model folder")
        existing = list_checkpoints(output_dir)
        if args.resume == "never" and existing:
            if not args.overwrite_output_dir:
                raise ValueError(
                    f"{output_dir} holds checkpoints ({existing[-1].name}); use --resume auto to continue, or "
                    "--overwrite-output-dir to start over"
                )
            for path in existing:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def _resume(accelerator, path: Path, progress: TrainingProgress):
    global_batch = progress.global_batch_size
    marker = load_checkpoint(accelerator, path, progress=progress)
    if marker.get("num_processes") != accelerator.num_processes:
        accelerator.print(
            f"Warning: {path} was saved by {marker.get('num_processes')} processes, this run has "
            f"{accelerator.num_processes}: the RNG streams differ from the interrupted run's"
        )
    if progress.global_batch_size != global_batch:
        raise ValueError(
            f"{path} was trained with a global batch of {progress.global_batch_size}, this run has {global_batch}: "
            "the data position cannot be restored (keep --batch-size x processes)"
        )
    accelerator.print(f"Resumed from {path}: step {progress.step}, epoch {progress.epoch}")


def _trackers(args: PretrainingArguments, output_dir: Path, resume_step: int | None) -> list:
    from accelerate.tracking import get_available_trackers

    trackers = []
    for name in args.report_to:
        if name == "none":
            continue
        if name == "jsonl":
            trackers.append(_jsonl_tracker_class()(output_dir / "logs", resume_step=resume_step))
        elif name in [str(t) for t in get_available_trackers()]:
            trackers.append(name)
        else:
            raise ValueError(
                f"--report-to {name}: not installed (available: jsonl, {[str(t) for t in get_available_trackers()]})"
            )
    return trackers


def _flat(args, config, accelerator, steps_per_epoch, total_steps) -> dict:
    values = {
        k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in asdict(args).items()
    }
    values.update(
        num_processes=accelerator.num_processes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        queue_size=config.queue_size,
        momentum=config.momentum,
        alpha=config.alpha,
        image_size=config.vision_config.image_size,
    )
    return values


def _marker(args: PretrainingArguments) -> dict:
    return {
        "args": {k: v for k, v in asdict(args).items() if k in ("batch_size", "gradient_accumulation_steps", "seed")}
    }


def _format_summary(summary: dict) -> str:
    lines = ["", "ALBEF pre-training summary"]
    for key in (
        "steps",
        "epochs_completed",
        "samples_seen",
        "steps_this_run",
        "wall_time_s",
        "samples_per_s",
        "num_processes",
        "global_batch_size",
        "resumed_from",
        "checkpoint",
        "final_model",
    ):
        if key in summary:
            lines.append(f"  {key:18s} {summary[key]}")
    for name, value in summary.get("last_logged", {}).items():
        lines.append(f"  last {name:13s} {value:.6g}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> PretrainingArguments:
    parser = HfArgumentParser(PretrainingArguments, prog="albef-pretrain", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> int:
    """The `albef-pretrain` command: parse the arguments and run `pretrain` (the summary is printed and written to
    `<output>/summary.json`). Errors are printed as one line (`albef-pretrain: error: ...`, exit status 2 for a
    user error, 1 otherwise); `ALBEF_DEBUG=1` shows the traceback instead."""
    from ..cli.common import report_errors

    def run() -> int:
        pretrain(parse_args(argv))
        return 0

    return report_errors(run, prog="albef-pretrain")


if __name__ == "__main__":
    sys.exit(main())
