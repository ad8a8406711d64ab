"""ALBEF heads: each a thin class over the shared image tower (`vision_model`) and text/fusion tower (`text_model`)."""

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, logging

from .configuration_albef import AlbefConfig
from .modeling_albef_base import AlbefPreTrainedModel
from .modeling_albef_text import AlbefPredictionHead, AlbefTextModel
from .modeling_albef_vision import AlbefVisionModel
from .momentum import AlbefMomentum
from .objectives import (
    distilled_classification_loss,
    itc_loss,
    mask_tokens,
    mlm_loss,
    pick_hard_negatives,
    soft_targets,
)

logger = logging.get_logger(__name__)


@dataclass
class AlbefOutput(ModelOutput):
    r"""
    logits_per_image (`(image_batch, text_batch)`): cosine similarity of the ITC embeddings divided by `temp`.
    logits_per_text (`(text_batch, image_batch)`): its transpose.
    image_embeds / text_embeds (`(batch, embed_dim)`): L2-normalised ITC embeddings.
    itm_logits (`(batch, 2)`): image-text matching logits of aligned pairs (index 1 = match), when asked.
    mlm_logits (`(num_masked, vocab_size)`): pre-training only, MLM logits at the masked positions
        (`mlm_labels != -100`, in row-major order); the others are never scored, so they are not computed.
    fused_last_hidden_state (`(batch, length, hidden)`): fusion-encoder output of aligned pairs, when asked.
    """

    loss: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_mlm: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    fused_last_hidden_state: torch.Tensor | None = None
    vision_model_output: BaseModelOutput | None = None
    text_model_output: BaseModelOutput | None = None

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class AlbefClassifierOutput(ModelOutput):
    r"""logits (`(batch, num_labels)`); loss when labels are given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    fused_last_hidden_state: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


def _check_pairs(pixel_values: torch.Tensor, input_ids: torch.Tensor, what: str):
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"{what} pairs image i with text i, so the batch sizes must match: got {pixel_values.shape[0]} images "
            f"and {input_ids.shape[0]} texts"
        )


# Text tokens (texts x length) per grouped ITM fusion forward; bounds the (heads, queries, image tokens) scores.
MAX_QUERY_TOKENS = 8192


def _grouped_batches(sorted_images: torch.Tensor, pair_order: torch.Tensor, max_texts_per_batch: int):
    """Batches for grouped ITM, planned on the host: `(images (G,), pairs (G * m,), valid (G * m,))` where group g
    holds up to `m` pairs of image `images[g]`. Runs of one image longer than the batch are split; groups shorter
    than `m` repeat their last pair (`valid` False), so similar sizes are batched together."""
    images, counts = torch.unique_consecutive(sorted_images, return_counts=True)
    pieces, start = [], 0
    for image, count in zip(images.tolist(), counts.tolist()):
        for offset in range(0, count, max_texts_per_batch):
            pieces.append((image, start + offset, min(max_texts_per_batch, count - offset)))
        start += count
    pieces.sort(key=lambda piece: -piece[2])
    begin = 0
    while begin < len(pieces):
        per_group = pieces[begin][2]  # the largest in this batch: every group is padded to it
        stop = min(len(pieces), begin + max(1, max_texts_per_batch // per_group))
        batch = pieces[begin:stop]
        begin = stop
        firsts = torch.tensor([p[1] for p in batch])
        counts = torch.tensor([p[2] for p in batch])
        slot = torch.arange(per_group)
        valid = (slot[None] < counts[:, None]).flatten()
        pairs = pair_order[(firsts[:, None] + torch.minimum(slot[None], counts[:, None] - 1)).flatten()]
        yield torch.tensor([p[0] for p in batch]), pairs, valid


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Run `model` with eager attention (attention probabilities are needed, e.g. by Grad-CAM), then restore."""
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    }
    saved = {key: config._attn_implementation_internal for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = saved[key]


class AlbefModel(AlbefPreTrainedModel):
    """The two towers with their ITC projections: aligned image and text embeddings (`logits_per_image`)."""

    config: AlbefConfig
    main_input_name = "pixel_values"
    # Modules the momentum towers copy (training heads extend this).
    momentum_module_names: tuple[str, ...] = ("vision_model", "vision_proj", "text_model", "text_proj")
    momentum_image_ids = False  # retrieval also queues the image id of each feature
    trains_with_momentum = False  # the ITC-only model has no training forward
    # The ITC model loads any ALBEF checkpoint's towers; the heads it has no use for are not worth a warning.
    _keys_to_ignore_on_load_unexpected = [r"^momentum\.", r"^itm_head\.", r"^mlm_head\."]

    def __init__(self, config: AlbefConfig):
        super().__init__(config)
        self.vision_model = AlbefVisionModel(config.vision_config)
        self.text_model = AlbefTextModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config.temp)
        self._build_heads(config)
        self._finish_init()

    def _build_heads(self, config: AlbefConfig):
        """Task heads on top of the towers (none here)."""

    def _new_momentum(self) -> AlbefMomentum:
        return AlbefMomentum(
            self,
            self.momentum_module_names,
            momentum=self.config.momentum,
            queue_size=self.config.queue_size,
            embed_dim=self.config.embed_dim,
            image_ids=self.momentum_image_ids,
        )

    # ----- towers --------------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image embeddings, (batch, embed_dim)."""
        image_states = self.vision_model(pixel_values).last_hidden_state
        return F.normalize(self.vision_proj(image_states[:, 0]), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised ITC text embeddings from the text encoder (layers before the fusion split)."""
        text_states = self.text_model(input_ids, attention_mask, mode="text").last_hidden_state
        return F.normalize(self.text_proj(text_states[:, 0]), dim=-1)

    def fuse(
        self, text_states: torch.Tensor, attention_mask: torch.Tensor | None, image_states: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """Fusion-encoder output for aligned (text i, image i) pairs, from text-encoder states."""
        return self.text_model(
            text_embeds=text_states,
            attention_mask=attention_mask,
            encoder_hidden_states=image_states,
            mode="fusion",
            **kwargs,
        ).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_fused_states: bool = False,
        **kwargs,
    ) -> AlbefOutput:
        r"""
        output_fused_states (`bool`): also run the fusion encoder on aligned pairs (image i, text i).
        """
        if pixel_values is None or input_ids is None:
            raise ValueError(
                "AlbefModel needs both pixel_values and input_ids; use get_image_features / "
                "get_text_features for one modality"
            )
        vision_out = self.vision_model(pixel_values, **kwargs)
        text_out = self.text_model(input_ids, attention_mask, mode="text", **kwargs)
        image_embeds = F.normalize(self.vision_proj(vision_out.last_hidden_state[:, 0]), dim=-1)
        text_embeds = F.normalize(self.text_proj(text_out.last_hidden_state[:, 0]), dim=-1)
        logits_per_image = image_embeds @ text_embeds.t() / self.temp
        fused = None
        if output_fused_states:
            _check_pairs(pixel_values, input_ids, "output_fused_states")
            fused = self.fuse(text_out.last_hidden_state, attention_mask, vision_out.last_hidden_state)
        return AlbefOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            fused_last_hidden_state=fused,
            vision_model_output=vision_out,
            text_model_output=text_out,
        )


class AlbefForRetrieval(AlbefModel):
    """ITC + ITM: image-text retrieval (COCO, Flickr30K) and weakly supervised grounding (RefCOCO+)."""

    momentum_image_ids = True
    trains_with_momentum = True

    def _build_heads(self, config: AlbefConfig):
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)

    def itm_logits(
        self, text_states: torch.Tensor, attention_mask: torch.Tensor | None, image_states: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (batch, 2) of aligned pairs (text i, image i), from text-encoder and image-encoder states."""
        return self.itm_head(self.fuse(text_states, attention_mask, image_states, cls_only=True)[:, 0])

    def itm_logits_for_image(
        self,
        image_states: torch.Tensor,
        text_states: torch.Tensor,
        text_attention_mask: torch.Tensor | None = None,
        max_query_tokens: int = MAX_QUERY_TOKENS,
    ) -> torch.Tensor:
        """ITM logits `(k, 2)` of one image against `k` candidate texts (index 1 = match), as re-ranking needs.

        image_states (`(tokens, hidden)` or `(1, tokens, hidden)`): the vision model's output for the image.
        text_states (`(k, length, hidden)`) / text_attention_mask (`(k, length)`): the text model's output in mode
            `"text"` and its padding mask.

        Equals `itm_logits(text_states, text_attention_mask, image_states.expand(k, -1, -1))`; the image's
        cross-attention keys/values are projected once for all `k` texts."""
        image_states = image_states.reshape(1, *image_states.shape[-2:])
        k = text_states.shape[0]
        return self.itm_logits_for_pairs(
            image_states,
            text_states,
            text_attention_mask,
            torch.zeros(k, dtype=torch.long),
            torch.arange(k),
            max_query_tokens=max_query_tokens,
        )

    def itm_logits_for_pairs(
        self,
        image_states: torch.Tensor,
        text_states: torch.Tensor,
        text_attention_mask: torch.Tensor | None,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        max_query_tokens: int = MAX_QUERY_TOKENS,
    ) -> torch.Tensor:
        """ITM logits `(pairs, 2)` of the pairs `(image_states[image_index[p]], text_states[text_index[p]])`.

        image_states (`(images, tokens, hidden)`): vision-model outputs, on the model's device.
        text_states (`(texts, length, hidden)`) / text_attention_mask (`(texts, length)`): text-model outputs in mode
            `"text"` and their padding mask, on any device (a batch at a time moves to the images' device).
        image_index / text_index (`(pairs,)`): the pairs to score, in any order, repeats allowed.
        max_query_tokens: text tokens per fusion forward (bounds the attention scores' memory).

        Equals `itm_logits(text_states[text_index], text_attention_mask[text_index], image_states[image_index])` up to
        float rounding, computed as one grouped fusion: pairs are grouped by image so that each image's keys/values
        are projected once per group, the last fusion layer computes [CLS] only, and columns that are padding in
        every text of a batch are dropped. The grouping is planned on the host, once per call."""
        device = image_states.device
        if image_states.ndim != 3 or text_states.ndim != 3:
            raise ValueError(
                f"image_states must be (images, tokens, hidden) and text_states (texts, length, hidden), got "
                f"{tuple(image_states.shape)} and {tuple(text_states.shape)}"
            )
        image_index = torch.as_tensor(image_index).reshape(-1).to("cpu", torch.long)
        text_index = torch.as_tensor(text_index).reshape(-1).to("cpu", torch.long)
        if image_index.shape != text_index.shape:
            raise ValueError(f"image_index {tuple(image_index.shape)} and text_index {tuple(text_index.shape)} differ")
        num_images, num_texts, length = image_states.shape[0], text_states.shape[0], text_states.shape[1]
        logits = torch.empty((image_index.numel(), 2), dtype=image_states.dtype, device=device)
        if image_index.numel() == 0:
            return logits
        for name, index, size in (("image_index", image_index, num_images), ("text_index", text_index, num_texts)):
            if int(index.min()) < 0 or int(index.max()) >= size:
                raise ValueError(
                    f"{name} must lie in [0, {size}), got values from {int(index.min())} to {int(index.max())}"
                )
        if text_attention_mask is None:
            text_attention_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
        if tuple(text_attention_mask.shape) != (num_texts, length):
            raise ValueError(
                f"text_attention_mask must be ({num_texts}, {length}) like text_states, got "
                f"{tuple(text_attention_mask.shape)}"
            )
        # Each text's used length (last attended column + 1), read once on the host.
        attended = text_attention_mask.to("cpu") != 0
        if not bool(attended[:, 0].all()):
            rows = (~attended[:, 0]).nonzero().flatten().tolist()
            raise ValueError(
                f"texts {rows} have attention_mask 0 at position 0; every text starts with an attended [CLS]"
            )
        used_length = (attended * torch.arange(1, length + 1)).amax(1)

        order = torch.argsort(image_index, stable=True)
        for images, pairs, valid in _grouped_batches(image_index[order], order, max(1, max_query_tokens // length)):
            per_group = pairs.shape[0] // images.shape[0]
            texts = text_index[pairs]
            used = max(1, int(used_length[texts].max()))
            on_text_device = texts.to(text_states.device)
            fused = self.text_model(
                text_embeds=text_states[on_text_device, :used].to(device),
                attention_mask=text_attention_mask[on_text_device, :used].to(device),
                encoder_hidden_states=image_states[images.to(device)],
                mode="fusion",
                group_size=per_group,
                cls_only=True,
            ).last_hidden_state
            keep = valid.to(device)
            logits[pairs.to(device)[keep]] = self.itm_head(fused[:, 0])[keep].to(logits.dtype)
        return logits

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_itm_head: bool = False,
        output_fused_states: bool = False,
        return_loss: bool = False,
        image_ids: torch.Tensor | None = None,
        alpha: float | None = None,
        hard_negatives: str = "sample",
        **kwargs,
    ) -> AlbefOutput:
        r"""
        use_itm_head (`bool`): also return `itm_logits` (batch, 2) for aligned pairs (image i, text i).
        return_loss (`bool`): training forward of the original: `loss_itc` (captions of the same `image_ids` are
            positives, queue included; momentum distillation with weight `alpha`) and `loss_itm` (hard negatives,
            `hard_negatives="sample"` as the original or `"hardest"`); updates the momentum towers and queues.
        image_ids (`torch.LongTensor` of shape `(batch,)`): image id of each pair (required with `return_loss`).
        alpha (`float`): distillation weight, defaults to `config.alpha` (the warm-up ramp is the caller's).
        """
        if return_loss:
            if image_ids is None:
                raise ValueError("return_loss=True needs image_ids (one per pair) for the ITC positives")
            _check_pairs(pixel_values, input_ids, "The retrieval loss")
            if image_ids.numel() != input_ids.shape[0]:
                raise ValueError(f"image_ids has {image_ids.numel()} entries for {input_ids.shape[0]} pairs")
            alpha = self.config.alpha if alpha is None else alpha
            out = self._itc_and_itm_losses(pixel_values, input_ids, attention_mask, alpha, image_ids, hard_negatives)
            return AlbefOutput(
                loss=out["loss_itc"] + out["loss_itm"],
                loss_itc=out["loss_itc"],
                loss_itm=out["loss_itm"],
                logits_per_image=out["logits_per_image"],
                logits_per_text=out["logits_per_image"].t(),
                itm_logits=out["itm_logits"],
                image_embeds=out["image_embeds"],
                text_embeds=out["text_embeds"],
            )
        wants_fusion = use_itm_head or output_fused_states
        output = super().forward(pixel_values, input_ids, attention_mask, output_fused_states=wants_fusion, **kwargs)
        if use_itm_head:
            output.itm_logits = self.itm_head(output.fused_last_hidden_state[:, 0])
        if not output_fused_states:
            output.fused_last_hidden_state = None
        return output

    def _itc_and_itm_losses(self, pixel_values, input_ids, attention_mask, alpha, image_ids, hard_negatives):
        """The original retrieval/pre-training forward up to ITM. `image_ids=None` means every pair is its own
        positive (pre-training); otherwise captions of the same image are positives, queue included (retrieval)."""
        momentum = self._require_momentum()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_states = self.vision_model(pixel_values).last_hidden_state
        image_feat = F.normalize(self.vision_proj(image_states[:, 0]), dim=-1)
        text_states = self.text_model(input_ids, attention_mask, mode="text").last_hidden_state
        text_feat = F.normalize(self.text_proj(text_states[:, 0]), dim=-1)
        batch = pixel_values.shape[0]

        with torch.no_grad():
            momentum.update(self)
            image_states_m = momentum.vision_model(pixel_values).last_hidden_state
            image_feat_m = F.normalize(momentum.vision_proj(image_states_m[:, 0]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), momentum.image_queue.clone()], dim=1)
            text_states_m = momentum.text_model(input_ids, attention_mask, mode="text").last_hidden_state
            text_feat_m = F.normalize(momentum.text_proj(text_states_m[:, 0]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), momentum.text_queue.clone()], dim=1)
            if image_ids is None:
                targets = torch.zeros(batch, text_feat_all.shape[1], device=image_feat.device)
                targets.fill_diagonal_(1)
            else:
                image_ids = image_ids.view(-1, 1)
                positives = torch.eq(image_ids, torch.cat([image_ids.t(), momentum.idx_queue.clone()], dim=1)).float()
                targets = positives / positives.sum(1, keepdim=True)
            targets_i2t = soft_targets(image_feat_m @ text_feat_all / self.temp, targets, alpha)
            targets_t2i = soft_targets(text_feat_m @ image_feat_all / self.temp, targets, alpha)

        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_itc = itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        momentum.enqueue(image_feat_m, text_feat_m, image_ids)

        fused_pos = self.fuse(text_states, attention_mask, image_states, cls_only=True)
        with torch.no_grad():
            if image_ids is None:
                weights_i2t = F.softmax(sim_i2t[:, :batch], dim=1)
                weights_t2i = F.softmax(sim_t2i[:, :batch], dim=1)
                weights_i2t.fill_diagonal_(0)
                weights_t2i.fill_diagonal_(0)
            else:
                weights_i2t = F.softmax(sim_i2t[:, :batch] + 1e-4, dim=1)
                weights_t2i = F.softmax(sim_t2i[:, :batch] + 1e-4, dim=1)
                same_image = torch.eq(image_ids, image_ids.t())
                weights_i2t.masked_fill_(same_image, 0)
                weights_t2i.masked_fill_(same_image, 0)
            negative_images = pick_hard_negatives(weights_t2i, hard_negatives)  # one per text
            negative_texts = pick_hard_negatives(weights_i2t, hard_negatives)  # one per image

        fused_neg = self.fuse(
            torch.cat([text_states, text_states[negative_texts]]),
            torch.cat([attention_mask, attention_mask[negative_texts]]),
            torch.cat([image_states[negative_images], image_states]),
            cls_only=True,
        )
        itm_logits = self.itm_head(torch.cat([fused_pos[:, 0], fused_neg[:, 0]]))
        itm_labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
        loss_itm = F.cross_entropy(itm_logits, itm_labels.to(itm_logits.device))
        return {
            "loss_itc": loss_itc,
            "loss_itm": loss_itm,
            "itm_logits": itm_logits,
            "logits_per_image": sim_i2t[:, :batch],
            "image_embeds": image_feat,
            "text_embeds": text_feat,
            "image_states": image_states,
            "image_states_m": image_states_m,
            "hard_negatives": torch.cat([negative_images, negative_texts]),
        }

    @torch.no_grad()
    def retrieval_scores(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original retrieval evaluation: rank by ITC cosine similarity, re-score the top `k` of each row with
        the ITM "match" logit, and leave -100 elsewhere. Returns `(score_i2t (images, texts), score_t2i)`."""
        from .retrieval import retrieval_score_matrices

        return retrieval_score_matrices(self, pixel_values, input_ids, attention_mask, k or self.config.retrieval_k)

    def gradcam(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mode: str = "itm",
        layer: int | None = None,
    ):
        """Grad-CAM grounding maps of each text on its image (see `transformers_albef.grounding.gradcam`)."""
        from .grounding import gradcam

        return gradcam(self, pixel_values, input_ids, attention_mask, mode=mode, layer=layer)


class AlbefForPreTraining(AlbefForRetrieval):
    """The five pre-training losses of the paper: ITC and MLM (each with momentum distillation) and ITM with hard
    negatives. The momentum towers and queues are always built."""

    momentum_module_names = ("vision_model", "vision_proj", "text_model", "text_proj", "mlm_head")
    momentum_image_ids = False
    tied_weights = {"mlm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: AlbefConfig):
        if not config.distill:
            config = copy.deepcopy(config)
            config.distill = True
        super().__init__(config)

    def _build_heads(self, config: AlbefConfig):
        super()._build_heads(config)
        self.mlm_head = AlbefPredictionHead(config.text_config)

    def get_output_embeddings(self):
        return self.mlm_head.decoder

    def mlm_logits(
        self,
        input_ids,
        attention_mask,
        image_states,
        towers: nn.Module | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits of the full multimodal text model (all layers) on `input_ids` with image cross-attention; with
        a boolean `positions` mask, only at those positions (`(num_positions, vocab)`)."""
        towers = towers or self
        states = towers.text_model(input_ids, attention_mask, encoder_hidden_states=image_states).last_hidden_state
        if positions is not None:
            states = states[positions]  # the vocabulary projection dominates the cost; skip unscored positions
        return towers.mlm_head(states)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        masked_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        alpha: float | None = None,
        hard_negatives: str = "sample",
        **kwargs,
    ) -> AlbefOutput:
        r"""
        return_loss (`bool`): the training forward (all three losses; updates the momentum towers and queues).
            Otherwise this is `AlbefForRetrieval.forward` (ITC similarities, `use_itm_head=True` for ITM).
        masked_input_ids / mlm_labels: the MLM inputs and targets (-100 = not predicted); when omitted, `input_ids`
            are masked here with the original 15% / 80-10-10 rule (`objectives.mask_tokens`).
        alpha (`float`): distillation weight for ITC and MLM, defaults to `config.alpha`.
        """
        if not return_loss:
            return super().forward(pixel_values, input_ids, attention_mask, **kwargs)
        _check_pairs(pixel_values, input_ids, "Pre-training")
        if (masked_input_ids is None) != (mlm_labels is None):
            raise ValueError("pass masked_input_ids and mlm_labels together (or neither to mask here)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        alpha = self.config.alpha if alpha is None else alpha
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        out = self._itc_and_itm_losses(pixel_values, input_ids, attention_mask, alpha, None, hard_negatives)

        if masked_input_ids is None:
            tc = self.config.text_config
            masked_input_ids, mlm_labels = mask_tokens(
                input_ids,
                tc.vocab_size,
                self.config.mlm_probability,
                tc.pad_token_id,
                tc.cls_token_id,
                tc.mask_token_id,
            )
        masked = mlm_labels != -100
        with torch.no_grad():
            teacher = self.mlm_logits(
                masked_input_ids, attention_mask, out["image_states_m"], towers=self.momentum, positions=masked
            )
        logits = self.mlm_logits(masked_input_ids, attention_mask, out["image_states"], positions=masked)
        loss_mlm = mlm_loss(logits, mlm_labels[masked], teacher, alpha)
        return AlbefOutput(
            loss=out["loss_itc"] + out["loss_itm"] + loss_mlm,
            loss_itc=out["loss_itc"],
            loss_itm=out["loss_itm"],
            loss_mlm=loss_mlm,
            logits_per_image=out["logits_per_image"],
            logits_per_text=out["logits_per_image"].t(),
            itm_logits=out["itm_logits"],
            mlm_logits=logits,
            image_embeds=out["image_embeds"],
            text_embeds=out["text_embeds"],
        )


class _AlbefClassifier(AlbefPreTrainedModel):
    """[CLS] of the multimodal text model -> `classifier` (Linear, ReLU, Linear), trained with distillation."""

    config: AlbefConfig
    main_input_name = "pixel_values"
    momentum_module_names = ("vision_model", "text_model", "classifier")

    def __init__(self, config: AlbefConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.vision_model = AlbefVisionModel(config.vision_config)
        self.text_model = AlbefTextModel(config.text_config)
        self.classifier = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.num_labels))
        self._finish_init()

    def _image_states(self, pixel_values: torch.Tensor, towers: nn.Module) -> torch.Tensor | list[torch.Tensor]:
        return towers.vision_model(pixel_values).last_hidden_state

    def _logits(self, pixel_values, input_ids, attention_mask, towers: nn.Module):
        images = self._image_states(pixel_values, towers)
        states = towers.text_model(input_ids, attention_mask, encoder_hidden_states=images).last_hidden_state
        return towers.classifier(states[:, 0]), states

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        alpha: float | None = None,
        **kwargs,
    ) -> AlbefClassifierOutput:
        r"""
        labels (`(batch,)`): when given, the loss is computed; with momentum towers (`config.distill`) it is the
            original distilled loss `(1 - alpha) * CE + alpha * KD` and the momentum towers are updated.
        """
        _check_pairs(pixel_values, input_ids, type(self).__name__)
        logits, states = self._logits(pixel_values, input_ids, attention_mask, self)
        loss = None
        if labels is not None:
            teacher = None
            if self.momentum is not None and self.training:
                with torch.no_grad():
                    self.momentum.update(self)
                    teacher, _ = self._logits(pixel_values, input_ids, attention_mask, self.momentum)
            alpha = self.config.alpha if alpha is None else alpha
            loss = distilled_classification_loss(logits, labels.view(-1), teacher, alpha)
        return AlbefClassifierOutput(loss=loss, logits=logits, fused_last_hidden_state=states)


