"""Conversion of original ALBEF checkpoints (salesforce/ALBEF) to this port's state-dict layout.

The mapping is declarative: `KEY_RULES` renames every original key (momentum towers `<part>_m.` are matched without the
`_m` and moved under `momentum.`), `SKIPPED_KEYS` lists what is dropped on purpose, and the target model of each kind
is a table of top-level components (`TARGET_COMPONENTS`). On top of the table there are five transforms:

1. the ViT's fused `attn.qkv` projection is split into `q_proj`, `k_proj`, `v_proj` (rows in that order);
2. position embeddings are interpolated bicubically when the target image size differs (`interpolate_pos_embed`);
3. pre-training -> VQA: the answer decoder is built from the fusion layers, embeddings and MLM head of the encoder;
4. pre-training -> NLVR2 / text assignment: each fusion layer is duplicated into a (image 0, image 1) pair;
5. tied tensors (LM-head decoder = word embeddings, decoder bias = head bias, NLVR2 shared cross-attention key/value)
   must be equal in the checkpoint and are kept once; the model ties the other name to it.

Every original key ends up consumed or skipped with a reason, recorded in a `ConversionReport`.

Typical use is through the heads: `AlbefForRetrieval.from_original("mscoco.pth")`, which calls `from_original` below.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .models.albef.configuration_albef import ALBEF_PRESETS, AlbefConfig

# ----- original checkpoint kinds ------------------------------------------------------------------------------------

# Top-level parts of each original model (models/model_*.py). `parts` are required; the momentum twins
# (`<part>_m`) of `momentum` and the `buffers` are optional: released fine-tuned checkpoints drop them.
ORIGINAL_LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": {
        "parts": (
            "visual_encoder",
            "text_encoder.bert",
            "text_encoder.cls",
            "vision_proj",
            "text_proj",
            "itm_head",
            "temp",
        ),
        "momentum": ("visual_encoder", "text_encoder.bert", "text_encoder.cls", "vision_proj", "text_proj"),
        "buffers": ("image_queue", "text_queue", "queue_ptr"),
    },
    # Also grounding (RefCOCO+), which trains the retrieval model.
    "retrieval": {
        "parts": ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "temp"),
        "momentum": ("visual_encoder", "text_encoder", "vision_proj", "text_proj"),
        "buffers": ("image_queue", "text_queue", "queue_ptr", "idx_queue"),
    },
    "vqa": {
        "parts": ("visual_encoder", "text_encoder", "text_decoder.bert", "text_decoder.cls"),
        "momentum": ("visual_encoder", "text_encoder", "text_decoder.bert", "text_decoder.cls"),
        "buffers": (),
    },
    "text_assignment": {
        "parts": ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "ta_head", "temp"),
        "momentum": (),
        "buffers": (),
    },
    "nlvr": {
        "parts": ("visual_encoder", "text_encoder", "cls_head"),
        "momentum": ("visual_encoder", "text_encoder", "cls_head"),
        "buffers": (),
    },
    "ve": {
        "parts": ("visual_encoder", "text_encoder", "cls_head"),
        "momentum": ("visual_encoder", "text_encoder", "cls_head"),
        "buffers": (),
    },
}

# NLVR2 and SNLI-VE checkpoints have the same parts; their classifiers differ (2 vs 3 classes).
CLASSIFIER_KINDS = {2: "nlvr", 3: "ve"}

# Source kind -> target kinds that make sense (the original fine-tuning scripts' loading paths, plus feature
# extraction). "itc" is `AlbefModel`, the two towers with the contrastive projections.
SUPPORTED_CONVERSIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("pretrain", "retrieval", "vqa", "nlvr", "text_assignment", "ve", "itc"),
    "retrieval": ("retrieval", "itc"),
    "vqa": ("vqa",),
    "nlvr": ("nlvr",),
    "text_assignment": ("text_assignment", "nlvr"),
    "ve": ("ve",),
}

MODEL_CLASS_KINDS = {
    "AlbefModel": "itc",
    "AlbefForPreTraining": "pretrain",
    "AlbefForRetrieval": "retrieval",
    "AlbefForQuestionAnswering": "vqa",
    "AlbefForVisualReasoning": "nlvr",
    "AlbefForTextAssignment": "text_assignment",
    "AlbefForVisualEntailment": "ve",
}

PRE_TRAINING_KINDS = ("pretrain", "text_assignment")
FINE_TUNING_KINDS = ("retrieval", "vqa", "nlvr", "ve")

# `AlbefConfig.from_preset` name of each target kind (None: the plain defaults).
KIND_PRESETS = {
    "pretrain": "pretrain",
    "retrieval": "retrieval_coco",
    "vqa": "vqa",
    "nlvr": "nlvr",
    "text_assignment": "text_assignment",
    "ve": "ve",
    "itc": None,
}

# ----- key map ------------------------------------------------------------------------------------------------------

# Everything a BERT tower holds; the names are kept as they are.
_BERT = (
    r"(embeddings\.(?:word_embeddings|position_embeddings|token_type_embeddings)\.weight"
    r"|embeddings\.LayerNorm\.(?:weight|bias)"
    r"|encoder\.layer\.\d+\.(?:(?:attention|crossattention)\.(?:self\.(?:query|key|value)|output\.(?:dense|LayerNorm))"
    r"|intermediate\.dense|output\.(?:dense|LayerNorm))\.(?:weight|bias))"
)
_LM_HEAD = r"(transform\.(?:dense|LayerNorm)\.(?:weight|bias)|decoder\.(?:weight|bias)|bias)"

# (original key, port key), matched in full against the key with any momentum `_m` removed. A `{}` in the port key
# marks a fused tensor split along dim 0 into one key per name in `FUSED_SPLITS`.
KEY_RULES: list[tuple[str, str]] = [
    # ViT: timm/DeiT names -> transformers 5.x ViT names
    (r"visual_encoder\.cls_token", "vision_model.embeddings.cls_token"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embeddings"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embeddings.projection.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision_model.layers.\1.layernorm_before.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision_model.layers.\1.attention.{}_proj.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_model.layers.\1.attention.o_proj.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision_model.layers.\1.layernorm_after.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.layers.\1.mlp.\2.\3"),
    (r"visual_encoder\.norm\.(weight|bias)", r"vision_model.layernorm.\1"),
    # BERT towers: only the wrapper prefix changes (`BertForMaskedLM.bert` in pre-training, a bare `BertModel` after)
    (r"text_encoder\.(?:bert\.)?" + _BERT, r"text_model.\1"),
    (r"text_encoder\.cls\.predictions\." + _LM_HEAD, r"mlm_head.\1"),
    (r"text_decoder\.bert\." + _BERT, r"text_decoder.\1"),
    (r"text_decoder\.cls\.predictions\." + _LM_HEAD, r"lm_head.\1"),
    # heads
    (r"(vision_proj|text_proj|itm_head|ta_head)\.(weight|bias)", r"\1.\2"),
    (r"cls_head\.([02])\.(weight|bias)", r"classifier.\1.\2"),
    (r"temp", "temp"),
    # MoCo queues are training state and live with the momentum towers
    (r"(image_queue|text_queue|queue_ptr|idx_queue)", r"momentum.\1"),
]
FUSED_SPLITS = ("q", "k", "v")

# (original key, reason): dropped whatever the target.
SKIPPED_KEYS: list[tuple[str, str]] = [
    (r".+\.embeddings\.position_ids", "constant buffer: arange position ids, rebuilt by the port (non-persistent)"),
]

_MOMENTUM_PART = re.compile(r"(visual_encoder|text_encoder|text_decoder|vision_proj|text_proj|cls_head)_m\.")
_PART = re.compile(
    r"(visual_encoder|text_encoder|text_decoder|vision_proj|text_proj|itm_head|ta_head|cls_head)"
    r"(_m)?\.(?:(bert|cls)\.)?"
)
_KEY_RULES = [(re.compile(pattern), replacement) for pattern, replacement in KEY_RULES]
_SKIPPED_KEYS = [(re.compile(pattern), reason) for pattern, reason in SKIPPED_KEYS]

# ----- target models ------------------------------------------------------------------------------------------------

# Top-level components of each target model, and those of its `momentum` module (built only with `distill=True`).
TARGET_COMPONENTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("vision_model", "text_model", "vision_proj", "text_proj", "temp", "itm_head", "mlm_head"),
    "retrieval": ("vision_model", "text_model", "vision_proj", "text_proj", "temp", "itm_head"),
    "itc": ("vision_model", "text_model", "vision_proj", "text_proj", "temp"),
    "vqa": ("vision_model", "text_model", "text_decoder", "lm_head"),
    "nlvr": ("vision_model", "text_model", "classifier"),
    "ve": ("vision_model", "text_model", "classifier"),
    "text_assignment": ("vision_model", "text_model", "vision_proj", "text_proj", "temp", "ta_head"),
}
_QUEUES = ("image_queue", "text_queue", "queue_ptr")
MOMENTUM_COMPONENTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("vision_model", "text_model", "vision_proj", "text_proj", "mlm_head", *_QUEUES),
    "retrieval": ("vision_model", "text_model", "vision_proj", "text_proj", *_QUEUES, "idx_queue"),
    "itc": (),  # AlbefModel does not train
    "vqa": ("vision_model", "text_model", "text_decoder", "lm_head"),
    "nlvr": ("vision_model", "text_model", "classifier"),
    "ve": ("vision_model", "text_model", "classifier"),
    "text_assignment": (),
}


def tied_keys(config: AlbefConfig) -> dict[str, str]:
    """Port keys that hold the same tensor as another port key, `{tied key: key it follows}`. The converter checks
    each pair is equal in the checkpoint and keeps only the followed key; the model ties the other name to it."""
    pairs = {
        "mlm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight",
        "lm_head.decoder.weight": "text_decoder.embeddings.word_embeddings.weight",
        # The original decoder's bias *is* `predictions.bias`; the port's decoder has no bias and adds `bias`.
        "mlm_head.decoder.bias": "mlm_head.bias",
        "lm_head.decoder.bias": "lm_head.bias",
    }
    text = config.text_config
    if text.share_cross_attention_kv:
        # NLVR2: the image-0 layer of each fusion pair uses the image-1 layer's cross-attention key/value.
        for first in range(text.fusion_layer, text.num_hidden_layers, 2):
            for name in ("key.weight", "key.bias", "value.weight", "value.bias"):
                layer = "text_model.encoder.layer.{}.crossattention.self." + name
                pairs[layer.format(first)] = layer.format(first + 1)
    return {**pairs, **{f"momentum.{key}": f"momentum.{value}" for key, value in pairs.items()}}


# ----- report -------------------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What happened to every key of an original checkpoint.

    sources: new key -> original key its values come from.
    created: new keys that are not a 1:1 rename (VQA decoder copied from the encoder, NLVR2 layer duplicates) -> how.
    transformed: new keys whose values were transformed (qkv split, position-embedding interpolation) -> how.
    skipped: original key -> why it is not used, as "<category>: <detail>".
    new_components: target components the checkpoint does not provide (left at the model's initialisation).
    missing: exact target keys left at initialisation, tied names excluded (filled by `from_original`).
    """

    source_kind: str
    target_kind: str
    sources: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)
    transformed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    new_components: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def consumed(self) -> list[str]:
        return sorted(set(self.sources.values()))

    @property
    def renamed(self) -> dict[str, str]:
        return {new: old for new, old in self.sources.items() if new not in self.created}

    def __str__(self) -> str:
        lines = [
            f"ALBEF {self.source_kind} -> {self.target_kind}: {len(self.consumed) + len(self.skipped)} original keys, "
            f"{len(self.consumed)} consumed, {len(self.skipped)} skipped; {len(self.sources)} new keys "
            f"({len(self.renamed)} renamed, {len(self.created)} created, {len(self.transformed)} transformed)"
        ]
        if self.new_components:
            lines.append(f"not in the checkpoint (initialised by the model): {', '.join(self.new_components)}")
        if self.missing:
            lines.append(f"{len(self.missing)} target keys left at initialisation")
        # Reasons read "<category>: <detail>"; one line per category.
        by_category = defaultdict(list)
        for key, reason in self.skipped.items():
            by_category[reason.split(":")[0]].append(key)
        for category, keys in by_category.items():
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            lines.append(f"skipped ({category}): {len(keys)} keys: {shown}")
        return "\n".join(lines)


