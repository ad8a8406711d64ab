"""Where does a GPU workload's time go? For the bf16/sdpa rows of `speed.py` that run far under the device's peak,
split each call into the host's time to issue it and the device's busy time, count host synchronisations, and time
a CUDA-graph replay where the shapes are static.

    python benchmarks/gpu_overhead.py                   # one GPU, the issue's sizes (base config, random weights)
    python benchmarks/gpu_overhead.py --size tiny       # smoke run (CPU-only machines skip the device columns)

Columns:
- wall: the synchronised time of one call (median).
- host issue: the time until the call returns to Python, without synchronising. When it is close to wall, the call
  is bound by Python and kernel launches, or it waits on the device inside (see syncs).
- device busy: the sum of the call's kernel times (torch.profiler). wall much larger than busy means an idle device.
- kernels: launches per call.
- DtoH: device-to-host copies per call; each makes the host wait for the device.
- syncs: the host synchronisations of one call as CUDA reports them (`torch.cuda.set_sync_debug_mode("warn")`
  warns at each; blocking host-to-device copies included). `benchmarks/host_overhead.py` predicts them on a CPU.
- graph replay: the same call captured once as a CUDA graph and replayed, which removes launch and Python costs.
  "-" means the call cannot be captured, for example because of a host synchronisation inside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import DTYPES, build, make_config, random_texts, set_attention, synthetic_answers  # noqa: E402


def workloads(size: str, device: torch.device, dtype: torch.dtype, attn: str):
    """(name, batch, unit, fn, graphable) for each workload, on models built once."""
    import transformers_albef as ta

    base = size == "base"
    image_size = 384 if base else 32
    config = make_config(size, image_size)
    vocab = config.text_config.vocab_size
    model = build(ta.AlbefForRetrieval, config, device, dtype)
    vqa = build(ta.AlbefForQuestionAnswering, config, device, dtype)
    for m in (model, vqa):
        set_attention(m, attn)
    g = torch.Generator().manual_seed(0)

    images = 128 if base else 4
    pixel_values = torch.randn(images, 3, image_size, image_size, generator=g).to(device, dtype)
    texts = 256 if base else 8
    ids, mask = random_texts(texts, 30, vocab, device, min_length=30)
    tokens = 1 + config.vision_config.grid_size**2
    image_states = torch.randn(1, tokens, config.vision_config.hidden_size, generator=g).to(device, dtype)
    with torch.no_grad():
        text_states = model.text_model(ids, mask, mode="text").last_hidden_state
    questions = 16 if base else 2
    q_pixels = torch.randn(questions, 3, image_size, image_size, generator=g).to(device, dtype)
    q_ids, q_mask = random_texts(questions, 14, vocab, device, seed=4, min_length=6)
    answers, answer_mask = synthetic_answers(3128 if base else 40, vocab, device)
    k = 128 if base else 8

    @torch.no_grad()
    def image():
        return model.get_image_features(pixel_values).pooler_output

    @torch.no_grad()
    def text():
        return model.get_text_features(ids, mask).pooler_output

    @torch.no_grad()
    def itm():
        return model.itm_logits_for_image(image_states, text_states, mask)[:, 1]

    @torch.no_grad()
    def vqa_rank():
        return vqa.rank_answers(q_pixels, q_ids, q_mask, answers, answer_mask, k=k)

    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    with torch.no_grad():
        states = vqa.encode_questions(q_pixels, q_ids, q_mask)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        vqa(answer_input_ids=answers[:questions, :1], question_states=states, question_attention_mask=q_mask,
            cache=cache)  # fmt: skip

    @torch.no_grad()
    def decoder_step():
        extra = cache.self_attention_cache.get_seq_length() - 1
        if extra:  # back to [CLS]: each call decodes the same second token
            cache.self_attention_cache.crop(-extra)
        return vqa(answer_input_ids=answers[:questions, 1:2], question_states=states, question_attention_mask=q_mask,
                   cache=cache).logits  # fmt: skip

    return [
        (f"image embedding @{image_size}", images, "images/s", image, True),
        ("text embedding, 30 tokens", texts, "texts/s", text, True),
        # The grouped ITM plans its batches on the host (it reads the text mask), so it is not captured.
        (f"ITM re-rank grouped (default), k={texts}", texts, "pairs/s", itm, False),
        (f"VQA rank_answers (default), k={k} of {answers.shape[0]:,}", questions, "questions/s", vqa_rank, False),
        # The cache grows and is cropped on the host: not captured.
        ("VQA cached decoder step (what generate runs per token)", questions, "questions/s", decoder_step, False),
    ]


def median_time(fn, device, repeats: int, sync_after: bool) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if sync_after:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def profile(fn, calls: int) -> tuple[float, float, float]:
    """Per call: summed kernel time (s), kernels launched, device-to-host copies (each one a host synchronisation)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    busy = kernels = copies = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        busy += event.time_range.elapsed_us()
        if "DtoH" in event.name:
            copies += 1
        elif not event.name.startswith(("Memcpy", "Memset")):
            kernels += 1
    return busy * 1e-6 / calls, kernels / calls, copies / calls


def count_syncs(fn) -> int:
    """Synchronising CUDA calls of one `fn()`: the warnings of `torch.cuda.set_sync_debug_mode("warn")`."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def graph_replay(fn, device, repeats: int) -> float | str:
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # a capture that fails says why in the table
        torch.cuda.synchronize(device)
        return f"- ({type(error).__name__})"
    return median_time(graph.replay, device, repeats, sync_after=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "base"), default="base")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--output", type=Path, default=None, help="also write the table into this file's gpu-overhead:gpu section"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}, {args.attn}")
    rows = [
        "| workload | batch | wall ms | host issue ms | device busy ms | kernels | DtoH | syncs | graph replay ms | "
        "throughput (wall) | throughput (graph) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, batch, unit, fn, graphable in workloads(args.size, device, DTYPES[args.dtype], args.attn):
        for _ in range(3):
            fn()
        wall = median_time(fn, device, args.repeats, sync_after=True)
        host = median_time(fn, device, args.repeats, sync_after=False)
        busy, kernels, copies = profile(fn, calls=3)
        syncs = count_syncs(fn)
        replay = graph_replay(fn, device, args.repeats) if graphable else "- (not tried)"
        graph_ms = f"{replay * 1e3:.2f}" if isinstance(replay, float) else replay
        graph_rate = f"{batch / replay:,.0f} {unit}" if isinstance(replay, float) else "-"
        rows.append(
            f"| {name} | {batch} | {wall * 1e3:.2f} | {host * 1e3:.2f} | {busy * 1e3:.2f} | {kernels:.0f} | "
            f"{copies:.0f} | {syncs} | {graph_ms} | {batch / wall:,.0f} {unit} | {graph_rate} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))
    if args.output:
        import datetime
        import re

        body = "\n".join(
            [
                f"## Where the GPU time goes, per call ({args.dtype}, {args.attn}, {args.size})",
                "",
                f"- date: {datetime.date.today().isoformat()}; {torch.cuda.get_device_name(device)}, torch "
                f"{torch.__version__}",
                f"- command: `python benchmarks/gpu_overhead.py {' '.join(sys.argv[1:])}` (columns: its docstring)",
                "",
                *rows,
            ]
        )
        begin, end = "<!-- gpu-overhead:gpu -->", "<!-- /gpu-overhead:gpu -->"
        block = f"{begin}\n{body}\n{end}\n"
        text = args.output.read_text() if args.output.exists() else ""
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", flags=re.S)
        text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else text + "\n" + block
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
