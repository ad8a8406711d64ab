"""`albef demo`: retrieval, VQA and Grad-CAM grounding with the bundled models on the bundled sample pictures.

Sample pictures live in `transformers_albef/resources/samples/` with a `samples.json` index: a list of entries (or an
object whose list-valued fields hold them), each `{"file": ..., "caption": ...}` (retrieval and grounding) and/or
`{"file": ..., "question": ..., "answer": ...}` (VQA; `answer` optional), files relative to the folder. Fields named
`attribution`, `credit` or `license`, at the top level or in entries, are printed as the pictures' credits, and so
is the path of a NOTICE file next to samples.json. A top-level `"splits"` object, `{"<list name>": "where these
pictures come from"}`, says which data split each list was drawn from (printed with the results, which mean little
on pictures a model was trained on). Only when that folder is not installed does the demo draw its own shapes.
"""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bundled import SAMPLES_ROOT
from .common import (
    CliError,
    add_device_argument,
    load_image,
    load_model,
    progress,
    rank_answer_list,
    resolve_device,
    save_picture,
)

SAMPLES_DIR = SAMPLES_ROOT  # the bundled sample pictures (`transformers_albef.bundled_samples_path()`)
CREDIT_FIELDS = ("attribution", "credit", "license")
RIGHT, WRONG = (0, 120, 0), (190, 0, 0)


@dataclass
class Sample:
    image: object  # PIL image
    name: str
    caption: str | None = None
    question: str | None = None
    answer: str | None = None


@dataclass
class Samples:
    captioned: list[Sample]
    questions: list[Sample]
    origin: str
    credits: list[str] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)  # list name in samples.json -> where its pictures come from


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="retrieval, VQA and grounding on bundled sample pictures (no downloads)",
        description="Runs image-text retrieval (ITC ranking re-scored by ITM), visual question answering (ranking "
        "the model's answer list) and Grad-CAM grounding with the small models bundled in the package, on the "
        "bundled sample pictures; prints the results and writes grounding.png and results.png.",
    )
    parser.add_argument("--output-dir", default="albef-demo", help="folder for the pictures (default: albef-demo)")
    parser.add_argument(
        "--model", metavar="PATH_OR_ID", help="retrieval/grounding model (default: the bundled retrieval model)"
    )
    parser.add_argument("--vqa-model", metavar="PATH_OR_ID", help="VQA model (default: the bundled VQA model)")
    parser.add_argument(
        "--samples", metavar="DIR", help="a folder with samples.json and its pictures (default: the bundled samples)"
    )
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import transformers_albef as ta

    start = time.perf_counter()
    device = resolve_device(args.device)
    samples = load_samples(args.samples)
    output_dir = Path(args.output_dir)
    stages = progress(total=4, desc="albef demo")
    retrieval_model, retrieval_processor = load_model(args.model, ta.AlbefForRetrieval, "retrieval", device)
    vqa_model, vqa_processor = load_model(args.vqa_model, ta.AlbefForQuestionAnswering, "vqa", device)
    stages.update()
    retrieval = run_retrieval(retrieval_model, retrieval_processor, samples.captioned) if samples.captioned else None
    stages.update()
    vqa = run_vqa(vqa_model, vqa_processor, samples.questions) if samples.questions else None
    stages.update()
    grounding = None
    if samples.captioned:
        from ..visualization import ground

        first = samples.captioned[0]
        grounding = ground(retrieval_model, retrieval_processor, first.image, first.caption)
        save_picture(grounding.figure, output_dir / "grounding.png")
    grid = results_picture(retrieval, vqa, samples)
    save_picture(grid, output_dir / "results.png")
    stages.update()
    stages.close()

    print(f"ALBEF demo: {samples.origin}")
    print(f"  retrieval model: {args.model or ta.bundled_model_path('retrieval')}")
    print(f"  VQA model:       {args.vqa_model or ta.bundled_model_path('vqa')}")
    note = bundled_models_note(args.model is None, args.vqa_model is None)
    for text in ([note] if note else []) + [f"{name} samples: {text}" for name, text in samples.splits.items()]:
        print(textwrap.fill(text, width=116, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False))
    if retrieval:
        print_retrieval(retrieval)
    if vqa:
        print_vqa(vqa)
    if grounding:
        print(f'\nGrounding "{grounding.text}" on {samples.captioned[0].name}', end="")
        if grounding.match_probability is not None:
            print(f" (ITM match probability {grounding.match_probability:.2f})", end="")
        print(f": per-word and whole-text Grad-CAM in {output_dir / 'grounding.png'}")
        if grounding.words and all(float(m.max() - m.min()) == 0 for m in grounding.word_maps):
            print(
                "  note: every per-word map is flat: the Grad-CAM layer is the last text layer, where only [CLS] "
                "reaches the ITM head (`albef ground --layer` reads another)"
            )
    print(f"Results picture: {output_dir / 'results.png'}")
    for credit in samples.credits:
        print(f"Sample pictures: {credit}")
    print(f"Done in {time.perf_counter() - start:.1f} s")
    return 0


