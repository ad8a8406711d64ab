"""`AlbefTrainer`: `transformers.Trainer` with what ALBEF fine-tuning needs on top, and the two evaluation protocols
that do not fit Trainer's per-batch prediction loop (retrieval: ITC -> top-k -> ITM over the whole set; VQA: answer
ranking against an answer list)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints, speed_metrics
from transformers.utils import logging

from ..retrieval_index import RetrievalEngine
from .callbacks import AlphaWarmupCallback
from .data import open_image
from .metrics import RetrievalRecall, VQAAccuracy
from .optim import AlbefLRSchedule, create_scheduler, is_decayed
from .task_data import retrieval_eval_index

logger = logging.get_logger(__name__)


class AlbefTrainer(Trainer):
    """`Trainer` for the ALBEF heads. On top of `Trainer`:

    - weight decay follows the original rule (every parameter but 1-D ones and biases, `optim.is_decayed`), and with
      `lr_schedule` (keyword arguments of `optim.AlbefLRSchedule`: `min_lr`, `warmup_lr`, `schedule`, and
      `warmup_steps`, by default `args.warmup_steps`) the learning rate follows the original cosine schedule, peaking
      at `args.learning_rate`, instead of `args.lr_scheduler_type`;
    - `forward_kwargs` are added to every training forward (retrieval: `{"return_loss": True}`), and the current
      distillation weight of an `AlphaWarmupCallback` among the callbacks is passed as `alpha=`; it is also logged
      next to the loss;
    - evaluation and prediction use `eval_data_collator` (the evaluation image transform) and never drop the last
      batch, whatever `dataloader_drop_last` says (training drops it: the feature queues need full batches);
    - with an `evaluator` (`RetrievalEvaluator`, `VQAEvaluator`), `evaluate()` runs that protocol over the whole
      evaluation set instead of the per-batch loop (on the unwrapped model: not for FSDP / ZeRO-3 sharded weights);
      without one (NLVR2, SNLI-VE) it is Trainer's loop with `compute_metrics`, gathering only the logits.
      `predict()` stays Trainer's per-batch forward;
    - checkpoints are written whole or not at all: Trainer writes `checkpoint-<step>` inside `.tmp-checkpoint-<step>`
      and the folder is renamed into place once every process has written its part, so an error, an interrupt or a
      full disk during a save leaves the earlier checkpoints as they were and no `checkpoint-<step>` that
      `resume_from_checkpoint=True` would pick up half-written.
    """

    def __init__(
        self, *args, eval_data_collator=None, evaluator=None, forward_kwargs=None, lr_schedule=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.evaluator = evaluator
        self.forward_kwargs = dict(forward_kwargs or {})
        self.lr_schedule = dict(lr_schedule) if lr_schedule is not None else None
        self._staging_run_dir: str | None = None

    @property
    def alpha_warmup(self) -> AlphaWarmupCallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, AlphaWarmupCallback)), None)

    # ----- optimisation ----------------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, param in model.named_parameters() if is_decayed(name, param)]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        epochs = math.ceil(self.args.num_train_epochs)
        steps_per_epoch = None
        if self.lr_schedule.get("schedule") == "original":
            if self.args.max_steps > 0:
                raise ValueError('the "original" schedule is epoch-based: train with num_train_epochs, not max_steps')
            steps_per_epoch = math.ceil(num_training_steps / self.args.num_train_epochs)
        options = {"warmup_steps": self.args.get_warmup_steps(num_training_steps), **self.lr_schedule}
        schedule = AlbefLRSchedule(
            lr=self.args.learning_rate,
            total_steps=num_training_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            **options,
        )
        self.lr_scheduler = create_scheduler(optimizer or self.optimizer, schedule)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ----- checkpoints ----------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, f".tmp-{name}"), os.path.join(run_dir, name)
        writer = self.args.should_save
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # into staging/checkpoint-<step>
            best = self.state.best_model_checkpoint
            if best and os.path.normpath(best).startswith(os.path.normpath(staging) + os.sep):
                # Trainer found the best checkpoint in the folder it wrote to: point at where it will be.
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                if writer:
                    self.state.save_to_json(os.path.join(staging, name, TRAINER_STATE_NAME))
            self.accelerator.wait_for_everyone()  # every process has written its part (RNG states)
            if writer:
                from ..hub import replace_folder

                replace_folder(os.path.join(staging, name), final)
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            if writer:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_run_dir = None
        if writer:  # Trainer rotated the (empty) staging folder; rotate the real ones
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    # ----- training -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            inputs = {**inputs, **self.forward_kwargs}
            warmup = self.alpha_warmup
            if warmup is not None:
                inputs["alpha"] = warmup.alpha
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        warmup = self.alpha_warmup
        if warmup is not None and "loss" in logs:
            logs["alpha"] = warmup.alpha
        super().log(logs, start_time)

    # ----- evaluation data -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluation_loading(self):
        """Evaluation batches: the evaluation collator, and every example (no dropped last batch)."""
        collator, drop_last = self.data_collator, self.args.dataloader_drop_last
        if self.eval_data_collator is not None:
            self.data_collator = self.eval_data_collator
        self.args.dataloader_drop_last = False
        try:
            yield
        finally:
            self.data_collator, self.args.dataloader_drop_last = collator, drop_last

    def get_eval_dataloader(self, eval_dataset=None):
        with self._evaluation_loading():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._evaluation_loading():
            return super().get_test_dataloader(test_dataset)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("AlbefTrainer.evaluate needs an eval_dataset")
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics

        start = time.time()
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                results = self.evaluator(model, dataset, self.args, self.state)
        finally:
            model.train(was_training)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in results.items()}
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=len(dataset)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _shard(num_items: int, args) -> range:
    return range(args.process_index, num_items, args.world_size)


def _gather_objects(items: list, args) -> list:
    """Concatenate a Python list from every process (the identity in a single process)."""
    if args.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


class RetrievalEvaluator:
    """The original retrieval evaluation over a whole evaluation set: ITC similarities pick the top `k_test` of each
    row, the ITM "match" logit re-scores them (`AlbefForRetrieval.retrieval_scores`), and `itm_eval` turns the two
    score matrices into R@1/5/10 both ways (`RetrievalRecall`).

    The dataset is either one row per image with all its captions (`image`, `caption: list[str]`, the original
    val/test files) or one row per caption (`image`, `caption: str`, `image_id`). Captions are cleaned with
    `pre_caption` and truncated to `max_length` (30) tokens as the original. The matrices come from
    `RetrievalEngine.score_matrices` (`chunked_retrieval_score_matrices`): memory stays bounded (images are read from
    the dataset a batch at a time, twice, and fused `image_chunk_size` at a time), and under several processes each
    encodes and fuses its share, then every process holds the full matrices.
    """

    def __init__(self, processor, k_test: int = 256, max_length: int = 30, image_chunk_size: int = 256):
        for name, value in (("k_test", k_test), ("max_length", max_length), ("image_chunk_size", image_chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrievalEvaluator: {name} must be a positive integer, got {value!r}")
        self.processor = processor
        self.k_test = k_test
        self.max_length = max_length
        self.image_chunk_size = image_chunk_size

    @staticmethod
    def index(dataset) -> tuple[list[int], list[str], list[int] | dict, list[list[int]] | dict]:
        """(image_rows, texts, txt2img, img2txt) of an evaluation set: the dataset row of each distinct image, every
        caption, `txt2img[t]` the image of text t and `img2txt[i]` the texts of image i."""
        captions = dataset["caption"]
        if len(captions) and isinstance(captions[0], (list, tuple)):
            texts, txt2img, img2txt = retrieval_eval_index(dataset)
            return list(range(len(dataset))), texts, txt2img, img2txt
        if "image_id" not in dataset.column_names:
            raise ValueError("a retrieval set with one caption per row needs an image_id column")
        image_rows, texts, txt2img, img2txt = [], [], [], []
        position = {}
        for row, (caption, image_id) in enumerate(zip(captions, dataset["image_id"])):
            if image_id not in position:
                position[image_id] = len(image_rows)
                image_rows.append(row)
                img2txt.append([])
            img2txt[position[image_id]].append(len(texts))
            txt2img.append(position[image_id])
            texts.append(caption)
        return image_rows, texts, txt2img, img2txt

    def __call__(self, model, dataset, args, state=None) -> dict[str, float]:
        image_rows, texts, txt2img, img2txt = self.index(dataset)
        engine = RetrievalEngine(
            model,
            self.processor,
            batch_size=args.per_device_eval_batch_size,
            image_chunk_size=self.image_chunk_size,
            fusion_batch_size=args.per_device_eval_batch_size,
            max_length=self.max_length,
            clean_text="caption",
            progress=not args.disable_tqdm and args.process_index == 0,
        )
        score_i2t, score_t2i = engine.score_matrices(_DatasetImages(dataset, image_rows), texts, k=self.k_test)
        self.scores = (score_i2t, score_t2i)
        return RetrievalRecall().compute(predictions=(score_i2t, score_t2i), references=(txt2img, img2txt))


class _DatasetImages:
    """The images of `rows`, opened on demand (`datasets` decodes only the rows asked for); a bad one names its row."""

    def __init__(self, dataset, rows: list[int]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        row = self.rows[position]
        return open_image(self.dataset[row]["image"], index=row)


class VQAEvaluator:
    """The original VQA evaluation: rank the answer list with `rank_answers` (`k_test` first-token candidates
    re-scored by the full answer likelihood) and take the best answer.

    The dataset has `image` and `question` (cleaned with `pre_question`, 50 words, no truncation, as the original
    test loader), optionally `question_id`; when it has the human answers, one per annotator (`references_column`,
    default: the original's `answer` column), the VQA accuracy (`VQAAccuracy`) is reported. Questions are split
    across processes. The predictions `[{"question_id", "answer"}]` are kept on `self.predictions` and, with
    `result_dir`, written to `vqa_result_step{N}.json` (the original's result file) by the main process.
    """

    def __init__(
        self,
        processor,
        answer_list: list[str],
        k_test: int = 128,
        references_column: str | None = None,
        leave_one_out: bool = False,
        result_dir: str | os.PathLike | None = None,
    ):
        if not answer_list:
            raise ValueError("VQA evaluation needs a non-empty answer list")
        if isinstance(k_test, bool) or not isinstance(k_test, int) or k_test < 1:
            raise ValueError(f"VQAEvaluator: k_test must be a positive integer, got {k_test!r}")
        self.processor = processor
        self.answer_list = list(answer_list)
        self.k_test = min(k_test, len(self.answer_list))
        self.references_column = references_column
        self.leave_one_out = leave_one_out
        self.result_dir = result_dir
        self.answers = processor.encode_answers(self.answer_list, return_tensors="pt")
        self.predictions: list[dict] = []

    def _references_column(self, dataset) -> str | None:
        # Not the training `answers` column: it holds each answer once, and the metric counts annotators.
        if self.references_column is not None:
            return self.references_column
        return "answer" if "answer" in dataset.column_names else None

    def __call__(self, model, dataset, args, state=None) -> dict[str, float]:
        device = args.device
        answer_ids = self.answers["input_ids"].to(device)
        answer_mask = self.answers["attention_mask"].to(device)
        rows = list(_shard(len(dataset), args))
        local = []
        for start in range(0, len(rows), args.per_device_eval_batch_size):
            batch = dataset[rows[start : start + args.per_device_eval_batch_size]]
            inputs = self.processor(
                images=[open_image(image) for image in batch["image"]],
                text=batch["question"],
                clean_text="question",
                truncation=False,
                return_tensors="pt",
            ).to(device)
            topk_ids, _ = model.rank_answers(
                inputs["pixel_values"],
                inputs["input_ids"],
                inputs["attention_mask"],
                answer_ids,
                answer_mask,
                k=self.k_test,
            )
            local.extend(zip(rows[start : start + args.per_device_eval_batch_size], topk_ids[:, 0].tolist()))
        ranked = sorted(_gather_objects(local, args))
        question_ids = list(dataset["question_id"]) if "question_id" in dataset.column_names else range(len(dataset))
        self.predictions = [
            {"question_id": question_ids[row], "answer": self.answer_list[answer]} for row, answer in ranked
        ]
        if self.result_dir is not None and args.process_index == 0:
            step = state.global_step if state is not None else 0
            path = Path(self.result_dir) / f"vqa_result_step{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.predictions))

        metrics = {"num_questions": float(len(self.predictions))}
        column = self._references_column(dataset)
        if column is not None:
            references = [list(r) if isinstance(r, (list, tuple)) else [r] for r in dataset[column]]
            metrics.update(
                VQAAccuracy().compute(
                    predictions=[p["answer"] for p in self.predictions],
                    references=references,
                    leave_one_out=self.leave_one_out,
                )
            )
        return metrics


__all__ = ["AlbefTrainer", "RetrievalEvaluator", "VQAEvaluator"]
