"""Exact fast paths for the fusion layers when many texts attend to the same source: ITM re-ranking.

Re-ranking scores one image against its k candidate texts. The eager path (`AlbefForRetrieval.itm_logits` on the
image repeated k times) projects the same image tokens to cross-attention keys/values k times in every fusion layer;
at k=256 with 577 image tokens and ~30 text tokens that projection is most of the work. Here the texts of one image
are folded into a single query sequence for the cross-attention sub-layer (cross-attention has no mask between text
tokens, so every query row sees exactly what it saw before), which makes the model's own cross-attention modules
project the image once per group. The last fusion layer runs only the [CLS] row, the only one ITM reads, and trailing
text columns that are padding in every text of a batch are dropped (masked keys contribute exactly zero).

Every function reads the model's existing modules and weights; results equal the eager path up to float rounding
(checked in tests/test_fast_paths.py: 1e-5 in fp32, and against the original code's fixtures).

For a retrieval evaluation, score all the pairs it needs in one call (`itm_match_scores`, or `rerank_scores` for
the original's two matrices): pairs are grouped by image, so each image's keys/values are computed once for every
text that ranks it, in both directions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .modeling_albef_text import AlbefTextModel, _AlbefTextAttentionCore

# Query tokens (texts x length) per cross-attention call; bounds the (heads, queries, image tokens) score tensor.
DEFAULT_MAX_QUERY_TOKENS = 8192


def trailing_length(mask: torch.Tensor) -> int:
    """1 + the last column where any row of `mask` (batch, length) is non-zero: the columns after it are padding
    everywhere and can be dropped without changing any unpadded position."""
    used = (mask != 0).any(dim=0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 1


def fuse_grouped(
    text_model: AlbefTextModel,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    sources: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    layers: range | None = None,
    cls_only_last: bool = False,
) -> torch.Tensor:
    """Run fusion layers of the (bidirectional) `text_model` on `G * m` sequences whose group `g` (rows
    `g*m : (g+1)*m`) cross-attends to `sources[g]`.

    hidden_states (`(G * m, length, hidden)`): states entering the first layer of `layers`.
    attention_mask (`(G * m, length)`): the sequences' padding mask.
    sources (`(G, tokens, width)`): one cross-attention source per group (e.g. one image's states).
    source_mask (`(G, tokens)`, *optional*): padding mask of the sources.
    layers: text-model layers to run (default: the fusion layers), each with cross-attention.
    cls_only_last: run the last layer for position 0 only and return `(G * m, 1, hidden)`.

    Equals `text_model(..., encoder_hidden_states=sources.repeat_interleave(m, 0), mode="fusion")` on each row's
    unpadded positions.
    """
    config = text_model.config
    layers = text_model.layer_range("fusion") if layers is None else layers
    if config.num_fused_images != 1 or config.is_decoder:
        raise ValueError(
            "fuse_grouped runs a bidirectional fusion encoder with one cross-attention source per sequence "
            "(num_fused_images=1, is_decoder=False)"
        )
    groups = sources.shape[0]
    rows, length, width = hidden_states.shape
    if rows % groups or attention_mask.shape != (rows, length):
        raise ValueError(
            f"{rows} sequences (mask {tuple(attention_mask.shape)}) do not split into {groups} equal groups"
        )
    per_group = rows // groups
    # The masks `AlbefTextModel.forward` builds, so that every attention backend gets its own format.
    self_mask = create_bidirectional_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    cross_masks = {}  # by query length

    def cross_mask(folded):
        if source_mask is None:
            return None
        if folded.shape[1] not in cross_masks:
            cross_masks[folded.shape[1]] = create_bidirectional_mask(
                config=config, inputs_embeds=folded, attention_mask=source_mask, encoder_hidden_states=sources
            )
        return cross_masks[folded.shape[1]]

    for i in layers:
        layer = text_model.encoder.layer[i]
        if i < config.fusion_layer:
            raise ValueError(f"layer {i} has no cross-attention (fusion_layer={config.fusion_layer})")
        if cls_only_last and i == layers[-1]:
            # Queries from position 0 only; keys/values from every token, with the same padding mask.
            cls = hidden_states[:, :1]
            cls_mask = create_bidirectional_mask(
                config=config, inputs_embeds=cls, attention_mask=attention_mask, encoder_hidden_states=hidden_states
            )
            attended, _ = _AlbefTextAttentionCore.forward(layer.attention.self, cls, hidden_states, cls_mask)
            hidden_states = layer.attention.output(attended, cls)
        else:
            hidden_states = layer.attention(hidden_states, self_mask)
        # Cross-attention: the group's rows become one query sequence, so its source is projected once.
        length = hidden_states.shape[1]
        folded = hidden_states.reshape(groups, per_group * length, width)
        folded = layer.crossattention(folded, sources, cross_mask(folded))
        hidden_states = folded.view(rows, length, width)
        hidden_states = layer.output(layer.intermediate(hidden_states), hidden_states)
    return hidden_states


def _check_retrieval_head(model: nn.Module):
    if not hasattr(model, "itm_head") or not hasattr(model, "text_model"):
        raise ValueError(f"{type(model).__name__} has no ITM head: use an AlbefForRetrieval (or pre-training) model")


def _pieces(sorted_images: torch.Tensor, max_per_piece: int) -> list[tuple[int, int, int]]:
    """(image, start, count) runs of equal images in the sorted pair list, split into runs of <= max_per_piece."""
    images, counts = torch.unique_consecutive(sorted_images, return_counts=True)
    pieces, start = [], 0
    for image, count in zip(images.tolist(), counts.tolist()):
        for offset in range(0, count, max_per_piece):
            pieces.append((image, start + offset, min(max_per_piece, count - offset)))
        start += count
    return pieces


@torch.no_grad()
def itm_match_scores(
    model: nn.Module,
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor | None,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
) -> torch.Tensor:
    """ITM "match" logits (index 1 of `itm_head`) of the pairs `(image_index[p], text_index[p])`, shape `(pairs,)`.

    image_states (`(images, tokens, hidden)`): vision-model outputs, on the model's device; text_states / text_mask
    (`(texts, length, ...)`): text-model outputs in mode `"text"` and their padding mask, on any device (a batch at a
    time is moved to the images' device). Equal to
    `model.itm_logits(text_states[text_index], text_mask[text_index], image_states[image_index])[:, 1]` up to
    rounding. Pairs are grouped by image (each image's cross-attention keys/values computed once per group) and
    processed in batches of about `max_query_tokens` text tokens; pass every pair you need in one call.
    """
    _check_retrieval_head(model)
    device = image_states.device
    if text_mask is None:
        text_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
    image_index = torch.as_tensor(image_index, device=device).reshape(-1)
    text_index = torch.as_tensor(text_index, device=device).reshape(-1)
    if image_index.shape != text_index.shape:
        raise ValueError(f"image_index {tuple(image_index.shape)} and text_index {tuple(text_index.shape)} differ")
    scores = torch.empty(image_index.shape[0], dtype=image_states.dtype, device=device)
    if image_index.numel() == 0:
        return scores

    length = text_states.shape[1]
    order = torch.argsort(image_index, stable=True)
    pieces = _pieces(image_index[order], max(1, max_query_tokens // length))
    pieces.sort(key=lambda piece: -piece[2])  # similar sizes batch together with little padding
    start = 0
    while start < len(pieces):
        per_group = pieces[start][2]  # the largest in this batch: every group is padded to it
        stop = min(len(pieces), start + max(1, max_query_tokens // (per_group * length)))
        batch = pieces[start:stop]
        start = stop
        images = torch.tensor([p[0] for p in batch], device=order.device)
        firsts = torch.tensor([p[1] for p in batch], device=order.device)
        counts = torch.tensor([p[2] for p in batch], device=order.device)
        slot = torch.arange(per_group, device=order.device)
        valid = slot[None] < counts[:, None]
        # Padding slots repeat the group's last pair; their scores are dropped.
        pairs = order[firsts[:, None] + torch.minimum(slot[None], counts[:, None] - 1)].flatten()
        texts = text_index[pairs].to(text_states.device)
        mask = text_mask[texts].to(device)
        used = trailing_length(mask)
        states = text_states[texts, :used].to(device)
        fused = fuse_grouped(model.text_model, states, mask[:, :used], image_states[images], cls_only_last=True)
        logits = model.itm_head(fused[:, 0])[:, 1]
        keep = valid.flatten()
        scores[pairs[keep]] = logits[keep].to(scores.dtype)
    return scores


@torch.no_grad()
def itm_scores_for_image(
    model: nn.Module, image_states: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor | None, **kwargs
) -> torch.Tensor:
    """One image `(tokens, hidden)` or `(1, tokens, hidden)` against k texts `(k, length, hidden)`: the match logits
    `(k,)`, equal to `model.itm_logits(text_states, text_mask, image_states.expand(k, -1, -1))[:, 1]`."""
    image_states = image_states.reshape(1, *image_states.shape[-2:])
    k = text_states.shape[0]
    zeros = torch.zeros(k, dtype=torch.long, device=image_states.device)
    return itm_match_scores(model, image_states, text_states, text_mask, zeros, torch.arange(k), **kwargs)


@torch.no_grad()
def itm_scores_for_text(
    model: nn.Module, image_states: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor | None, **kwargs
) -> torch.Tensor:
    """k images `(k, tokens, hidden)` against one text `(length, hidden)` or `(1, length, hidden)`: the match logits
    `(k,)`. Each image is seen once here, so only the [CLS]-only last layer saves work; to share an image's
    keys/values across the texts that rank it, score all pairs together with `itm_match_scores`/`rerank_scores`."""
    text_states = text_states.reshape(1, *text_states.shape[-2:])
    if text_mask is not None:
        text_mask = text_mask.reshape(1, -1)
    k = image_states.shape[0]
    zeros = torch.zeros(k, dtype=torch.long, device=image_states.device)
    return itm_match_scores(model, image_states, text_states, text_mask, torch.arange(k), zeros, **kwargs)


@torch.no_grad()
def rerank_scores(
    model: nn.Module,
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor | None,
    sims: torch.Tensor,
    k: int,
    k_images: int | None = None,
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original evaluation's re-ranking: `(score_i2t (images, texts), score_t2i (texts, images))` where the top
    `k` texts of each image row of `sims` (and the top `k_images`, default `k`, images of each text) hold the ITM
    match logit and every other entry is -100.

    A pair in both top-k lists is scored once; every pair is grouped by image, so an image's keys/values are
    computed once for all the texts it is scored against (COCO 5K t2i: ~1,280 texts per image on average)."""
    num_images, num_texts = sims.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_texts, k_images = min(k, num_texts), min(k_images or k, num_images)
    device = image_states.device
    top_texts = sims.topk(k_texts, dim=1).indices.to(device)  # (images, k)
    top_images = sims.t().topk(k_images, dim=1).indices.to(device)  # (texts, k)
    i2t_images = torch.arange(num_images, device=device).repeat_interleave(k_texts)
    t2i_texts = torch.arange(num_texts, device=device).repeat_interleave(k_images)
    keys = torch.cat([i2t_images * num_texts + top_texts.flatten(), top_images.flatten() * num_texts + t2i_texts])
    unique, inverse = torch.unique(keys, return_inverse=True)
    scores = itm_match_scores(
        model, image_states, text_states, text_mask, unique // num_texts, unique % num_texts, max_query_tokens
    ).float()
    pair_scores = scores[inverse]
    score_i2t = torch.full((num_images, num_texts), -100.0, device=device)
    score_t2i = torch.full((num_texts, num_images), -100.0, device=device)
    score_i2t.scatter_(1, top_texts, pair_scores[: num_images * k_texts].view(num_images, k_texts))
    score_t2i.scatter_(1, top_images, pair_scores[num_images * k_texts :].view(num_texts, k_images))
    return score_i2t, score_t2i


__all__ = [
    "fuse_grouped",
    "itm_match_scores",
    "itm_scores_for_image",
    "itm_scores_for_text",
    "rerank_scores",
    "trailing_length",
]