def load_samples(folder: str | Path | None) -> Samples:
    """The pictures of `folder` (default: the bundled samples), or drawn shapes when the bundled folder is not
    installed. A folder that exists must be complete: a broken samples.json is an error, not a reason to draw."""
    if folder is None:
        if not SAMPLES_DIR.exists():
            return drawn_samples()
        folder = SAMPLES_DIR
    folder = Path(folder)
    index = folder / "samples.json"
    if not index.is_file():
        raise CliError(f"no samples.json in {folder}")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CliError(f"{index} is not valid JSON: {error}") from None
    credits, splits = [], {}
    if isinstance(data, dict):
        credits += [str(data[name]) for name in CREDIT_FIELDS if isinstance(data.get(name), str)]
        splits = data.get("splits", {})
        if not isinstance(splits, dict) or not all(isinstance(text, str) for text in splits.values()):
            raise CliError(f'{index}: "splits" must map sample list names to descriptions (strings)')
        entries = [entry for value in data.values() if isinstance(value, list) for entry in value]
    elif isinstance(data, list):
        entries = data
    else:
        raise CliError(f"{index} must hold a list of samples or an object with lists of samples")

    samples = Samples([], [], origin=f"{len(entries)} sample pictures from {folder}", credits=[], splits=splits)
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise CliError(f"{index}: sample {number} needs a 'file' field")
        if not isinstance(entry.get("caption"), str) and not isinstance(entry.get("question"), str):
            raise CliError(f"{index}: sample {number} ({entry['file']}) needs a 'caption' or a 'question'")
        image = load_image(folder / entry["file"])
        sample = Sample(image, entry["file"], entry.get("caption"), entry.get("question"), entry.get("answer"))
        if sample.caption is not None:
            samples.captioned.append(sample)
        if sample.question is not None:
            samples.questions.append(sample)
        credits += [str(entry[name]) for name in CREDIT_FIELDS if isinstance(entry.get(name), str)]
    if not entries:
        raise CliError(f"{index} lists no samples")
    notices = [path for path in sorted(folder.glob("NOTICE*")) if path.is_file()]
    credits += [f"credits and licences in {path}" for path in notices]
    samples.credits = list(dict.fromkeys(credits))  # unique, in order
    return samples


