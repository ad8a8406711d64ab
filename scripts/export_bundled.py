"""Write a trained model into the package's bundled-model folder (`transformers_albef.bundled_model_path(task)`).

    python scripts/export_bundled.py --task retrieval --model runs/emoji/pretrain/final \
        --card model_cards/bundled-retrieval.md
    python scripts/export_bundled.py --task vqa --model runs/easy-vqa/model \
        --answer-list runs/easy-vqa/data/answer_list.json --card model_cards/bundled-vqa.md

A bundle lives inside the package, which loads it through its own registrations: unlike a folder `save_pretrained`
writes elsewhere, it carries no copy of the model folder's code and no `auto_map` (a copy could only go stale). To
re-export both bundles from themselves (e.g. after a change to what `save_pretrained` writes):

    python scripts/export_bundled.py --refresh

The weights are stored in float16 (half the size; the bundle must stay under 25 MB) and load as float32: the saved
config says `dtype: float32`. Training state (momentum towers, queues) is dropped. The processor is saved alongside.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import transformers_albef as ta
from transformers_albef.bundled import BUNDLED_ROOT
from transformers_albef.cli.common import report_errors
from transformers_albef.hub import atomic_folder

CLASSES = {"retrieval": ta.AlbefForRetrieval, "vqa": ta.AlbefForQuestionAnswering}


def export(
    task: str, model_dir: Path, output: Path, answer_list: list[str] | None = None, card: Path | None = None
) -> Path:
    model = CLASSES[task].from_pretrained(model_dir)
    model.momentum = None
    model.config.distill = False
    if answer_list is not None:
        model.config.answer_list = answer_list
    if (model_dir / "processor_config.json").exists():
        processor = ta.AlbefProcessor.from_pretrained(model_dir)
    else:
        processor = ta.AlbefProcessor.from_bert_vocab(image_size=model.config.vision_config.image_size)
    # Written next to the target and swapped in (`atomic_folder`): an interrupted or failed export (an error, Ctrl-C,
    # a full disk) never leaves half a model, and only an ALBEF model folder is ever replaced.
    with atomic_folder(output, overwrite=True, what="bundle folder") as staging:
        # Shards under 20 MB: the repository tracks no file over 25 MB.
        model.to(torch.float16).save_pretrained(staging, max_shard_size="20MB")
        config = json.loads((staging / "config.json").read_text())
        config["dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        processor.save_pretrained(staging)
        _drop_remote_code(staging)
        if card is not None:
            shutil.copyfile(card, staging / "README.md")
    return output


def _drop_remote_code(folder: Path) -> None:
    """Remove the code files and `auto_map` entries `save_pretrained` writes for remote code (see the docstring)."""
    for code in folder.glob("*.py"):
        code.unlink()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            config.pop("auto_map", None)
            if isinstance(config.get("image_processor"), dict):
                config["image_processor"].pop("auto_map", None)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_answer_list(path: Path) -> list[str]:
    """A JSON list of answer strings; errors name the file and say what is wrong."""
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{path} must hold a non-empty JSON list of answer strings")
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(CLASSES))
    parser.add_argument("--model", type=Path, help="trained model folder (save_pretrained)")
    parser.add_argument("--refresh", action="store_true", help="re-export every bundle from itself")
    parser.add_argument("--answer-list", type=Path, help="VQA: answer_list.json stored in the config")
    parser.add_argument("--card", type=Path, help="model card (markdown) saved as README.md")
    parser.add_argument("--output", type=Path, help="default: the package's bundled folder for the task")
    args = parser.parse_args(argv)
    return report_errors(lambda: run(parser, args), prog="export_bundled.py")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.refresh:
        for task in sorted(CLASSES):
            folder = BUNDLED_ROOT / task
            with tempfile.TemporaryDirectory() as tmp:
                card = Path(tmp) / "README.md"
                shutil.copyfile(folder / "README.md", card)
                print(f"refreshed {export(task, folder, folder, card=card)}")
        return 0
    if args.task is None or args.model is None:
        parser.error("--task and --model are required (or --refresh)")
    answers = read_answer_list(args.answer_list) if args.answer_list else None
    output = args.output or BUNDLED_ROOT / args.task
    output.parent.mkdir(parents=True, exist_ok=True)
    path = export(args.task, args.model, output, answers, args.card)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"wrote {path} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
