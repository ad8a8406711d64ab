"""Shared pieces of the pre-training tests: a small real image-caption folder, a tiny config, and launchers for the
real entry point (in this process, or under `torchrun` with 2 gloo processes)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tests.tiny_models import tiny_config

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("pretrain_run.py")
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]


def write_pairs(folder: Path, count: int = 16, size: int = 40) -> Path:
    """An imagefolder of `count` PNG drawings (a coloured shape on a background) with captions in metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i in range(count):
            color, shape = COLORS[i % len(COLORS)], SHAPES[i % len(SHAPES)]
            image = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
            draw = ImageDraw.Draw(image)
            box = [size // 5 + i % 3, size // 5, size - size // 5, size - size // 5 - i % 4]
            if shape == "circle":
                draw.ellipse(box, fill=color)
            elif shape == "square":
                draw.rectangle(box, fill=color)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
            image.save(folder / f"{i:03d}.png")
            caption = f"a {color} {shape} on a plain background" + (", drawn by hand" if i % 2 else "")
            handle.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption}) + "\n")
    return folder


def write_config(path: Path, queue_size: int = 16) -> Path:
    """The tiny test model with the real bert-base-uncased vocabulary size (the bundled tokenizer's ids)."""
    tiny_config(text={"vocab_size": 30522}, queue_size=queue_size).to_json_file(str(path))
    return path


def cli_args(data: Path, config: Path, output: Path, **options) -> list[str]:
    """Command-line arguments of a tiny run: 32 px, 2 pairs per process, no data workers, log every step."""
    values = {
        "train-data": data,
        "config": config,
        "output-dir": output,
        "image-size": 32,
        "batch-size": 2,
        "num-workers": 0,
        "logging-steps": 1,
        "warmup-steps": 2,
        "save-final-model": False,
        **{key.replace("_", "-"): value for key, value in options.items()},
    }
    args = []
    for key, value in values.items():
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            args += [f"--{key}", "false"]
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], record_dir: Path, nproc: int = 2, timeout: int = 120, **runner_options):
    """`torchrun --nproc_per_node nproc tests/training/pretrain_run.py ...` (gloo on CPU, one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    options = [f"--record-dir={record_dir}"] + [f"--{k.replace('_', '-')}={v}" for k, v in runner_options.items()]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(RUNNER),
        *options,
        "--",
        *map(str, args),
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def records(record_dir: Path, rank: int) -> dict[int, dict]:
    """What `pretrain_run.py` recorded on process `rank`, by step."""
    found = {}
    for path in sorted(record_dir.glob(f"rank{rank}-step*.pt")):
        item = torch.load(path, weights_only=True)
        found[item["step"]] = item
    return found


def reset_accelerate():
    """Forget accelerate's process-wide state (AcceleratorState, GradientState)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def fresh_accelerate():
    """Run in-process accelerate code from a clean process-wide state (earlier tests, e.g. Trainer ones, may have set
    it up differently) and leave it clean."""
    reset_accelerate()
    try:
        yield
    finally:
        reset_accelerate()
