"""Small real image files and annotation files in ALBEF's formats, written into a test's tmp_path."""

import json
from pathlib import Path

import numpy as np
import PIL.Image


def write_images(folder: Path, seed: int = 0) -> dict[str, Path]:
    """
    Writes a few small images of different sizes, modes and formats, plus `corrupt.jpg` (not an image) and
    `truncated.jpg` (a JPEG cut in half). Returns name -> path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    specs = {
        "red.png": ((40, 30), "RGB"),
        "green.jpg": ((48, 48), "RGB"),
        "blue.png": ((36, 52), "RGB"),
        "gray.png": ((33, 41), "L"),
        "alpha.png": ((44, 28), "RGBA"),
        "big.jpg": ((80, 64), "RGB"),
    }
    for name, ((width, height), mode) in specs.items():
        bands = len(mode)
        pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
        image = PIL.Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode)
        image.save(folder / name)
        paths[name] = folder / name
    (folder / "corrupt.jpg").write_bytes(b"this is not a JPEG file at all")
    paths["corrupt.jpg"] = folder / "corrupt.jpg"
    data = (folder / "big.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    paths["truncated.jpg"] = folder / "truncated.jpg"
    return paths


def write_json(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
