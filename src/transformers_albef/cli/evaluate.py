"""`albef evaluate`: image-text retrieval evaluation (recall@1/5/10 both ways) on a local dataset, as ALBEF's."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import CliError, add_model_arguments, load_model, positive_int, resolve_device

PLOT_SIZE = (900, 560)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="retrieval evaluation (recall@1/5/10) on a local dataset",
        description="Evaluates image-text retrieval exactly as the original ALBEF evaluation: the top --candidates "
        "of every row by ITC similarity are re-scored by the ITM match logit (-100 elsewhere) and recall@1/5/10 is "
        "reported both ways (an image counts as found when any of its captions is). Images are processed in chunks, "
        "so large sets (e.g. COCO's 5K test images) fit in memory; launched with torchrun or `accelerate launch`, "
        "the work is split across the processes. Writes a recall-curve picture, and the numbers as JSON with "
        "--output.",
        epilog="example: albef evaluate coco_test.json --image-root /data/coco --output results.json",
    )
    parser.add_argument(
        "annotation",
        help='the test set in ALBEF\'s format: a JSON list of {"image": path, "caption": [captions]} (or json lines)',
    )
    parser.add_argument("--image-root", metavar="DIR", help="folder the image paths are relative to")
    parser.add_argument(
        "--candidates",
        type=positive_int,
        default=None,
        metavar="K",
        help="k_test: ITC candidates re-scored by ITM in each row (default: the model's retrieval_k; the original "
        "uses 256 on COCO, 128 on Flickr30K)",
    )
    parser.add_argument(
        "--score",
        choices=("itm", "itm+itc"),
        default="itm",
        help="itm: the ITM match logit (the original); itm+itc: plus the ITC similarity (LAVIS) (default: itm)",
    )
    parser.add_argument("--output", metavar="FILE", help="write the metrics and the recall curve as JSON here")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="recall-curve picture (PNG) (default: next to --output, else recall_curve.png in the current folder)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the recall curve")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images or texts per forward (default: 64)"
    )
    parser.add_argument(
        "--image-chunk-size",
        type=positive_int,
        default=256,
        help="images whose tower states are held at once (default: 256)",
    )
    parser.add_argument(
        "--fusion-batch-size",
        type=positive_int,
        default=256,
        help="image-text pairs per fusion forward (default: 256)",
    )
    add_model_arguments(parser, "retrieval", what="retrieval model")
    parser.set_defaults(func=run)


def read_retrieval_set(annotation: str | Path, image_root: str | None):
    """`(image paths, captions, txt2img, img2txt)` of an ALBEF retrieval test file, every record checked (the first
    bad one raises, naming it)."""
    from transformers_albef.training.data import check_image_file, read_records, record_captions, resolve_image_path

    if image_root is not None and not Path(image_root).is_dir():
        raise CliError(f"--image-root is not a folder: {image_root}")
    images, captions, txt2img, img2txt = [], [], [], []
    for index, record in read_records(annotation):
        if isinstance(record, Exception):
            raise record
        if not isinstance(record, dict) or "image" not in record:
            raise CliError(f"{annotation} record {index}: expected an object with 'image' and 'caption' fields")
        path = resolve_image_path(record["image"], image_root, index, annotation)
        texts = record_captions(record, index, path, annotation)
        check_image_file(path, index, annotation)
        img2txt.append(list(range(len(captions), len(captions) + len(texts))))
        txt2img.extend([len(images)] * len(texts))
        captions.extend(texts)
        images.append(path)
    if not images:
        raise CliError(f"{annotation} holds no records")
    return images, captions, txt2img, img2txt


def _process_state(device_name: str | None):
    """accelerate's view of the launch: several processes under torchrun / `accelerate launch` (this also sets up
    torch.distributed, which the evaluation splits its work over), else one."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # On CPU accelerate sees the launched processes only when told to run on CPU.
    return PartialState(cpu=not torch.cuda.is_available() or (device_name or "").startswith("cpu"))


