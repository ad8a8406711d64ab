"""Image transforms of ALBEF's training and evaluation, and its RandAugment variant, on PIL images.

The original augments with its own RandAugment (`dataset/randaugment.py`, OpenCV on numpy arrays). `RandAugment`
below keeps its semantics on PIL images: the same ops, magnitude mapping, probabilities, fill value and order of
random draws, and the same pixel geometry (OpenCV's affine conventions are converted to PIL's, see
`_affine_like_opencv`; outputs match the original's within one grey level). Random draws come from torch's
generator, so `torch.manual_seed` (and the per-worker seeding of `DataLoader`) makes the whole training transform
reproducible.

By default two ops follow the semantics the original intends (PIL's) rather than its uint8 overflows, which
`RandAugment(wrap_overflow=True)` reproduces: its AutoContrast turns every channel whose minimum is above 0 white,
and its Sharpness wraps values past 0/255 around.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch
from PIL import ImageEnhance, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..models.albef.image_processing_albef import AlbefImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The op list every ALBEF training transform uses (pre-training, fine-tuning, grounding).
ALBEF_RANDAUGMENT_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
PRETRAIN_SCALE = (0.2, 1.0)
FINETUNE_SCALE = (0.5, 1.0)

# Magnitude mapping of the original, at `level` out of `max_level`:
#   Brightness / Sharpness factor  0.1 + 1.8 * level / max_level   (1.36 at level 7: always a boost, never a cut)
#   Shear                          0.3 * level / max_level          (0.21), random sign
#   Translate                      10 * level / max_level PIXELS    (7 px whatever the image size), random sign
#   Rotate                         30 * level / max_level DEGREES   (21), random sign
_SIGNED_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


def _affine_like_opencv(image: PIL.Image.Image, matrix: np.ndarray, fill) -> PIL.Image.Image:
    """
    Applies the 2x3 forward matrix `matrix` as `cv2.warpAffine(img, matrix, (W, H), INTER_LINEAR,
    borderValue=fill)` does (the original's ops), to within one grey level: output pixel `matrix @ (x, y, 1)`
    takes input pixel `(x, y)`.

    - OpenCV puts pixel centres on integer coordinates and PIL on half-integers, and PIL wants the inverse map:
      the matrix is inverted and its offset shifted by half a pixel.
    - A one-pixel frame of `fill` makes samples between the image and the outside blend with `fill`, as
      OpenCV's constant border does (PIL alone would clamp to the edge pixel).
    - Each band is resampled in float and rounded, as OpenCV rounds (PIL's 8-bit path truncates).
    """
    linear, offset = matrix[:, :2].astype(np.float64), matrix[:, 2].astype(np.float64)
    inverse = np.linalg.inv(linear)
    # +1: coordinates inside the framed image.
    inverse_offset = -inverse @ offset + 0.5 * (1.0 - inverse.sum(axis=1)) + 1.0
    data = (inverse[0, 0], inverse[0, 1], inverse_offset[0], inverse[1, 0], inverse[1, 1], inverse_offset[1])
    bands = image.split()
    fill = _per_band(fill, len(bands))
    out = []
    for band, value in zip(bands, fill):
        framed = PIL.Image.new("F", (image.width + 2, image.height + 2), float(value))
        framed.paste(band.convert("F"), (1, 1))
        warped = framed.transform(
            image.size, PIL.Image.Transform.AFFINE, data, PIL.Image.Resampling.BILINEAR, fillcolor=float(value)
        )
        out.append(PIL.Image.fromarray(np.clip(np.rint(np.asarray(warped)), 0, 255).astype(np.uint8)))
    return PIL.Image.merge(image.mode, out)


def _per_band(fill, num_bands: int) -> tuple:
    fill = (fill,) if isinstance(fill, (int, float)) else tuple(fill)
    return fill if len(fill) == num_bands else (fill[0],) * num_bands


def identity(image: PIL.Image.Image) -> PIL.Image.Image:
    return image


def auto_contrast(image: PIL.Image.Image, wrap_overflow: bool = False) -> PIL.Image.Image:
    """
    Stretches each channel linearly so that its minimum maps to 0 and its maximum to 255 (no cut-off).

    `wrap_overflow=True` reproduces the original's uint8 overflow instead: it computes the offset `-low * scale`
    on a uint8 minimum, which wraps to `(256 - low) * scale` (> 255), so every channel whose minimum is above 0
    becomes 255 everywhere (only channels that already reach 0 are stretched).
    """
    if not wrap_overflow:
        return ImageOps.autocontrast(image, cutoff=0)
    bands = []
    for band in image.split():
        low, high = band.getextrema()
        bands.append(PIL.Image.new("L", band.size, 255) if 0 < low < high else ImageOps.autocontrast(band))
    return PIL.Image.merge(image.mode, bands)


def equalize(image: PIL.Image.Image) -> PIL.Image.Image:
    """Histogram equalisation per channel, PIL's formula (which the original reimplements)."""
    return ImageOps.equalize(image)


def brightness(image: PIL.Image.Image, factor: float) -> PIL.Image.Image:
    """Multiplies every value by `factor`, truncating to an integer and saturating at 255 (the original's table)."""
    table = np.minimum(np.arange(256, dtype=np.float32) * np.float32(factor), 255).astype(np.uint8).tolist()
    return image.point(table * len(image.getbands()))


def sharpness(image: PIL.Image.Image, factor: float, wrap_overflow: bool = False) -> PIL.Image.Image:
    """
    Blends the image with its 3x3 smoothed version (centre weight 5 of 13) by `factor`, leaving the one-pixel
    border unchanged, and saturates at 0 and 255. `wrap_overflow=True` reproduces the original's cast without
    saturation: values past 0/255 are truncated and wrap around modulo 256.
    """
    if not wrap_overflow:
        return ImageEnhance.Sharpness(image).enhance(factor)
    smooth = np.asarray(image.filter(ImageFilter.SMOOTH), dtype=np.float32)
    out = np.array(image, dtype=np.float32)
    inner = (slice(1, -1), slice(1, -1))
    out[inner] = smooth[inner] + np.float32(factor) * (out[inner] - smooth[inner])
    return PIL.Image.fromarray((np.trunc(out).astype(np.int64) % 256).astype(np.uint8), image.mode)


def shear_x(image: PIL.Image.Image, shear: float, fill=(128, 128, 128)) -> PIL.Image.Image:
    """Moves row y by `shear * y` pixels to the right (the top row stays)."""
    return _affine_like_opencv(image, np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]), fill)


