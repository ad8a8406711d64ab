"""Fine-tune ALBEF with `transformers.Trainer`: image-text retrieval (COCO / Flickr30K), VQA, NLVR2 and SNLI-VE,
with the original fine-tuning recipe (configs/*.yaml) as defaults.

```bash
python -m transformers_albef.training.finetune --task retrieval --model ALBEF.pth \\
    --train-data data/coco_train.json --eval-data data/coco_val.json --image-root /data/coco --output-dir out/coco
torchrun --nproc_per_node 8 -m transformers_albef.training.finetune --task vqa --model ALBEF.pth \\
    --train-data data/vqa_train.json data/vqa_val.json data/vg_qa.json --eval-data data/vqa_test.json \\
    --answer-list data/answer_list.json --image-root /data --output-dir out/vqa --bf16
python -m transformers_albef.training.finetune --task nlvr --config tiny.json --train-data ... --output-dir out/tiny
```

Every `TrainingArguments` flag is accepted (`--bf16`, `--gradient_accumulation_steps`, `--report_to`, ...); the task's
original values are only defaults, and an explicit option always wins, with what it needs (`--save_steps N` saves every
N steps although the recipe saves per epoch; `--eval_steps N` evaluates every N steps; `--lr_scheduler_type` replaces
the recipe's cosine unless `--lr_schedule` is given too). `--help` shows the recipe's values (per task without
`--task`). Data-loader workers default to what the machine's cores allow (at most the original's 4). Image paths are
joined to `--image_root` (`--vg_root` for Visual Genome records), or used as they are when absolute. Errors are one
line (`albef-finetune: error: ...`); `ALBEF_DEBUG=1` shows the traceback. `accelerate launch --cpu --num_processes N`
(one process) is refused; on CPU use `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu`.

The recipe (per process, as the original's per-GPU batch sizes):

| task | lr | epochs | batch train / eval | lr warm-up steps | alpha warm-up | k_test |
|---|---|---|---|---|---|---|
| retrieval (coco / flickr) | 1e-5 | 5 / 10 | 32 / 64 | 0 (warmup_lr = lr) | yes | 256 / 128 |
| vqa | 2e-5 | 8 | 32 / 16 | 400 | yes | 128 |
| nlvr | 2e-5 | 10 | 16 / 16 | 100 | yes | - |
| ve | 2e-5 | 5 | 32 / 64 | 100 | no | - |

All: AdamW, weight decay 0.02 on every parameter but 1-D ones and biases, no gradient clipping, cosine schedule
from `lr` to 1e-6 after a linear warm-up from 1e-5 (the original steps it per epoch; `--lr-schedule original`
reproduces that staircase), distillation weight alpha 0.4 ramped over the first epoch where the yaml has
`warm_up: True`, the last incomplete training batch dropped (the feature queues need full batches), a checkpoint
every epoch, and evaluation every epoch (retrieval: recall@1/5/10 both ways by ITC -> top-k -> ITM, best checkpoint by
`r_mean`; NLVR2 / SNLI-VE: accuracy) or, for VQA as VQA.py, once after training (answers ranked from the answer list,
written to `vqa_result_step{N}.json`; VQA accuracy when the evaluation file has the human answers). The metrics of
the run go to `all_results.json` in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import logging

from ..models.albef.configuration_albef import ALBEF_PRESETS, AlbefConfig
from ..models.albef.modeling_albef import (
    AlbefForQuestionAnswering,
    AlbefForRetrieval,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
)
from ..models.albef.processing_albef import AlbefProcessor
from .callbacks import AlphaWarmupCallback
from .data import default_num_workers
from .launch import check_launch
from .metrics import accuracy_from_logits
from .trainer import AlbefTrainer, RetrievalEvaluator, VQAEvaluator

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class TaskRecipe:
    """The original fine-tuning recipe of one task (configs/*.yaml)."""

    model_class: type
    preset: str  # `AlbefConfig.from_preset` name of the task's full-size model
    learning_rate: float
    num_train_epochs: int
    train_batch_size: int
    eval_batch_size: int
    lr_warmup_steps: int  # the original's warmup_epochs x 100 iterations (none where warmup_lr == lr)
    alpha_warm_up: bool
    k_test: int | None = None
    metric_for_best_model: str | None = None
    evaluate_every_epoch: bool = True  # VQA.py evaluates (on the test split) once, after training
    alpha: float = 0.4
    weight_decay: float = 0.02
    min_lr: float = 1e-6
    warmup_lr: float = 1e-5


RECIPES: dict[str, TaskRecipe] = {
    "retrieval_coco": TaskRecipe(AlbefForRetrieval, "retrieval_coco", 1e-5, 5, 32, 64, 0, True, 256, "r_mean"),
    "retrieval_flickr": TaskRecipe(AlbefForRetrieval, "retrieval_flickr", 1e-5, 10, 32, 64, 0, True, 128, "r_mean"),
    "vqa": TaskRecipe(AlbefForQuestionAnswering, "vqa", 2e-5, 8, 32, 16, 400, True, 128, "vqa_accuracy", False),
    "nlvr": TaskRecipe(AlbefForVisualReasoning, "nlvr", 2e-5, 10, 16, 16, 100, True, None, "accuracy"),
    "ve": TaskRecipe(AlbefForVisualEntailment, "ve", 2e-5, 5, 32, 64, 100, False, None, "accuracy"),
}
TASKS = ("retrieval", "vqa", "nlvr", "ve")


def recipe_for(task: str, retrieval_set: str = "coco") -> TaskRecipe:
    """The recipe of `task` (`retrieval` with `retrieval_set` "coco" or "flickr", or a `RECIPES` key)."""
    key = f"retrieval_{retrieval_set}" if task == "retrieval" else task
    if key not in RECIPES:
        raise ValueError(f"unknown task {task!r} (retrieval set {retrieval_set!r}); expected one of {TASKS}")
    return RECIPES[key]


def recipe_training_defaults(recipe: TaskRecipe) -> dict:
    """`TrainingArguments` values of a recipe (anything the caller passes wins)."""
    return {
        "learning_rate": recipe.learning_rate,
        "num_train_epochs": recipe.num_train_epochs,
        "per_device_train_batch_size": recipe.train_batch_size,
        "per_device_eval_batch_size": recipe.eval_batch_size,
        "weight_decay": recipe.weight_decay,
        # Used when the schedule is left to Trainer (`lr_schedule="trainer"`): the closest built-in one.
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr": recipe.min_lr},
        "warmup_steps": recipe.lr_warmup_steps,
        "max_grad_norm": 0.0,  # the original does not clip gradients
        "dataloader_drop_last": True,  # the original's train loaders drop the last batch; evaluation never does
        "remove_unused_columns": False,  # collators read raw columns (images, captions)
        # The original loaders' 4 workers (decoding and augmentation beside the GPU), as many as the cores allow.
        "dataloader_num_workers": default_num_workers(),
        "eval_strategy": "epoch" if recipe.evaluate_every_epoch else "no",
        "save_strategy": "epoch",
        "logging_steps": 50,
        "metric_for_best_model": recipe.metric_for_best_model,
    }


def finetuning_arguments(task: str, output_dir: str, retrieval_set: str = "coco", **overrides) -> TrainingArguments:
    """`TrainingArguments` with the task's original recipe as defaults; `overrides` are any `TrainingArguments`."""
    return TrainingArguments(
        output_dir=output_dir, **{**recipe_training_defaults(recipe_for(task, retrieval_set)), **overrides}
    )


def _collators(task: str, processor, image_size: int, augment: bool = True):
    """(training collator, evaluation collator) of a task, from the data package. Without `augment` training images
    are only resized, as in evaluation (for data where crops, flips or colour changes alter the answer)."""
    from . import collators
    from .transforms import FINETUNE_SCALE, albef_eval_transform, albef_train_transform

    cls = {
        "retrieval": collators.RetrievalCollator,
        "vqa": collators.VQACollator,
        "nlvr": collators.NLVRCollator,
        "ve": collators.VECollator,
    }[task]
    # Retrieval.py tokenises training captions without truncation (pre_caption already keeps 30 words).
    options = {"max_length": None} if task == "retrieval" else {}
    train_transform = (
        albef_train_transform(image_size, scale=FINETUNE_SCALE) if augment else albef_eval_transform(image_size)
    )
    train = cls(processor, train_transform, **options)
    return train, cls(processor, albef_eval_transform(image_size))


def build_trainer(
    task: str,
    model,
    processor: AlbefProcessor,
    train_dataset=None,
    eval_dataset=None,
    args: TrainingArguments | None = None,
    *,
    retrieval_set: str = "coco",
    answer_list: list[str] | None = None,
    alpha: float | None = None,
    alpha_warm_up: bool | None = None,
    k_test: int | None = None,
    lr_schedule: str = "cosine",
    distill: bool = True,
    augment: bool = True,
    data_collator=None,
    eval_data_collator=None,
    callbacks=None,
    vqa_result_dir: str | os.PathLike | None = None,
) -> AlbefTrainer:
    """An `AlbefTrainer` fine-tuning `model` on `task` ("retrieval", "vqa", "nlvr", "ve") with the original recipe.

    - `args`: `TrainingArguments` (default: `finetuning_arguments(task, "albef-<task>")`).
    - `alpha` / `alpha_warm_up`: distillation weight (default `model.config.alpha`) and whether it ramps up over the
      first epoch (default: the recipe's); passed to the forward by `AlphaWarmupCallback`.
    - `k_test`: candidates re-ranked in evaluation (retrieval: ITM over the ITC top-k; VQA: `rank_answers`).
    - `lr_schedule`: "cosine" (per-step cosine after a warm-up from 1e-5, `optim.AlbefLRSchedule`), "original" (the
      original's per-epoch staircase) or "trainer" (`args.lr_scheduler_type`).
    - `distill`: train with momentum distillation as every original recipe (builds the momentum towers when the
      model has none). Retrieval always needs them (the feature queues): without distillation it trains with
      alpha 0.
    - `data_collator` / `eval_data_collator`: default to the task's collator with the fine-tuning training transform
      / the evaluation transform.
    - `augment`: the original's random crop, flip and RandAugment on training images (else resize only).
    - `answer_list`: VQA candidate answers for evaluation.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    recipe = recipe_for(task, retrieval_set)
    if not isinstance(model, recipe.model_class):
        raise TypeError(f"task {task!r} fine-tunes a {recipe.model_class.__name__}, got {type(model).__name__}")
    if args is None:
        args = finetuning_arguments(task, f"albef-{task}", retrieval_set)
    if (distill or task == "retrieval") and getattr(model, "momentum", None) is None:
        model.init_momentum()
    if not distill:
        alpha = 0.0
        if task != "retrieval" and getattr(model, "momentum", None) is not None:
            model.momentum = None  # no teacher to run: the towers would cost a forward pass per step for nothing
            model.config.distill = False
    if data_collator is None or eval_data_collator is None:
        train_collator, eval_collator = _collators(task, processor, model.config.vision_config.image_size, augment)
        data_collator = data_collator or train_collator
        eval_data_collator = eval_data_collator or eval_collator

    if k_test is not None and (isinstance(k_test, bool) or not isinstance(k_test, int) or k_test < 1):
        raise ValueError(f"k_test must be a positive integer, got {k_test!r}")  # 0 is not "the recipe's"
    k_test = recipe.k_test if k_test is None else k_test
    evaluator, compute_metrics = None, None
    if task == "retrieval":
        evaluator = RetrievalEvaluator(processor, k_test)
    elif task == "vqa":
        if eval_dataset is not None:
            if not answer_list:
                raise ValueError("VQA evaluation ranks an answer list: pass answer_list")
            evaluator = VQAEvaluator(processor, answer_list, k_test, result_dir=vqa_result_dir)
    else:
        compute_metrics = accuracy_from_logits

    warmup = AlphaWarmupCallback(
        model.config.alpha if alpha is None else alpha,
        warm_up=recipe.alpha_warm_up if alpha_warm_up is None else alpha_warm_up,
    )
    schedule = None
    if lr_schedule != "trainer":
        schedule = {
            "min_lr": recipe.min_lr,
            "warmup_lr": min(recipe.warmup_lr, args.learning_rate),
            "schedule": lr_schedule,
        }
    return AlbefTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        eval_data_collator=eval_data_collator,
        processing_class=processor,
        compute_metrics=compute_metrics,
        evaluator=evaluator,
        forward_kwargs={"return_loss": True} if task == "retrieval" else None,
        lr_schedule=schedule,
        callbacks=[warmup, *(callbacks or [])],
    )


# ----- command line --------------------------------------------------------------------------------------------------


@dataclass
class FinetuneArguments:
    """What the fine-tuning script needs besides `TrainingArguments`."""

    task: str = field(metadata={"choices": TASKS, "help": "retrieval, vqa, nlvr (NLVR2) or ve (SNLI-VE)"})
    model: str | None = field(
        default=None,
        metadata={
            "help": "A saved model folder or Hub id (from_pretrained), an original ALBEF checkpoint (.pth; "
            "converted with from_original), or a preset name (random weights, e.g. for smoke tests)."
        },
    )
    config: str | None = field(
        default=None,
        metadata={"help": "AlbefConfig JSON: the model's configuration (random weights when --model is not given)."},
    )
    processor: str | None = field(
        default=None, metadata={"help": "Processor folder (default: the model folder's, else the bundled vocab)."}
    )
    train_data: list[str] | None = field(default=None, metadata={"help": "Training annotation file(s)."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation annotation file."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the annotations' image paths are in."})
    vg_root: str | None = field(default=None, metadata={"help": "VQA: folder of the Visual Genome images."})
    answer_list: str | None = field(default=None, metadata={"help": "VQA: answer_list.json (candidate answers)."})
    retrieval_set: str = field(
        default="coco", metadata={"choices": ("coco", "flickr"), "help": "retrieval recipe: coco or flickr"}
    )
    alpha: float | None = field(default=None, metadata={"help": "distillation weight (default: the config's)"})
    alpha_warm_up: bool | None = field(default=None, metadata={"help": "ramp alpha over epoch 0 (default: recipe)"})
    k_test: int | None = field(default=None, metadata={"help": "evaluation candidates (default: the recipe's)"})
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "choices": ("cosine", "original", "trainer"),
            "help": "cosine: per-step cosine after warm-up from 1e-5; original: the per-epoch staircase; trainer: "
            "--lr_scheduler_type",
        },
    )
    distill: bool = field(default=True, metadata={"help": "momentum distillation (all original recipes)"})
    augment: bool = field(
        default=True, metadata={"help": "random crop/flip/RandAugment on training images (--no_augment: resize only)"}
    )

    def __post_init__(self):
        # An explicit 0 is never "the default".
        if self.k_test is not None and self.k_test < 1:
            raise ValueError(f"--k_test must be at least 1, got {self.k_test}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be between 0 and 1, got {self.alpha}")
        for name in ("image_root", "vg_root"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"--{name} {folder}: not a folder")
        for name in ("config", "answer_list"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise ValueError(f"--{name} {value}: file not found")
        for path in [*(self.train_data or []), *([self.eval_data] if self.eval_data else [])]:
            if not Path(path).is_file():
                raise ValueError(f"annotation file not found: {path}")


def load_model(model_class, model: str | None = None, config: str | None = None):
    """A `model_class` from a folder / Hub id, an original checkpoint file, a preset name, or a config JSON."""
    from ..conversion import load_config_file

    config_obj = load_config_file(config) if config else None
    if model is None:
        if config_obj is None:
            raise ValueError("pass --model (folder, checkpoint or preset) or --config (random weights)")
        return model_class(config_obj)
    if model in ALBEF_PRESETS and not Path(model).exists():
        return model_class(config_obj or AlbefConfig.from_preset(model))
    if Path(model).is_file():
        return model_class.from_original(model, config=config_obj)
    if Path(model).is_dir() and config_obj is None:
        config_obj = load_config_file(model)  # a broken config.json is named, not a traceback
    if model_class is AlbefForQuestionAnswering and _is_pretraining_folder(model):
        return _vqa_from_pretraining(model)
    kwargs = {"config": config_obj} if config_obj is not None else {}
    return model_class.from_pretrained(model, **kwargs)


def _is_pretraining_folder(model: str) -> bool:
    """A local folder whose model has no answer decoder (a pre-training or retrieval model)."""
    weights = Path(model) / "model.safetensors"
    if not weights.is_file():
        return False
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        return not any(key.startswith("text_decoder.") for key in f.keys())


def _vqa_from_pretraining(folder: str) -> AlbefForQuestionAnswering:
    """VQA.py's initialisation from a pre-trained model: the answer decoder starts as the encoder's fusion layers."""
    from safetensors.torch import load_file

    from ..conversion import vqa_init_from_pretraining

    state_dict, config = vqa_init_from_pretraining(
        load_file(Path(folder) / "model.safetensors"), AlbefConfig.from_pretrained(folder)
    )
    model = AlbefForQuestionAnswering(config)
    expected = model.state_dict()
    # The decoder's cross-attention reads question states (text width) where the fusion layers read image states
    # (vision width): with different widths those keys/values cannot be copied and start from the initialisation.
    fresh = [k for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    usable = {k: v for k, v in state_dict.items() if k in expected and k not in fresh}
    missing, _ = model.load_state_dict(usable, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [key for key in missing if key not in tied and key not in fresh]
    if fresh:
        logger.warning("VQA initialisation: %d tensors of another width left at initialisation: %s", len(fresh), fresh)
    if missing:
        raise ValueError(f"{folder} is not an ALBEF pre-training model: the VQA initialisation lacks {missing[:5]}")
    logger.info("VQA model initialised from the pre-trained model in %s (answer decoder = fusion layers)", folder)
    return model


def load_processor(processor: str | None, model: str | None, image_size: int) -> AlbefProcessor:
    for source in (processor, model):
        if source and Path(source).is_dir() and (Path(source) / "processor_config.json").exists():
            return AlbefProcessor.from_pretrained(source)
    if processor:
        return AlbefProcessor.from_pretrained(processor)
    return AlbefProcessor.from_bert_vocab(image_size=image_size)


def check_processor(processor: AlbefProcessor, config: AlbefConfig, source: str | None = None) -> None:
    """The processor must fit the model: a vocabulary of another size (missing tokenizer files leave only the special
    tokens; another vocabulary maps words to the wrong embeddings or to ids out of range) or another image size would
    train without a word, wrongly. `ValueError` naming `source`."""
    where = f"{source}: " if source else ""
    words, vocab_size = len(processor.tokenizer), config.text_config.vocab_size
    if words != vocab_size:
        raise ValueError(
            f"{where}the tokenizer has {words} tokens but the model's vocabulary (text_config.vocab_size) has "
            f"{vocab_size}; pass the model's own processor with --processor"
        )
    size = getattr(processor.image_processor, "size", None)
    height = getattr(size, "height", None)
    if height is not None and (height, size.width) != (config.vision_config.image_size,) * 2:
        raise ValueError(
            f"{where}the image processor resizes to {height}x{size.width} but the model takes "
            f"{config.vision_config.image_size} px images"
        )


def load_task_data(task: str, files: str | list[str], image_root: str | None, train: bool, vg_root: str | None = None):
    """A task's `datasets.Dataset` from original annotation files (`task_data.load_task_dataset`)."""
    from .task_data import load_task_dataset

    kwargs = {"vg_root": vg_root} if task == "vqa" else {}
    return load_task_dataset(task, files, image_root=image_root, train=train, **kwargs)


class _PerTask:
    """A help-text default that depends on --task: "per --task: retrieval 1e-05 (flickr: 1e-05), vqa 2e-05, ..."."""

    def __init__(self, key: str):
        self.key = key

    def __str__(self) -> str:
        values = {name: recipe_training_defaults(recipe)[self.key] for name, recipe in RECIPES.items()}
        if self.key == "dataloader_num_workers":
            return f"{next(iter(values.values()))} (the original's 4, as many as this machine's cores allow)"
        if len(set(map(repr, values.values()))) == 1:
            return f"{next(iter(values.values()))} (the original recipe, every --task)"
        shown = []
        for task in TASKS:
            if task == "retrieval":
                coco, flickr = values["retrieval_coco"], values["retrieval_flickr"]
                shown.append(f"retrieval {coco}" + ("" if coco == flickr else f" (flickr {flickr})"))
            else:
                shown.append(f"{task} {values[task]}")
        return "per --task: " + ", ".join(shown)


# An explicit option that only takes effect with another one: what that one becomes unless it is given too (the
# recipe's epoch strategies would otherwise silently ignore --save_steps / --eval_steps).
IMPLIED_OPTIONS = {
    "save_steps": ("save_strategy", "steps"),
    "eval_steps": ("eval_strategy", "steps"),
    "logging_steps": ("logging_strategy", "steps"),
}


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations the command line sets itself (`--name`, `--name=value`, `--no_name`, unique prefixes)."""
    actions = parser._option_string_actions
    found = set()
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        option = token.split("=", 1)[0]
        if option in actions:
            found.add(actions[option].dest)
            continue
        prefixed = {action.dest for name, action in actions.items() if name.startswith(option)}
        if len(prefixed) == 1:  # argparse accepts unique prefixes
            found |= prefixed
    return found


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneArguments, TrainingArguments]:
    """`(FinetuneArguments, TrainingArguments)` of a command line. The task's recipe gives the defaults, which an
    explicit option always overrides, including through the options it needs: `--save_steps N` saves every N steps
    (the recipe saves per epoch), `--eval_steps N` evaluates every N steps, `--lr_scheduler_type` is used (instead of
    the recipe's cosine) unless `--lr_schedule` says otherwise. `--help` shows the recipe's values (per task without
    `--task`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The task decides the defaults of the Trainer arguments: read it first.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=TASKS)
    pre.add_argument("--retrieval_set", "--retrieval-set", default="coco")
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser(
        (FinetuneArguments, TrainingArguments),
        prog="albef-finetune",
        description=__doc__.split("\n\n")[0],
        epilog="Defaults marked 'per --task' are the original recipe's; `--task TASK --help` shows that task's. "
        "Errors are printed as one line; ALBEF_DEBUG=1 shows the traceback.",
    )
    recipe_keys = recipe_training_defaults(RECIPES["vqa"])
    if known.task is not None:
        parser.set_defaults(**recipe_training_defaults(recipe_for(known.task, known.retrieval_set)))
    else:  # only shown by --help: --task is required to run
        parser.set_defaults(**{key: _PerTask(key) for key in recipe_keys})
    explicit = explicit_options(parser, argv)
    implied = {
        target: value
        for given, (target, value) in IMPLIED_OPTIONS.items()
        if given in explicit and target not in explicit
    }
    if {"lr_scheduler_type", "lr_scheduler_kwargs"} & explicit:
        if "lr_schedule" not in explicit:
            implied["lr_schedule"] = "trainer"
        elif _lr_schedule_given(argv) != "trainer":
            raise ValueError(
                "--lr_scheduler_type / --lr_scheduler_kwargs choose Trainer's schedule, but --lr_schedule "
                f"{_lr_schedule_given(argv)} asks for ALBEF's: pass --lr_schedule trainer, or drop one of them"
            )
    parser.set_defaults(**implied)
    return parser.parse_args_into_dataclasses(argv)


def _lr_schedule_given(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--lr_schedule", "--lr-schedule")
    return pre.parse_known_args(argv)[0].lr_schedule


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune and/or evaluate as the command line says; returns the final metrics."""
    ft, args = parse_args(argv)
    check_launch("transformers_albef.training.finetune")
    recipe = recipe_for(ft.task, ft.retrieval_set)
    model = load_model(recipe.model_class, ft.model, ft.config)
    processor = load_processor(ft.processor, ft.model, model.config.vision_config.image_size)
    check_processor(processor, model.config, ft.processor or ft.model)
    train_dataset, eval_dataset = None, None
    if ft.train_data:
        train_dataset = load_task_data(ft.task, ft.train_data, ft.image_root, True, ft.vg_root)
    if ft.eval_data:
        eval_dataset = load_task_data(ft.task, ft.eval_data, ft.image_root, False, ft.vg_root)
    if eval_dataset is None and args.eval_strategy != "no":
        args = dataclasses.replace(args, eval_strategy="no")
    answer_list = None
    if ft.answer_list:
        from .task_data import load_answer_list

        answer_list = load_answer_list(ft.answer_list)

    trainer = build_trainer(
        ft.task,
        model,
        processor,
        train_dataset,
        eval_dataset,
        args,
        retrieval_set=ft.retrieval_set,
        answer_list=answer_list,
        alpha=ft.alpha,
        alpha_warm_up=ft.alpha_warm_up,
        k_test=ft.k_test,
        lr_schedule=ft.lr_schedule,
        distill=ft.distill,
        augment=ft.augment,
        vqa_result_dir=args.output_dir,
    )
    metrics = {}
    if train_dataset is not None:
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        metrics.update(result.metrics)
        trainer.save_model()
        trainer.save_state()
    if eval_dataset is not None:
        evaluated = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
        if evaluated and evaluated[-1]["step"] == trainer.state.global_step and train_dataset is not None:
            metrics.update({k: v for k, v in evaluated[-1].items() if k.startswith("eval_")})  # at the last step
        else:
            metrics.update(trainer.evaluate())
    trainer.save_metrics("all", metrics)
    return metrics


def console_main(argv: list[str] | None = None) -> int:
    """The `albef-finetune` console script (exit status 0; the metrics are in `all_results.json`). Errors are
    printed as one line (`albef-finetune: error: ...`, status 2 for a user error, 1 otherwise); `ALBEF_DEBUG=1` shows
    the traceback instead."""
    from ..cli.common import report_errors

    def run() -> int:
        main(argv)
        return 0

    return report_errors(run, prog="albef-finetune")


if __name__ == "__main__":
    sys.exit(console_main())
