"""The work of `albef convert` (see `convert.py`, which holds its options and imports this module only when the
command runs: torch, transformers and the models are not needed to parse a command line or print `--help`)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, BertTokenizer

import transformers_albef as ta
from transformers_albef.conversion import detect_kind, load_config_file, load_original_checkpoint
from transformers_albef.hub import (
    HubPushError,
    OutputFolderError,
    atomic_folder,
    check_output_folder,
    write_hub_folder,
)
from transformers_albef.model_card import CARDS_BY_NAME, build_model_card, card_for_checkpoint

from .common import CliError, one_line
from .convert import HEAD_NAMES, KIND_OVERRIDES

# Target kind -> head. The checkpoint's own kind is the default target.
HEADS = {kind: getattr(ta, name) for kind, name in HEAD_NAMES.items()}
# Reloading memory-maps the weights at unaligned offsets, where BLAS may take other paths: not always bit-exact
# (seen: 2e-7 on identical weights).
RELOAD_TOLERANCE = 1e-5


def step(message: str):
    """Print a step and, when the context ends, how long it took (large checkpoints take a while)."""

    class _Step:
        def __enter__(self):
            self.start = time.perf_counter()
            print(f"{message} ...", flush=True)

        def __exit__(self, *exc):
            if exc[0] is None:
                print(f"  done in {time.perf_counter() - self.start:.1f} s", flush=True)

    return _Step()


def load_tokenizer(name_or_path: str | None) -> BertTokenizer:
    """The bundled bert-base-uncased vocabulary by default; a vocab.txt, a tokenizer folder or a Hub name otherwise.
    A source that gives no vocabulary (only special tokens) is an error naming it."""
    try:
        if name_or_path is None:
            return BertTokenizer(vocab=str(ta.models.albef.processing_albef.BERT_VOCAB), model_max_length=512)
        if Path(name_or_path).is_file():
            tokenizer = BertTokenizer(vocab=name_or_path, model_max_length=512)
        else:
            tokenizer = BertTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CliError(
            f"--tokenizer {name_or_path}: cannot load a WordPiece vocabulary from it ({one_line(error)})"
        ) from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise CliError(f"--tokenizer {name_or_path}: no vocabulary found there (only {len(tokenizer)} special tokens)")
    return tokenizer


def check_tokenizer(tokenizer, model) -> None:
    """The vocabulary must cover the model's: a smaller one leaves word embeddings unreachable and means another
    vocabulary (refused); a larger one gives ids the model does not have (said)."""
    words, vocab_size = len(tokenizer), model.config.text_config.vocab_size
    if words < vocab_size:
        raise CliError(
            f"the tokenizer has {words} tokens but the model's vocabulary has {vocab_size} (text_config.vocab_size): "
            "pass the checkpoint's own vocabulary with --tokenizer"
        )
    if words > vocab_size:
        print(f"note: the tokenizer has {words} tokens, the model {vocab_size}: ids >= {vocab_size} are out of range")


def probe_inputs(model):
    """A small deterministic batch of the model's input shapes (2 pairs; padding in the second text)."""
    generator = torch.Generator().manual_seed(0)
    size, text = model.config.vision_config.image_size, model.config.text_config
    pixel_values = torch.randn(2, 3, size, size, generator=generator)
    ids = torch.randint(min(1000, text.vocab_size // 2), text.vocab_size, (2, 6), generator=generator)
    ids[:, 0] = text.cls_token_id
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = text.pad_token_id, 0
    if isinstance(model, ta.AlbefForVisualReasoning):
        pixel_values = torch.stack([pixel_values, pixel_values.flip(0)], 1)
    return pixel_values, ids, mask


@torch.no_grad()
def probe(model) -> dict[str, torch.Tensor]:
    """The outputs the reload check compares: every tower and head the model has."""
    pixel_values, ids, mask = probe_inputs(model)
    if isinstance(model, ta.AlbefForQuestionAnswering):
        answers = ids[:, :4].clone()
        answers[:, -1] = model.config.text_config.sep_token_id
        ranked_ids, ranked_probs = model.rank_answers(pixel_values, ids, mask, answers, torch.ones_like(answers), k=2)
        return {"question_states": model(pixel_values, ids, mask).question_states, "rank_probs": ranked_probs}
    if isinstance(model, (ta.AlbefForVisualReasoning, ta.AlbefForVisualEntailment)):
        return {"logits": model(pixel_values, ids, mask).logits}
    if isinstance(model, ta.AlbefForTextAssignment):
        order = torch.arange(2)
        return {"logits": model(pixel_values, ids, mask, image0_index=order, image1_index=order.flip(0)).logits}
    if isinstance(model, ta.AlbefForRetrieval):
        out = model(pixel_values, ids, mask, use_itm_head=True)
        return {"logits_per_image": out.logits_per_image, "itm_logits": out.itm_logits}
    return {"logits_per_image": model(pixel_values, ids, mask).logits_per_image}


def verify_reload(model, folder: Path) -> float:
    """Reload `folder` with the head's class and every Auto class its `auto_map` lists (AutoModel only where the
    ITC model is part of the head), and return the largest output difference of the head to `model`."""
    config = AutoConfig.from_pretrained(folder)
    assert type(config) is ta.AlbefConfig, f"AutoConfig gave {type(config).__name__}"
    for name, class_name in ta.models.albef.modeling_albef.AUTO_CLASSES.items():
        expected = getattr(ta, class_name)  # with the package installed, its registrations decide
        if isinstance(model, expected):
            loaded = getattr(transformers, name).from_pretrained(folder)
            assert type(loaded) is expected, f"{name} gave {type(loaded).__name__}, expected {expected.__name__}"
    reloaded = type(model).from_pretrained(folder, attn_implementation=model.config._attn_implementation).eval()
    want, got = probe(model), probe(reloaded)
    not_finite = [name for name in want if not (torch.isfinite(want[name]).all() and torch.isfinite(got[name]).all())]
    if not_finite:
        return float("nan")  # the check must fail, not compare NaN with NaN
    return max(float((want[name] - got[name]).abs().max()) for name in want)


def compare_with_original(original_repo: str, model, checkpoint) -> list[str]:
    """Compare with the original code where it imports. Its `models/vit.py` needs only timm; its `models/xbert.py`
    needs transformers 4.8-era APIs and does not import under transformers 5, which is said, not hidden."""
    sys.path.insert(0, original_repo)
    try:
        lines = [compare_vision_tower(model, checkpoint)]
        try:
            import models.xbert  # noqa: F401
        except Exception as error:
            lines.append(
                f"original text encoder (models/xbert.py) not importable here ({type(error).__name__}); skipped"
            )
        return lines
    except Exception as error:
        return [f"original code at {original_repo} is not importable here ({type(error).__name__}: {error}); skipped"]
    finally:
        sys.path.remove(original_repo)


def compare_vision_tower(model, checkpoint) -> str:
    """Image-encoder outputs of the original `VisionTransformer` with the checkpoint's weights vs the port's."""
    from models.vit import VisionTransformer, interpolate_pos_embed

    vision = model.config.vision_config
    original = VisionTransformer(
        img_size=vision.image_size,
        patch_size=vision.patch_size,
        embed_dim=vision.hidden_size,
        depth=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        mlp_ratio=vision.intermediate_size / vision.hidden_size,
        qkv_bias=vision.qkv_bias,
        norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=vision.layer_norm_eps),
    ).eval()
    weights = {k[len("visual_encoder.") :]: v for k, v in checkpoint.items() if k.startswith("visual_encoder.")}
    weights["pos_embed"] = interpolate_pos_embed(weights["pos_embed"], original)
    original.load_state_dict(weights)
    pixel_values = probe_inputs(model)[0]
    if pixel_values.ndim == 5:
        pixel_values = pixel_values[:, 0]
    with torch.no_grad():
        diff = (original(pixel_values) - model.vision_model(pixel_values).last_hidden_state).abs().max()
    return f"original image encoder (models/vit.py) vs port: max abs diff {float(diff):.3g}"


def convert(args) -> tuple[object, object]:
    with step(f"loading {args.checkpoint}"):
        state_dict = load_original_checkpoint(args.checkpoint)
    source_kind = detect_kind(state_dict)
    target = args.kind or source_kind
    overrides = dict(KIND_OVERRIDES.get(target, {}))
    if args.kind is None:
        # A released file converted as itself: its own settings (e.g. flickr30k.pth ranks the top 128).
        spec = CARDS_BY_NAME.get(card_for_checkpoint(args.checkpoint))
        overrides.update(spec.config_overrides if spec else {})
    kind = "retrieval" if target in KIND_OVERRIDES else target
    if args.drop_training_state:
        overrides["distill"] = False
    config = None
    if args.config:
        config = load_config_file(args.config)
        config.update(overrides)
        overrides = {}
    with step(f"converting a {source_kind} checkpoint into {HEADS[kind].__name__}"):
        model = HEADS[kind].from_original(state_dict, config=config, image_size=args.image_size, **overrides)
    print(model.conversion_report)
    return model, state_dict


def run(args) -> int:
    """Convert, save, verify the reload, optionally compare with the original code and push. User errors raise
    `CliError` (status 2; 1 when the saved folder does not reproduce the model, 3 when the push fails).

    The folder is written next to `--output-dir` and renamed into place only once the reload check passed: a failure
    at any point (an error, an interrupt, a full disk) leaves `--output-dir` as it was. A non-empty `--output-dir` is
    refused unless `--overwrite`, which replaces only a model folder this tool wrote."""
    try:
        check_output_folder(args.output_dir, args.overwrite, what="--output-dir")
    except OutputFolderError as error:
        raise CliError(str(error)) from None
    try:
        model, state_dict = convert(args)
        tokenizer = load_tokenizer(args.tokenizer)
    except (ValueError, OSError) as error:
        raise CliError(one_line(error)) from None
    check_tokenizer(tokenizer, model)
    processor = ta.AlbefProcessor(ta.AlbefImageProcessor(size=model.config.vision_config.image_size), tokenizer)
    card = build_card(args, model, getattr(args, "command_line", None) or "albef convert ...")

    try:
        with atomic_folder(args.output_dir, overwrite=args.overwrite, what="--output-dir") as staging:
            with step(f"writing {args.output_dir}"):
                write_hub_folder(model, processor, staging, card=card)
            with step("reloading the folder with the Auto classes"):
                diff = verify_reload(model, staging)
            print(f"reload check: max abs diff {diff:.3g} (tolerance {RELOAD_TOLERANCE})")
            if not diff <= RELOAD_TOLERANCE:  # NaN included
                what = (
                    "the converted model computes NaN or infinite outputs"
                    if math.isnan(diff)
                    else f"the saved folder does not reproduce the converted model (max abs diff {diff:.3g})"
                )
                raise CliError(f"{what}; {args.output_dir} was left as it was", status=1)
    except OutputFolderError as error:
        raise CliError(str(error)) from None
    except OSError as error:
        raise CliError(f"cannot write {args.output_dir}: {one_line(error)}; it was left as it was") from None
    if args.original_repo:
        print("\n".join(compare_with_original(args.original_repo, model, state_dict)))
    if args.push_to_hub:
        try:
            with step(f"pushing to {args.push_to_hub}"):
                commit = ta.hub.push_folder(args.output_dir, args.push_to_hub)
        except HubPushError as error:
            raise CliError(f"{error} The converted folder is kept at {args.output_dir}.", status=3) from None
        print(f"published: {commit.commit_url}")
    return 0


def build_card(args, model, command):
    """The card of the released file (or `--card`), or the generic one when the file is converted into another
    head or resolution."""
    return build_model_card(
        args.card or Path(args.checkpoint).name,
        repo_id=args.push_to_hub or args.output_dir.name,
        conversion_command=command,
        conversion_report=str(model.conversion_report),
        model=model,
        kind=args.kind,
    )
