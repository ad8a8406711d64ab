"""ALBEF's text tower: one BERT whose first `fusion_layer` layers encode text and whose remaining layers fuse it with
image features through cross-attention (the original `xbert.py` design, with BERT's parameter names kept)."""

from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_albef import AlbefTextConfig
from .modeling_albef_base import AlbefPreTrainedModel, attend

TEXT_MODES = ("text", "fusion", "multimodal")


class AlbefTextEmbeddings(nn.Module):
    """word + position + token-type embeddings (token type 0 is always added, as in the original), LayerNorm."""

    def __init__(self, config: AlbefTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        length = input_ids.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :length]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class _AlbefTextAttentionCore(nn.Module):
    """query/key/value projections and the attention call; keys and values come from `kv_width`-wide states."""

    def __init__(self, config: AlbefTextConfig, kv_width: int, is_causal: bool):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = is_causal
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, kv_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self.query(hidden_states).view(*hidden_states.shape[:-1], -1, self.head_dim).transpose(1, 2)
        kv_shape = (*kv_states.shape[:-1], -1, self.head_dim)
        key = self.key(kv_states).view(kv_shape).transpose(1, 2)
        value = self.value(kv_states).view(kv_shape).transpose(1, 2)
        output, weights = attend(self, query, key, value, attention_mask, **kwargs)
        return output.reshape(*hidden_states.shape[:-1], -1), weights


class AlbefTextSelfAttention(_AlbefTextAttentionCore):
    def __init__(self, config: AlbefTextConfig):
        super().__init__(config, config.hidden_size, is_causal=config.is_decoder)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return super().forward(hidden_states, hidden_states, attention_mask, **kwargs)


class AlbefTextCrossAttention(_AlbefTextAttentionCore):
    def __init__(self, config: AlbefTextConfig):
        super().__init__(config, config.encoder_width, is_causal=False)

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None, **kwargs):
        return super().forward(hidden_states, encoder_hidden_states, encoder_attention_mask, **kwargs)


