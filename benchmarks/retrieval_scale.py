"""The retrieval index at scale, on the CPU: build, disk, memory, query latency and the recall of the approximate
searches, on synthetic ITC embeddings; and an index built by two processes.

    python benchmarks/retrieval_scale.py                                  # 1M x 256-d embeddings (~10 min, 2 cores)
    python benchmarks/retrieval_scale.py --size tiny --output /tmp/x.md   # smoke run (seconds)

What is measured (`--size full`; tiny is the same at small sizes):

1. Build: `RetrievalIndex.from_embeddings` writes N synthetic L2-normalised 256-d float32 embeddings (one modality)
   in shards of 4096 (safetensors + Arrow), at N/4 and N: wall time, bytes on disk, peak anonymous memory (the
   resident set minus file-backed pages, sampled every 5 ms; the embeddings given to it are not counted), and the
   time to open the index (every shard checked). 10M is projected linearly from the growth between the two sizes
   (memory: one shard at a time, about constant).
2. Queries: single-query latency p50 / p95 over `queries` queries at k=16 and k=256, and batched throughput (1,024
   queries at k=16), for the exact searches (`torch`: streamed from the memory-mapped shards; `flat`: faiss
   IndexFlatIP, the embeddings in memory) and the approximate ones (`ivf`, `hnsw`, `pq`, `ivfpq`, built with
   `build_ann`: build time, file size, recall@16 / @256 against the exact search on 256 queries). Peak anonymous
   memory of each search (the first query of a faiss flat search builds its in-memory index: counted).
3. Two processes: the bundled retrieval model indexes `images` synthetic 64-px PNG files with one process (2 torch
   threads) and with `torchrun --nproc_per_node 2` (gloo, 1 thread each); wall time of `build_index` and of the
   whole command (process start and model load included), and the largest difference between the two indexes.

Synthetic data: points of a 32-dimensional Gaussian latent space projected to 256 dimensions, plus isotropic noise
(0.3 of the signal's norm), normalised; queries are drawn the same way with another seed. Recall of approximate
indexes depends on the data: measure yours (`albef retrieve --index DIR --build-ann KIND` prints it).
The table goes to stdout and into the `<!-- retrieval-scale -->` section of `--output` (default: BENCHMARKS.md at
the repository root); the rest of that file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers beside this script
import sections  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLANS = {
    "full": dict(count=1_000_000, dim=256, queries=30, batch=1024, recall_queries=256, shard_size=4096, images=2048,
                 ann={"ivf": {}, "hnsw": {"M": 16}, "pq": {}, "ivfpq": {}}),
    "tiny": dict(count=4000, dim=32, queries=8, batch=64, recall_queries=64, shard_size=512, images=12,
                 ann={"ivf": {}, "hnsw": {"M": 8}, "pq": {}, "ivfpq": {}}),
}  # fmt: skip
KS = (16, 256)
LOAD_AT_START = os.getloadavg()[0]


# ----- data and measurement ------------------------------------------------------------------------------------------
def synthetic(count: int, dim: int, seed: int, latent: int = 32, noise: float = 0.3, block: int = 65536):
    """`count` L2-normalised float32 vectors from a `latent`-dimensional Gaussian projected to `dim` dimensions."""
    projection = np.random.default_rng(1234).standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, block):
        rows = min(block, count - start)
        x = rng.standard_normal((rows, latent), dtype=np.float32) @ projection
        x += noise * rng.standard_normal((rows, dim), dtype=np.float32)  # each coordinate of x has variance 1
        out[start : start + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def anonymous_rss() -> int:
    """Bytes of this process's resident memory that are not file-backed (page cache of mapped files excluded)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields.get("RssAnon", "0 kB").split()[0]) * 1024