def run(args) -> int:
    import transformers_albef as ta
    from transformers_albef.retrieval_index import RetrievalEngine

    if args.plot and args.no_plot:
        raise CliError("--plot and --no-plot contradict each other")
    images, captions, txt2img, img2txt = read_retrieval_set(args.annotation, args.image_root)
    state = _process_state(args.device)
    device = resolve_device(args.device) if state is None or args.device else state.device
    is_main = state is None or state.is_main_process
    model, processor = load_model(args.model, ta.AlbefForRetrieval, "retrieval", device)
    engine = RetrievalEngine(
        model,
        processor,
        batch_size=args.batch_size,
        image_chunk_size=args.image_chunk_size,
        fusion_batch_size=args.fusion_batch_size,
        progress=is_main and sys.stderr.isatty(),
    )
    result = engine.evaluate(images, captions, txt2img, img2txt, k=args.candidates, score=args.score)
    if not is_main:
        return 0

    metrics, curve = result.metrics, result.recall_curve()
    # Each direction ranks at most the whole other side: k larger than that changes nothing and would mislead.
    candidates = {"image_to_text": min(result.k, len(captions)), "text_to_image": min(result.k, len(images))}
    chance = chance_metrics(img2txt, len(images), len(captions))
    model_name = args.model or "the bundled retrieval model"
    print(
        f"retrieval on {args.annotation}: {len(images)} images, {len(captions)} captions, score={args.score}, "
        f"model: {model_name}"
    )
    capped = f" (k={result.k} capped at the corpus size)" if result.k > min(len(images), len(captions)) else ""
    print(
        f"ITM re-ranks the ITC top {candidates['image_to_text']} captions of each image and the top "
        f"{candidates['text_to_image']} images of each caption{capped}"
    )
    print(f"{'':15s} {'R@1':>7s} {'R@5':>7s} {'R@10':>7s} {'mean':>7s}")
    for label, prefix in (("image -> text", "txt"), ("text -> image", "img")):
        keys = [f"{prefix}_r1", f"{prefix}_r5", f"{prefix}_r10", f"{prefix}_r_mean"]
        print(f"{label:15s} " + " ".join(f"{metrics[key]:7.2f}" for key in keys))
        print(f"{'  chance':15s} " + " ".join(f"{chance[key]:7.2f}" for key in keys))
    print(f"r_mean {metrics['r_mean']:.2f} (chance {chance['r_mean']:.2f})")
    print(
        "chance: the recall of a random ranking (R@k of text -> image = k / images; image -> text counts an image "
        "found when any of its captions is in the top k)"
    )

    if args.output:
        report = {
            "annotation": str(args.annotation),
            "model": model_name,
            "num_images": len(images),
            "num_texts": len(captions),
            "k": max(candidates.values()),
            "candidates": candidates,
            "score": args.score,
            "metrics": metrics,
            "chance": chance,
            "recall_curve": curve,
        }
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        print(f"metrics written to {output}")
    if not args.no_plot:
        plot = Path(args.plot) if args.plot else (Path(args.output).with_suffix(".png") if args.output else None)
        plot = plot or Path("recall_curve.png")
        title = (
            f"{Path(args.annotation).name}: {len(images)} images, {len(captions)} captions, "
            f"k={max(candidates.values())}"
        )
        draw_recall_curve(curve, plot, title)
        print(f"recall curve drawn in {plot}")
    return 0


def chance_recall(relevant: Sequence[int], corpus_size: int, k: int) -> float:
    """Recall@k in percent of a random ranking: the mean over queries of the probability that at least one of the
    query's `relevant[q]` items (among `corpus_size`) is in its top k, 1 - C(n - m, k) / C(n, k) (k / n for one)."""
    k = min(k, corpus_size)
    total, cache = 0.0, {}
    for m in relevant:
        if m not in cache:
            cache[m] = 1.0 - math.comb(corpus_size - m, k) / math.comb(corpus_size, k)
        total += cache[m]
    return 100.0 * total / len(relevant)


def chance_metrics(img2txt: Sequence[Sequence[int]], num_images: int, num_texts: int) -> dict[str, float]:
    """The chance level of each metric `recall_at_k` reports (`txt_r1` ... `r_mean`), for this ground truth."""
    chance = {}
    for prefix, relevant, corpus_size in (
        ("txt", [len(texts) for texts in img2txt], num_texts),
        ("img", [1] * num_texts, num_images),
    ):
        values = [chance_recall(relevant, corpus_size, k) for k in (1, 5, 10)]
        chance.update({f"{prefix}_r{k}": value for k, value in zip((1, 5, 10), values)})
        chance[f"{prefix}_r_mean"] = sum(values) / 3
    chance["r_mean"] = (chance["txt_r_mean"] + chance["img_r_mean"]) / 2
    return chance


