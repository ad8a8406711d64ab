"""Loading the reference fixtures (produced by the original salesforce/ALBEF code) and comparing against them."""

import json
import os

import torch
from safetensors.torch import load_file

from transformers_albef import AlbefConfig
from transformers_albef.conversion import rename_key

from .conftest import FIXTURES

TINY = FIXTURES / "tiny"
TWO_IMAGE_KINDS = ("nlvr", "pretrain_nlvr")


def load_fixture(kind: str):
    folder = TINY / kind
    meta = json.loads((folder / "meta.json").read_text())
    return folder, load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors"), meta


def tiny_config(meta: dict, kind: str, **overrides) -> AlbefConfig:
    """The fixture's tiny configuration (meta.json) as an AlbefConfig."""
    bert, vit, cfg = meta["bert_config"], meta["vit_config"], meta["config"]
    text = {
        key: bert[key]
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "fusion_layer",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "layer_norm_eps",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
        )
    }
    if kind in TWO_IMAGE_KINDS:
        text.update(num_fused_images=2, share_cross_attention_kv=True)
    vision = {
        "hidden_size": vit["embed_dim"],
        "num_hidden_layers": vit["depth"],
        "num_attention_heads": vit["num_heads"],
        "intermediate_size": vit["embed_dim"] * vit["mlp_ratio"],
        "image_size": vit["img_size"],
        "patch_size": vit["patch_size"],
    }
    settings = {
        "embed_dim": cfg["embed_dim"],
        "temp": cfg["temp"],
        "queue_size": cfg["queue_size"],
        "momentum": cfg["momentum"],
        "alpha": cfg["alpha"],
        "retrieval_k": cfg["k_test"],
        "decoder_num_hidden_layers": bert.get("decoder", {}).get("num_hidden_layers", 6),
    }
    settings.update(overrides)
    return AlbefConfig(text_config=text, vision_config=vision, **settings)


def max_diff(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    diff = (got.detach().float() - want.float()).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.max())


# (test, output) -> max abs diff, printed as a table at the end of the run (conftest.py).
MEASURED: dict[tuple[str, str], float] = {}


def assert_close(got, want, atol: float, mask=None, name: str = ""):
    diff = max_diff(got, want, mask)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    MEASURED[(test, name)] = diff
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol}"
    return diff


def assert_after_step(model, outputs: dict, atol: float):
    state = model.state_dict()
    checked = 0
    for name, want in outputs.items():
        if not name.startswith("after_step."):
            continue
        key = rename_key(name[len("after_step.") :])  # the original name -> this port's
        got = state[key]
        if want.dtype.is_floating_point:
            assert_close(got, want, atol, name=name)
        else:
            assert torch.equal(got.cpu(), want), name
        checked += 1
    assert checked
