"""Pictures of ALBEF results.

- Grounding: Grad-CAM maps (`AlbefForRetrieval.gradcam`, see `grounding.py`) upsampled to the image and blended
  over it, one panel per word (word pieces merged) and one for the whole text, as in the paper's grounding figure
  and the original visualisation notebook. `ground(model, processor, image, text)` runs the model and draws;
  `grounding_figure` draws maps you already have.
- `image_grid`: labelled pictures (retrieval hits with scores, VQA answers).

Pillow does all the drawing, so pictures look the same everywhere; matplotlib is optional and, when installed,
only supplies colour maps other than the built-in "jet".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_CMAP = "jet"
# The original notebook's blend: a pixel takes the colour map with weight heat**0.7, so weak heat fades out.
HEAT_GAMMA = 0.7
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)


def _to_numpy(heatmap) -> np.ndarray:
    if hasattr(heatmap, "detach"):  # a torch tensor, on any device or dtype
        heatmap = heatmap.detach().float().cpu().numpy()
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"a heat map must be 2-D (grid, grid), got shape {heat.shape}")
    return heat


def normalize_heatmap(heatmap, scale: float | None = None) -> np.ndarray:
    """Shift to a minimum of 0 and divide by the maximum (or by `scale`, to compare maps on one scale): [0, 1]."""
    heat = _to_numpy(heatmap)
    heat = heat - heat.min()
    top = heat.max() if scale is None else scale
    return np.clip(heat / top, 0.0, 1.0) if top > 0 else heat


def colorize(heat: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """RGB colours in [0, 1] of a [0, 1] map, shape (..., 3)."""
    try:
        import matplotlib

        return np.asarray(matplotlib.colormaps[cmap](heat))[..., :3].astype(np.float32)
    except ImportError:
        pass
    if cmap != "jet":
        raise ValueError(f"colour map {cmap!r} needs matplotlib (not installed); without it only 'jet' is available")
    # Piecewise-linear jet: blue -> cyan -> yellow -> red.
    channels = [np.clip(1.5 - np.abs(4.0 * heat - offset), 0.0, 1.0) for offset in (3.0, 2.0, 1.0)]
    return np.stack(channels, axis=-1).astype(np.float32)


def overlay_heatmap(image: Image.Image, heatmap, cmap: str = DEFAULT_CMAP, scale: float | None = None) -> Image.Image:
    """`image` with `heatmap` (any grid size, e.g. the (16, 16) patch grid) upsampled bicubically to its size and
    blended over it. The map covers the whole image: ALBEF squashes the image to a square without cropping."""
    heat = normalize_heatmap(heatmap, scale)
    heat = np.asarray(Image.fromarray(heat).resize(image.size, Image.BICUBIC))
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    weight = heat**HEAT_GAMMA
    blended = (1.0 - weight) * pixels + weight * colorize(heat[..., 0], cmap)
    return Image.fromarray((blended * 255.0).round().astype(np.uint8))


def merge_word_pieces(tokens: Sequence[str], maps, special_tokens: Sequence[str] = ()) -> list[tuple[str, np.ndarray]]:
    """Words and their maps from WordPiece tokens and one map per token: `##` pieces join the word before them
    and the word's map is the mean of its pieces' maps. Special tokens ([CLS], [PAD]) are left out."""
    words: list[tuple[str, list[np.ndarray]]] = []
    for token, heat in zip(tokens, maps):
        if token in special_tokens:
            continue
        heat = _to_numpy(heat)
        if token.startswith("##") and words:
            words[-1][0].append(token[2:])
            words[-1][1].append(heat)
        else:
            words.append(([token], [heat]))
    return [("".join(pieces), np.mean(heats, axis=0)) for pieces, heats in words]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled (up or down) so its longer side is `size`, aspect ratio kept."""
    scale = size / max(image.size)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(target, Image.BICUBIC)


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Lines of `text` that fit `width` pixels, at most `max_lines` (the last one cut with an ellipsis)."""
    lines = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    lines = [_shorten(line, font, width) for line in lines]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [_shorten(lines[max_lines - 1], font, width, ellipsis=True)]
    return lines


def _shorten(line: str, font, width: int, ellipsis: bool = False) -> str:
    """`line` cut to fit `width`, ending in "..." when cut (or when `ellipsis` is set)."""
    if not ellipsis and font.getlength(line) <= width:
        return line
    line = line.rstrip()
    while line and font.getlength(line + "...") > width:
        line = line[:-1].rstrip()
    return line + "..."


def image_grid(
    images: Sequence[Image.Image],
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    panel_size: int = 160,
    title: str | None = None,
    label_colors: Sequence[tuple[int, int, int] | str | None] | None = None,
    max_label_lines: int = 4,
) -> Image.Image:
    """A grid of pictures, each fitted into a `panel_size` square with its label (wrapped) underneath, and an
    optional title on top: retrieval hits with their scores, VQA questions with their answers.

    Layout (in pixels, `margin = max(6, panel_size // 12)`): `columns * (panel_size + margin) + margin` wide; each
    row is `panel_size` plus as many label lines as the longest label needs. `label_colors` colours labels
    (e.g. green for a right answer, red for a wrong one).
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    labels = list(labels) if labels is not None else [""] * len(images)
    colors = list(label_colors) if label_colors is not None else [None] * len(images)
    if len(labels) != len(images) or len(colors) != len(images):
        raise ValueError(f"{len(images)} images need as many labels and colours, got {len(labels)} and {len(colors)}")
    if panel_size < 16:
        raise ValueError(f"panel_size must be at least 16 pixels, got {panel_size}")
    columns = max(1, min(columns or len(images), len(images)))
    rows = -(-len(images) // columns)
    margin = max(6, panel_size // 12)
    font = _font(max(10, panel_size // 13))
    title_font = _font(max(12, panel_size // 10))
    line_height = _line_height(font)
    wrapped = [_wrap(label, font, panel_size, max_label_lines) if label else [] for label in labels]
    label_height = max(len(lines) for lines in wrapped) * line_height
    width = columns * (panel_size + margin) + margin
    title_lines = _wrap(title, title_font, width - 2 * margin, 3) if title else []
    title_height = len(title_lines) * _line_height(title_font) + (margin if title else 0)
    row_height = panel_size + label_height + margin
    canvas = Image.new("RGB", (width, title_height + rows * row_height + margin), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    y = margin
    for line in title_lines:
        draw.text((margin, y), line, fill=TEXT_COLOR, font=title_font)
        y += _line_height(title_font)
    for index, (image, lines, color) in enumerate(zip(images, wrapped, colors)):
        row, column = divmod(index, columns)
        left, top = margin + column * (panel_size + margin), title_height + margin + row * row_height
        panel = _fit(image, panel_size)
        canvas.paste(panel, (left + (panel_size - panel.width) // 2, top + (panel_size - panel.height) // 2))
        for number, line in enumerate(lines):
            position = (left, top + panel_size + number * line_height)
            draw.text(position, line, fill=color or TEXT_COLOR, font=font)
    return canvas


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def stack_vertically(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures one under the other, left-aligned on a white canvas (e.g. a retrieval grid above a VQA grid)."""
    if not pictures:
        raise ValueError("stack_vertically needs at least one picture")
    width = max(picture.width for picture in pictures)
    height = sum(picture.height for picture in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    y = 0
    for picture in pictures:
        canvas.paste(picture.convert("RGB"), (0, y))
        y += picture.height + gap
    return canvas


def grounding_figure(
    image: Image.Image,
    phrase_map,
    word_maps: Sequence[tuple[str, object]] = (),
    text: str | None = None,
    score: float | None = None,
    columns: int = 6,
    panel_size: int = 192,
    cmap: str = DEFAULT_CMAP,
    shared_scale: bool = False,
) -> Image.Image:
    """The grounding picture: the image, the whole-text map over it, then one panel per word.

    `phrase_map` and each map of `word_maps` (`(word, map)` pairs, see `merge_word_pieces`) are Grad-CAM grids.
    Each map is scaled to its own maximum, as the original notebook does; `shared_scale=True` puts the word maps
    on one scale instead, so that words the model hardly grounds stay faint. `score` (the ITM match probability)
    goes into the title.
    """
    shown = _fit(image, panel_size)
    scale = None
    if shared_scale and word_maps:
        scale = max(float(np.ptp(_to_numpy(heat))) for _, heat in word_maps)
    panels = [shown, overlay_heatmap(shown, phrase_map, cmap)]
    labels = ["image", "whole text" if word_maps else (text or "whole text")]
    for word, heat in word_maps:
        panels.append(overlay_heatmap(shown, heat, cmap, scale=scale))
        # A flat map has nothing to show (e.g. a word the read layer does not pass on to the ITM head).
        labels.append(word if np.ptp(_to_numpy(heat)) > 0 else f"{word} (flat map)")
    title = None
    if text is not None:
        title = f'Grad-CAM grounding of "{text}"'
        if score is not None:
            title += f"  (ITM match probability {score:.2f})"
    return image_grid(panels, labels, columns=columns, panel_size=panel_size, title=title)


@dataclass
class GroundingResult:
    """What `ground` computed: the (cleaned) text, its words with their maps, the whole-text map, the ITM match
    probability (ITM mode) and the picture."""

    text: str
    words: list[str]
    word_maps: list[np.ndarray]
    phrase_map: np.ndarray
    match_probability: float | None
    figure: Image.Image

    def save(self, path: str | Path) -> Path:
        """Write the picture (format from the suffix, PNG without one), all at once: it goes to a temporary sibling
        that is renamed over `path`, so a failure (a full disk, an interrupt) leaves an earlier picture as it was."""
        return save_image_atomically(self.figure, path)


def save_image_atomically(picture: Image.Image, path: str | Path) -> Path:
    """`picture.save(path)` through a temporary sibling and a rename; the temporary file never stays behind."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture_format = None
    if path.suffix:
        Image.init()
        picture_format = Image.EXTENSION.get(path.suffix.lower())
        if picture_format is None:
            raise ValueError(f"cannot write {path}: unknown picture format {path.suffix!r} (use e.g. .png or .jpg)")
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(descriptor)
    try:
        picture.save(temp, format=picture_format or "PNG")
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(temp, 0o666 & ~mask)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def ground(
    model,
    processor,
    image: Image.Image,
    text: str,
    mode: str = "itm",
    layer: int | None = None,
    clean_text: bool = True,
    **figure_kwargs,
) -> GroundingResult:
    """Grad-CAM of `text` on `image` with a retrieval model (`AlbefForRetrieval` or a subclass), drawn by
    `grounding_figure`. ITM mode gives a map per word and the whole-text map; ITC mode only the whole-text map.
    `clean_text` applies the original caption cleaning (lower case, punctuation removed) first."""
    import torch

    from .models.albef.processing_albef import pre_caption

    text = pre_caption(text) if clean_text else text
    if not text.strip():
        raise ValueError("the text to ground is empty")
    inputs = processor(images=image.convert("RGB"), text=text, return_tensors="pt").to(model.device)
    out = model.gradcam(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], mode=mode, layer=layer)
    words, maps, probability = [], [], None
    if out.gradcam_per_token is not None:
        tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        special = processor.tokenizer.all_special_tokens
        merged = merge_word_pieces(tokens, out.gradcam_per_token[0], special_tokens=special)
        words, maps = [word for word, _ in merged], [heat for _, heat in merged]
    if out.itm_logits is not None:
        probability = float(torch.softmax(out.itm_logits[0].float(), dim=-1)[1])
    phrase_map = _to_numpy(out.gradcam[0])
    figure = grounding_figure(image, phrase_map, list(zip(words, maps)), text, probability, **figure_kwargs)
    return GroundingResult(text, words, maps, phrase_map, probability, figure)


__all__ = [
    "GroundingResult",
    "colorize",
    "ground",
    "grounding_figure",
    "image_grid",
    "merge_word_pieces",
    "normalize_heatmap",
    "overlay_heatmap",
    "stack_vertically",
]