def shear_y(image: PIL.Image.Image, shear: float, fill=(128, 128, 128)) -> PIL.Image.Image:
    """Moves column x by `shear * x` pixels down (the left column stays)."""
    return _affine_like_opencv(image, np.array([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]]), fill)


def translate_x(image: PIL.Image.Image, pixels: float, fill=(128, 128, 128)) -> PIL.Image.Image:
    """Moves the content `pixels` to the LEFT (the original's sign convention)."""
    return _affine_like_opencv(image, np.array([[1.0, 0.0, -pixels], [0.0, 1.0, 0.0]]), fill)


def translate_y(image: PIL.Image.Image, pixels: float, fill=(128, 128, 128)) -> PIL.Image.Image:
    """Moves the content `pixels` UP (the original's sign convention)."""
    return _affine_like_opencv(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -pixels]]), fill)


def rotate(image: PIL.Image.Image, degrees: float, fill=(128, 128, 128)) -> PIL.Image.Image:
    """
    Rotates counter-clockwise by `degrees` about (W/2, H/2) in OpenCV's pixel coordinates (half a pixel right of
    and below the true centre, as the original), keeping the size.
    """
    width, height = image.size
    cx, cy = width / 2, height / 2
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix = np.array([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]])
    return _affine_like_opencv(image, matrix, fill)


