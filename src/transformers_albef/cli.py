"""The `albef` command line."""

import argparse
import sys
from pathlib import Path


def _demo_images():
    """Three drawn shapes, so the demo needs no files or network."""
    from PIL import Image, ImageDraw

    shapes = []
    for colour, shape in (("red", "circle"), ("blue", "square"), ("green", "triangle")):
        image = Image.new("RGB", (128, 128), "white")
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse((24, 24, 104, 104), fill=colour)
        elif shape == "square":
            draw.rectangle((24, 24, 104, 104), fill=colour)
        else:
            draw.polygon([(64, 16), (112, 108), (16, 108)], fill=colour)
        shapes.append((image, f"a {colour} {shape}"))
    return shapes


def _overlay(image, heat, path: Path):
    """Save `image` with a red Grad-CAM heat map on top."""
    import numpy as np
    from PIL import Image

    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    mask = Image.fromarray((heat.numpy() * 255).astype(np.uint8)).resize(image.size, Image.BICUBIC)
    red = Image.new("RGB", image.size, (255, 0, 0))
    Image.composite(red, image, mask.point(lambda v: int(v * 0.6))).save(path)


def demo(args) -> int:
    import torch

    from . import AlbefConfig, AlbefForQuestionAnswering, AlbefForRetrieval, AlbefProcessor

    print(
        "ALBEF demo on a RANDOMLY INITIALISED tiny model (no trained weights are bundled yet): the numbers show the "
        "API and the data path, not meaningful predictions.\n"
    )
    torch.manual_seed(args.seed)
    image_size = 64
    config = AlbefConfig(
        text_config=dict(
            hidden_size=64, num_hidden_layers=4, fusion_layer=2, num_attention_heads=4, intermediate_size=128
        ),
        vision_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=image_size
        ),
        embed_dim=32,
        decoder_num_hidden_layers=2,
    )
    processor = AlbefProcessor.from_bert_vocab(image_size=image_size)
    retrieval = AlbefForRetrieval(config).eval()
    vqa = AlbefForQuestionAnswering(config).eval()

    samples = _demo_images()
    images, captions = [s[0] for s in samples], [s[1] for s in samples]
    inputs = processor(images=images, text=captions, clean_text="caption", return_tensors="pt")
    with torch.no_grad():
        out = retrieval(**inputs, use_itm_head=True)
        score_i2t, score_t2i = retrieval.retrieval_scores(
            inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], k=2
        )
    print("ITC logits (rows: images, columns: captions)")
    for caption, row in zip(captions, out.logits_per_image):
        print(f"  {caption:18s}" + " ".join(f"{v:8.3f}" for v in row.tolist()))
    print(
        "ITM match probability of each aligned pair:", [round(p, 3) for p in out.itm_logits.softmax(-1)[:, 1].tolist()]
    )
    for t, caption in enumerate(captions):
        print(f"text->image for {caption!r}: image {int(score_t2i[t].argmax())} (ITC top-2 re-ranked by ITM)")

    answers = ["red", "blue", "green", "circle", "square", "triangle"]
    answer_inputs = processor.encode_answers(answers, return_tensors="pt")
    question = processor(text=["what color is the shape?"] * 3, clean_text="question", return_tensors="pt")
    ids, probs = vqa.rank_answers(
        inputs["pixel_values"],
        question["input_ids"],
        question["attention_mask"],
        answer_inputs["input_ids"],
        answer_inputs["attention_mask"],
        k=3,
    )
    for i in range(3):
        print(f"VQA image {i}: {answers[int(ids[i, 0])]!r} (p={float(probs[i, 0]):.3f})")

    cam = retrieval.gradcam(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        _overlay(image, cam.gradcam[i], output / f"gradcam_{i}.png")
    print(f"\nGrad-CAM maps written to {output}/gradcam_*.png")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="albef", description="ALBEF (Align before Fuse) for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="retrieval, VQA and Grad-CAM on drawn sample images (no downloads)")
    run_demo.add_argument("--output", default="albef-demo", help="folder for the Grad-CAM pictures")
    run_demo.add_argument("--seed", type=int, default=0)
    run_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"albef {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
