"""The model's one path against the computation it replaced, measured on the CPU in one run (same commit, same
machine, variants taking turns), with a check that both give the same outputs.

    python benchmarks/one_path.py                                   # base: ViT-B/16 @384 + BERT-base, 2 threads
    python benchmarks/one_path.py --size tiny --output /tmp/x.md    # smoke run (seconds)

Rows (random weights, fp32, sdpa attention; `--size base` is `speed.make_config("base")`):

1. `retrieval_scores`: 4 images x 64 texts (30-token slots, ragged padding), k=64. Default: `model.retrieval_scores`
   (ITC top-k both ways, each distinct candidate pair fused once, grouped by image). Reference: the original
   evaluation loop on the same tower outputs: for each image row its top-k texts fused with the image repeated, for
   each text row its top-k images, every pair with the per-pair fusion (so a pair both rows select is fused twice).
2. `RetrievalEngine.text_to_image(index, query, k=16, score="itm")` over an in-memory index of 32 images (built once,
   outside the timing, from pixel tensors; the image tower states are cached by the index). Reference: the same
   query encoded, the same ITC top-16 candidates read from the index, scored by the per-pair fusion.
3. `rank_answers` over 3,128 synthetic answers at k = 8, 16, 32, 64, 128 for one question (and k=128 for a batch
   of 8 questions). Reference: the original `rank_answer` without a decoder cache (the decoder run from scratch on
   every candidate, the question states repeated k times).
4. `generate`, 5 new tokens (`min_new_tokens=5`, so no answer stops early), greedy and with 3 beams, one question.
   Reference: the same call with `use_cache=False` (the whole prefix decoded again at every step).

Method: each measured group runs every variant once untimed (warm-up; its outputs are what the agreement column
compares), then times them in turn (A, B, C, ..., A, B, C, ...) `--repeats` rounds; the table gives medians. The
heaviest references (row 1's loop, the batch-8 ranking) get `--slow-repeats` rounds. The table goes to stdout and
into the `<!-- one-path:cpu -->` section of `--output` (default: BENCHMARKS.md at the repository root); the rest of
that file is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
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
import torch.nn.functional as F

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers beside this script
import sections  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ROWS = ("retrieval", "engine", "rank", "rank8", "generate")

# What each size runs. `repeats` / `slow_repeats`: timed rounds (after one untimed run of each variant).
PLANS = {
    "base": dict(image_size=384, images=4, texts=64, retrieval_k=64, index_images=32, engine_k=16, answers=3128,
                 rank_ks=(8, 16, 32, 64, 128), batch8_ks=(128,), new_tokens=5, beams=3, repeats=3, slow_repeats=2),
    "tiny": dict(image_size=32, images=4, texts=64, retrieval_k=64, index_images=32, engine_k=16, answers=400,
                 rank_ks=(8, 16, 32, 64, 128), batch8_ks=(16,), new_tokens=5, beams=3, repeats=2, slow_repeats=2),
}  # fmt: skip
QUERY = "a dog running on the beach with a red ball"


def load_speed():
    """benchmarks/speed.py, imported by path (its helpers: configs, synthetic inputs, the original computations)."""
    name = "albef_speed_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


speed = load_speed()


# ----- measurement --------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    fn: Callable[[], object]
    repeats: int
    times: list[float] = field(default_factory=list)
    output: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Row:
    workload: str
    setting: str
    default: Variant
    reference: Variant
    compare: Callable[[object, object], str]
    agreement: str = ""


def measure(rows: list[Row]) -> None:
    """One untimed run of every variant of `rows` (its output kept for the agreement check), then timed rounds with
    the variants in turn; a variant with fewer repeats sits out the later rounds."""
    variants = [v for row in rows for v in (row.default, row.reference)]
    for v in variants:
        v.output = v.fn()
    for round_ in range(max(v.repeats for v in variants)):
        for v in variants:
            if round_ < v.repeats:
                start = time.perf_counter()
                v.fn()
                v.times.append(time.perf_counter() - start)
        print(".", end="", file=sys.stderr, flush=True)
    for row in rows:
        row.agreement = row.compare(row.default.output, row.reference.output)
        for v in (row.default, row.reference):
            v.output = v.fn = None  # release what they hold


# ----- agreement ----------------------------------------------------------------------------------------------------
def compare_score_matrices(got, want) -> str:
    """`(score_i2t, score_t2i)` pairs: the same candidates (-100 elsewhere) and their largest score difference."""
    same_candidates = all(torch.equal(g == -100, w == -100) for g, w in zip(got, want))
    if not same_candidates:
        return "**different candidates**"
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    return f"same candidates, max abs diff {diff:.1e}"


def compare_rankings(got, want) -> str:
    """`(indices, scores)` rankings of the same query."""
    got_scores, want_scores = dict(zip(*got)), dict(zip(*want))
    if set(got_scores) != set(want_scores):
        return "**different candidates**"
    diff = max(abs(got_scores[i] - want_scores[i]) for i in got_scores)
    order = "same order" if list(got[0]) == list(want[0]) else "**order differs**"
    return f"{order}, max abs diff {diff:.1e}"


def compare_answers(got, want, num_answers: int) -> str:
    """`rank_answers`-style `(ids, probs)`: the same ranked ids, and every answer's probability."""
    ids = "same ranked ids" if torch.equal(got[0], want[0]) else "**ranked ids differ**"
    diff = (speed.answer_probabilities(*got, num_answers) - speed.answer_probabilities(*want, num_answers)).abs()
    return f"{ids}, max abs diff {float(diff.max()):.1e}"


