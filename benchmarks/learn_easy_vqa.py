"""Does VQA fine-tuning really learn? A small ALBEF fine-tuned on easy-vqa, evaluated by answer ranking.

    pip install easy-vqa==1.0
    python benchmarks/learn_easy_vqa.py --output-dir runs/easy-vqa --pretrain-epochs 30 --lr 2e-4 --epochs 10 \
        --num-workers 3                            # 0.9514, 8.4 min on one H100 (the bundled VQA model)
    python benchmarks/learn_easy_vqa.py --output-dir runs/easy-vqa-scratch --epochs 6   # no pre-training

easy-vqa (MIT, PyPI) has 4,000 train / 1,000 test 64x64 images and 38,575 / 9,673 questions over 13 answers. The
script writes them in the original ALBEF VQA format (images as PNG, `vqa_*.json`, `answer_list.json`), runs the
package's fine-tuning entry point (`python -m transformers_albef.training.finetune --task vqa`) on a small
configuration, and appends the test accuracy of `rank_answers` (top-1 over the 13-answer list) to `LEARNING.md`.

Align before fusing: trained from scratch on the questions alone, the model learns colour but not shape (the
image tower's features never come to encode it: a linear probe finds no shape in them). With `--pretrain-epochs`
it is first pre-trained as ALBEF (`python -m transformers_albef.training.pretrain`: ITC, ITM and MLM) on the
training images captioned from their own training answers ("a red circle"), and the VQA model starts from that
(`--model <pretraining>/final`, the answer decoder built from the fusion layers as the original's VQA.py). No test
question, answer or image is used before the evaluation.
"""

import argparse
import json
import os
import platform
import re
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


SHAPES = ("circle", "rectangle", "triangle")
NEGATIONS = {"no", "not"}


def training_captions(questions, answers, image_ids, colours) -> dict[int, str]:
    """A caption per training image ("a red circle", "a triangle", "a blue shape") from its questions and answers:
    shape and colour answers, the shape named in "what color is the triangle?", and what a yes/no answer says is
    present ("is there not a blue shape?" -> "no": blue). Images with neither fact get none."""
    shape, colour = {}, {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        words = set(re.findall(r"[a-z]+", question))
        present = (answer == "yes") != bool(words & NEGATIONS)
        for name in SHAPES:
            if answer == name or (name in words and (answer in colours or present)):
                shape[image_id] = name
        for name in colours:
            if answer == name or (name in words and present):
                colour[image_id] = name
    return {
        image_id: f"a {colour.get(image_id, '')} {shape.get(image_id, 'shape')}".replace("  ", " ")
        for image_id in shape.keys() | colour.keys()
    }


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
        if split == "train":  # pre-training pairs in the original format, from the training answers only
            colours = [a for a in easy_vqa.get_answers() if a not in (*SHAPES, "yes", "no")]
            captions = training_captions(*questions, colours)
            pairs = [{"image": f"train_{i}.png", "caption": caption} for i, caption in sorted(captions.items())]
            (root / "pretrain_train.json").write_text(json.dumps(pairs))
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
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help="first pre-train (ITC+ITM+MLM) on the training images captioned from their answers, then fine-tune",
    )
    parser.add_argument("--pretrain-lr", type=float, default=5e-4)
    parser.add_argument("--num-workers", type=int, default=1, help="data loader processes")
    parser.add_argument("--probe", metavar="MODEL_DIR", help="only print the shape probe of a model's image tower")
    args = parser.parse_args()
    if args.probe:
        print(f"shape linearly decodable from the image tower of {args.probe}: {shape_probe(args.probe):.3f}")
        return 0
    if args.model and args.pretrain_epochs:
        parser.error("--model and --pretrain-epochs both choose the starting point; pass one")

    data = args.output_dir / "data"
    export(data)
    SMALL.to_json_file(args.output_dir / "config.json")
    start = time.time()
    if args.pretrain_epochs:
        args.model = str(pretrain(args, data))
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
        "--dataloader_num_workers", str(args.num_workers), "--save_strategy", "no", "--logging_steps", "50",
        "--report_to", "none",
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    minutes = (time.time() - start) / 60
    metrics = json.loads((args.output_dir / "model" / "all_results.json").read_text())
    print(json.dumps(metrics, indent=1))
    row = (
        f"| {time.strftime('%Y-%m-%d')} | easy-vqa test, {int(metrics['eval_num_questions'])} questions | "
        f"{metrics['eval_vqa_accuracy']:.4f} ({accuracy_by_answer_kind(data, args.output_dir / 'model')}) | "
        f"{describe_start(args)}{args.epochs:g} epochs of VQA, "
        f"batch {args.batch_size}, lr {args.lr:g}, augment {args.augment}, distill {args.distill} | "
        f"{minutes:.1f} min on {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {torch_device()})|"
    )
    with open(RESULTS, "a") as results:
        results.write(row + "\n")
    print(f"recorded in {RESULTS}:\n{row}")
    return 0


