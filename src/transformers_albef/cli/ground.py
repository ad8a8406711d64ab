"""`albef ground`: where on the image each word of a text is matched (Grad-CAM), as a picture."""

from __future__ import annotations

from .common import add_model_arguments, load_image, load_model, nonempty, positive_int, resolve_device, save_picture


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ground",
        help="draw Grad-CAM grounding maps of a text on an image",
        description="Computes Grad-CAM maps of a text on an image with an ALBEF retrieval model (default: the "
        "bundled one) and writes a picture: the image, the whole-text map and one map per word (word pieces "
        "merged), as in the paper's grounding figure.",
    )
    parser.add_argument("--image", required=True, help="the picture (any format Pillow reads)")
    parser.add_argument("--text", required=True, type=nonempty, help="the phrase to ground, e.g. 'a dog on a sofa'")
    parser.add_argument("--output", default="grounding.png", help="picture to write (default: grounding.png)")
    parser.add_argument(
        "--mode",
        choices=("itm", "itc"),
        default="itm",
        help="itm (default): cross-attention of the fusion layers, one map per word; itc: the image encoder's "
        "[CLS] attention, one map for the whole text",
    )
    parser.add_argument(
        "--layer",
        type=int,
        help="layer whose attention is read: a fusion layer of the text tower (itm) or a ViT block (itc); "
        "default: the model's config.gradcam_layer, else the original's choice",
    )
    parser.add_argument("--panel-size", type=positive_int, default=192, help="panel size in pixels (default: 192)")
    parser.add_argument("--columns", type=positive_int, default=6, help="panels per row (default: 6)")
    add_model_arguments(parser, "retrieval", what="retrieval model")
    parser.set_defaults(func=run)


def run(args) -> int:
    import transformers_albef as ta

    from ..visualization import ground

    device = resolve_device(args.device)
    image = load_image(args.image)
    model, processor = load_model(args.model, ta.AlbefForRetrieval, "retrieval", device)
    result = ground(
        model,
        processor,
        image,
        args.text,
        mode=args.mode,
        layer=args.layer,
        panel_size=args.panel_size,
        columns=args.columns,
    )
    path = save_picture(result.figure, args.output)
    print(f'grounded "{result.text}"', end="")
    if result.match_probability is not None:
        print(f" (ITM match probability {result.match_probability:.3f})", end="")
    print(f": {path} ({result.figure.width}x{result.figure.height})")
    if result.words:
        print("words: " + " ".join(result.words))
        if all(float(heat.max() - heat.min()) == 0 for heat in result.word_maps):
            print(
                "note: every per-word map is flat; this happens when the layer read is the last text layer (only "
                "[CLS] reaches the ITM head from there): try --layer with an earlier fusion layer"
            )
    return 0