def _legend(curve: dict, key: str, label: str) -> str:
    """The series name with its recall@1/5/10 (those the curve reaches)."""
    values = ", ".join(f"R@{k} {curve[key][k - 1]:.1f}" for k in (1, 5, 10) if k <= len(curve["ranks"]))
    return f"{label}  ({values})"


def draw_recall_curve(curve: dict, path: Path, title: str) -> Path:
    """Recall@K against K for both directions, as a PNG: with matplotlib when it is installed, else with PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        _draw_with_pil(curve, path, title)
        return path
    figure = Figure(figsize=(PLOT_SIZE[0] / 100, PLOT_SIZE[1] / 100), dpi=100)
    axes = figure.add_subplot()
    marked = [k for k in (1, 5, 10) if k <= len(curve["ranks"])]
    for key, label, colour in (
        ("image_to_text", "image → text", "tab:blue"),
        ("text_to_image", "text → image", "tab:orange"),
    ):
        # Recall@K only changes at whole ranks: a step line, with R@1/5/10 marked.
        axes.step(curve["ranks"], curve[key], where="post", label=_legend(curve, key, label), color=colour)
        axes.plot(marked, [curve[key][k - 1] for k in marked], "o", color=colour)
    axes.set_xlabel("K (rank)")
    axes.set_ylabel("recall@K (%)")
    axes.set_ylim(0, 102)
    axes.set_xlim(1, max(curve["ranks"][-1], 2))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _draw_with_pil(curve: dict, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        font = ImageFont.load_default()
    width, height = PLOT_SIZE
    left, right, top, bottom = 70, 30, 50, 60
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    ranks = curve["ranks"]
    largest = max(ranks[-1], 2)

    def point(rank: float, recall: float) -> tuple[float, float]:
        x = left + (rank - 1) / (largest - 1) * (width - left - right)
        y = height - bottom - recall / 100 * (height - top - bottom)
        return x, y

    for recall in range(0, 101, 20):  # horizontal grid and y labels
        _, y = point(1, recall)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{recall}", fill="black", font=font, anchor="rm")
    step = max(1, round(largest / 10))
    for rank in sorted({1, *range(step, largest + 1, step)}):  # x ticks
        x, y = point(rank, 0)
        draw.line([(x, y), (x, y + 5)], fill="black")
        draw.text((x, y + 8), f"{rank}", fill="black", font=font, anchor="mt")
    draw.line([point(1, 0), (width - right, height - bottom)], fill="black")
    draw.line([point(1, 0), (left, top)], fill="black")
    draw.text((width / 2, height - 18), "K (rank)", fill="black", font=font, anchor="mm")
    draw.text((12, top - 20), "recall@K (%)", fill="black", font=font, anchor="lm")
    draw.text((width / 2, 18), title, fill="black", font=font, anchor="mm")

    series = (("image_to_text", "image -> text", (31, 119, 180)), ("text_to_image", "text -> image", (255, 127, 14)))
    for number, (key, label, colour) in enumerate(series):
        points = [point(rank, value) for rank, value in zip(ranks, curve[key])]
        # Recall@K only changes at whole ranks: a step line.
        steps = [c for a, b in zip(points[:-1], points[1:]) for c in (a, (b[0], a[1]))] + [points[-1]]
        if len(steps) > 1:
            draw.line(steps, fill=colour, width=3, joint="curve")
        for k in (1, 5, 10):
            if k <= len(ranks):
                x, y = points[k - 1]
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        legend_y = height - bottom - 40 + 20 * number
        draw.line([(width - right - 390, legend_y), (width - right - 360, legend_y)], fill=colour, width=3)
        draw.text((width - right - 352, legend_y), _legend(curve, key, label), fill="black", font=font, anchor="lm")
    picture.save(path, format="PNG")