# ----- loading and detection ----------------------------------------------------------------------------------------


def load_original_checkpoint(path_or_state_dict) -> dict[str, torch.Tensor]:
    """Load an original ALBEF checkpoint: a `.pth` file (`{'model': state_dict, ...}` or a flat state dict), a
    `.safetensors` file, or an already loaded dict. Returns the flat state dict.

    `.pth` files are read with `torch.load(weights_only=True)` only: a file that needs arbitrary unpickling is refused,
    because unpickling can run code. Re-save such a file's `['model']` from a trusted environment.
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No ALBEF checkpoint at {path!r}")
        checkpoint = _load_safetensors(path) if path.endswith(".safetensors") else _load_pickle(path)
    if isinstance(checkpoint, Mapping) and "model" in checkpoint:
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"An ALBEF checkpoint is a state dict or {{'model': state_dict}}, got {type(checkpoint).__name__}"
        )
    where = "" if isinstance(path_or_state_dict, Mapping) else f"{os.fspath(path_or_state_dict)}: "
    not_strings = [key for key in checkpoint if not isinstance(key, str)]
    if not_strings:
        raise ValueError(f"{where}not a state dict: these keys are not strings: {not_strings[:10]}")
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{where}not a state dict: these entries are not tensors: {not_tensors[:10]}")
    if not checkpoint:
        raise ValueError(f"{where}the checkpoint holds no tensors")
    not_finite = non_finite_keys(checkpoint)
    if not_finite:
        raise ValueError(
            f"{where}{len(not_finite)} tensor(s) hold NaN or infinite values ({', '.join(not_finite[:5])}"
            f"{', ...' if len(not_finite) > 5 else ''}): a diverged or corrupt checkpoint, refused"
        )
    return dict(checkpoint)


def non_finite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors holding a NaN or an infinity (meta tensors are not checked)."""
    return [
        key
        for key, value in state_dict.items()
        if value.is_floating_point() and not value.is_meta and not bool(torch.isfinite(value).all())
    ]


