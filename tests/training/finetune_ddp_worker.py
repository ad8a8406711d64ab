"""One process of the 2-process fine-tuning test (run by `torchrun --nproc_per_node 2`).

Fine-tunes the tiny retrieval head (its feature queues gather across processes) and SNLI-VE head (its batches have
`labels`, the case where Trainer would rescale the loss of a head that accepted loss kwargs) for 2 steps with
`AlbefTrainer` (gloo) and writes, per rank, the loss the model returned at every training forward and the losses
Trainer logged, to compare them in the test. The retrieval model is then evaluated with `RetrievalEvaluator` (each
process encodes and fuses its share) and, on each process alone, with the original in-memory evaluation.

usage: finetune_ddp_worker.py IMAGE_DIR OUTPUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.*`

from tests.training.finetune_helpers import (  # noqa: E402
    ANSWER_LIST,
    eval_rows,
    processor,
    tiny_model,
    train_rows,
    training_args,
)
from transformers_albef import pre_caption  # noqa: E402
from transformers_albef.retrieval import retrieval_score_matrices  # noqa: E402
from transformers_albef.training.finetune import build_trainer  # noqa: E402
from transformers_albef.training.trainer import RetrievalEvaluator  # noqa: E402


def main(image_dir: str, output_dir: str):
    rank = int(os.environ["RANK"])
    images = sorted(str(p) for p in Path(image_dir).glob("*.png"))
    results = {}
    for task in ("retrieval", "ve"):
        torch.manual_seed(0)  # same initial weights on both ranks, as DDP expects
        # queue 16 > 2 steps x global batch 4: the pointer shows both processes' features were queued
        model = tiny_model(task, queue_size=16)
        losses = []
        model.register_forward_hook(lambda module, args, output, seen=losses: seen.append(output.loss.item()))
        args = training_args(
            task, Path(output_dir) / task, per_device_train_batch_size=2, ddp_backend="gloo", max_steps=2
        )
        trainer = build_trainer(task, model, processor(), train_rows(task, images), args=args, answer_list=ANSWER_LIST)
        trainer.train()
        results[task] = {
            "model_losses": losses,
            "logged": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "world_size": torch.distributed.get_world_size(),
            "queue_ptr": int(model.momentum.queue_ptr) if task == "retrieval" else None,
        }
        if task == "retrieval":
            results["evaluation"] = evaluate_retrieval(model, eval_rows(task, images), args)
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(results))


def evaluate_retrieval(model, dataset, args) -> dict:
    """The split evaluation's score matrices and those of the original single-process evaluation."""
    evaluator = RetrievalEvaluator(processor(), k_test=3)
    metrics = evaluator(model, dataset, args)
    texts = [pre_caption(caption) for captions in dataset["caption"] for caption in captions]
    text = processor()(text=texts, padding="max_length", max_length=30, truncation=True, return_tensors="pt")
    pixels = processor()(images=list(dataset["image"]), return_tensors="pt")["pixel_values"]
    model.eval()
    reference = retrieval_score_matrices(model, pixels, text["input_ids"], text["attention_mask"], k=3)
    return {
        "metrics": metrics,
        "split": [matrix.tolist() for matrix in evaluator.scores],
        "single_process": [matrix.tolist() for matrix in reference],
    }


if __name__ == "__main__":
    main(*sys.argv[1:3])
