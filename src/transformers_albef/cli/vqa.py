"""`albef vqa`: answer a question about an image."""

from __future__ import annotations

import json
from pathlib import Path

from .common import (
    CliError,
    add_model_arguments,
    load_image,
    load_model,
    nonempty,
    positive_int,
    rank_answer_list,
    resolve_device,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vqa",
        help="answer a question about an image",
        description="Answers a question about an image with an ALBEF VQA model (default: the bundled one). Answers "
        "are ranked from a list, as in the original evaluation: --answers, else the model's config.answer_list; "
        "a model without a list generates one answer greedily.",
    )
    parser.add_argument("--image", required=True, help="the picture (any format Pillow reads)")
    parser.add_argument("--question", required=True, type=nonempty, help="the question, in English")
    parser.add_argument(
        "--answers", metavar="FILE", help="candidate answers: a JSON list of strings or a text file, one per line"
    )
    parser.add_argument("--top-k", type=positive_int, default=5, help="how many ranked answers to print (default: 5)")
    add_model_arguments(parser, "vqa", what="VQA model")
    parser.set_defaults(func=run)


def read_answers(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"answer file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            answers = json.loads(text)
        except json.JSONDecodeError as error:
            raise CliError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise CliError(f"{path} must hold a JSON list of strings")
    else:
        answers = [line.strip() for line in text.splitlines()]
    answers = [a for a in dict.fromkeys(answers) if a.strip()]  # unique, in order, no blanks
    if not answers:
        raise CliError(f"{path} holds no answers")
    return answers


def run(args) -> int:
    import transformers_albef as ta

    device = resolve_device(args.device)
    answers = read_answers(args.answers) if args.answers else None
    image = load_image(args.image)
    model, processor = load_model(args.model, ta.AlbefForQuestionAnswering, "vqa", device)
    answers = answers or model.config.answer_list
    inputs = processor(images=image, text=args.question, clean_text="question", return_tensors="pt").to(device)
    print(f"question: {args.question}")
    if not answers:
        generated = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        answer = processor.tokenizer.decode(generated[0], skip_special_tokens=True)
        print(f"answer (generated; the model has no answer list): {answer}")
        return 0
    ids, probs = rank_answer_list(model, processor, inputs, answers)  # print the first --top-k
    shown = min(args.top_k, ids.shape[1])
    width = max(len(answers[i]) for i in ids[0, :shown].tolist())
    print(f"answers (ranked from {len(answers)} candidates):")
    for rank, (index, probability) in enumerate(zip(ids[0, :shown].tolist(), probs[0, :shown].tolist()), 1):
        print(f"  {rank}. {answers[index]:{width}s}  {probability:.3f}")
    return 0
