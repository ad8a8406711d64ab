"""`albef retrieve`: index a folder of images and/or a file of captions (or load a saved index) and search it.

Under torchrun / `accelerate launch` the build is split between the processes (each embeds every N-th shard of
`--save-index`); the main process then answers the queries."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import CliError, add_model_arguments, load_model, nonempty, positive_int, resolve_device

ANN_CHOICES = {
    "ivf": "k-means cells, exact vectors",
    "hnsw": "a graph, no training, the slowest to build",
    "pq": "product-quantised vectors (dim/8 bytes each), scanned",
    "ivfpq": "cells over product-quantised vectors, the smallest",
}
SCORE_HELP = (
    "ranking score of the re-ranked candidates: itm (the ITM match logit, as the original ALBEF evaluation), "
    "itm+itc (plus the ITC similarity, as LAVIS) or itc (ITC similarity only, no re-ranking) (default: itm)"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "retrieve",
        help="search images by text and texts by image",
        description="Searches a corpus the way ALBEF evaluates retrieval: the --candidates best matches by ITC "
        "embedding similarity are re-ranked by the image-text matching (ITM) head. The corpus is a folder of images "
        "(--images) and/or a file of captions (--captions), indexed on the fly and optionally saved (--save-index), "
        "or an index saved earlier (--index). --text queries search the images, --image queries search the captions. "
        "A build saved with --save-index is written in shards: an interrupted build resumes from the shards it "
        "finished, and under torchrun / `accelerate launch` the processes share the work.",
        epilog="examples: albef retrieve --images photos/ --save-index photos.index --text 'a dog on the beach'; "
        "albef retrieve --index photos.index --build-ann hnsw; "
        "albef retrieve --index photos.index --search hnsw --text-file queries.txt --json",
    )
    corpus = parser.add_argument_group("corpus")
    corpus.add_argument("--images", metavar="FOLDER", help="a folder of images to index (its files, not subfolders)")
    corpus.add_argument(
        "--captions", metavar="FILE", help="captions to index: a text file with one caption per line, or a JSON list"
    )
    corpus.add_argument(
        "--index", metavar="DIR", help="a saved index (from --save-index) instead of --images/--captions"
    )
    corpus.add_argument("--save-index", metavar="DIR", help="save the index built from --images/--captions here")
    corpus.add_argument(
        "--overwrite",
        action="store_true",
        help="let --save-index replace an existing index (never a file or a folder that is not an index)",
    )
    corpus.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="items per shard of --save-index: the unit of resumption and of work between processes (default: 4096)",
    )
    corpus.add_argument(
        "--no-resume",
        action="store_true",
        help="discard the shards of an interrupted --save-index build instead of resuming from them",
    )
    corpus.add_argument(
        "--build-ann",
        action="append",
        default=[],
        metavar="KIND",
        choices=sorted(ANN_CHOICES),
        help="build an approximate faiss index into the saved index (--save-index or --index; repeatable): "
        + "; ".join(f"{k}: {v}" for k, v in ANN_CHOICES.items())
        + ". Its recall@16/@256 against the exact search is measured and printed",
    )
    corpus.add_argument(
        "--skip-non-images", action="store_true", help="ignore files in --images that are not images (else an error)"
    )
    queries = parser.add_argument_group("queries")
    queries.add_argument(
        "--text",
        action="append",
        type=nonempty,
        default=[],
        metavar="QUERY",
        help="search the images for this text (repeatable)",
    )
    queries.add_argument(
        "--text-file",
        metavar="FILE",
        help="search the images for every text in FILE (one per line, or a JSON list), in batches",
    )
    queries.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="search the captions for this image (repeatable)"
    )
    queries.add_argument(
        "--search",
        default="exact",
        metavar="NAME",
        help="candidate search: exact (faiss IndexFlatIP when faiss is installed, else torch; the default), torch, "
        "flat, or an approximate index built with --build-ann (ivf, hnsw, pq, ivfpq)",
    )
    queries.add_argument("--top-k", type=positive_int, default=5, help="how many ranked matches to print (default: 5)")
    queries.add_argument(
        "--candidates",
        type=positive_int,
        default=None,
        metavar="K",
        help="ITC candidates re-ranked by ITM (default: the model's retrieval_k, at most the corpus size)",
    )
    queries.add_argument("--score", choices=("itm", "itm+itc", "itc"), default="itm", help=SCORE_HELP)
    queries.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images or texts per forward (default: 64)"
    )
    add_model_arguments(parser, "retrieval", what="retrieval model")
    parser.set_defaults(func=run)


def read_captions(path: str | Path, what: str = "caption") -> list[str]:
    """Captions (or query texts) from a text file (one per line, blank lines skipped) or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            captions = json.loads(text)
        except json.JSONDecodeError as error:
            raise CliError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise CliError(f"{path} must hold a JSON list of strings (one {what} each)")
    else:
        captions = text.splitlines()
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise CliError(f"{path} holds no {what}s")
    return captions


