"""Conversion of original ALBEF checkpoints: key rules, transforms, kind detection and safe loading."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers_albef
from transformers_albef import AlbefConfig, conversion
from transformers_albef.conversion import (
    MODEL_CLASS_KINDS,
    SUPPORTED_CONVERSIONS,
    config_from_state_dict,
    convert_state_dict,
    detect_kind,
    from_original,
    load_original_checkpoint,
    rename_key,
    tied_keys,
)

from .conftest import FIXTURES

TINY = FIXTURES / "tiny"
# Fixture folder -> the kind detect_kind must name.
TINY_KINDS = {
    "pretrain": "pretrain",
    "retrieval": "retrieval",
    "grounding": "retrieval",
    "vqa": "vqa",
    "nlvr": "nlvr",
    "ve": "ve",
    "pretrain_nlvr": "text_assignment",
}
FULL_KINDS = {
    "pretrain": "pretrain",
    "retrieval_coco": "retrieval",
    "retrieval_flickr": "retrieval",
    "grounding": "retrieval",
    "vqa": "vqa",
    "nlvr": "nlvr",
    "ve": "ve",
    "pretrain_nlvr": "text_assignment",
}
# The tiny world has head_dim 16, which shapes cannot tell.
TINY_HEADS = {"text_config": {"num_attention_heads": 2}, "vision_config": {"num_attention_heads": 2}}
TINY_PAIRS = [(folder, target) for folder, kind in TINY_KINDS.items() for target in SUPPORTED_CONVERSIONS[kind]]
HEADS = {kind: getattr(transformers_albef, name) for name, kind in MODEL_CLASS_KINDS.items()}

_cache = {}


def tiny_state_dict(folder):
    if folder not in _cache:
        _cache[folder] = load_original_checkpoint(TINY / folder / "checkpoint.pth")
    return dict(_cache[folder])


def tiny_config(state_dict, target, **kwargs):
    heads = {key: dict(value) for key, value in TINY_HEADS.items()}
    return config_from_state_dict(state_dict, target, **heads, **kwargs)


def full_size_rows(name):
    """(key, shape, dtype, kind) rows of a released checkpoint's key table (tests/fixtures/keys/<name>.tsv)."""
    for line in (FIXTURES / "keys" / f"{name}.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype, kind = line.split("\t")
        yield key, tuple(int(size) for size in shape.strip("()").split(",") if size.strip()), dtype, kind


def full_size_state_dict(name):
    """A released checkpoint's keys and shapes as meta tensors."""
    return {
        key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        for key, shape, dtype, _ in full_size_rows(name)
    }


def assert_accounted(state_dict, report):
    """Every original key is consumed or skipped with a categorised reason, never both."""
    consumed, skipped = set(report.consumed), set(report.skipped)
    assert not consumed & skipped
    assert consumed | skipped == set(state_dict)
    for key, reason in report.skipped.items():
        category, _, detail = reason.partition(": ")
        assert category and detail, f"{key}: reason {reason!r} is not '<category>: <detail>'"


# ----- detection and configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", TINY_KINDS)
def test_detect_kind_tiny(folder):
    assert detect_kind(tiny_state_dict(folder)) == TINY_KINDS[folder]


@pytest.mark.parametrize("name", FULL_KINDS)
def test_detect_kind_full_size(name):
    assert detect_kind(full_size_state_dict(name)) == FULL_KINDS[name]


def test_detect_kind_names_closest_kind_and_misfits():
    state_dict = tiny_state_dict("vqa")
    state_dict["my_extra_head.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"closest kind is 'vqa'.*my_extra_head\.weight"):
        detect_kind(state_dict)


def test_detect_kind_classifier_width():
    state_dict = tiny_state_dict("ve")
    state_dict["cls_head.2.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match="5 classes"):
        detect_kind(state_dict)


@pytest.mark.parametrize("name", FULL_KINDS)
def test_config_from_full_size_keys_is_the_preset(name):
    state_dict = full_size_state_dict(name)
    kind = FULL_KINDS[name]
    config = config_from_state_dict(state_dict, kind)
    # Shapes cannot tell COCO from Flickr30K (retrieval_k) nor grounding from retrieval: compare without it.
    preset = {"retrieval": "retrieval_coco"}.get(kind, kind)
    expected = AlbefConfig.from_preset(preset, distill=config.distill)
    assert config.to_dict() == expected.to_dict()
    # The training state of every released kind except text assignment carries momentum towers.
    assert config.distill == (kind != "text_assignment")


def test_config_from_tiny_checkpoint_matches_fixture():
    state_dict = tiny_state_dict("pretrain")
    meta = json.loads((TINY / "retrieval_from_pretrain" / "meta.json").read_text())
    config = tiny_config(state_dict, "retrieval", image_size=48)
    bert, vit = meta["bert_config"], meta["vit_config"]
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "fusion_layer",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "num_attention_heads",
    ):
        assert getattr(config.text_config, name) == bert[name], name
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (
        vit["embed_dim"],
        vit["depth"],
        vit["img_size"],
        vit["patch_size"],
    )
    assert vision.intermediate_size == vit["embed_dim"] * vit["mlp_ratio"]
    assert (config.embed_dim, config.queue_size, config.distill) == (16, 16, True)
    # Two-image targets of a pre-training checkpoint get the duplicated fusion layers.
    nlvr = tiny_config(state_dict, "nlvr")
    assert (nlvr.text_config.num_hidden_layers, nlvr.text_config.share_cross_attention_kv) == (6, True)
    assert tiny_config(state_dict, "vqa").decoder_num_hidden_layers == 2


# ----- every conversion ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("folder", "target"), TINY_PAIRS)
def test_every_tiny_conversion_loads(folder, target):
    """Each key is consumed or skipped with a reason, and the head loads everything but the parts new to it."""
    state_dict = tiny_state_dict(folder)
    model = from_original(HEADS[target], state_dict, config=tiny_config(state_dict, target, image_size=48))
    report = model.conversion_report
    assert_accounted(state_dict, report)
    assert report.source_kind == TINY_KINDS[folder] and report.target_kind == target
    assert all(f"{key}.".startswith(tuple(f"{part}." for part in report.new_components)) for key in report.missing)
    assert not model.training
    assert str(report).startswith(f"ALBEF {TINY_KINDS[folder]} -> {target}")


@pytest.mark.parametrize("name", FULL_KINDS)
def test_every_full_size_conversion(name):
    """Full-size key tables (meta tensors): every supported target converts with every key accounted for."""
    state_dict = full_size_state_dict(name)
    kind = FULL_KINDS[name]
    for target in SUPPORTED_CONVERSIONS[kind]:
        config = config_from_state_dict(state_dict, target, image_size=384)
        converted, report = convert_state_dict(state_dict, config, target)
        assert_accounted(state_dict, report)
        assert converted["vision_model.embeddings.position_embeddings"].shape == (1, 577, 768)
        assert not any(key in converted for key in tied_keys(config))
        layers = config.text_config.num_hidden_layers
        assert f"text_model.encoder.layer.{layers - 1}.crossattention.self.query.weight" in converted
        assert f"text_model.encoder.layer.{layers}.output.dense.weight" not in converted


@pytest.mark.parametrize("name", FULL_KINDS)
def test_tied_keys_are_the_original_shared_tensors(name):
    """Each pair of keys that is one tensor in the original model (marked `shared:` in the key table) is a tied pair
    of the port, and nothing else is."""
    state_dict = full_size_state_dict(name)
    config = config_from_state_dict(state_dict, FULL_KINDS[name])
    shared = {
        tuple(sorted((rename_key(key), rename_key(kind.split("shared:")[1]))))
        for key, _, _, kind in full_size_rows(name)
        if "shared:" in kind
    }
    ported = {rename_key(key) for key in state_dict}
    tied = {tuple(sorted(pair)) for pair in tied_keys(config).items() if set(pair) <= ported}
    assert shared == tied


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_KINDS)
def test_full_size_conversion_matches_head_keys(name):
    """Full-size heads (meta device) hold exactly the converted keys plus their tied names and the new components."""
    state_dict = full_size_state_dict(name)
    for target in SUPPORTED_CONVERSIONS[FULL_KINDS[name]]:
        with torch.device("meta"):
            model = HEADS[target](config_from_state_dict(state_dict, target, image_size=384))
        converted, report = convert_state_dict(state_dict, model.config, target)
        expected = model.state_dict()
        assert set(converted) <= set(expected)
        assert all(converted[key].shape == expected[key].shape for key in converted)
        missing = set(expected) - set(converted) - set(model.get_expanded_tied_weights_keys(all_submodels=True))
        assert all(f"{key}.".startswith(tuple(f"{part}." for part in report.new_components)) for key in missing)


def test_from_original_builds_the_config_and_interpolates():
    path = TINY / "pretrain" / "checkpoint.pth"
    model = transformers_albef.AlbefForRetrieval.from_original(path, image_size=48)
    assert model.config.vision_config.image_size == 48 and model.config.distill
    outputs = load_file(TINY / "retrieval_from_pretrain" / "outputs.safetensors")
    got = model.vision_model.embeddings.position_embeddings.detach()
    assert (got - outputs["interpolated_pos_embed"]).abs().max() <= 1e-6
    assert model.conversion_report.missing == ["momentum.idx_queue"]


@pytest.mark.parametrize("folder", ["pretrain_nlvr", "retrieval"])
def test_momentum_towers_start_from_loaded_weights(folder):
    """A checkpoint without momentum towers, loaded with distill=True: the towers copy the loaded weights (NLVR.py
    copies before loading and leaves them at their initialisation; LAVIS fixes that)."""
    state_dict = tiny_state_dict(folder)
    target = "nlvr" if folder == "pretrain_nlvr" else "retrieval"
    model = from_original(HEADS[target], state_dict, config=tiny_config(state_dict, target, distill=True))
    assert "momentum.vision_model" in model.conversion_report.new_components
    for name, tensor in model.momentum.vision_model.state_dict().items():
        assert torch.equal(tensor, model.vision_model.state_dict()[name]), name
    key = "text_model.encoder.layer.3.crossattention.self.key.weight"
    assert torch.equal(model.momentum.state_dict()[key], model.state_dict()[key])


def test_released_flat_checkpoint_without_momentum():
    """mscoco.pth-like: flat, no momentum towers, no queues; nothing is missing for inference."""
    state_dict = tiny_state_dict("retrieval")
    assert not any("_m." in key or "queue" in key for key in state_dict)
    config = tiny_config(state_dict, "retrieval")
    assert not config.distill
    _, report = convert_state_dict(state_dict, config, "retrieval")
    assert report.new_components == []
    assert set(report.skipped) == {"text_encoder.embeddings.position_ids"}


def test_momentum_dropped_without_distill():
    state_dict = tiny_state_dict("pretrain")
    config = tiny_config(state_dict, "retrieval", distill=False)
    converted, report = convert_state_dict(state_dict, config, "retrieval")
    assert not any(key.startswith("momentum.") for key in converted)
    assert report.skipped["visual_encoder_m.pos_embed"].startswith("training state:")
    assert report.skipped["image_queue"].startswith("training state:")
    assert report.skipped["text_encoder.cls.predictions.bias"].startswith("not in target:")


def test_unsupported_conversion():
    state_dict = tiny_state_dict("vqa")
    with pytest.raises(ValueError, match="vqa checkpoint cannot initialise a retrieval model"):
        convert_state_dict(state_dict, tiny_config(tiny_state_dict("pretrain"), "retrieval"), "retrieval")


def test_unknown_key_is_named():
    state_dict = tiny_state_dict("retrieval")
    config = tiny_config(state_dict, "retrieval")
    state_dict["visual_encoder.blocks.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"visual_encoder\.blocks\.0\.attn\.extra\.weight"):
        convert_state_dict(state_dict, config, "retrieval", source_kind="retrieval")


# ----- agreement with the original loading code ---------------------------------------------------------------------


def test_pos_embed_interpolation_matches_original():
    state_dict = tiny_state_dict("pretrain")
    config = tiny_config(state_dict, "retrieval", image_size=48)
    converted, report = convert_state_dict(state_dict, config, "retrieval")
    outputs = load_file(TINY / "retrieval_from_pretrain" / "outputs.safetensors")
    for prefix, name in (("", "interpolated_pos_embed"), ("momentum.", "interpolated_pos_embed_m")):
        got = converted[f"{prefix}vision_model.embeddings.position_embeddings"]
        assert got.shape == outputs[name].shape == (1, 10, 32)
        assert (got - outputs[name]).abs().max() <= 1e-6
        assert "2x2 -> 3x3" in report.transformed[f"{prefix}vision_model.embeddings.position_embeddings"]


@pytest.mark.parametrize(
    ("fixture", "target"), [("retrieval_from_pretrain", "retrieval"), ("vqa_from_pretrain", "vqa")]
)
def test_matches_original_loading(fixture, target):
    """The dict the original script passes to load_state_dict (Retrieval.py / VQA.py renames of a pre-training
    checkpoint): every tensor it loads is in the conversion, exactly; what it ignores is what the conversion skips."""
    state_dict = tiny_state_dict("pretrain")
    meta = json.loads((TINY / fixture / "meta.json").read_text())
    config = tiny_config(state_dict, target, image_size=48)
    converted, report = convert_state_dict(state_dict, config, target)
    reference = load_file(TINY / fixture / "converted_state_dict.safetensors")
    tied, matched = tied_keys(config), set()
    for key, tensor in reference.items():
        if key.endswith("position_ids"):
            continue
        if key in meta["unexpected_keys"]:  # the original model ignores it too
            assert key in report.skipped
            continue
        new_key = rename_key(key)
        parts = [new_key] if "{}" not in new_key else [new_key.format(name) for name in conversion.FUSED_SPLITS]
        tensors = [tensor] if len(parts) == 1 else tensor.chunk(len(parts))
        for part, value in zip(parts, tensors):
            part = tied.get(part, part)
            assert torch.equal(converted[part], value), part
            matched.add(part)
    assert set(converted) == matched
    assert report.new_components == [f"momentum.{key}" for key in meta["missing_keys"]]


def test_vqa_decoder_from_encoder():
    state_dict = tiny_state_dict("pretrain")
    converted, report = convert_state_dict(state_dict, tiny_config(state_dict, "vqa"), "vqa")
    source = "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"
    assert torch.equal(converted["text_decoder.encoder.layer.1.crossattention.self.key.weight"], state_dict[source])
    assert torch.equal(converted["text_model.encoder.layer.3.crossattention.self.key.weight"], state_dict[source])
    assert torch.equal(converted["lm_head.bias"], state_dict["text_encoder.cls.predictions.bias"])
    assert report.created["text_decoder.encoder.layer.1.crossattention.self.key.weight"].endswith(f"(from {source})")
    assert "mlm_head.bias" not in converted


def test_nlvr_layer_duplication():
    state_dict = tiny_state_dict("pretrain")
    config = tiny_config(state_dict, "nlvr")
    converted, report = convert_state_dict(state_dict, config, "nlvr")
    for layer, pair in ((2, (2, 3)), (3, (4, 5))):
        for name in ("attention.self.query.weight", "crossattention.self.query.weight", "output.dense.bias"):
            for index in pair:
                want = state_dict[f"text_encoder.bert.encoder.layer.{layer}.{name}"]
                assert torch.equal(converted[f"text_model.encoder.layer.{index}.{name}"], want)
        # Cross-attention key/value exist once per pair, in the image-1 layer.
        key = "encoder.layer.{}.crossattention.self.key.weight"
        want = state_dict["text_encoder.bert." + key.format(layer)]
        assert torch.equal(converted["text_model." + key.format(pair[1])], want)
        assert "text_model." + key.format(pair[0]) not in converted
    assert torch.equal(
        converted["text_model.encoder.layer.1.output.dense.weight"],
        state_dict["text_encoder.bert.encoder.layer.1.output.dense.weight"],
    )
    assert_accounted(state_dict, report)


def test_qkv_split_round_trip():
    state_dict = tiny_state_dict("retrieval")
    converted, report = convert_state_dict(state_dict, tiny_config(state_dict, "retrieval"), "retrieval")
    for name in ("weight", "bias"):
        fused = state_dict[f"visual_encoder.blocks.1.attn.qkv.{name}"]
        parts = [converted[f"vision_model.layers.1.attention.{p}_proj.{name}"] for p in ("q", "k", "v")]
        assert torch.equal(torch.cat(parts), fused)
        assert torch.equal(parts[0], fused[:32])  # q is the first third of the rows
        source = report.sources[f"vision_model.layers.1.attention.v_proj.{name}"]
        assert source == f"visual_encoder.blocks.1.attn.qkv.{name}"


# ----- tied tensors: refused when they differ -----------------------------------------------------------------------


def test_tied_lm_head_must_equal_word_embeddings():
    """The original ties the MLM decoder to the word embeddings; a checkpoint where they differ is inconsistent and
    the port cannot hold both, so it is an error rather than a silent choice."""
    state_dict = tiny_state_dict("pretrain")
    decoder = "text_encoder.cls.predictions.decoder.weight"
    state_dict[decoder] = state_dict[decoder] + 1
    config = tiny_config(state_dict, "pretrain")
    with pytest.raises(ValueError, match=rf"{decoder} and text_encoder.bert.embeddings.word_embeddings.weight"):
        convert_state_dict(state_dict, config, "pretrain")
    # Without the MLM head in the target, the head is skipped and its consistency does not matter.
    _, report = convert_state_dict(state_dict, tiny_config(state_dict, "retrieval"), "retrieval")
    assert report.skipped["text_encoder.cls.predictions.decoder.weight"].startswith("not in target:")


def test_tied_decoder_bias_and_nlvr_key_value():
    state_dict = tiny_state_dict("pretrain")
    state_dict["text_encoder.cls.predictions.decoder.bias"] = torch.zeros(512)
    with pytest.raises(ValueError, match=r"decoder\.bias and text_encoder\.cls\.predictions\.bias"):
        convert_state_dict(state_dict, tiny_config(state_dict, "pretrain"), "pretrain")
    state_dict = tiny_state_dict("nlvr")
    _, report = convert_state_dict(state_dict, tiny_config(state_dict, "nlvr"), "nlvr")
    assert report.skipped["text_encoder.encoder.layer.2.crossattention.self.value.bias"].startswith("tied:")
    state_dict["text_encoder.encoder.layer.2.crossattention.self.value.bias"] = torch.zeros(32)
    with pytest.raises(ValueError, match="differ"):
        convert_state_dict(state_dict, tiny_config(state_dict, "nlvr"), "nlvr")


# ----- loading files ------------------------------------------------------------------------------------------------


def test_wrapped_flat_and_safetensors_agree(tmp_path):
    wrapped = tiny_state_dict("pretrain")
    torch.save(wrapped, tmp_path / "flat.pth")
    save_file({key: value.clone() for key, value in wrapped.items()}, tmp_path / "model.safetensors")
    for path in (tmp_path / "flat.pth", tmp_path / "model.safetensors", str(tmp_path / "flat.pth")):
        loaded = load_original_checkpoint(path)
        assert loaded.keys() == wrapped.keys()
        assert all(torch.equal(loaded[key], wrapped[key]) for key in wrapped)
    assert load_original_checkpoint({"model": wrapped, "epoch": 3}).keys() == wrapped.keys()


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"temp": torch.tensor(0.07)}, "config": _RunsCode(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match="arbitrary unpickling"):
        load_original_checkpoint(path)
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No ALBEF checkpoint"):
        load_original_checkpoint(tmp_path / "absent.pth")
    data = (TINY / "pretrain" / "checkpoint.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("truncated.pth", "garbage.pth", "empty.pth"):
        with pytest.raises(ValueError, match="corrupt"):
            load_original_checkpoint(tmp_path / name)
    save_file({"temp": torch.tensor([0.07])}, tmp_path / "ok.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:-3])
    with pytest.raises(ValueError, match="corrupt"):
        load_original_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not tensors"):
        load_original_checkpoint({"model": {"temp": 0.07}})
