"""The largest pre-training batch that fits on the GPU, with and without gradient checkpointing, and the step's
memory and speed at each batch (issue 17: batch 64 @256 took 19.4 GB in bf16; the target is <= 14 GB).

    python benchmarks/pretrain_batch.py --device cuda                      # base model @256, bf16 autocast, sdpa
    python benchmarks/pretrain_batch.py --size tiny --device cpu --batches 2,4 --output /tmp/x.md   # smoke run

One model (AlbefForPreTraining, random weights, fused AdamW as `create_optimizer` makes it) takes steps of growing
batch size (`--batches`, powers of two: the queue of 65,536 features takes a whole number of batches), first without,
then with gradient checkpointing (`activation_checkpointing_enable`, non-reentrant, as `albef-pretrain
--gradient-checkpointing`), until a step runs out of memory or `--time-budget` is spent. Each batch: one untimed step
(allocations), then `--repeats` timed steps. Peak: `torch.cuda.max_memory_allocated` over the timed steps, weights,
gradients and AdamW state included. The memory per sample (the slope between the two largest batches that fit)
projects the largest batch that would fit the device.

The table goes to stdout and into the `<!-- pretrain-batch:DEVICE -->` section of `--output` (default: BENCHMARKS.md
at the repository root); the rest of that file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))  # speed.py's helpers
import sections  # noqa: E402


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> tuple[list[dict], str]:
    from speed import make_config, random_texts

    import transformers_albef as ta
    from transformers_albef.models.albef.modeling_albef import mask_tokens
    from transformers_albef.training.optim import create_optimizer

    device = torch.device(args.device)
    config = make_config(args.size, args.image_size)
    config.distill = True
    torch.manual_seed(0)
    model = ta.AlbefForPreTraining(config).to(device).train()
    model.set_attn_implementation(args.attn)
    optimizer = create_optimizer(model, lr=1e-5)
    autocast = DTYPES[args.dtype]
    tc = config.text_config
    size = config.vision_config.image_size
    started = time.time()
    rows = []

    def step(batch):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(*batch[:3], return_loss=True, masked_input_ids=batch[3], mlm_labels=batch[4],
                         hard_negatives="sample").loss  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    stopped = ""
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for batch_size in args.batches:
            if args.time_budget is not None and time.time() - started > args.time_budget:
                stopped = f"time budget of {args.time_budget:.0f} s spent"
                break
            if config.queue_size % batch_size:
                continue
            g = torch.Generator().manual_seed(batch_size)
            pixel_values = torch.randn(batch_size, 3, size, size, generator=g)
            ids, mask = random_texts(batch_size, 25, tc.vocab_size, "cpu", seed=6, min_length=8)
            masked, labels = mask_tokens(ids, tc.vocab_size, config.mlm_probability, tc.pad_token_id,
                                         tc.cls_token_id, tc.mask_token_id)  # fmt: skip
            batch = [t.to(device) for t in (pixel_values, ids, mask, masked, labels)]
            row = {"checkpointing": checkpointing, "batch": batch_size}
            try:
                step(batch)
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(args.repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    step(batch)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                row["seconds"] = statistics.median(times)
                row["peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            except torch.OutOfMemoryError:
                row["oom"] = True
            finally:
                optimizer.zero_grad(set_to_none=True)
                del batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            if row.get("oom"):
                break
        if stopped:
            break
    return rows, stopped


def project(rows: list[dict], capacity: float | None) -> str:
    fits = [r for r in rows if not r.get("oom") and r.get("peak")]
    if len(fits) < 2 or not capacity:
        return "-"
    a, b = fits[-2], fits[-1]
    per_sample = (b["peak"] - a["peak"]) / (b["batch"] - a["batch"])
    if per_sample <= 0:
        return "-"
    fixed = b["peak"] - per_sample * b["batch"]
    return f"~{int((capacity - fixed) / per_sample):,} ({per_sample / 2**20:,.0f} MiB per sample)"


def section(args, rows, stopped, elapsed) -> tuple[str, str]:
    import transformers

    import transformers_albef

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    capacity = torch.cuda.get_device_properties(device).total_memory if gpu else None
    hardware = f"{torch.cuda.get_device_name(device)}, {capacity / 2**30:.0f} GiB" if gpu else platform.machine()
    lines = [
        f"## The largest pre-training batch, with and without gradient checkpointing ({device.type.upper()}, "
        f"{args.size})",
        "",
        f"- date: {datetime.date.today().isoformat()}; device: {hardware}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, transformers-albef {transformers_albef.__version__}",
        f"- model: `speed.make_config('{args.size}')` @{args.image_size} px, random weights, 25-token captions, "
        f"{args.dtype}{' autocast' if args.dtype != 'fp32' else ''}, {args.attn} attention, fused AdamW",
        f"- command: `python benchmarks/pretrain_batch.py {' '.join(sys.argv[1:])}`; wall time {elapsed:.0f} s"
        + (f"; stopped: {stopped}" if stopped else ""),
        *[f"- note: {note}" for note in args.note],
        "",
        "| gradient checkpointing | batch | step ms | samples/s | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ckpt = "yes" if r["checkpointing"] else "no"
        if r.get("oom"):
            lines.append(f"| {ckpt} | {r['batch']} | out of memory | - | - |")
            continue
        peak = f"{r['peak'] / 2**30:,.1f}" if r.get("peak") else "-"
        lines.append(
            f"| {ckpt} | {r['batch']} | {r['seconds'] * 1e3:,.0f} | {r['batch'] / r['seconds']:,.1f} | {peak} |"
        )
    lines.append("")
    for ckpt in (False, True):
        mine = [r for r in rows if r["checkpointing"] == ckpt]
        fits = [r["batch"] for r in mine if not r.get("oom")]
        if fits:
            lines.append(
                f"- {'with' if ckpt else 'without'} checkpointing: largest batch run {max(fits)}"
                + (" (the next one ran out of memory)" if any(r.get("oom") for r in mine) else "")
                + f"; projected largest that fits: {project(mine, capacity)}"
            )
    return device.type, "\n".join(lines) + "\n"


def write_section(path: Path, key: str, body: str) -> None:
    sections.write_section(path, f"pretrain-batch:{key}", body)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "base"), default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="autocast (default: bf16 on a GPU)")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--image-size", type=int, default=None, help="default 256 (tiny: 32)")
    parser.add_argument("--batches", default="64,128,256,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds: no new batch size after them")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    args.image_size = args.image_size or (32 if args.size == "tiny" else 256)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.time()
    rows, stopped = run(args)
    key, body = section(args, rows, stopped, time.time() - started)
    print(body)
    if not args.no_write:
        write_section(args.output, key, body)
        print(f"wrote the pretrain-batch:{key} section of {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