def compare_tokens(got, want) -> str:
    if got.shape == want.shape and torch.equal(got, want):
        return f"identical token ids {tuple(got.shape)}"
    return f"**token ids differ** ({tuple(got.shape)} vs {tuple(want.shape)})"


# ----- rows ---------------------------------------------------------------------------------------------------------
def make_config(size: str, image_size: int):
    config = speed.make_config(size, image_size)
    # The BERT word pieces of the processor (the engine's queries) need the full vocabulary in the tiny model too.
    config.text_config.vocab_size = 30522
    return config


def build(cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def retrieval_rows(model, plan, repeats, slow_repeats) -> list[Row]:
    from transformers_albef.models.albef.modeling_albef import encode_for_retrieval

    size, vocab = plan["image_size"], model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(plan["images"], 3, size, size, generator=g)
    ids, mask = speed.random_texts(plan["texts"], 30, vocab, "cpu", seed=2, min_length=12)
    k = plan["retrieval_k"]

    def default():
        return model.retrieval_scores(pixel_values, ids, mask, k=k)

    def reference():
        return speed.per_row_rerank(model, *encode_for_retrieval(model, pixel_values, ids, mask), k=k)

    return [
        Row("`retrieval_scores`", f"{plan['images']} images x {plan['texts']} texts, k={k}",
            Variant("grouped, each pair once", default, repeats),
            Variant("per-row loop, per-pair fusion", reference, slow_repeats), compare_score_matrices),
    ]  # fmt: skip


def engine_rows(model, plan, repeats) -> list[Row]:
    import transformers_albef as ta
    from transformers_albef.retrieval_index import RetrievalEngine

    size, k = plan["image_size"], plan["engine_k"]
    processor = ta.AlbefProcessor.from_bert_vocab(image_size=size)
    engine = RetrievalEngine(model, processor, progress=False)
    g = torch.Generator().manual_seed(3)
    index = engine.build_index(images=torch.randn(plan["index_images"], 3, size, size, generator=g))

    def default():
        [result] = engine.text_to_image(index, QUERY, k=k, score="itm")
        return result.indices, result.scores

    def reference():
        text = processor(text=[QUERY], clean_text="caption", padding="max_length", truncation=True, max_length=30,
                         return_tensors="pt")  # fmt: skip
        ids, mask = text["input_ids"], text["attention_mask"]
        states = model.text_model(ids, mask, mode="text").last_hidden_state
        embeds = F.normalize(model.text_proj(states[:, 0]), dim=-1)
        top = (embeds.float() @ index.image_embeds.float().t()).topk(k, dim=1).indices[0]
        image_states = index.image_states(top).to(model.dtype)
        itm = speed.per_pair_itm(model, states.expand(k, -1, -1), mask.expand(k, -1), image_states)[:, 1].float()
        order = torch.argsort(itm, descending=True, stable=True)
        return top[order].tolist(), itm[order].tolist()

    return [
        Row("`RetrievalEngine.text_to_image`", f"1 query, ITM re-rank of k={k} of {plan['index_images']} images",
            Variant("grouped ITM", default, repeats), Variant("per-pair fusion", reference, repeats),
            compare_rankings),
    ]  # fmt: skip


def vqa_inputs(model, plan, batch: int):
    size, vocab = plan["image_size"], model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(4)
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    ids, mask = speed.random_texts(batch, 14, vocab, "cpu", seed=5, min_length=6)
    return pixel_values, ids, mask


def rank_rows(model, plan, batch: int, ks, repeats) -> list[Row]:
    pixel_values, ids, mask = vqa_inputs(model, plan, batch)
    answers, answer_mask = speed.synthetic_answers(plan["answers"], model.config.text_config.vocab_size, "cpu")
    rows = []
    for k in ks:

        def default(k=k):
            return model.rank_answers(pixel_values, ids, mask, answers, answer_mask, k=k)

        def reference(k=k):
            return speed.uncached_ranking(model, pixel_values, ids, mask, answers, answer_mask, k=k)

        question = "1 question" if batch == 1 else f"{batch} questions"
        rows.append(
            Row(
                "`rank_answers`",
                f"{question}, k={k} of {len(answers):,} answers",
                Variant("cached decoder", default, repeats),
                Variant("uncached per-candidate", reference, repeats),
                lambda got, want: compare_answers(got, want, len(answers)),
            )
        )
    return rows


def generate_rows(model, plan, repeats) -> list[Row]:
    pixel_values, ids, mask = vqa_inputs(model, plan, 1)
    tokens = plan["new_tokens"]
    rows = []
    for name, options in (("greedy", {}), (f"{plan['beams']} beams", {"num_beams": plan["beams"]})):
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, **options)

        def default(kwargs=kwargs):
            return model.generate(pixel_values, ids, mask, **kwargs)

        def reference(kwargs=kwargs):
            return model.generate(pixel_values, ids, mask, use_cache=False, **kwargs)

        rows.append(
            Row(
                "`generate`",
                f"1 question, {name}, {tokens} new tokens",
                Variant("cached decoder", default, repeats),
                Variant("`use_cache=False`", reference, repeats),
                compare_tokens,
            )
        )
    return rows