def load_config_file(path: str | os.PathLike) -> AlbefConfig:
    """An `AlbefConfig` from a JSON file (or a model folder's `config.json`), with one-line errors that name the file
    and say what is wrong: not found, not JSON, not an object, another model type, or a value the configuration
    refuses (the validator's own reason, not its wrapper's)."""
    import json

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"configuration file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a JSON text file") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (an AlbefConfig), got a {type(data).__name__}")
    model_type = data.get("model_type", AlbefConfig.model_type)
    if model_type != AlbefConfig.model_type:
        raise ValueError(f"{path} is the configuration of a {model_type!r} model, not an ALBEF ('albef') one")
    problems = config_value_problems(data)
    if problems:
        raise ValueError(f"{path} is not a valid ALBEF configuration: {'; '.join(problems[:3])}")
    try:
        return AlbefConfig.from_dict(data)
    except Exception as error:  # noqa: BLE001 - configuration validators raise anything; reported with the file
        raise ValueError(f"{path} is not a valid ALBEF configuration: {config_error_reason(error)}") from error


# Sizes and counts that must be >= 1, and fractions that must lie in [0, 1], per (sub-)configuration.
_POSITIVE_FIELDS = {
    None: ("embed_dim", "queue_size", "decoder_num_hidden_layers", "retrieval_k", "answer_rank_k"),
    "text_config": (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "encoder_width",
        "num_fused_images",
    ),
    "vision_config": (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "image_size",
        "patch_size",
        "num_channels",
    ),
}
_FRACTION_FIELDS = ("momentum", "alpha", "mlm_probability", "hidden_dropout_prob", "attention_probs_dropout_prob")


