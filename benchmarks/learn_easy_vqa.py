"""Does VQA fine-tuning really learn? A small ALBEF trained from scratch on easy-vqa, evaluated by answer ranking.

    pip install easy-vqa==1.0
    python benchmarks/learn_easy_vqa.py --output-dir runs/easy-vqa [--epochs 8] [--model runs/emoji/final]

easy-vqa (MIT, PyPI) has 4,000 train / 1,000 test 64x64 images and 38,575 / 9,673 questions over 13 answers. The
script writes them in the original ALBEF VQA format (images as PNG, `vqa_*.json`, `answer_list.json`), runs the
package's fine-tuning entry point (`python -m transformers_albef.training.finetune --task vqa`) on a small
configuration, and appends the test accuracy of `rank_answers` (top-1 over the 13-answer list) to `LEARNING.md`.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import transformers_albef as ta

RESULTS = Path(__file__).parent / "LEARNING.md"

# The bundled VQA model's size: a 128-wide ViT on 64 px images and a 64-wide text side (the vocabulary embeddings
# dominate the parameter count).
SMALL = ta.AlbefConfig(
    vision_config=dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=64, patch_size=8
    ),
    text_config=dict(
        hidden_size=64, num_hidden_layers=4, fusion_layer=2, num_attention_heads=4, intermediate_size=256
    ),
    embed_dim=128,
    decoder_num_hidden_layers=2,
    distill=False,
)


def export(root: Path) -> None:
    """easy-vqa in the original ALBEF VQA json layout."""
    import easy_vqa

    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, questions, paths in (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        records = []
        for number, (question, answer, image_id) in enumerate(zip(*questions)):
            name = f"{split}_{image_id}.png"
            if not (root / "images" / name).exists():
                shutil.copyfile(paths[image_id], root / "images" / name)
            records.append(
                {"question_id": number, "question": question, "answer": [answer], "image": name, "dataset": "vqa"}
            )
        (root / f"vqa_{split}.json").write_text(json.dumps(records))
    (root / "answer_list.json").write_text(json.dumps(easy_vqa.get_answers()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/easy-vqa"))
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the original's crop/flip/RandAugment (off: colour operations and crops change easy-vqa's answers)",
    )
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--model", help="start from this model folder (e.g. a pretrained one) instead of scratch")
    args = parser.parse_args()

    data = args.output_dir / "data"
    export(data)
    SMALL.to_json_file(args.output_dir / "config.json")
    start_from = ["--model", args.model] if args.model else ["--config", str(args.output_dir / "config.json")]
    command = [
        sys.executable, "-m", "transformers_albef.training.finetune", "--task", "vqa", *start_from,
        "--train-data", str(data / "vqa_train.json"), "--eval-data", str(data / "vqa_test.json"),
        "--answer-list", str(data / "answer_list.json"), "--image-root", str(data / "images"),
        "--output-dir", str(args.output_dir / "model"), "--k-test", "13",
        "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", "128", "--learning_rate", str(args.lr),
        "--warmup_steps", str(args.warmup_steps),
        "--distill", str(args.distill), "--augment", str(args.augment), "--eval_strategy", "no",
        "--dataloader_num_workers", "1", "--save_strategy", "no", "--logging_steps", "50", "--report_to", "none",
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True)
    minutes = (time.time() - start) / 60
    metrics = json.loads((args.output_dir / "model" / "all_results.json").read_text())
    print(json.dumps(metrics, indent=1))
    row = (
        f"| {time.strftime('%Y-%m-%d')} | easy-vqa test, {int(metrics['eval_num_questions'])} questions | "
        f"{metrics['eval_vqa_accuracy']:.4f} | {args.epochs:g} epochs from {args.model or 'scratch'}, "
        f"batch {args.batch_size}, lr {args.lr:g}, augment {args.augment}, distill {args.distill} | "
        f"{minutes:.1f} min on {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {torch_device()})|"
    )
    with open(RESULTS, "a") as results:
        results.write(row + "\n")
    print(f"recorded in {RESULTS}:\n{row}")
    return 0


def torch_device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


if __name__ == "__main__":
    sys.exit(main())