# ----- report -------------------------------------------------------------------------------------------------------
def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}" if seconds < 10 else f"{seconds * 1e3:,.0f}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| workload | setting | default path | ms | reference | ms | timed runs | speed-up | outputs agree? |",
        "|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        d, r = row.default, row.reference
        lines.append(
            f"| {row.workload} | {row.setting} | {d.label} | {format_ms(d.median)} | {r.label} "
            f"| {format_ms(r.median)} | {len(d.times)} / {len(r.times)} | {r.median / d.median:.2f}x "
            f"| {row.agreement} |"
        )
    return lines


def section(args, plan, rows: list[Row], wall: float) -> str:
    import transformers

    import transformers_albef

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, AttributeError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    model = "ViT-B/16 + BERT-base (`speed.make_config('base')`)" if args.size == "base" else "tiny config"
    lines = [
        f"## The one path against the computation it replaced (CPU, {args.size})",
        "",
        f"- date: {datetime.date.today().isoformat()}; commit {sections.commit()}",
        f"- device: {cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, transformers-albef {transformers_albef.__version__}",
        f"- model: {model}, images {plan['image_size']} px, random weights, fp32, sdpa attention",
        f"- command: `python benchmarks/one_path.py {' '.join(sys.argv[1:])}`; wall time {wall:.0f} s",
        *[f"- note: {note}" for note in args.note],
        "",
        "Median milliseconds per call. Each group of rows ran every variant once untimed (warm-up; the agreement "
        "column compares those outputs), then timed them in turn, round after round. Speed-up: reference / default.",
        "",
        *table(rows),
        "",
        "References: `retrieval_scores` against the original evaluation loop over the same tower outputs (each image "
        "row's top-k texts fused with the image repeated, each text row's top-k images, so pairs both rows select are "
        "fused twice); the engine's ITM re-ranking against the same ITC candidates fused per pair; `rank_answers` "
        "against the original `rank_answer` decoding every candidate from scratch with the question repeated k times; "
        "`generate` against the same call with `use_cache=False`. Source: `benchmarks/one_path.py`.",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the one-path section of `path`, keeping the rest; a new file starts with speed.py's
    header."""
    sections.write_section(path, "one-path:cpu", body, header=speed.HEADER)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PLANS), default="base")
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: 384; tiny 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: base 3, tiny 2)")
    parser.add_argument("--slow-repeats", type=int, default=None,
                        help="timed rounds of the heaviest references: the retrieval loop, the batch-8 ranking "
                        "(default 2)")  # fmt: skip
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)}")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--note", action="append", default=[], help="a line for the section (e.g. machine load)")
    args = parser.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        parser.error(f"unknown row(s) {bad}; choose from {ROWS}")
    for name in ("threads", "repeats", "slow_repeats", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    import transformers_albef as ta

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    plan = dict(PLANS[args.size])
    plan["image_size"] = args.image_size or plan["image_size"]
    repeats = args.repeats or plan["repeats"]
    slow_repeats = args.slow_repeats or plan["slow_repeats"]
    config = make_config(args.size, plan["image_size"])

    started = time.time()
    rows: list[Row] = []

    def run(name, make_rows):
        if name in args.rows:
            print(f"{name} ", end="", file=sys.stderr, flush=True)
            group = make_rows()
            measure(group)
            rows.extend(group)
            print(f" {time.time() - started:.0f}s", file=sys.stderr, flush=True)

    if {"retrieval", "engine"} & set(args.rows):
        retrieval = build(ta.AlbefForRetrieval, config)
        run("retrieval", lambda: retrieval_rows(retrieval, plan, repeats, slow_repeats))
        run("engine", lambda: engine_rows(retrieval, plan, repeats))
        del retrieval
    if {"rank", "rank8", "generate"} & set(args.rows):
        vqa = build(ta.AlbefForQuestionAnswering, config)
        run("rank", lambda: rank_rows(vqa, plan, 1, plan["rank_ks"], repeats))
        run("rank8", lambda: rank_rows(vqa, plan, 8, plan["batch8_ks"], slow_repeats))
        run("generate", lambda: generate_rows(vqa, plan, repeats))
        del vqa

    body = section(args, plan, rows, time.time() - started)
    print(body)
    if not args.no_write:
        write_section(args.output, body)
        print(f"wrote the one-path:cpu section of {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