def config_value_problems(data: Mapping) -> list[str]:
    """What is wrong with the values of a configuration dict, one phrase each (empty when nothing is): a value of
    another type than the field's default (a string for an integer, ...), a size below 1, a fraction outside
    [0, 1], a temperature <= 0. Unknown fields are left to the configuration."""
    defaults = AlbefConfig().to_dict()
    problems = []

    def check(values: Mapping, expected: Mapping, section: str | None):
        prefix = f"{section}." if section else ""
        for key, value in values.items():
            default = expected.get(key)
            name = f"{prefix}{key}"
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    problems.append(f"{name} must be true or false, got {value!r}")
                continue
            if isinstance(default, int) or (isinstance(default, float) and key not in ("temp",)):
                numeric = (int,) if isinstance(default, int) and not isinstance(default, bool) else (int, float)
                if isinstance(value, bool) or not isinstance(value, numeric):
                    kind = "an integer" if numeric == (int,) else "a number"
                    problems.append(f"{name} must be {kind}, got {value!r}")
                    continue
            if key in _POSITIVE_FIELDS[section] and value < 1:
                problems.append(f"{name} must be at least 1, got {value!r}")
            elif key in _FRACTION_FIELDS and isinstance(value, (int, float)) and not 0 <= value <= 1:
                problems.append(f"{name} must be between 0 and 1, got {value!r}")
            elif key == "temp" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                problems.append(f"{name} must be a number above 0, got {value!r}")

    check({k: v for k, v in data.items() if k not in ("text_config", "vision_config")}, defaults, None)
    for section in ("text_config", "vision_config"):
        if isinstance(data.get(section), Mapping):
            check(data[section], defaults[section], section)
    return problems


def config_error_reason(error: BaseException) -> str:
    """The reason of a configuration error on one line. A strict-dataclass error's first line is only "Class
    validation error for validator 'x':" / "Validation error for field 'y':": the wrapped cause is what says it."""
    text = " ".join(str(error).split())
    if type(error).__name__.startswith("StrictDataclass"):
        where = re.match(r"(?:Class validation error for validator|Validation error for field) '([^']+)':\s*", text)
        if where:
            return f"{text[where.end() :]} (checked by {where.group(1)})"
    return text or type(error).__name__


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path!r} is not a readable safetensors file (corrupt or truncated?): {error}") from error


def _load_pickle(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A truncated legacy pickle can also end up here, so both causes are named.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" (it references `{found.group(1)}`)" if found else ""
        raise ValueError(
            f"{path!r} cannot be loaded with torch.load(weights_only=True){what}. Either it holds objects that need "
            "arbitrary unpickling, which this loader refuses because unpickling can run code, or it is corrupt. If "
            "you trust the file, load it yourself and re-save its state dict (torch.save(ckpt['model'], ...) or "
            "safetensors)."
        ) from error
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, AttributeError) as error:
        message = f"{path!r} is not a readable PyTorch checkpoint (corrupt or truncated?): {error!r}"
        raise ValueError(message) from error


def _part(key: str) -> str:
    """The original top-level part a key belongs to, e.g. `text_encoder_m.bert`, `cls_head`, `temp`."""
    match = _PART.match(key)
    if match is None:
        return key
    name, momentum, sub = match.groups()
    return name + (momentum or "") + (f".{sub}" if sub else "")


def _momentum_part(part: str) -> str:
    name, _, sub = part.partition(".")
    return f"{name}_m" + (f".{sub}" if sub else "")