def drawn_samples() -> Samples:
    """Shapes drawn in the style of easy-vqa, for an installation without the sample pictures."""
    from PIL import Image, ImageDraw

    def draw(colour: str, shape: str) -> Image.Image:
        image = Image.new("RGB", (64, 64), "white")
        pen = ImageDraw.Draw(image)
        if shape == "circle":
            pen.ellipse((12, 12, 52, 52), fill=colour)
        elif shape == "rectangle":
            pen.rectangle((10, 16, 54, 48), fill=colour)
        else:
            pen.polygon([(32, 8), (56, 54), (8, 54)], fill=colour)
        return image

    shapes = [("red", "circle"), ("blue", "rectangle"), ("green", "triangle")]
    images = {shape: draw(colour, shape) for colour, shape in shapes}
    captioned = [Sample(images[shape], f"{colour} {shape}", caption=f"a {colour} {shape}") for colour, shape in shapes]
    questions = [
        Sample(images["circle"], "red circle", question="what color is the shape?", answer="red"),
        Sample(images["rectangle"], "blue rectangle", question="what shape is in the image?", answer="rectangle"),
        Sample(images["triangle"], "green triangle", question="is there a green shape?", answer="yes"),
    ]
    origin = "drawn shapes (the bundled sample pictures are not installed)"
    return Samples(captioned, questions, origin)


def bundled_models_note(retrieval: bool, vqa: bool) -> str | None:
    """What the bundled models are (and are not), and how to run the published ALBEF checkpoints instead: said when
    the demo uses a bundled model (`retrieval` / `vqa`: that one is the bundled one)."""
    trained = [
        *(["retrieval: emoji drawings and their names"] if retrieval else []),
        *(["VQA: easy-vqa pictures of coloured shapes"] if vqa else []),
    ]
    if not trained:
        return None
    which = "the bundled models are small ALBEFs" if retrieval and vqa else "the bundled model is a small ALBEF"
    option = "--model" if retrieval else "--vqa-model"
    checkpoint, folder = ("mscoco.pth", "albef-coco") if retrieval else ("vqa.pth", "albef-vqa")
    return (
        f"note: {which} trained by this project on toy data ({'; '.join(trained)}), not ALBEF's published "
        f"checkpoints. For those, download a released checkpoint (github.com/salesforce/ALBEF) and convert it: "
        f"`albef convert --checkpoint {checkpoint} --output-dir {folder}`, then `albef demo {option} {folder}`."
    )


def run_retrieval(model, processor, samples: list[Sample]) -> dict:
    """Both directions over the samples' images and captions with the original protocol (ITC top-k, ITM re-rank),
    and the ITM match probability of each image's best caption."""
    import torch

    captions = [sample.caption for sample in samples]
    inputs = processor(
        images=[sample.image for sample in samples], text=captions, clean_text="caption", return_tensors="pt"
    ).to(model.device)
    pixel_values, input_ids, attention_mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    score_i2t, score_t2i = model.retrieval_scores(pixel_values, input_ids, attention_mask)
    best_text = score_i2t.argmax(1)
    best_image = score_t2i.argmax(1)
    with torch.no_grad():
        itm = model(pixel_values, input_ids[best_text], attention_mask[best_text], use_itm_head=True).itm_logits
    return {
        "samples": samples,
        "best_text": best_text.tolist(),
        "best_image": best_image.tolist(),
        "match_probability": itm.float().softmax(-1)[:, 1].tolist(),
    }


def run_vqa(model, processor, samples: list[Sample]) -> dict:
    """The top answer of each question: ranked from `config.answer_list` when the model has one (the original
    evaluation), generated greedily otherwise."""
    inputs = processor(
        images=[sample.image for sample in samples],
        text=[sample.question for sample in samples],
        clean_text="question",
        return_tensors="pt",
    ).to(model.device)
    answers = model.config.answer_list
    if answers:
        ids, probs = rank_answer_list(model, processor, inputs, answers)
        predicted = [answers[i] for i in ids[:, 0].tolist()]
        probabilities = probs[:, 0].tolist()
        how = f"ranking the model's {len(answers)} answers; p: probability among the ranked answers"
    else:
        generated = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        predicted = processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
        probabilities = [None] * len(predicted)
        how = "generated (the model has no answer list)"
    return {
        "samples": samples,
        "predicted": predicted,
        "probabilities": probabilities,
        "how": how,
        "num_answers": len(answers or []),
    }