def release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc), so that the next measurement starts from what is in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak growth of the anonymous resident set during a `with` block (sampled every 5 ms)."""

    def __enter__(self):
        release_freed_memory()
        self.base = self.peak = anonymous_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anonymous_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_rss())
        self.growth = max(0, self.peak - self.base)


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def human_count(count: int) -> str:
    return f"{count / 1e6:g}M" if count >= 1e6 else f"{count / 1e3:g}k" if count >= 1e3 else str(count)


def latencies(index, modality: str, queries: torch.Tensor, k: int) -> tuple[float, float]:
    """p50 and p95 of single-query latency (ms); one untimed query first."""
    index.search(modality, queries[:1], k)
    times = []
    for row in range(len(queries)):
        start = time.perf_counter()
        index.search(modality, queries[row : row + 1], k)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


# ----- the measurements ----------------------------------------------------------------------------------------------
def measure_build(plan: dict, folder: Path, log) -> tuple[list[dict], object, torch.Tensor]:
    from transformers_albef.retrieval_index import RetrievalIndex

    rows, index = [], None
    warm_up = synthetic(2 * plan["shard_size"], plan["dim"], seed=0)  # imports and first calls, not measured
    RetrievalIndex.from_embeddings(folder / "warm-up", image_embeds=warm_up, shard_size=plan["shard_size"]).search(
        "images", torch.from_numpy(warm_up[:2]), 4
    )
    for count in (plan["count"] // 4, plan["count"]):
        embeds = synthetic(count, plan["dim"], seed=0)
        target = folder / f"index-{count}"
        with PeakMemory() as memory:
            start = time.perf_counter()
            index = RetrievalIndex.from_embeddings(target, image_embeds=embeds, shard_size=plan["shard_size"])
            seconds = time.perf_counter() - start
        del embeds
        start = time.perf_counter()
        index = RetrievalIndex.load(target)
        opened = time.perf_counter() - start
        row = dict(count=count, seconds=seconds, disk=disk_bytes(target), memory=memory.growth, open=opened)
        rows.append(row)
        log(f"build {count}: {seconds:.1f} s, {human_bytes(row['disk'])}, +{human_bytes(memory.growth)} anon")
    queries = torch.from_numpy(synthetic(max(plan["queries"], plan["recall_queries"], plan["batch"]), plan["dim"], 7))
    return rows, index, queries


def measure_searches(plan: dict, index, queries: torch.Tensor, log) -> list[dict]:
    from transformers_albef.retrieval_backends import faiss_available

    rows = []
    searches = ["torch"] + (["flat"] if faiss_available() else [])
    recall_queries = queries[: plan["recall_queries"]]
    for kind, options in plan["ann"].items() if faiss_available() else []:
        with PeakMemory() as memory:
            entry = index.build_ann(kind, modalities="images", queries=recall_queries, **options)["images"]
        log(f"ann {kind}: {entry['factory']}, {entry['build_seconds']} s, recall {entry['recall']}")
        rows.append(dict(search=kind, entry=entry, build_memory=memory.growth))
    rows = [dict(search=name) for name in searches] + rows
    for row in rows:
        index.use_search(row["search"])
        with PeakMemory() as memory:
            for k in KS:
                row[f"p{k}"] = latencies(index, "images", queries[: plan["queries"]], k)
            batch = queries[: plan["batch"]]
            start = time.perf_counter()
            index.search("images", batch, KS[0])
            row["throughput"] = len(batch) / (time.perf_counter() - start)
        row["memory"] = memory.growth
        log(f"search {row['search']}: p50/p95 k=16 {row['p16']}, k=256 {row['p256']}, {row['throughput']:.0f} q/s")
    index.use_search("exact")
    return rows


def measure_two_processes(plan: dict, folder: Path, log) -> dict:
    """The bundled model indexes the same image files with 1 process and with 2 (torchrun)."""
    import PIL.Image

    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(plan["images"]):
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    runs = {}
    for name, processes in (("one", 1), ("two", 2)):
        output = folder / f"{name}.index"
        worker = [str(Path(__file__).resolve()), "--worker", str(images), str(output), str(plan["shard_size"] // 8)]
        if processes == 1:
            command, threads = [sys.executable, *worker], "2"
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port()}"]
            command, threads = [*command, *worker], "1"
        start = time.perf_counter()
        done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        build = max(json.loads(line)["seconds"] for line in done.stdout.splitlines() if line.startswith("{"))
        runs[name] = dict(wall=wall, build=build, output=output)
        log(f"{processes} process(es): build_index {build:.1f} s, command {wall:.1f} s")
    from transformers_albef.retrieval_index import RetrievalIndex

    one, two = (RetrievalIndex.load(runs[name]["output"]) for name in ("one", "two"))
    same_layout = one._meta["images"] == two._meta["images"] and list(one.images) == list(two.images)
    difference = float((one.image_embeds - two.image_embeds).abs().max())
    return dict(images=plan["images"], runs=runs, same_layout=same_layout, difference=difference)


def port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(images: str, output: str, shard_size: str) -> None:
    """One process of the two-process build (or the single process): prints {"seconds": build_index time}."""
    import transformers_albef as ta
    from transformers_albef.retrieval_index import RetrievalEngine, list_image_files

    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = ta.bundled_model_path("retrieval")
    model = ta.AlbefForRetrieval.from_pretrained(path).eval()
    engine = RetrievalEngine(model, ta.AlbefProcessor.from_pretrained(path), batch_size=32, progress=False)
    if state is not None:
        state.wait_for_everyone()  # the build is timed from a common start, not from each process's start-up
    start = time.perf_counter()
    engine.build_index(images=list_image_files(images), path=output, shard_size=int(shard_size))
    print(json.dumps({"seconds": time.perf_counter() - start}))


# ----- the report ----------------------------------------------------------------------------------------------------
def projected(rows: list[dict], key: str, count: int) -> float:
    """Linear in N through the two measured sizes."""
    (a, b) = rows
    slope = (b[key] - a[key]) / (b["count"] - a["count"])
    return b[key] + slope * (count - b["count"])


def render(plan: dict, size: str, builds: list[dict], searches: list[dict], two: dict | None, argv, seconds) -> str:
    from transformers_albef.retrieval_backends import faiss_available

    faiss_version = "not installed"
    if faiss_available():
        import faiss

        faiss_version = faiss.__version__
    load = os.getloadavg()[0]
    big = plan["count"] * 10
    lines = [
        f"## The retrieval index at scale ({'1M' if size == 'full' else size} synthetic embeddings, CPU)",
        "",
        f"`python benchmarks/retrieval_scale.py {' '.join(argv)}`".replace(" `", "`"),
        f"({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores shared with other jobs: load average "
        f"{LOAD_AT_START:.1f} at the start, {load:.1f} at the end; torch {torch.__version__}, faiss {faiss_version}; "
        f"{seconds / 60:.1f} min in all). "
        f"{plan['dim']}-d float32 embeddings, shards of {plan['shard_size']}; method and data in the script's "
        "docstring. Memory is the peak growth of the anonymous resident set: the memory-mapped shards are page cache "
        "(reclaimable), not counted.",
        "",
        "**Build, disk, memory** (`RetrievalIndex.from_embeddings`, one process; open = `RetrievalIndex.load`, every "
        "shard checked):",
        "",
        "| embeddings | build | rate | disk | peak memory | open |",
        "|---|---|---|---|---|---|",
    ]
    for row in builds:
        lines.append(
            f"| {human_count(row['count'])} | {row['seconds']:.1f} s | {row['count'] / row['seconds'] / 1e3:.0f}k/s "
            f"| {human_bytes(row['disk'])} | {human_bytes(row['memory'])} | {row['open']:.2f} s |"
        )
    lines.append(
        f"| {human_count(big)} (projected) | {projected(builds, 'seconds', big):.0f} s | | "
        f"{human_bytes(projected(builds, 'disk', big))} | about the same (one shard at a time) | "
        f"{projected(builds, 'open', big):.1f} s |"
    )
    n = builds[-1]["count"]
    lines += [
        "",
        f"**Queries over {human_count(n)}** (single query: p50 / p95 in ms; batched: {plan['batch']} queries at "
        "k=16; recall@k: share of the exact top-k found, on "
        f"{plan['recall_queries']} queries; memory: peak growth while searching):",
        "",
        "| search | index | build | size | recall@16 | recall@256 | k=16 p50 / p95 | k=256 p50 / p95 | batched | "
        "memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in searches:
        entry = row.get("entry")
        if entry is None:
            what = "exact, streamed from the shards" if row["search"] == "torch" else "exact, IndexFlatIP"
            built, size_, recall = "–", "–", ("1 (exact)", "1 (exact)")
        else:
            what = f"`{entry['factory']}` ({', '.join(f'{k}={v}' for k, v in entry['parameters'].items()) or '–'})"
            built, size_ = f"{entry['build_seconds']:.1f} s", human_bytes(entry["bytes"])
            recall = tuple(f"{entry['recall'][str(k)]:.3f}" for k in KS)
        lines.append(
            f"| `{row['search']}` | {what} | {built} | {size_} | {recall[0]} | {recall[1]} | "
            f"{row['p16'][0]:.1f} / {row['p16'][1]:.1f} | {row['p256'][0]:.1f} / {row['p256'][1]:.1f} | "
            f"{row['throughput']:.0f} q/s | {human_bytes(row['memory'])} |"
        )
    exact = {row["search"]: row for row in searches if "entry" not in row}
    factor = big / n
    lines += [
        "",
        f"At {human_count(big)} (projected, linear in N): the exact searches read every embedding per query batch, "
        f"about {factor:.0f}x the times above ("
        + ", ".join(f"`{name}` k=16 p50 ~{row['p16'][0] * factor / 1000:.1f} s" for name, row in exact.items())
        + f"); `flat` holds {human_bytes(big * plan['dim'] * 4)} in memory (its peak above is twice that: faiss "
        "grows its array while the shards are added), `torch` streams it from the page cache. IVF and PQ indexes "
        f"grow about linearly in build time and size (PQ codes: {plan['dim'] // 8} bytes per vector), HNSW's build "
        "time somewhat faster. More cells probed (`nprobe`) or a wider graph search (`efSearch`) buy recall for "
        "time: `RetrievalIndex.load(path, search='hnsw', efSearch=512)`.",
    ]
    if two is not None:
        one, pair = two["runs"]["one"], two["runs"]["two"]
        lines += [
            "",
            f"**Two processes** (bundled retrieval model, {two['images']} synthetic 64-px PNG files, CPU):",
            "",
            "| processes | `build_index` | whole command (start, model load) | images/s (build) |",
            "|---|---|---|---|",
            f"| 1 (2 torch threads) | {one['build']:.1f} s | {one['wall']:.1f} s | "
            f"{two['images'] / one['build']:.0f} |",
            f"| 2 (torchrun, gloo, 1 thread each) | {pair['build']:.1f} s | {pair['wall']:.1f} s | "
            f"{two['images'] / pair['build']:.0f} |",
            "",
            f"The two indexes: same shards and items: {'yes' if two['same_layout'] else 'NO'}; embeddings "
            + ("identical." if two["difference"] == 0 else f"differ by at most {two['difference']:.1e} (rounding)."),
        ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) this script's section of `path`, keeping the rest."""
    sections.write_section(path, "retrieval-scale", body, header="# Benchmarks\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PLANS), default="full")
    parser.add_argument("--count", type=int, default=None, help="embeddings (default: full 1M, tiny 4000)")
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss CPU threads (default 2)")
    parser.add_argument("--no-two-processes", action="store_true", help="skip the two-process build")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--workdir", type=Path, default=None, help="where the indexes are written (default: a tmp)")
    args = parser.parse_args(argv)
    plan = dict(PLANS[args.size])
    plan["count"] = args.count or plan["count"]
    torch.set_num_threads(args.threads)
    from transformers_albef.retrieval_backends import faiss_available

    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    folder = Path(tempfile.mkdtemp(prefix="albef-scale-", dir=args.workdir))
    try:
        builds, index, queries = measure_build(plan, folder, log)
        searches = measure_searches(plan, index, queries, log)
        del index
        two = None if args.no_two_processes else measure_two_processes(plan, folder, log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    body = render(plan, args.size, builds, searches, two, argv, time.perf_counter() - started)
    print(body)
    if not args.no_write:
        write_section(args.output, body)
        log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