def _check_arguments(args) -> None:
    if args.index and (args.images or args.captions):
        raise CliError("--index loads a saved index; it cannot be combined with --images/--captions")
    if args.index and args.save_index:
        raise CliError("--save-index saves an index built from --images/--captions; --index is already saved")
    if not (args.index or args.images or args.captions):
        raise CliError("nothing to search: give --images FOLDER and/or --captions FILE, or --index DIR")
    if not (args.text or args.text_file or args.image or args.save_index or args.build_ann):
        raise CliError("nothing to do: give --text/--image queries, or --save-index DIR to build an index")
    if args.build_ann and not (args.index or args.save_index):
        raise CliError("--build-ann adds to a saved index: give --save-index DIR or --index DIR")
    for path in args.image:
        if not Path(path).is_file():
            raise CliError(f"query image not found: {path}")


def _shown(item) -> str:
    """An image path relative to the current folder when it lies below it; a text as is."""
    if item is None:
        return "<in-memory image>"
    if os.path.isabs(item):
        relative = os.path.relpath(item)
        return item if relative.startswith("..") else relative
    return item


def run(args) -> int:
    import transformers_albef as ta
    from transformers_albef.retrieval_backends.storage import DEFAULT_SHARD_SIZE
    from transformers_albef.retrieval_index import RetrievalEngine, list_image_files

    from .evaluate import _process_state

    _check_arguments(args)
    images = list_image_files(args.images, skip_non_images=args.skip_non_images) if args.images else None
    captions = read_captions(args.captions) if args.captions else None
    text_queries = list(args.text) + (read_captions(args.text_file, "query text") if args.text_file else [])
    state = _process_state(args.device)
    if state is not None and not (args.index or args.save_index):
        raise CliError("several processes build one index through a folder: give --save-index DIR")
    device = resolve_device(args.device) if state is None or args.device else state.device
    is_main = state is None or state.is_main_process
    model, processor = load_model(args.model, ta.AlbefForRetrieval, "retrieval", device)
    engine = RetrievalEngine(model, processor, batch_size=args.batch_size, progress=is_main and sys.stderr.isatty())
    if args.index:
        if not is_main:
            return 0  # a saved index: the main process answers alone
        index = engine.load_index(args.index, search=args.search)
    else:
        index = engine.build_index(
            images=images,
            texts=captions,
            path=args.save_index,
            overwrite=args.overwrite,
            shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
            resume=not args.no_resume,
            search=args.search,
        )
        if not is_main:
            return 0
    built = {}
    for kind in args.build_ann:
        built[kind] = index.build_ann(kind)
    summary = f"index: {index.num_images} image(s), {index.num_texts} caption(s)"
    if args.save_index:
        summary += f", saved to {args.save_index}"
    searches = []
    if text_queries:
        searches += [
            ("text -> image", r) for r in engine.text_to_image(index, text_queries, args.candidates, args.score)
        ]
    if args.image:
        searches += [
            ("image -> text", r) for r in engine.image_to_text(index, args.image, args.candidates, args.score)
        ]

    if args.json:
        report = {
            "index": {"images": index.num_images, "texts": index.num_texts, "path": args.index or args.save_index}
        }
        if built:
            report["built"] = built
        report["search"], report["score"] = args.search, args.score
        report["queries"] = [
            {
                "direction": direction.replace(" -> ", "_to_"),
                "query": result.query,
                "matches": [
                    {"rank": rank, "id": id_, "item": item, "score": score, "itc": itc}
                    for rank, (id_, item, score, itc) in enumerate(
                        zip(result.ids, result.items, result.scores, result.itc_scores), 1
                    )
                ][: args.top_k],
            }
            for direction, result in searches
        ]
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0

    print(summary)
    for kind, modalities in built.items():
        for modality, entry in modalities.items():
            recall = ", ".join(f"recall@{k} {value:.3f}" for k, value in entry["recall"].items())
            print(
                f"approximate search {kind!r} over the {modality}: {entry['factory']}, built in "
                f"{entry['build_seconds']:.1f} s; against the exact search: {recall} ({entry['recall_queries']})"
            )
    for direction, result in searches:
        shown = min(args.top_k, len(result))
        query = repr(result.query) if direction.startswith("text") else _shown(result.query)
        search = "" if args.search == "exact" else f", search={args.search}"
        print(f"\n{direction}: {query} (best {shown} of {len(result)} candidates, score={args.score}{search})")
        names = [_shown(item) for item in result.items[:shown]]
        width = min(max(len(name) for name in names), 60)
        for rank, (name, score, itc) in enumerate(zip(names, result.scores, result.itc_scores), 1):
            print(f"  {rank:>2}. {name:{width}s}  {score:8.3f}  (itc {itc:.3f})")
    return 0