class RandAugment:
    """
    ALBEF's RandAugment on PIL images: draw `num_ops` ops uniformly **with replacement** from `ops`, then apply each
    with probability `prob` at magnitude `magnitude` / `max_level` (geometric ops with a random sign, filled with
    `fill`). The defaults are the original's `RandomAugment(2, 7, isPIL=True, augs=[...])` with its ten ops.

    Args:
        num_ops (`int`, defaults to 2): ops drawn per image (the original's `N`).
        magnitude (`float`, defaults to 7): the original's `M`, out of `max_level`.
        ops (`Sequence[str]`, *optional*): op names, a subset of `RandAugment.OPS`; defaults to ALBEF's ten.
        prob (`float`, defaults to 0.5): probability of applying each drawn op.
        fill (`tuple[int, int, int]`, defaults to (128, 128, 128)): value of the pixels geometric ops uncover.
        max_level (`float`, defaults to 10).
        translate_pixels (`float`, defaults to 10): translation at `max_level`, in pixels (not a fraction).
        wrap_overflow (`bool`, defaults to `False`): reproduce the original's two uint8 overflows (AutoContrast
            whitens channels whose minimum is above 0; Sharpness wraps values past 0/255) instead of the intended
            PIL semantics.
        generator (`torch.Generator`, *optional*): source of the random draws; torch's global one by default, so
            `torch.manual_seed` and `DataLoader`'s per-worker seeds apply.
    """

    OPS: dict[str, Callable] = {
        "Identity": identity,
        "AutoContrast": auto_contrast,
        "Equalize": equalize,
        "Brightness": brightness,
        "Sharpness": sharpness,
        "ShearX": shear_x,
        "ShearY": shear_y,
        "TranslateX": translate_x,
        "TranslateY": translate_y,
        "Rotate": rotate,
    }

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 7,
        ops: Sequence[str] = ALBEF_RANDAUGMENT_OPS,
        prob: float = 0.5,
        fill: tuple[int, int, int] = (128, 128, 128),
        max_level: float = 10,
        translate_pixels: float = 10,
        wrap_overflow: bool = False,
        generator: torch.Generator | None = None,
    ):
        unknown = [op for op in ops if op not in self.OPS]
        if unknown or not ops:
            raise ValueError(f"Unknown RandAugment ops {unknown}; choose from {sorted(self.OPS)}.")
        self.num_ops, self.magnitude, self.ops, self.prob = num_ops, magnitude, tuple(ops), prob
        self.fill, self.max_level, self.translate_pixels = tuple(fill), max_level, translate_pixels
        self.wrap_overflow, self.generator = wrap_overflow, generator

    def op_arguments(self, name: str, negative: bool = False) -> tuple:
        """The magnitude argument(s) `OPS[name]` takes after the image at this magnitude."""
        level = self.magnitude / self.max_level
        sign = -1.0 if negative else 1.0
        if name in ("Brightness", "Sharpness"):
            return (0.1 + 1.8 * level,)
        if name in ("ShearX", "ShearY"):
            return (sign * 0.3 * level,)
        if name in ("TranslateX", "TranslateY"):
            return (sign * self.translate_pixels * level,)
        if name == "Rotate":
            return (sign * 30.0 * level,)
        return ()

    def _uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def sample(self) -> list[tuple[str, tuple]]:
        """
        Draws the ops applied to one image, with their arguments: the op names first, then for each a coin
        (`prob`) and, for geometric ops that are applied, a sign (the original's order of draws).
        """
        chosen = torch.randint(len(self.ops), (self.num_ops,), generator=self.generator).tolist()
        plan = []
        for index in chosen:
            name = self.ops[index]
            if self._uniform() >= self.prob:
                continue
            negative = name in _SIGNED_OPS and self._uniform() < 0.5
            plan.append((name, self.op_arguments(name, negative)))
        return plan

    def apply(self, image: PIL.Image.Image, plan: list[tuple[str, tuple]]) -> PIL.Image.Image:
        """Applies a `sample()`d plan."""
        for name, args in plan:
            if name in _SIGNED_OPS:
                image = self.OPS[name](image, *args, fill=self.fill)
            elif name in ("AutoContrast", "Sharpness"):
                image = self.OPS[name](image, *args, wrap_overflow=self.wrap_overflow)
            else:
                image = self.OPS[name](image, *args)
        return image

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"RandAugment works on PIL images, got {type(image).__name__}.")
        return self.apply(image, self.sample())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, prob={self.prob}, "
            f"ops={list(self.ops)}, fill={self.fill}, wrap_overflow={self.wrap_overflow})"
        )


def albef_train_transform(
    image_size: int,
    scale: tuple[float, float] | None = PRETRAIN_SCALE,
    randaugment: bool = True,
    horizontal_flip: bool = True,
) -> T.Compose:
    """
    ALBEF's training transform, PIL image -> normalised (3, image_size, image_size) tensor:
    RandomResizedCrop(image_size, scale, bicubic) -> RandomHorizontalFlip -> RandAugment(2, 7) -> ToTensor ->
    Normalize(CLIP mean/std).

    `scale=(0.2, 1.0)` is pre-training, `(0.5, 1.0)` fine-tuning (`FINETUNE_SCALE`); `scale=None` replaces the crop
    by a square bicubic resize (the grounding transform). The flip does not swap "left"/"right" in the text, as the
    original. Random draws come from torch's global generator.
    """
    if scale is None:
        steps = [T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
    else:
        steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)]
    if horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment:
        steps.append(RandAugment())
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


class AlbefEvalTransform:
    """PIL image -> (3, size, size) tensor through `AlbefImageProcessor` (square bicubic resize, CLIP norm)."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.image_processor = AlbefImageProcessor(size=image_size)

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


def albef_eval_transform(image_size: int) -> AlbefEvalTransform:
    """ALBEF's test transform: exactly `AlbefImageProcessor(size=image_size)` on one image."""
    return AlbefEvalTransform(image_size)


__all__ = [
    "ALBEF_RANDAUGMENT_OPS",
    "CLIP_MEAN",
    "CLIP_STD",
    "FINETUNE_SCALE",
    "PRETRAIN_SCALE",
    "AlbefEvalTransform",
    "RandAugment",
    "albef_eval_transform",
    "albef_train_transform",
]
