"""Host time per call of each user path, and the host synchronisations each call would incur on a GPU, measured on
the CPU (issue 17: text embedding, ITM re-ranking and VQA ran host-bound on an H100).

    python benchmarks/host_overhead.py                        # skeleton model (base depth, tiny widths), 1 thread
    python benchmarks/host_overhead.py --size tiny --output /tmp/x.md   # smoke run (seconds)

The model ("skeleton") has the base config's depth and heads (ViT: 12 layers; text: 6 + 6 fusion layers; answer
decoder: 6 layers; 12 heads) with tiny widths (48 hidden, 4 patches + [CLS] per image, vocabulary 4,096), and the
issue's batch sizes. The computation is then negligible, and a call's time is what Python, transformers and the
dispatcher spend issuing it: the floor under that call's wall time on any device, unless it is captured
(`torch.compile`, CUDA graphs).

Columns:
- host ms: median time of one call (1 torch thread; `--repeats` runs after `--warmup`).
- ops: aten operators dispatched per call, views and metadata excluded: about the kernels a GPU would launch.
- host us/op: host ms / ops.
- DtoH reads: values read from device tensors on the host (`.item()`, `bool()`, `int()`, `.tolist()`, `.cpu()`, ...).
- implicit syncs: operators whose output size depends on device values (`nonzero`, boolean-mask indexing, `unique`,
  `repeat_interleave` with tensor repeats, `torch.equal`, ...): the host waits for the device inside them.
- blocking HtoD: host tensors copied onto the device with `non_blocking=False`; PyTorch synchronises the stream after
  such a copy (`memcpy_and_sync`), so the host waits for the device's queue to drain.
- where: the call sites of the synchronisations (file:line, count per call).

How a CPU run counts GPU synchronisations: a `TorchFunctionMode` follows which tensors would live on the device. The
model's parameters and buffers and the call's input tensors start on it; every result of an operator with a device
tensor among its inputs is on it; a factory (`torch.zeros(..., device=d)`, `torch.tensor(data, device=d)`) is on it
when `d` was read off a device tensor's `.device`; `.to(d)` moves a tensor there and `.cpu()` / `.to("cpu")` back.
The model's input checks take their accelerator branch (`_readable_on_host` answers False for device tensors, as it
does on a GPU), in the timed calls too. Host reads of host tensors (index planning on the CPU) cost nothing and are
not counted.

The table goes to stdout and into the `<!-- host-overhead:cpu -->` section of `--output` (default: BENCHMARKS.md at the
repository root); the rest of that file is kept.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

REPO = Path(__file__).resolve().parent.parent
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))  # speed.py, host_overhead.py: shared helpers
import sections  # noqa: E402

BEGIN, END = "<!-- host-overhead:cpu -->", "<!-- /host-overhead:cpu -->"


def markers(key: str) -> tuple[str, str]:
    return f"<!-- host-overhead:{key} -->", f"<!-- /host-overhead:{key} -->"


PATHS = ("image", "text", "itm", "rank", "generate", "step", "pretrain")
# The performance issue's GPU targets (items per second at its batch sizes, the skeleton's counted ones).
TARGETS = {"image": 4000, "text": 150_000, "itm": 120_000, "rank": 1500, "pretrain": 630}

# What each size runs. "count": the batch sizes (the skeleton) or small ones (tiny), where the operators and
# synchronisations are counted (one call); "time": the batch sizes of the timed calls, small so that the computation
# stays a small part of the time (the operators a call dispatches do not depend on its batch size).
PLANS = {
    "skeleton": dict(
        count=dict(images=128, texts=256, itm_k=256, questions=16, answers=3128, rank_k=128, new_tokens=5,
                   pretrain=64),
        time=dict(images=2, texts=2, itm_k=2, questions=2, answers=3128, rank_k=8, new_tokens=5, pretrain=4),
        repeats=20, pretrain_repeats=5, warmup=2,
    ),
    "tiny": dict(
        count=dict(images=4, texts=8, itm_k=8, questions=2, answers=40, rank_k=8, new_tokens=3, pretrain=4),
        time=dict(images=2, texts=2, itm_k=2, questions=2, answers=40, rank_k=4, new_tokens=3, pretrain=4),
        repeats=3, pretrain_repeats=2, warmup=1,
    ),
}  # fmt: skip


def make_config(size: str):
    import transformers_albef as ta

    if size == "tiny":
        from speed import make_config as speed_config

        config = speed_config("tiny", 32)
        config.queue_size = 16
        return config
    return ta.AlbefConfig(
        text_config=dict(
            vocab_size=4096, hidden_size=48, num_hidden_layers=12, fusion_layer=6, num_attention_heads=12,
            intermediate_size=192, max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=48, num_hidden_layers=12, num_attention_heads=12, intermediate_size=192, image_size=32,
            patch_size=16,
        ),
        embed_dim=16, queue_size=256, decoder_num_hidden_layers=6,
    )  # fmt: skip


# ----- counting what a GPU would synchronise on ---------------------------------------------------------------------
READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__"}
DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal",
                  "allclose"}  # fmt: skip
DEVICE_FACTORIES = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "eye", "linspace",
                    "empty_strided", "randperm", "tensor", "as_tensor", "asarray", "scalar_tensor"}  # fmt: skip
COPYING_FACTORIES = {"tensor", "as_tensor", "asarray"}
HERE = str(Path(__file__).resolve())


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _call_site() -> str:
    """The innermost frame outside torch and this file: the line of the model (or transformers) that synchronises."""
    frame = sys._getframe(2)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(torch_dir) and path != HERE and "contextlib" not in path:
            parts = Path(path).parts
            for anchor in ("transformers_albef", "transformers"):
                if anchor in parts:
                    path = "/".join(parts[parts.index(anchor) :])
                    break
            else:
                path = Path(path).name
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class SyncCounter(TorchFunctionMode):
    """Counts what a call would synchronise on if the tensors marked with `on_device` lived on an accelerator (see
    the module docstring). `counts[kind]`: "DtoH reads", "implicit syncs", "blocking HtoD"; `sites[(kind, site)]`."""

    KINDS = ("DtoH reads", "implicit syncs", "blocking HtoD")

    def __init__(self):
        super().__init__()
        self.device_tensors = WeakIdKeyDictionary()
        self.device_objects: dict[int, torch.device] = {}  # `.device` objects read off device tensors (kept alive)
        self.counts = collections.Counter()
        self.sites = collections.Counter()

    # -- marking
    def on_device(self, *tensors) -> SyncCounter:
        for tensor in tree_flatten(tensors)[0]:
            if isinstance(tensor, torch.Tensor):
                self.device_tensors[tensor] = True
        return self

    def on_device_module(self, module: torch.nn.Module) -> SyncCounter:
        return self.on_device(list(module.parameters()), list(module.buffers()))

    def is_device(self, value) -> bool:
        return isinstance(value, torch.Tensor) and value in self.device_tensors

    def _is_device_target(self, device) -> bool | None:
        """True / False for a device argument that names the accelerator / the host; None when not a device."""
        if isinstance(device, torch.Tensor):
            return self.is_device(device)
        if isinstance(device, torch.device):
            return id(device) in self.device_objects
        if isinstance(device, str):
            return False
        return None

    def _count(self, kind: str):
        self.counts[kind] += 1
        self.sites[(kind, _call_site())] += 1

    def reset(self):
        self.counts.clear()
        self.sites.clear()

    # -- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the `.device` getter
            device = func(*args, **kwargs)
            if self.is_device(args[0]):
                self.device_objects[id(device)] = device
            return device
        inputs = tree_flatten((args, kwargs))[0]
        from_device = any(self.is_device(x) for x in inputs)
        self_tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_device_out = from_device

        htod = None  # a host-to-device copy: counted once its size is known (an empty one copies nothing)
        if name in READS and self.is_device(self_tensor):
            self._count("DtoH reads")
        elif name in ("cpu", "to", "cuda") and self_tensor is not None:
            target = True if name == "cuda" else False if name == "cpu" else None
            if name == "to":
                for value in (*args[1:], kwargs.get("device"), kwargs.get("other")):
                    target = self._is_device_target(value)
                    if target is not None:
                        break
            if target is False and self.is_device(self_tensor):
                self._count("DtoH reads")
                out = func(*args, **kwargs)
                # On the CPU `.to("cpu")` returns the tensor itself; on a GPU it is a new host tensor.
                return out.clone() if out is self_tensor else out
            if target is True and not self.is_device(self_tensor):
                htod = not kwargs.get("non_blocking", False)
                on_device_out = True
        elif name in DATA_DEPENDENT and from_device:
            self._count("implicit syncs")
        elif name == "repeat_interleave" and from_device:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if len(args) == 1 else None)
            if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
                self._count("implicit syncs")
        elif name == "where" and len(args) == 1 and from_device:
            self._count("implicit syncs")
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and self.is_device(self_tensor):
            for index in tree_flatten(args[1])[0] if len(args) > 1 else []:
                if not isinstance(index, torch.Tensor) or index.ndim == 0:
                    continue
                if index.dtype in (torch.bool, torch.uint8):
                    self._count("implicit syncs")  # a boolean mask is turned into indices: nonzero
                elif not self.is_device(index) and index.numel():
                    self._count("blocking HtoD")  # a host index tensor is copied to the device first
        elif name in DEVICE_FACTORIES and not from_device and self._is_device_target(kwargs.get("device")):
            on_device_out = True
            htod = name in COPYING_FACTORIES and not kwargs.get("non_blocking", False)

        out = func(*args, **kwargs)
        if htod and any(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            self._count("blocking HtoD")
        if on_device_out:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.device_tensors[tensor] = True
        return out

    def report(self, calls: int = 1) -> dict:
        per_call = {kind: self.counts[kind] / calls for kind in self.KINDS}
        sites = collections.defaultdict(list)
        for (kind, site), count in self.sites.most_common():
            sites[kind].append((site, count / calls))
        return {"counts": per_call, "sites": dict(sites)}


class OpCounter(TorchDispatchMode):
    """aten operators dispatched, views and metadata-only operators excluded (about the kernels a GPU launches)."""

    SKIP = {"_local_scalar_dense", "detach", "lift_fresh", "_to_copy_meta", "empty", "empty_strided", "set_"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket.__name__
        if not func.is_view and packet not in self.SKIP:
            self.ops[packet] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def accelerator_branches(counter: SyncCounter | None = None):
    """The model's input checks take the branch they take on an accelerator: values of device tensors are not read
    (with `counter`, the tensors it follows; without, every tensor, as in the timed calls)."""
    from transformers_albef.models.albef import modeling_albef

    original = modeling_albef._readable_on_host

    def readable(tensor):
        if counter is None:
            return False
        return original(tensor) and not counter.is_device(tensor)

    modeling_albef._readable_on_host = readable
    try:
        yield
    finally:
        modeling_albef._readable_on_host = original


# ----- the user paths -----------------------------------------------------------------------------------------------
@dataclass
class UserPath:
    name: str
    call: str
    fn: Callable[[], object]
    device_inputs: list = field(default_factory=list)  # tensors that live on the device before the call
    modules: list = field(default_factory=list)
    repeats: int | None = None
    size: str = ""  # the batch, short
    items: int = 0  # items per call (images, texts, pairs, questions, samples): the host-bound ceiling's numerator
    unit: str = ""
    per: str = "call"
    per_count: int = 1
    result: dict = field(default_factory=dict)


_MODELS: dict = {}


def build(cls, config):
    """One model per class and config (the counted and the timed paths share it)."""
    key = (cls.__name__, config.to_json_string())
    if key not in _MODELS:
        torch.manual_seed(0)
        model = cls(config).eval()
        model.set_attn_implementation("sdpa")
        _MODELS[key] = model
    return _MODELS[key]


def make_paths(size: str, plan: dict, selected) -> list[UserPath]:
    from speed import random_texts
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    import transformers_albef as ta

    config = make_config(size)
    vocab = config.text_config.vocab_size
    size_px = config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    paths = []
    retrieval = build(ta.AlbefForRetrieval, config)
    if {"image", "text", "itm"} & set(selected):
        pixel_values = torch.randn(plan["images"], 3, size_px, size_px, generator=g)
        ids, mask = random_texts(plan["texts"], 30, vocab, "cpu", min_length=8)
        with torch.no_grad():
            image_states = retrieval.vision_model(pixel_values[:1]).last_hidden_state
            k_ids, k_mask = ids[: plan["itm_k"]], mask[: plan["itm_k"]]
            text_states = retrieval.text_model(k_ids, k_mask, mode="text").last_hidden_state

        @torch.no_grad()
        def image():
            return retrieval.get_image_features(pixel_values).pooler_output

        @torch.no_grad()
        def text():
            return retrieval.get_text_features(ids, mask).pooler_output

        @torch.no_grad()
        def itm():
            return retrieval.itm_logits_for_image(image_states, text_states, k_mask)[:, 1]

        paths += [
            UserPath("image", f"`get_image_features`, batch {plan['images']}", image, [pixel_values], [retrieval],
                     size=f"batch {plan['images']}", items=plan["images"], unit="images/s"),
            UserPath("text", f"`get_text_features`, batch {plan['texts']}, 30-token slots", text, [ids, mask],
                     [retrieval], size=f"batch {plan['texts']}", items=plan["texts"], unit="texts/s"),
            UserPath("itm", f"`itm_logits_for_image`, 1 image x k={plan['itm_k']} texts", itm,
                     [image_states, text_states, k_mask], [retrieval], size=f"k={plan['itm_k']}",
                     items=plan["itm_k"], unit="pairs/s"),
        ]  # fmt: skip
    if {"rank", "generate", "step"} & set(selected):
        vqa = build(ta.AlbefForQuestionAnswering, config)
        q = plan["questions"]
        q_pixels = torch.randn(q, 3, size_px, size_px, generator=g)
        q_ids, q_mask = random_texts(q, 14, vocab, "cpu", seed=4, min_length=6)
        answers, answer_mask = answer_list(plan["answers"], vocab)
        k, tokens = plan["rank_k"], plan["new_tokens"]
        with torch.no_grad():
            states = vqa.encode_questions(q_pixels, q_ids, q_mask)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = torch.full((q, 1), config.text_config.cls_token_id, dtype=torch.long)
        with torch.no_grad():
            vqa(answer_input_ids=start, question_states=states, question_attention_mask=q_mask, cache=cache)
        next_token = answers[:q, 1:2].contiguous()

        @torch.no_grad()
        def rank():
            return vqa.rank_answers(q_pixels, q_ids, q_mask, answers, answer_mask, k=k)

        @torch.no_grad()
        def generate():
            return vqa.generate(q_pixels, q_ids, q_mask, max_new_tokens=tokens, min_new_tokens=tokens)

        @torch.no_grad()
        def step():
            extra = cache.self_attention_cache.get_seq_length() - 1
            if extra:  # back to [CLS]: each call decodes the same second token
                cache.self_attention_cache.crop(-extra)
            return vqa(answer_input_ids=next_token, question_states=states, question_attention_mask=q_mask,
                       cache=cache).logits  # fmt: skip

        paths += [
            UserPath("rank", f"`rank_answers`, {q} questions, k={k} of {plan['answers']:,}", rank,
                     [q_pixels, q_ids, q_mask, answers, answer_mask], [vqa], size=f"{q} questions, k={k}",
                     items=q, unit="questions/s"),
            UserPath("generate", f"`generate`, {q} questions, greedy, {tokens} new tokens", generate,
                     [q_pixels, q_ids, q_mask], [vqa], size=f"{q} questions", per="token", per_count=tokens),
            UserPath("step", f"one cached decoder step (what `generate` runs per token), {q} questions", step,
                     [states, q_mask, next_token, *_cache_tensors(cache)], [vqa], size=f"{q} questions"),
        ]  # fmt: skip
    if "pretrain" in selected:
        paths.append(pretrain_path(config, plan))
    return [p for p in paths if p.name in selected]


def answer_list(count: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` distinct answers `[CLS] a [SEP]` / `[CLS] a b [SEP]` over a small vocabulary (many share their first
    piece, as VQA answers do); the skeleton's 4,096 pieces are too few for `speed.synthetic_answers`' draw."""
    low = 104
    pieces = vocab - low
    ids = torch.zeros(count, 4, dtype=torch.long)
    ids[:, 0] = 101
    for i in range(count):
        if i < pieces // 2:
            ids[i, 1:3] = torch.tensor([low + i, 102])
        else:
            j = i - pieces // 2
            ids[i, 1:4] = torch.tensor([low + j % (pieces // 2), low + pieces // 2 + j // (pieces // 2), 102])
    return ids, (ids != 0).long()


def _cache_tensors(cache) -> list[torch.Tensor]:
    tensors = []
    for part in (cache.self_attention_cache, cache.cross_attention_cache):
        for layer in part.layers:
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    return tensors


def pretrain_path(config, plan) -> UserPath:
    """One pre-training step as `albef-pretrain` runs it: the collator's MLM masks (made on the host, moved with the
    batch), forward with the three losses, backward, AdamW (fused), zero_grad."""
    from speed import random_texts

    import transformers_albef as ta
    from transformers_albef.models.albef.modeling_albef import mask_tokens

    config = config.__class__.from_dict(config.to_dict())
    config.distill = True
    model = build(ta.AlbefForPreTraining, config).train()
    batch = plan["pretrain"]
    g = torch.Generator().manual_seed(5)
    size_px = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size_px, size_px, generator=g)
    ids, mask = random_texts(batch, 25, config.text_config.vocab_size, "cpu", seed=6, min_length=8)
    torch.manual_seed(1)
    tc = config.text_config
    masked, labels = mask_tokens(ids, tc.vocab_size, 0.15, tc.pad_token_id, tc.cls_token_id, tc.mask_token_id)
    optimizer = getattr(model, "_host_overhead_optimizer", None)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        model._host_overhead_optimizer = optimizer

    def step():
        loss = model(pixel_values, ids, mask, return_loss=True, masked_input_ids=masked, mlm_labels=labels,
                     alpha=0.4, hard_negatives="sample").loss  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return UserPath("pretrain", f"`AlbefForPreTraining` step (forward, backward, fused AdamW), batch {batch}", step,
                    [pixel_values, ids, mask, masked, labels], [model], size=f"batch {batch}", items=batch,
                    unit="samples/s")  # fmt: skip


# ----- measurement --------------------------------------------------------------------------------------------------
def count(path: UserPath) -> tuple[collections.Counter, dict]:
    """Operators dispatched and synchronisations of one call (after one untimed call: lazy state is made there)."""
    with accelerator_branches():
        path.fn()
    ops = OpCounter()
    with accelerator_branches(), ops:
        path.fn()
    counter = SyncCounter()
    for module in path.modules:
        counter.on_device_module(module)  # parameters, buffers (and the optimiser's state, made from them)
    counter.on_device(path.device_inputs)
    with accelerator_branches(counter), counter:
        path.fn()
    return ops.ops, counter.report()


def measure(counted: UserPath, timed: UserPath, plan: dict) -> dict:
    """Counts at the counted path's batch sizes; median host time of the timed path's calls."""
    for _ in range(plan["warmup"]):
        with accelerator_branches():
            timed.fn()
    times = []
    repeats = plan["pretrain_repeats"] if timed.name == "pretrain" else plan["repeats"]
    for _ in range(repeats):
        with accelerator_branches():
            start = time.perf_counter()
            timed.fn()
            times.append(time.perf_counter() - start)
    timed_ops, _ = count(timed) if timed is not counted else (None, None)
    ops, sync = count(counted)
    host = statistics.median(times)
    # The counted call dispatches its operators at the timed call's host cost per operator: the most items per
    # second this host could issue in eager mode, however fast the device (the computation left to it).
    per_op = host / max(1, sum((timed_ops or ops).values()))
    ceiling = counted.items / (per_op * sum(ops.values())) if counted.items else None
    counted.result = dict(host=host, runs=len(times), ops=sum(ops.values()), ceiling=ceiling,
                          timed_ops=sum(timed_ops.values()) if timed_ops else None, timed_call=timed.size,
                          top_ops=ops.most_common(6), **sync)  # fmt: skip
    return counted.result


def format_sites(sites: dict) -> str:
    parts = []
    short = {"DtoH reads": "read", "implicit syncs": "implicit", "blocking HtoD": "HtoD"}
    for kind, entries in sites.items():
        for site, count in entries:
            site = site.replace("transformers_albef/models/albef/modeling_albef.py", "modeling_albef.py")
            parts.append(f"{short[kind]} x{count:g} `{site}`")
    return "; ".join(parts) if parts else "-"


def table(paths: list[UserPath]) -> list[str]:
    lines = [
        "| path | call (counted) | ops | DtoH reads | implicit syncs | blocking HtoD | where | host ms (timed call) "
        "| host us/op | host-bound ceiling | issue's GPU target |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for p in paths:
        r = p.result
        counts = r["counts"]
        host = r["host"] * 1e3
        timed_ops = r["timed_ops"] or r["ops"]
        per = f", {host / p.per_count:.2f} per {p.per}" if p.per_count > 1 else ""
        ops = f"{r['ops']:,}" + (f" ({timed_ops:,} timed)" if timed_ops != r["ops"] else "")
        ceiling = f"{r['ceiling']:,.0f} {p.unit}" if r["ceiling"] else "-"
        target = TARGETS.get(p.name) if p.items >= 16 else None  # the batch sizes only
        target = f"{target:,} ({r['ceiling'] / target:.2f}x)" if target and r["ceiling"] else "-"
        lines.append(
            f"| {p.name} | {p.call} | {ops} | {counts['DtoH reads']:g} | {counts['implicit syncs']:g} "
            f"| {counts['blocking HtoD']:g} | {format_sites(r['sites'])} | {host:.2f} ({r['timed_call']}{per}) "
            f"| {host * 1e3 / max(1, timed_ops):.1f} | {ceiling} | {target} |"
        )
    return lines


# ----- report -------------------------------------------------------------------------------------------------------
def section(args, paths: list[UserPath], wall: float) -> str:
    import transformers

    import transformers_albef

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, AttributeError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    model = ("skeleton: base depth (ViT 12 layers, text 6 + 6, decoder 6, 12 heads), 48 wide, 5 image tokens, "
             "vocabulary 4,096" if args.size == "skeleton" else "tiny config")  # fmt: skip
    lines = [
        f"## Host time per call and the host synchronisations a GPU would see ({args.key})",
        "",
        f"- date: {datetime.date.today().isoformat()}; commit {sections.commit()}",
        f"- device: {cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, transformers-albef {transformers_albef.__version__}",
        f"- model: {model}; random weights, fp32, sdpa attention",
        f"- command: `python benchmarks/host_overhead.py {' '.join(sys.argv[1:])}`; wall time {wall:.0f} s",
        *[f"- note: {note}" for note in args.note],
        "",
        "Counted at the issue's batch sizes (one call): ops, aten operators per call (views excluded), about the "
        "kernels a GPU launches; and what would make the host wait for a GPU: values read back (DtoH reads), "
        "operators whose output size depends on device values (implicit syncs), host tensors copied with "
        "`non_blocking=False` (blocking HtoD: PyTorch synchronises the stream after such a copy). Host ms: median "
        "time of one call of the same path at a small batch (the operators do not depend on the batch size; the "
        "computation is then a small part): what Python, transformers and the dispatcher take to issue it. Host-bound "
        "ceiling: the counted call's items over its host time (its operators at the timed call's cost each), the most "
        "this host could issue per second in eager mode however fast the device; the last column compares it with "
        "the issue's GPU target (ceiling / target: below 1, the target needs captured execution, `torch.compile` or "
        "CUDA graphs, or a faster host). Method: `benchmarks/host_overhead.py`'s docstring.",
        "",
        *table(paths),
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str, key: str = "cpu") -> None:
    sections.write_section(path, f"host-overhead:{key}", body)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PLANS), default="skeleton")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {','.join(PATHS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--note", action="append", default=[], help="a line for the section (e.g. machine load)")
    parser.add_argument("--key", default="cpu", help="section key: <!-- host-overhead:KEY --> (e.g. gpu-host)")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in args.paths if p not in PATHS]
    if bad:
        parser.error(f"unknown path(s) {bad}; choose from {PATHS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    plan = dict(PLANS[args.size])
    if args.repeats:
        plan["repeats"] = args.repeats
        plan["pretrain_repeats"] = min(plan["pretrain_repeats"], args.repeats)
    started = time.time()
    paths = make_paths(args.size, plan["count"], args.paths)
    timed = {p.name: p for p in make_paths(args.size, plan["time"], args.paths)}
    for path in paths:
        print(f"{path.name} ", end="", file=sys.stderr, flush=True)
        measure(path, timed[path.name], plan)
        print(f"{time.time() - started:.0f}s", file=sys.stderr, flush=True)
    body = section(args, paths, time.time() - started)
    print(body)
    if not args.no_write:
        write_section(args.output, body, args.key)
        print(f"wrote the host-overhead:{args.key} section of {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