class AlbefForVisualEntailment(_AlbefClassifier):
    """SNLI-VE: 3-way logits, 0 contradiction, 1 neutral, 2 entailment."""


class AlbefForVisualReasoning(_AlbefClassifier):
    """NLVR2: is the sentence true of the image pair? `pixel_values` are (batch, 2, 3, H, W); logits index 1 = true.

    The text model has `num_fused_images=2`: its fusion layers alternate between image 0 and image 1."""

    def _image_states(self, pixel_values, towers):
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                f"NLVR2 takes exactly two images per sentence: pixel_values of shape (batch, 2, 3, H, W), got "
                f"{tuple(pixel_values.shape)}"
            )
        batch = pixel_values.shape[0]
        # One tower pass over both images, as the original concatenates them.
        states = towers.vision_model(torch.cat([pixel_values[:, 0], pixel_values[:, 1]])).last_hidden_state
        return [states[:batch], states[batch:]]


class AlbefForTextAssignment(AlbefPreTrainedModel):
    """NLVR2 text-assignment pre-training: given a sentence and two images, is the sentence's image left (0), right
    (1) or neither (2)?"""

    config: AlbefConfig
    main_input_name = "pixel_values"
    trains_with_momentum = False  # the original text-assignment model has no momentum towers

    def __init__(self, config: AlbefConfig):
        super().__init__(config)
        self.vision_model = AlbefVisionModel(config.vision_config)
        self.text_model = AlbefTextModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)  # unused, kept for checkpoints
        self.temp = nn.Parameter(torch.ones([]) * config.temp)  # unused: the similarity uses a fixed 0.07
        self.ta_head = nn.Linear(config.text_config.hidden_size, 3)
        self._finish_init()

    @torch.no_grad()
    def assignment_weights(self, image_states: torch.Tensor) -> torch.Tensor:
        """softmax(image-image cosine / 0.07) with a zero diagonal: how likely each other image is drawn."""
        feat = F.normalize(self.vision_proj(image_states[:, 0]), dim=-1)
        weights = F.softmax(feat @ feat.t() / 0.07, dim=1)
        return weights.fill_diagonal_(0)

    @staticmethod
    def sample_assignment(weights: torch.Tensor, draws: torch.Tensor | None = None, hard_negatives: str = "sample"):
        """The original assignment: with probability 2/3 the sentence's own image is placed left (label 0) or right
        (label 1) of a drawn image, otherwise two drawn images (label 2). `draws` are the uniform numbers the
        original takes from `torch.rand(1)` (consumed in its order); drawn by `torch.rand` when omitted."""
        batch = weights.shape[0]
        draws = iter(draws.tolist()) if draws is not None else None
        uniform = (lambda: next(draws)) if draws is not None else (lambda: torch.rand(1).item())
        left, right, labels = [], [], []
        for b in range(batch):
            if uniform() > 1 / 3:
                other = int(pick_hard_negatives(weights[b : b + 1], hard_negatives))
                own_left = uniform() > 0.5
                left.append(b if own_left else other)
                right.append(other if own_left else b)
                labels.append(0 if own_left else 1)
            else:
                pair = torch.multinomial(weights[b], 2) if hard_negatives == "sample" else weights[b].topk(2).indices
                left.append(int(pair[0]))
                right.append(int(pair[1]))
                labels.append(2)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=weights.device)  # noqa: E731
        return as_tensor(left), as_tensor(right), as_tensor(labels)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image0_index: torch.Tensor | None = None,
        image1_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        hard_negatives: str = "sample",
        **kwargs,
    ) -> AlbefClassifierOutput:
        r"""
        pixel_values (`(batch, 3, H, W)`): image b belongs to sentence b.
        image0_index / image1_index / labels: an explicit assignment; sampled as the original when omitted.
        """
        _check_pairs(pixel_values, input_ids, "Text assignment")
        image_states = self.vision_model(pixel_values).last_hidden_state
        if image0_index is None:
            weights = self.assignment_weights(image_states)
            image0_index, image1_index, labels = self.sample_assignment(weights, hard_negatives=hard_negatives)
        states = self.text_model(
            input_ids, attention_mask, encoder_hidden_states=[image_states[image0_index], image_states[image1_index]]
        ).last_hidden_state
        logits = self.ta_head(states[:, 0])
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return AlbefClassifierOutput(loss=loss, logits=logits, fused_last_hidden_state=states)


__all__ = [
    "AlbefModel",
    "AlbefForRetrieval",
    "AlbefForPreTraining",
    "AlbefForVisualEntailment",
    "AlbefForVisualReasoning",
    "AlbefForTextAssignment",
    "AlbefOutput",
    "AlbefClassifierOutput",
]
