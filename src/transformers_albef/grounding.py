"""Grad-CAM grounding maps (paper Fig. 5, the original `Grounding.py`): where on the image each word is matched."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .models.albef.modeling_albef import _check_pairs

GRADCAM_MODES = ("itm", "itc")


@dataclass
class AlbefGradCamOutput(ModelOutput):
    r"""
    gradcam (`(batch, grid, grid)`): whole-text map, the mean over tokens (padding counts as zeros, as the original).
    gradcam_per_token (`(batch, length, grid, grid)`): one map per token (ITM mode).
    itm_logits (`(batch, 2)`): ITM logits of the multimodal forward (ITM mode); `itc_logits` the ITC similarity.
    attention_map / attention_grad: the attention probabilities read and their gradient.
    """

    gradcam: torch.Tensor | None = None
    gradcam_per_token: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    itc_logits: torch.Tensor | None = None
    attention_map: torch.Tensor | None = None
    attention_grad: torch.Tensor | None = None


@contextlib.contextmanager
def eager_attention(model):
    """Run `model` with eager attention (Grad-CAM reads the attention probabilities, which the other backends do not
    return), then give it back the backend it had, through transformers' public `set_attn_implementation`."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def gradcam(model, pixel_values, input_ids, attention_mask=None, mode: str = "itm", layer: int | None = None):
    """Grad-CAM of each (image i, text i) pair.

    `mode="itm"` (default): the cross-attention probabilities of text layer `layer` (default
    `config.gradcam_layer`, else `fusion_layer + 2`: the third cross-attention layer, block 8 of the 12-layer BERT;
    the last-but-one layer if there are fewer: in the last layer only [CLS] reaches the ITM head, so every word's
    gradient there is zero)
    times their positive gradient of the ITM match logit, averaged over heads (and over tokens for `gradcam`).
    `mode="itc"`: the [CLS]-query attention row of ViT block `layer` (default: block 8 of 12, the original
    `--block_num`) times the positive gradient of the ITC similarity of the pair.
    Runs with eager attention whatever the model's backend, since it needs the attention probabilities.
    """
    if mode not in GRADCAM_MODES:
        raise ValueError(f"mode must be one of {GRADCAM_MODES}, got {mode!r}")
    _check_pairs(pixel_values, input_ids, "Grad-CAM")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()  # as the original val(): dropout would randomise the attention maps
    try:
        with eager_attention(model), torch.enable_grad():
            compute = _itm_gradcam if mode == "itm" else _itc_gradcam
            return compute(model, pixel_values, input_ids, attention_mask, layer)
    finally:
        model.train(was_training)


def _itm_gradcam(model, pixel_values, input_ids, attention_mask, layer):
    text_config = model.config.text_config
    if layer is None:
        layer = model.config.gradcam_layer
    if layer is None:  # models with fewer than three fusion layers: the last layer would give flat word maps
        last_useful = max(text_config.fusion_layer, text_config.num_hidden_layers - 2)
        layer = min(text_config.fusion_layer + 2, last_useful)
    if not text_config.fusion_layer <= layer < text_config.num_hidden_layers:
        raise ValueError(
            f"ITM Grad-CAM reads a fusion layer: layer must be in [{text_config.fusion_layer}, "
            f"{text_config.num_hidden_layers}), got {layer}"
        )
    batch, grid = pixel_values.shape[0], model.config.vision_config.grid_size
    image_states = model.vision_model(pixel_values).last_hidden_state
    out = model.text_model(input_ids, attention_mask, encoder_hidden_states=image_states, output_attentions=True)
    attention = out.cross_attentions[layer - text_config.fusion_layer]
    logits = model.itm_head(out.last_hidden_state[:, 0])
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), attention)
    # Drop the image [CLS] column, unfold the patch grid, zero the padded text rows.
    mask = attention_mask.view(batch, 1, -1, 1, 1)
    cams = attention[:, :, :, 1:].detach().reshape(batch, attention.shape[1], -1, grid, grid) * mask
    grads = grad[:, :, :, 1:].clamp(min=0).reshape(batch, attention.shape[1], -1, grid, grid) * mask
    per_token = (cams * grads).mean(1)
    return AlbefGradCamOutput(
        gradcam=per_token.mean(1),
        gradcam_per_token=per_token,
        itm_logits=logits.detach(),
        attention_map=attention.detach(),
        attention_grad=grad,
    )


def _itc_gradcam(model, pixel_values, input_ids, attention_mask, layer):
    num_blocks = model.config.vision_config.num_hidden_layers
    if layer is None:
        layer = min(8, num_blocks - 1)
    if not 0 <= layer < num_blocks:
        raise ValueError(f"ITC Grad-CAM reads a ViT block: layer must be in [0, {num_blocks}), got {layer}")
    batch, grid = pixel_values.shape[0], model.config.vision_config.grid_size
    vision = model.vision_model(pixel_values, output_attentions=True)
    attention = vision.attentions[layer]
    image_feat = F.normalize(model.vision_proj(vision.last_hidden_state[:, 0]), dim=-1)
    text_feat = model.get_text_features(input_ids, attention_mask).pooler_output
    similarity = (image_feat * text_feat).sum(-1) / model.temp
    (grad,) = torch.autograd.grad(similarity.sum(), attention)
    # The image [CLS] query's row over the patches.
    cam = attention[:, :, 0, 1:].detach().reshape(batch, -1, grid, grid)
    grads = grad[:, :, 0, 1:].clamp(min=0).reshape(batch, -1, grid, grid)
    return AlbefGradCamOutput(
        gradcam=(cam * grads).mean(1),
        itc_logits=similarity.detach(),
        attention_map=attention.detach(),
        attention_grad=grad,
    )


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Whether the peak of each grounding map falls on its object: `maps` `(batch, grid, grid)` (e.g.
    `gradcam(...).gradcam`) are upsampled bilinearly to the masks' size, and map i scores a hit when `masks[i]`
    (`(batch, height, width)`, the object's pixels > 0.5, e.g. an emoji's alpha channel scaled to [0, 1]) is set at
    its peak. Returns a bool tensor `(batch,)`; its mean is the pointing-game accuracy. A map without a peak (all
    equal, e.g. all zero) counts as a miss. The chance level of a random point is the mean object area,
    `masks.gt(0.5).float().mean()`."""
    if maps.dim() != 3 or masks.dim() != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(
            f"pointing_game expects maps (batch, grid, grid) and masks (batch, height, width) with the same batch, "
            f"got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    batch, height, width = masks.shape
    upsampled = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    flat = upsampled.flatten(1)
    peaks = flat.argmax(1)
    flat_peak = flat.max(1).values > flat.min(1).values
    on_object = masks.flatten(1).gt(0.5).gather(1, peaks[:, None]).squeeze(1)
    return on_object & flat_peak