class AlbefTextSelfOutput(nn.Module):
    """Post-norm residual: LayerNorm(x + dropout(dense(y)))."""

    def __init__(self, config: AlbefTextConfig, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class AlbefTextAttention(nn.Module):
    def __init__(self, config: AlbefTextConfig, is_cross_attention: bool = False):
        super().__init__()
        self.self = AlbefTextCrossAttention(config) if is_cross_attention else AlbefTextSelfAttention(config)
        self.output = AlbefTextSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        attended, _ = self.self(hidden_states, *args, **kwargs)
        return self.output(attended, hidden_states)


class AlbefTextIntermediate(nn.Module):
    def __init__(self, config: AlbefTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class AlbefTextLayer(GradientCheckpointingLayer):
    """self-attention -> cross-attention (fusion layers only) -> feed-forward, each post-norm."""

    def __init__(self, config: AlbefTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = AlbefTextAttention(config)
        if layer_idx >= config.fusion_layer:
            self.crossattention = AlbefTextAttention(config, is_cross_attention=True)
        self.intermediate = AlbefTextIntermediate(config)
        self.output = AlbefTextSelfOutput(config, in_features=config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = self.attention(hidden_states, attention_mask, **kwargs)
        if hasattr(self, "crossattention"):
            if encoder_hidden_states is None:
                raise ValueError(f"text layer {self.layer_idx} is a fusion layer and needs encoder_hidden_states")
            hidden_states = self.crossattention(hidden_states, encoder_hidden_states, encoder_attention_mask, **kwargs)
        return self.output(self.intermediate(hidden_states), hidden_states)


class AlbefTextEncoder(nn.Module):
    def __init__(self, config: AlbefTextConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([AlbefTextLayer(config, i) for i in range(config.num_hidden_layers)])
        # NLVR2: the image-0 layer of each fusion pair uses the image-1 layer's key/value projections.
        for first, second in self.shared_kv_pairs():
            for name in ("key", "value"):
                setattr(
                    self.layer[first].crossattention.self, name, getattr(self.layer[second].crossattention.self, name)
                )

    def shared_kv_pairs(self) -> list[tuple[int, int]]:
        if not self.config.share_cross_attention_kv:
            return []
        return [(i, i + 1) for i in range(self.config.fusion_layer, self.config.num_hidden_layers, 2)]


def _as_list(states):
    return list(states) if isinstance(states, (list, tuple)) else [states]


class AlbefTextModel(AlbefPreTrainedModel):
    r"""
    The text/fusion BERT. `mode` selects the layers, as in the original:

    - `"text"`: embeddings + layers `[0, fusion_layer)`; the unimodal text encoder (ITC features).
    - `"fusion"`: layers `[fusion_layer, num_hidden_layers)` on `text_embeds` (the output of mode `"text"`),
      cross-attending to `encoder_hidden_states`; ITM uses this so the text half runs once per caption.
    - `"multimodal"`: all layers; the same computation as `"text"` followed by `"fusion"`.

    `encoder_hidden_states` may be a list of tensors (NLVR2): fusion layer `L` attends to entry
    `(L - fusion_layer) % len(list)`, with the matching entry of `encoder_attention_mask`.
    """

    config: AlbefTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)
    _can_record_outputs = {
        "hidden_states": AlbefTextLayer,
        "attentions": AlbefTextSelfAttention,
        "cross_attentions": AlbefTextCrossAttention,
    }

    def __init__(self, config: AlbefTextConfig):
        super().__init__(config)
        self.embeddings = AlbefTextEmbeddings(config)
        self.encoder = AlbefTextEncoder(config)
        self._tied_weights_keys = {
            f"encoder.layer.{a}.crossattention.self.{name}.{p}": f"encoder.layer.{b}.crossattention.self.{name}.{p}"
            for a, b in self.encoder.shared_kv_pairs()
            for name in ("key", "value")
            for p in ("weight", "bias")
        }
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings.word_embeddings = value

    def layer_range(self, mode: str) -> range:
        if mode not in TEXT_MODES:
            raise ValueError(f"mode must be one of {TEXT_MODES}, got {mode!r}")
        start = self.config.fusion_layer if mode == "fusion" else 0
        stop = self.config.fusion_layer if mode == "text" else self.config.num_hidden_layers
        return range(start, stop)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        mode: str = "multimodal",
        **kwargs,
    ) -> BaseModelOutputWithCrossAttentions:
        r"""
        text_embeds (`torch.Tensor` of shape `(batch, length, hidden)`, *optional*):
            Mode `"fusion"` only: the text-encoder output to fuse (instead of `input_ids`).
        encoder_hidden_states (`torch.Tensor` or list of them, *optional*):
            Image features (or, for the VQA decoder, question states) the fusion layers cross-attend to.
        mode (`str`, defaults to `"multimodal"`): `"text"`, `"fusion"` or `"multimodal"`.
        """
        layers = self.layer_range(mode)
        if mode == "fusion":
            if text_embeds is None or input_ids is not None:
                raise ValueError('mode="fusion" takes text_embeds (the mode="text" output) and no input_ids')
            hidden_states = text_embeds
            batch, length = hidden_states.shape[:2]
        else:
            if input_ids is None or text_embeds is not None:
                raise ValueError(f"mode={mode!r} takes input_ids (and no text_embeds)")
            if input_ids.ndim != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
            batch, length = input_ids.shape
            hidden_states = self.embeddings(input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        attention_mask = self._check_text_mask(attention_mask, batch, length, hidden_states.device)

        images, image_masks = [], []
        if layers.stop > self.config.fusion_layer and len(layers):
            if encoder_hidden_states is None:
                raise ValueError(f"mode={mode!r} runs fusion layers and needs encoder_hidden_states (image features)")
            images = _as_list(encoder_hidden_states)
            masks = _as_list(encoder_attention_mask) if encoder_attention_mask is not None else [None] * len(images)
            if len(masks) != len(images):
                raise ValueError(f"got {len(images)} encoder_hidden_states but {len(masks)} encoder_attention_masks")
            for image in images:
                if image.ndim != 3 or image.shape[0] != batch or image.shape[-1] != self.config.encoder_width:
                    raise ValueError(
                        f"encoder_hidden_states must be (batch={batch}, tokens, {self.config.encoder_width}) to pair "
                        f"with the text, got {tuple(image.shape)}"
                    )
            image_masks = [
                None
                if mask is None
                else create_bidirectional_mask(
                    config=self.config, inputs_embeds=hidden_states, attention_mask=mask, encoder_hidden_states=image
                )
                for image, mask in zip(images, masks)
            ]

        if self.config.is_decoder:
            self_mask = create_causal_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, past_key_values=None
            )
        else:
            self_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )

        for i in layers:
            image_index = (i - self.config.fusion_layer) % len(images) if i >= self.config.fusion_layer else None
            hidden_states = self.encoder.layer[i](
                hidden_states,
                self_mask,
                images[image_index] if image_index is not None else None,
                image_masks[image_index] if image_index is not None else None,
                **kwargs,
            )
        return BaseModelOutputWithCrossAttentions(last_hidden_state=hidden_states)

    @staticmethod
    def _check_text_mask(attention_mask, batch, length, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.long, device=device)
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be ({batch}, {length}) like the text, got {tuple(attention_mask.shape)}"
            )
        # Skipped under torch.compile: the check reads the mask on the host.
        if not torch.compiler.is_compiling() and not bool((attention_mask != 0).any(dim=1).all()):
            empty = (attention_mask == 0).all(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"texts {empty} are all padding (attention_mask is 0 everywhere); every text needs [CLS]")
        return attention_mask


class AlbefPredictionHead(nn.Module):
    """BERT's LM head: dense -> act -> LayerNorm -> vocabulary projection (tied to the word embeddings) + bias."""

    def __init__(self, config: AlbefTextConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.transform_act_fn = ACT2FN[config.hidden_act]
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        t = self.transform
        return self.decoder(t.LayerNorm(t.transform_act_fn(t.dense(hidden_states)))) + self.bias


__all__ = ["AlbefTextModel"]