def accuracy_by_answer_kind(data: Path, model_dir: Path) -> str:
    """Test accuracy split by what the answer is: a colour, a shape, or yes/no (from the run's result file)."""
    truth = {r["question_id"]: r["answer"][0] for r in json.loads((data / "vqa_test.json").read_text())}
    [result_file] = sorted(model_dir.glob("vqa_result_step*.json"))[-1:]
    hits, counts = {}, {}
    for prediction in json.loads(result_file.read_text()):
        answer = truth[prediction["question_id"]]
        kind = "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "colour"
        counts[kind] = counts.get(kind, 0) + 1
        hits[kind] = hits.get(kind, 0) + (prediction["answer"] == answer)
    return ", ".join(f"{kind} {hits[kind] / counts[kind]:.3f}" for kind in ("colour", "shape", "yes/no"))


def pretrain(args, data: Path) -> Path:
    """ALBEF pre-training of the small configuration on the captioned training images; returns the final model."""
    config = ta.AlbefConfig.from_dict({**SMALL.to_dict(), "distill": True, "queue_size": 1024})
    config_path = args.output_dir / "pretrain_config.json"
    config.to_json_file(config_path)
    output = args.output_dir / "pretrain"
    command = [
        sys.executable, "-m", "transformers_albef.training.pretrain",
        "--train-data", str(data / "pretrain_train.json"), "--image-root", str(data / "images"),
        "--config", str(config_path), "--output-dir", str(output),
        # No crops or RandAugment: they change colours and cut shapes, i.e. the captions' facts.
        "--no-augment", "--epochs", str(args.pretrain_epochs), "--batch-size", str(args.batch_size),
        "--lr", str(args.pretrain_lr), "--warmup-steps", "100", "--save-steps", "0", "--save-total-limit", "1",
        "--num-workers", str(args.num_workers), "--logging-steps", "20", *([] if on_gpu() else ["--cpu"]),
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return output / "final"


def describe_start(args) -> str:
    if args.pretrain_epochs:
        return f"{args.pretrain_epochs} epochs of pre-training on captioned train images (lr {args.pretrain_lr:g}), "
    return f"from {args.model}, " if args.model else "from scratch, "


def shape_probe(model_dir: str) -> float:
    """Diagnostic: how linearly decodable is the shape from a model's frozen image tower? A logistic regression on
    [CLS] + mean patch states, fitted on the training images whose shape an answer gives and scored on such test
    images. Chance is about 1/3."""
    import easy_vqa
    import torch
    from PIL import Image
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as weights:
        state = {
            k[len("vision_model.") :]: weights.get_tensor(k) for k in weights.keys() if k.startswith("vision_model.")
        }
    config = ta.AlbefConfig.from_pretrained(model_dir)
    tower = ta.AlbefVisionModel(config.vision_config).float().eval()
    tower.load_state_dict({k: v.float() for k, v in state.items()})
    processor = ta.AlbefImageProcessor(size=config.vision_config.image_size)

    def features_and_labels(questions, paths):
        shape_of = {image_id: SHAPES.index(a) for _, a, image_id in zip(*questions) if a in SHAPES}
        ids = sorted(shape_of)
        with torch.no_grad():
            pixels = processor([Image.open(paths[i]).convert("RGB") for i in ids], return_tensors="pt")["pixel_values"]
            states = torch.cat([tower(chunk).last_hidden_state for chunk in pixels.split(256)])
        return torch.cat([states[:, 0], states[:, 1:].mean(1)], 1), torch.tensor([shape_of[i] for i in ids])

    x_train, y_train = features_and_labels(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    x_test, y_test = features_and_labels(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    weight = torch.zeros(x_train.shape[1], len(SHAPES), requires_grad=True)
    bias = torch.zeros(len(SHAPES), requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=500)

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return ((x_test @ weight + bias).argmax(1) == y_test).float().mean().item()


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device() -> str:
    import torch

    return torch.cuda.get_device_name() if on_gpu() else "no GPU"


if __name__ == "__main__":
    sys.exit(main())