def detect_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The original model kind a state dict comes from: "pretrain", "retrieval" (also grounding), "vqa", "nlvr",
    "text_assignment" (pretrain_nlvr) or "ve". Raises `ValueError` naming the closest kind when none fits."""
    keys_by_part = defaultdict(list)
    for key in state_dict:
        keys_by_part[_part(key)].append(key)
    fits, misfits = [], {}
    for kind, layout in ORIGINAL_LAYOUTS.items():
        allowed = {*layout["parts"], *map(_momentum_part, layout["momentum"]), *layout["buffers"]}
        extra = [part for part in keys_by_part if part not in allowed]
        absent = [part for part in layout["parts"] if part not in keys_by_part]
        if not extra and not absent:
            fits.append(kind)
        misfits[kind] = (extra, absent)
    if fits == ["nlvr", "ve"]:
        classes = state_dict["cls_head.2.weight"].shape[0] if "cls_head.2.weight" in state_dict else None
        if classes not in CLASSIFIER_KINDS:
            raise ValueError(f"A classifier checkpoint with {classes} classes is neither NLVR2 (2) nor SNLI-VE (3)")
        return CLASSIFIER_KINDS[classes]
    if len(fits) == 1:
        return fits[0]
    closest = min(misfits, key=lambda kind: len(misfits[kind][0]) + len(misfits[kind][1]))
    extra, absent = misfits[closest]
    extra_keys = [key for part in extra for key in keys_by_part[part]]
    raise ValueError(
        f"Unrecognised ALBEF checkpoint. The closest kind is {closest!r}; keys that do not fit it: "
        f"{extra_keys[:20]}{' ...' if len(extra_keys) > 20 else ''}; parts it needs that are absent: {absent}"
    )


def _check_conversion(source_kind: str, target_kind: str):
    if target_kind not in TARGET_COMPONENTS:
        raise ValueError(f"Unknown target kind {target_kind!r}; expected one of {list(TARGET_COMPONENTS)}")
    if target_kind not in SUPPORTED_CONVERSIONS[source_kind]:
        raise ValueError(
            f"A {source_kind} checkpoint cannot initialise a {target_kind} model; it converts to "
            f"{list(SUPPORTED_CONVERSIONS[source_kind])}"
        )


# ----- configuration ------------------------------------------------------------------------------------------------


def _layer_indices(state_dict: Mapping[str, torch.Tensor], prefix: str, sub: str = "") -> set[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(sub))
    return {int(match.group(1)) for key in state_dict if (match := pattern.match(key))}


def _grid_size(num_positions: int, key: str) -> int:
    grid = int(round((num_positions - 1) ** 0.5))
    if grid * grid != num_positions - 1:
        raise ValueError(f"{key} has {num_positions} positions: not 1 [CLS] + a square grid of patches")
    return grid


def config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], kind: str, image_size: int | None = None, **overrides
) -> AlbefConfig:
    """The standard configuration of a `kind` model (the target) initialised from `state_dict`, with the sizes read
    from the checkpoint's shapes. `image_size` defaults to the checkpoint's (position-embedding grid x patch size),
    except when a pre-training checkpoint starts a fine-tuning head: then it is the task's (384) and `distill` is on,
    as in the original fine-tuning scripts.

    Shapes do not give the number of attention heads: it is `hidden_size // 64`, as in every released checkpoint;
    pass e.g. `text_config={"num_attention_heads": 2}` in `overrides` otherwise. `overrides` go to
    `AlbefConfig.from_preset` (sub-config dicts are merged with the derived ones).
    """
    source_kind = detect_kind(state_dict)
    _check_conversion(source_kind, kind)
    sd = state_dict
    # A pre-training checkpoint loaded into a task head is the start of fine-tuning: like the original fine-tuning
    # scripts, use the task's resolution (384) and build the momentum towers for distillation.
    fine_tuning = source_kind in PRE_TRAINING_KINDS and kind in FINE_TUNING_KINDS
    if image_size is None and fine_tuning:
        image_size = ALBEF_PRESETS[KIND_PRESETS[kind]]["vision_config"]["image_size"]
    text = "text_encoder.bert." if source_kind == "pretrain" else "text_encoder."
    try:
        patch = sd["visual_encoder.patch_embed.proj.weight"].shape
        _check_image_size(image_size, patch[-1])
        vision_hidden = sd["visual_encoder.cls_token"].shape[-1]
        text_hidden = sd[f"{text}embeddings.word_embeddings.weight"].shape[1]
        grid = _grid_size(sd["visual_encoder.pos_embed"].shape[1], "visual_encoder.pos_embed")
        vision_config = {
            "hidden_size": vision_hidden,
            "num_hidden_layers": len(_layer_indices(sd, "visual_encoder.blocks.")),
            "num_attention_heads": max(1, vision_hidden // 64),
            "intermediate_size": sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
            "patch_size": patch[-1],
            "num_channels": patch[1],
            "image_size": image_size if image_size is not None else grid * patch[-1],
        }
        num_layers = len(_layer_indices(sd, f"{text}encoder.layer."))
        fusion_layer = min(_layer_indices(sd, f"{text}encoder.layer.", "crossattention."), default=num_layers)
        if kind in ("nlvr", "text_assignment") and source_kind == "pretrain":
            num_layers = fusion_layer + 2 * (num_layers - fusion_layer)
        text_config = {
            "vocab_size": sd[f"{text}embeddings.word_embeddings.weight"].shape[0],
            "hidden_size": text_hidden,
            "num_hidden_layers": num_layers,
            "fusion_layer": fusion_layer,
            "num_attention_heads": max(1, text_hidden // 64),
            "intermediate_size": sd[f"{text}encoder.layer.0.intermediate.dense.weight"].shape[0],
            "max_position_embeddings": sd[f"{text}embeddings.position_embeddings.weight"].shape[0],
            "type_vocab_size": sd[f"{text}embeddings.token_type_embeddings.weight"].shape[0],
        }
    except (IndexError, KeyError) as error:
        raise ValueError(
            f"the checkpoint's tensors do not have the shapes of an original ALBEF {source_kind} model, so its sizes "
            f"cannot be read ({type(error).__name__}: {error}); it is damaged, or pass a matching --config"
        ) from None
    has_momentum = fine_tuning or any(_MOMENTUM_PART.match(key) for key in sd)
    derived = {"distill": bool(MOMENTUM_COMPONENTS[kind]) and has_momentum}
    if "vision_proj.weight" in sd:
        derived["embed_dim"] = sd["vision_proj.weight"].shape[0]
    if "image_queue" in sd:
        derived["queue_size"] = sd["image_queue"].shape[1]
    if kind == "vqa":
        decoder_layers = _layer_indices(sd, "text_decoder.bert.encoder.layer.")
        derived["decoder_num_hidden_layers"] = len(decoder_layers) if decoder_layers else num_layers - fusion_layer
    vision_config.update(overrides.pop("vision_config", {}))
    text_config.update(overrides.pop("text_config", {}))
    settings = {**derived, **overrides, "vision_config": vision_config, "text_config": text_config}
    preset = KIND_PRESETS[kind]
    try:
        return AlbefConfig.from_preset(preset, **settings) if preset else AlbefConfig(**settings)
    except Exception as error:  # noqa: BLE001 - configuration validators raise anything
        raise ValueError(
            f"the configuration read from the checkpoint's shapes is not valid: {config_error_reason(error)}"
        ) from error


def _check_image_size(image_size, patch_size: int) -> None:
    """An explicit image size must be a whole number of patches (0 or a negative size is not "the default")."""
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the checkpoint's patch size {patch_size}")


# ----- transforms ---------------------------------------------------------------------------------------------------


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize ViT position embeddings (1, 1 + s*s, D) to a `grid_size` x `grid_size` patch grid: the [CLS] position
    is kept, the grid is resized with bicubic interpolation (align_corners=False), as the original
    `interpolate_pos_embed` does. A no-op at the same size."""
    old = _grid_size(pos_embed.shape[1], "pos_embed")
    if old == grid_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    # Computed in fp32: bicubic interpolation is not implemented for every half type.
    grid = F.interpolate(grid.float(), size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


class _Converted:
    """The converted tensors with the original key each one comes from, and the bookkeeping for the report."""

    def __init__(self, report: ConversionReport):
        self.tensors: dict[str, torch.Tensor] = {}
        self.report = report
        self.dropped: dict[str, str] = {}  # original key -> why its last output was dropped

    def put(self, key: str, tensor: torch.Tensor, source: str, created: str | None = None):
        self.tensors[key] = tensor
        self.report.sources[key] = source
        if created:
            self.report.created[key] = f"{created} (from {source})"

    def pop(self, key: str, reason: str | None = None) -> tuple[torch.Tensor, str]:
        """Remove `key`; `reason` explains it in the report if no other output of the original key is kept."""
        source = self.report.sources.pop(key)
        self.report.created.pop(key, None)
        self.report.transformed.pop(key, None)
        if reason:
            self.dropped[source] = reason
        return self.tensors.pop(key), source


def rename_key(key: str) -> str | None:
    """The port key of an original key by `KEY_RULES`, or None when no rule matches. A `{}` in the result stands
    for the names of a fused tensor's parts (`FUSED_SPLITS`)."""
    momentum = _MOMENTUM_PART.match(key)
    if momentum:
        key = momentum.group(1) + key[momentum.end() - 1 :]
    for pattern, replacement in _KEY_RULES:
        match = pattern.fullmatch(key)
        if match:
            return ("momentum." if momentum else "") + match.expand(replacement)
    return None


def _rename(state_dict: Mapping[str, torch.Tensor], converted: _Converted):
    unknown = []
    for key, tensor in state_dict.items():
        reason = next((reason for pattern, reason in _SKIPPED_KEYS if pattern.fullmatch(key)), None)
        if reason:
            converted.report.skipped[key] = reason
            continue
        new_key = rename_key(key)
        if new_key is None:
            unknown.append(key)
        elif "{}" in new_key:
            for name, part in zip(FUSED_SPLITS, tensor.chunk(len(FUSED_SPLITS), dim=0)):
                converted.put(new_key.format(name), part.clone(), key)
                converted.report.transformed[new_key.format(name)] = f"rows of {key} for {name}"
        else:
            converted.put(new_key, tensor, key)
    if unknown:
        raise ValueError(f"No conversion rule for these original keys: {unknown}")


_TEXT_LAYER = re.compile(r"((?:momentum\.)?text_model\.)encoder\.layer\.(\d+)\.(.+)")


def _text_layers(converted: _Converted) -> tuple[dict[str, tuple[str, int, str]], int, int]:
    """`{key: (tower prefix, layer index, rest of the key)}` of the text-model layers, the number of layers and the
    fusion layer (the first with cross-attention)."""
    layers = {key: (m[1], int(m[2]), m[3]) for key in converted.tensors if (m := _TEXT_LAYER.fullmatch(key))}
    count = 1 + max(index for _, index, _ in layers.values())
    cross = (index for _, index, rest in layers.values() if rest.startswith("crossattention."))
    return layers, count, min(cross, default=count)


def _decoder_from_encoder(converted: _Converted, config: AlbefConfig):
    """VQA.py: the answer decoder starts as the encoder's embeddings, fusion layers [f, n) (renumbered from 0) and
    MLM head; the question encoder keeps all its layers."""
    layers, count, fusion_layer = _text_layers(converted)
    if count - fusion_layer != config.decoder_num_hidden_layers:
        raise ValueError(
            f"The encoder has {count - fusion_layer} fusion layers but config.decoder_num_hidden_layers is "
            f"{config.decoder_num_hidden_layers}"
        )
    for key, (prefix, index, rest) in layers.items():
        if index >= fusion_layer:
            new_key = f"{prefix.replace('text_model.', 'text_decoder.')}encoder.layer.{index - fusion_layer}.{rest}"
            converted.put(new_key, converted.tensors[key].clone(), converted.report.sources[key], "decoder layer")
    for key in list(converted.tensors):
        if re.match(r"(momentum\.)?text_model\.embeddings\.", key):
            new_key = key.replace("text_model.", "text_decoder.", 1)
            converted.put(new_key, converted.tensors[key].clone(), converted.report.sources[key], "decoder embeddings")
        elif re.match(r"(momentum\.)?mlm_head\.", key):
            converted.put(key.replace("mlm_head.", "lm_head.", 1), *converted.pop(key), "decoder LM head")


def _pair_fusion_layers(converted: _Converted, config: AlbefConfig):
    """Pretrain_nlvr.py: fusion layer L of the one-image encoder becomes the pair f + 2(L - f) (image 0) and
    f + 2(L - f) + 1 (image 1) of the two-image encoder; text layers keep their index."""
    layers, _, fusion_layer = _text_layers(converted)
    expected = config.text_config.fusion_layer
    if fusion_layer != expected:
        raise ValueError(f"The checkpoint's fusion layer is {fusion_layer}, the config's {expected}")
    # All fusion layers are taken out first: their new indices overlap the old ones.
    taken = {key: converted.pop(key) for key, (_, index, _) in layers.items() if index >= fusion_layer}
    for key, (tensor, source) in taken.items():
        prefix, index, rest = layers[key]
        first = fusion_layer + 2 * (index - fusion_layer)
        for new_index, image in ((first, 0), (first + 1, 1)):
            new_key = f"{prefix}encoder.layer.{new_index}.{rest}"
            converted.put(new_key, tensor.clone(), source, f"image-{image} copy of fusion layer {index}")


# (source kind, target kind) -> structural transform
STRUCTURAL_TRANSFORMS = {
    ("pretrain", "vqa"): _decoder_from_encoder,
    ("pretrain", "nlvr"): _pair_fusion_layers,
    ("pretrain", "text_assignment"): _pair_fusion_layers,
}


def _component(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "momentum" else parts[0]


def _target_components(config: AlbefConfig, target_kind: str) -> list[str]:
    momentum = MOMENTUM_COMPONENTS[target_kind] if config.distill else ()
    return [*TARGET_COMPONENTS[target_kind], *(f"momentum.{name}" for name in momentum)]


def _keep_target_components(converted: _Converted, config: AlbefConfig, target_kind: str):
    wanted = _target_components(config, target_kind)
    for key in list(converted.tensors):
        component = _component(key)
        if component in wanted:
            continue
        if component.startswith("momentum.") and not config.distill and MOMENTUM_COMPONENTS[target_kind]:
            reason = f"training state: {component} is a momentum part, and the target config has distill=False"
        else:
            reason = f"not in target: a {target_kind} model has no {component}"
        converted.pop(key, reason)
    present = {_component(key) for key in converted.tensors}
    converted.report.new_components = [component for component in wanted if component not in present]


def _drop_tied(converted: _Converted, config: AlbefConfig):
    sources = converted.report.sources
    for tied, followed in tied_keys(config).items():
        if tied not in converted.tensors or followed not in converted.tensors:
            continue
        a, b = converted.tensors[tied], converted.tensors[followed]
        if a.shape != b.shape or (not a.is_meta and not torch.equal(a, b)):
            raise ValueError(
                f"{sources[tied]} and {sources[followed]} are one tensor in the original model but differ in this "
                "checkpoint, so it is inconsistent; the port keeps them tied and cannot load both"
            )
        converted.pop(tied, f"tied: same tensor as {sources[followed]} (checked equal); the port ties them")


def _interpolate_position_embeddings(converted: _Converted, config: AlbefConfig):
    vision = config.vision_config
    for prefix in ("", "momentum."):
        key = f"{prefix}vision_model.embeddings.position_embeddings"
        if key not in converted.tensors:
            continue
        patch = converted.tensors[f"{prefix}vision_model.embeddings.patch_embeddings.projection.weight"].shape[-1]
        if patch != vision.patch_size:
            raise ValueError(f"The checkpoint's patch size is {patch}, the config's {vision.patch_size}")
        old = converted.tensors[key]
        new = interpolate_pos_embed(old, vision.grid_size)
        if new is not old:
            converted.tensors[key] = new
            old_grid = _grid_size(old.shape[1], key)
            new_grid = vision.grid_size
            converted.report.transformed[key] = f"bicubic {old_grid}x{old_grid} -> {new_grid}x{new_grid} patch grid"


# ----- conversion ---------------------------------------------------------------------------------------------------


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: AlbefConfig, target_kind: str, source_kind: str | None = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert a flat original state dict into the state dict of a `target_kind` model built from `config`.

    Raises `ValueError` for keys no rule knows, for conversions that make no sense (e.g. VQA -> retrieval) and for
    tied tensors that differ. Tied target names (LM-head decoder weight, NLVR2 image-0 cross-attention key/value) are
    not in the result: the model ties them. Momentum towers and queues are kept only with `config.distill`.
    """
    source_kind = source_kind or detect_kind(state_dict)
    _check_conversion(source_kind, target_kind)
    report = ConversionReport(source_kind, target_kind)
    converted = _Converted(report)
    _rename(state_dict, converted)
    transform = STRUCTURAL_TRANSFORMS.get((source_kind, target_kind))
    if transform:
        transform(converted, config)
    _keep_target_components(converted, config, target_kind)
    _drop_tied(converted, config)
    _interpolate_position_embeddings(converted, config)
    consumed = set(report.sources.values())
    for key in state_dict:
        if key not in consumed and key not in report.skipped:
            report.skipped[key] = converted.dropped[key]
    return converted.tensors, report


def _model_kind(model_class: type) -> str:
    for cls in model_class.__mro__:
        if cls.__name__ in MODEL_CLASS_KINDS:
            return MODEL_CLASS_KINDS[cls.__name__]
    raise ValueError(f"{model_class.__name__} is not an ALBEF head; expected one of {list(MODEL_CLASS_KINDS)}")


def from_original(
    model_class: type, checkpoint, config: AlbefConfig | None = None, image_size: int | None = None, **config_overrides
):
    """Build `model_class` (an ALBEF head) from an original checkpoint (path or state dict).

    Without `config`, the standard configuration is built from the checkpoint (`config_from_state_dict`);
    `image_size` overrides the image size either way (position embeddings are interpolated). Keys the checkpoint
    cannot provide are allowed only for components new to the task (e.g. the classifier when starting from
    pre-training, `idx_queue`); anything else raises. When the config asks for momentum towers (`distill=True`) and
    the checkpoint has none, they start as copies of the loaded weights. Returns the model in eval mode, with the
    `ConversionReport` on `model.conversion_report`.
    """
    state_dict = load_original_checkpoint(checkpoint)
    target_kind = _model_kind(model_class)
    source_kind = detect_kind(state_dict)
    if config is None:
        config = config_from_state_dict(state_dict, target_kind, image_size=image_size, **config_overrides)
    elif config_overrides:
        raise ValueError(f"pass either a config or config overrides, not both (got {sorted(config_overrides)})")
    elif image_size is not None:
        _check_image_size(image_size, config.vision_config.patch_size)
        config = copy.deepcopy(config)
        config.vision_config.image_size = image_size
    model = model_class(config)
    # The model's config: a head may adjust it (pre-training always builds its momentum towers).
    try:
        converted, report = convert_state_dict(state_dict, model.config, target_kind, source_kind)
    except (RuntimeError, IndexError) as error:  # a transform met a tensor of the wrong shape
        raise ValueError(
            f"the checkpoint's tensors do not have the shapes of an original ALBEF {source_kind} model: "
            f"{' '.join(str(error).split())}"
        ) from error
    _check_shapes(converted, model, report)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise ValueError(f"The conversion produced keys {model_class.__name__} does not have: {unexpected}")
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    report.missing = [key for key in missing if key not in tied]
    unexplained = [key for key in report.missing if _component(key) not in report.new_components]
    if unexplained:
        raise ValueError(f"The {source_kind} checkpoint lacks these weights of {model_class.__name__}: {unexplained}")
    momentum_queues = {f"momentum.{name}" for name in (*_QUEUES, "idx_queue")}
    if getattr(model, "momentum", None) is not None and not any(
        key.startswith("momentum.") and _component(key) not in momentum_queues for key in converted
    ):
        # The towers were copied at construction, before loading: start them from the loaded weights instead (as
        # LAVIS does; NLVR.py's copy-before-load leaves them at BERT/random init).
        model.momentum.copy_from(model)
    model.conversion_report = report
    return model.eval()


def _check_shapes(converted: Mapping[str, torch.Tensor], model, report: ConversionReport) -> None:
    """Every converted tensor has the shape of the model's tensor it loads into; otherwise a `ValueError` that names
    the original keys and both shapes (instead of `load_state_dict`'s multi-line RuntimeError)."""
    expected = model.state_dict()
    wrong = [
        f"{report.sources.get(key, key)} {tuple(tensor.shape)} -> {key} {tuple(expected[key].shape)}"
        for key, tensor in converted.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    if wrong:
        raise ValueError(
            f"{len(wrong)} checkpoint tensor(s) do not have the shape {type(model).__name__} expects (original key "
            f"(shape) -> port key (expected shape)): {'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}. The "
            "checkpoint is damaged or the configuration does not match it"
        )


def vqa_init_from_pretraining(state_dict: Mapping[str, torch.Tensor], config: AlbefConfig):
    """The initial weights of an `AlbefForQuestionAnswering` fine-tuned from a pre-trained ALBEF in this package's
    format (e.g. the `final` folder of `albef-pretrain`), as VQA.py builds them from an original pre-training
    checkpoint: the answer decoder starts as the encoder's embeddings, fusion layers (renumbered from 0) and MLM head.

    Returns `(state_dict, config)`: `config` is a copy with `decoder_num_hidden_layers` set to the number of fusion
    layers (the decoder is made of them) and without momentum towers unless `config.distill` was set."""
    config = copy.deepcopy(config)
    text = config.text_config
    config.decoder_num_hidden_layers = text.num_hidden_layers - text.fusion_layer
    converted = _Converted(ConversionReport("pretrain", "vqa"))
    for key, tensor in state_dict.items():
        if not key.startswith(("itm_head.", "vision_proj.", "text_proj.", "temp", "momentum.image_queue")):
            converted.put(key, tensor, key)
    _decoder_from_encoder(converted, config)
    return converted.tensors, config


__all__ = [
    "ConversionReport",
    "config_from_state_dict",
    "convert_state_dict",
    "detect_kind",
    "from_original",
    "interpolate_pos_embed",
    "load_original_checkpoint",
    "rename_key",
    "tied_keys",
    "vqa_init_from_pretraining",
]