def _is_right(predicted: str, expected: str | None) -> bool | None:
    return None if expected is None else predicted.strip().lower() == expected.strip().lower()


def print_retrieval(retrieval: dict) -> None:
    samples = retrieval["samples"]
    width = max(len(sample.name) for sample in samples)
    print(
        f"\nImage -> text retrieval over {len(samples)} captions (ITC top-k re-ranked by ITM; p(match): the ITM "
        "head's probability that the caption matches the image):"
    )
    right_i2t = 0
    for sample, best, probability in zip(samples, retrieval["best_text"], retrieval["match_probability"]):
        found = samples[best].caption
        right = found == sample.caption
        right_i2t += right
        mark, expected = ("ok", "") if right else ("--", f'   (true: "{sample.caption}")')
        print(f'  {mark}  {sample.name:{width}s}  -> "{found}"  p(match) {probability:.2f}{expected}')
    print("Text -> image:")
    right_t2i = 0
    for sample, best in zip(samples, retrieval["best_image"]):
        right = samples[best].caption == sample.caption
        right_t2i += right
        print(f'  {"ok" if right else "--"}  "{sample.caption}" -> {samples[best].name}')
    print(f"Recall@1: image->text {right_i2t}/{len(samples)}, text->image {right_t2i}/{len(samples)}")
    print(f"  (chance level: 1/{len(samples)} each way, a random ranking)")


def print_vqa(vqa: dict) -> None:
    samples = vqa["samples"]
    print(f"\nVisual question answering ({vqa['how']}):")
    right_count, judged = 0, 0
    for sample, answer, probability in zip(samples, vqa["predicted"], vqa["probabilities"]):
        right = _is_right(answer, sample.answer)
        mark = "  " if right is None else "ok" if right else "--"
        score = "" if probability is None else f" (p {probability:.2f})"
        expected = "" if right is None or right else f'   (true: "{sample.answer}")'
        print(f'  {mark}  {sample.name}: "{sample.question}" -> {answer}{score}{expected}')
        if right is not None:
            judged += 1
            right_count += right
    if judged:
        print(f"Accuracy: {right_count}/{judged}")
        if vqa["num_answers"]:
            print(f"  (chance level: 1/{vqa['num_answers']}, a random pick among the model's answers)")


def results_picture(retrieval: dict | None, vqa: dict | None, samples: Samples):
    """Retrieval hits (each image with its best caption) above VQA answers, coloured right / wrong."""
    from ..visualization import image_grid, stack_vertically

    grids = []
    columns = max(len(samples.captioned), len(samples.questions), 1)
    columns = min(columns, 6)
    if retrieval:
        images, labels, colours = [], [], []
        for sample, best, probability in zip(
            retrieval["samples"], retrieval["best_text"], retrieval["match_probability"]
        ):
            found = retrieval["samples"][best].caption
            right = found == sample.caption
            images.append(sample.image)
            labels.append(f'"{found}" ({probability:.2f})' + ("" if right else f'\ntrue: "{sample.caption}"'))
            colours.append(RIGHT if right else WRONG)
        grids.append(
            image_grid(
                images,
                labels,
                columns=columns,
                title="Image -> best caption (ITM match probability)",
                label_colors=colours,
            )
        )
    if vqa:
        images, labels, colours = [], [], []
        for sample, answer, probability in zip(vqa["samples"], vqa["predicted"], vqa["probabilities"]):
            right = _is_right(answer, sample.answer)
            score = "" if probability is None else f" ({probability:.2f})"
            images.append(sample.image)
            labels.append(
                f"Q: {sample.question}\nA: {answer}{score}" + (f"\ntrue: {sample.answer}" if right is False else "")
            )
            colours.append(None if right is None else RIGHT if right else WRONG)
        title = "Visual question answering"
        grids.append(image_grid(images, labels, columns=columns, title=title, label_colors=colours))
    if not grids:
        raise CliError("the samples have neither captions nor questions")
    return stack_vertically(grids, gap=16)
