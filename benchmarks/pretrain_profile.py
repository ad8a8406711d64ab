"""Where the time of one pre-training step goes (issue 17: the step ran at 8.5 % MFU in bf16 on an H100).

    python benchmarks/pretrain_profile.py                                   # CPU: base model @256, batch 4, fp32
    python benchmarks/pretrain_profile.py --device cuda --dtype bf16 --batch 64   # the issue's step on a GPU
    python benchmarks/pretrain_profile.py --size tiny --output /tmp/x.md    # smoke run (seconds)

One step as `albef-pretrain` runs it (the collator's MLM masks made beforehand on the host; forward with the three
losses and momentum distillation, `hard_negatives="sample"`; backward; fused AdamW from `create_optimizer`;
`zero_grad`), after `--warmup` untimed steps, under `torch.profiler`. Ranges are opened around the step's phases and,
by module hooks, around each tower call: the online vision tower, the online text model per mode ("text" = the text
encoder, "fusion" = ITM's fusion layers, "multimodal" = the MLM's full pass), the momentum towers (no grad), the MLM
heads, the momentum EMA update and the queue update. A tower's range holds what it dispatches (on a GPU: the kernels
it launches), so the rest of the forward is the losses' own arithmetic. Backward is one range (autograd runs it).

Columns: CPU ms is the host time inside the range (on a CPU run: all of the work); on a GPU, device ms sums the
kernels the range launched, so host ms close to or above device ms says that range is bound by the host. Ops: aten
operators dispatched in the range. The top-operator table sorts by self time (CPU run: CPU; GPU run: device).
GFLOP: `torch.utils.flop_counter` over one step.

The tables go to stdout and into the `<!-- pretrain-profile:DEVICE -->` section of `--output` (default: BENCHMARKS.md
at the repository root); the rest of that file is kept.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))  # speed.py, host_overhead.py: shared helpers
import sections  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_config(size: str, image_size: int):
    if size == "skeleton":
        from host_overhead import make_config as skeleton

        config = skeleton("skeleton")
    else:
        from speed import make_config as speed_config

        config = speed_config(size, image_size)
    config.distill = True
    return config


class Ranges:
    """`torch.profiler.record_function` ranges opened and closed by module hooks: `name(module)` gives each call's
    range name (None: no range)."""

    def __init__(self):
        self.handles = []
        self.open = collections.defaultdict(list)

    def watch(self, module: torch.nn.Module, name):
        def pre(mod, args, kwargs):
            label = name(kwargs)
            if label:
                scope = torch.profiler.record_function(label)
                scope.__enter__()
                self.open[id(mod)].append(scope)

        def post(mod, args, kwargs, output):
            if self.open[id(mod)]:
                self.open[id(mod)].pop().__exit__(None, None, None)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def wrap(self, owner, attribute: str, label: str):
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)
        self.handles.append(_Restore(owner, attribute))

    def remove(self):
        for handle in self.handles:
            handle.remove()


class _Restore:
    def __init__(self, owner, attribute):
        self.owner, self.attribute = owner, attribute

    def remove(self):
        with contextlib.suppress(AttributeError):
            delattr(self.owner, self.attribute)  # the instance attribute: the class method shows through again


def text_range(prefix):
    return lambda kwargs: f"{prefix} text model [{kwargs.get('mode', 'multimodal')}]"


def instrument(model) -> Ranges:
    ranges = Ranges()
    ranges.watch(model.vision_model, lambda kwargs: "online vision tower")
    ranges.watch(model.text_model, text_range("online"))
    ranges.watch(model.mlm_head, lambda kwargs: "online MLM head")
    ranges.watch(model.itm_head, lambda kwargs: "ITM head")
    momentum = model.momentum
    ranges.watch(momentum.vision_model, lambda kwargs: "momentum vision tower")
    ranges.watch(momentum.text_model, text_range("momentum"))
    ranges.watch(momentum.mlm_head, lambda kwargs: "momentum MLM head")
    ranges.wrap(momentum, "update", "momentum EMA update")
    ranges.wrap(momentum, "enqueue", "queue enqueue")
    return ranges


PHASES = ("step", "forward", "backward", "optimizer step", "zero_grad")


def build(args):
    from speed import random_texts

    import transformers_albef as ta
    from transformers_albef.models.albef.modeling_albef import mask_tokens
    from transformers_albef.training.optim import create_optimizer

    device = torch.device(args.device)
    config = make_config(args.size, args.image_size)
    if config.queue_size % args.batch:
        config.queue_size = args.batch * max(1, config.queue_size // args.batch)
    torch.manual_seed(0)
    model = ta.AlbefForPreTraining(config).to(device).train()
    model.set_attn_implementation(args.attn)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = create_optimizer(model, lr=1e-5)
    g = torch.Generator().manual_seed(5)
    size = config.vision_config.image_size
    pixel_values = torch.randn(args.batch, 3, size, size, generator=g)
    ids, mask = random_texts(args.batch, 25, config.text_config.vocab_size, "cpu", seed=6, min_length=8)
    tc = config.text_config
    torch.manual_seed(1)
    masked, labels = mask_tokens(ids, tc.vocab_size, config.mlm_probability, tc.pad_token_id, tc.cls_token_id,
                                 tc.mask_token_id)  # fmt: skip
    batch = [t.to(device) for t in (pixel_values, ids, mask, masked, labels)]
    autocast = DTYPES[args.dtype]

    def step():
        with torch.profiler.record_function("step"):
            with torch.profiler.record_function("forward"):
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    loss = model(*batch[:3], return_loss=True, masked_input_ids=batch[3], mlm_labels=batch[4],
                                 alpha=0.4, hard_negatives="sample").loss  # fmt: skip
            with torch.profiler.record_function("backward"):
                loss.backward()
            with torch.profiler.record_function("optimizer step"):
                optimizer.step()
            with torch.profiler.record_function("zero_grad"):
                optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, config


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def profile(args):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode

    model, step, config = build(args)
    for _ in range(args.warmup):
        step()
    synchronize(args.device)
    # Wall time of the step without the profiler (its ranges and hooks cost host time).
    walls = []
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        step()
        synchronize(args.device)
        walls.append(time.perf_counter() - start)
    with FlopCounterMode(display=False) as flops:
        step()
    ranges = instrument(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    try:
        with torch_profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            synchronize(args.device)
    finally:
        ranges.remove()
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    return prof, sorted(walls)[len(walls) // 2], float(flops.get_total_flops()), peak, config


def _device_total(event) -> float:
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def _device_self(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def tables(prof, steps: int, gpu: bool) -> tuple[list[str], list[str], float]:
    """(phase/range table, top-operator table, step CPU ms)."""
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}
    # Operators dispatched inside each range: top-level aten events (no aten ancestor) under it. Backward's run on
    # autograd's thread, under its engine's events instead of the Python ranges: they are credited to `backward`.
    ops_in = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if any(name.startswith("aten::") for name in ancestors):
            continue
        names = {name for name in ancestors}
        if any(name.startswith("autograd::engine::evaluate_function") for name in ancestors):
            names |= {"backward", "step"}
        for name in names:
            ops_in[name] += 1
    step_cpu = by_name["step"].cpu_time_total / 1e3 / steps if "step" in by_name else float("nan")
    step_dev = _device_total(by_name["step"]) / 1e3 / steps if "step" in by_name else 0.0
    ours = (" tower", " text model", " head", "momentum EMA update", "queue enqueue")
    names = list(PHASES) + sorted(
        (k for k in by_name if k not in PHASES and not k.startswith("aten::") and any(part in k for part in ours)),
        key=lambda k: -by_name[k].cpu_time_total,
    )  # fmt: skip
    header = "| range | calls per step | ops | CPU ms | % of step (CPU) |"
    header += " device ms | % of step (device) |" if gpu else ""
    lines = [header, "|---|---:|---:|---:|---:|" + ("---:|---:|" if gpu else "")]
    for name in names:
        if name not in by_name:
            continue
        e = by_name[name]
        cpu = e.cpu_time_total / 1e3 / steps
        row = f"| {name} | {e.count / steps:g} | {ops_in[name] / steps:,.0f} | {cpu:,.1f} | {cpu / step_cpu:.1%} |"
        if gpu:
            dev = _device_total(e) / 1e3 / steps
            row += f" {dev:,.1f} | {dev / step_dev if step_dev else float('nan'):.1%} |"
        lines.append(row)
    inside = [n for n in names if n not in PHASES and n in by_name]
    if "forward" in by_name and inside:
        forward = by_name["forward"]
        cpu = (forward.cpu_time_total - sum(by_name[n].cpu_time_total for n in inside)) / 1e3 / steps
        ops = (ops_in["forward"] - sum(ops_in[n] for n in inside)) / steps
        row = f"| forward outside those ranges (losses, masks, hard negatives) | - | {ops:,.0f} | {cpu:,.1f} | "
        row += f"{cpu / step_cpu:.1%} |"
        if gpu:
            dev = (_device_total(forward) - sum(_device_total(by_name[n]) for n in inside)) / 1e3 / steps
            row += f" {dev:,.1f} | {dev / step_dev if step_dev else float('nan'):.1%} |"
        lines.append(row)
    # Top operators by self time.
    aten = [e for e in averages if e.key.startswith("aten::")]
    key = (lambda e: _device_self(e)) if gpu else (lambda e: e.self_cpu_time_total)
    total_self = sum(key(e) for e in aten) or 1.0
    top = sorted(aten, key=key, reverse=True)[:15]
    kind = "device" if gpu else "CPU"
    op_lines = [f"| operator | calls per step | self {kind} ms | share of the operators' {kind} time |",
                "|---|---:|---:|---:|"]  # fmt: skip
    for e in top:
        op_lines.append(
            f"| `{e.key}` | {e.count / steps:g} | {key(e) / 1e3 / steps:,.1f} | {key(e) / total_self:.1%} |"
        )
    calls = sum(e.count for e in aten) / steps
    op_lines.append(f"| all {len(aten)} operators | {calls:,.0f} | {total_self / 1e3 / steps:,.1f} | 100% |")
    return lines, op_lines, step_cpu


def section(args, prof, wall, flops, peak, config, elapsed) -> tuple[str, str]:
    import transformers

    import transformers_albef

    gpu = args.device.startswith("cuda")
    key = "gpu" if gpu else "cpu"
    if gpu:
        hardware = torch.cuda.get_device_name()
    else:
        hardware = platform.processor() or platform.machine()
        with contextlib.suppress(OSError, AttributeError):
            hardware = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
        hardware += f", {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    vision, text = config.vision_config, config.text_config
    model = (f"{args.size}: ViT {vision.num_hidden_layers} x {vision.hidden_size} @{vision.image_size} px, text "
             f"{text.num_hidden_layers} x {text.hidden_size} (fusion from layer {text.fusion_layer}), vocabulary "
             f"{text.vocab_size:,}, queue {config.queue_size:,}")  # fmt: skip
    ranges, ops, step_cpu = tables(prof, args.steps, gpu)
    rate = flops / wall / 1e9
    memory = f"; peak memory {peak / 2**30:.1f} GiB" if peak else ""
    lines = [
        f"## Where a pre-training step's time goes ({key.upper()}, {args.size})",
        "",
        f"- date: {datetime.date.today().isoformat()}; commit {sections.commit()}",
        f"- device: {hardware}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, transformers-albef {transformers_albef.__version__}",
        f"- model: {model}; random weights, batch {args.batch}, 25-token captions, {args.dtype}"
        f"{' autocast' if args.dtype != 'fp32' else ''}, {args.attn} attention, fused AdamW"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}",
        f"- command: `python benchmarks/pretrain_profile.py {' '.join(sys.argv[1:])}`; wall time {elapsed:.0f} s",
        *[f"- note: {note}" for note in args.note],
        "",
        f"One step: {wall * 1e3:,.0f} ms (median of {args.repeats}, without the profiler), {flops / 1e9:,.1f} GFLOP "
        f"({rate:,.1f} GFLOP/s){memory}. Under the profiler ({args.steps} step(s)), per step:",
        "",
        *ranges,
        "",
        "Ranges nest: the towers, heads, EMA and enqueue ranges lie inside `forward` (the online towers' backward is "
        "in `backward`). Top operators by self time:",
        "",
        *ops,
    ]
    return key, "\n".join(lines) + "\n"


def write_section(path: Path, key: str, body: str) -> None:
    sections.write_section(path, f"pretrain-profile:{key}", body)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("base", "skeleton", "tiny"), default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on the CPU, 64 on a GPU")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: CPU 1, GPU 10)")
    parser.add_argument("--steps", type=int, default=1, help="profiled steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (64 if gpu else 4)
    args.repeats = args.repeats or (10 if gpu else 1)
    if args.size == "tiny" and args.image_size == 256:
        args.image_size = 32
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    prof, wall, flops, peak, config = profile(args)
    key, body = section(args, prof, wall, flops, peak, config, time.time() - started)
    print(body)
    if not args.no_write:
        write_section(args.output, key, body)
        print(f"wrote the pretrain-profile:{key} section of {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
