"""ALBEF's text tower: one BERT whose first `fusion_layer` layers encode text and whose remaining layers fuse it with
image features through cross-attention (the original `xbert.py` design, with BERT's parameter names kept)."""

from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
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


def _split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, length, hidden) -> (batch, heads, length, head_dim)."""
    return states.view(*states.shape[:-1], -1, head_dim).transpose(1, 2)


class _AlbefTextAttentionCore(nn.Module):
    """query/key/value projections and the attention call; keys and values come from `kv_width`-wide states."""

    def __init__(self, config: AlbefTextConfig, kv_width: int, is_causal: bool, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = is_causal
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def project_kv(self, kv_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.key(kv_states), self.head_dim), _split_heads(self.value(kv_states), self.head_dim)


class AlbefTextSelfAttention(_AlbefTextAttentionCore):
    """Self-attention. `kv_states` (default: `hidden_states`) are the rows keys/values come from: the [CLS]-only last
    fusion layer queries position 0 against every position. With a cache, this layer's keys/values are appended to
    it and the queries attend to every cached position."""

    def __init__(self, config: AlbefTextConfig, layer_idx: int | None = None):
        super().__init__(config, config.hidden_size, is_causal=config.is_decoder, layer_idx=layer_idx)

    def forward(self, hidden_states, attention_mask=None, kv_states=None, cache: Cache | None = None, **kwargs):
        query = _split_heads(self.query(hidden_states), self.head_dim)
        key, value = self.project_kv(hidden_states if kv_states is None else kv_states)
        if cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            key, value = cache.update(key, value, self.layer_idx)
        output, weights = attend(self, query, key, value, attention_mask, **kwargs)
        return output.reshape(*hidden_states.shape[:-1], -1), weights


class AlbefTextCrossAttention(_AlbefTextAttentionCore):
    """Cross-attention to `encoder_hidden_states`, grouped: when the source has `batch // group_size` rows, the
    `group_size` consecutive query sequences of each source row are folded into one query sequence, so each source
    row's keys/values are projected once for all of them. Cross-attention has no mask between query tokens, so every
    query row sees exactly what it would see with the source repeated per sequence.

    With an `EncoderDecoderCache`, the source's keys/values are projected on the first call and read back after."""

    def __init__(self, config: AlbefTextConfig, layer_idx: int | None = None):
        super().__init__(config, config.encoder_width, is_causal=False, layer_idx=layer_idx)

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        encoder_attention_mask=None,
        cache: Cache | None = None,
        group_size: int = 1,
        **kwargs,
    ):
        rows, length, width = hidden_states.shape
        folded = hidden_states.reshape(rows // group_size, group_size * length, width)
        query = _split_heads(self.query(folded), self.head_dim)
        cached = isinstance(cache, EncoderDecoderCache)
        if cached and cache.is_updated.get(self.layer_idx, False):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = layer.keys, layer.values
        else:
            key, value = self.project_kv(encoder_hidden_states)
            if cached:
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        output, weights = attend(self, query, key, value, encoder_attention_mask, **kwargs)
        return output.reshape(rows, length, -1), weights


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
    def __init__(self, config: AlbefTextConfig, is_cross_attention: bool = False, layer_idx: int | None = None):
        super().__init__()
        attention = AlbefTextCrossAttention if is_cross_attention else AlbefTextSelfAttention
        self.self = attention(config, layer_idx=layer_idx)
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
        self.attention = AlbefTextAttention(config, layer_idx=layer_idx)
        if layer_idx >= config.fusion_layer:
            self.crossattention = AlbefTextAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.intermediate = AlbefTextIntermediate(config)
        self.output = AlbefTextSelfOutput(config, in_features=config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        group_size: int = 1,
        cls_only: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        r"""
        cls_only (`bool`): compute position 0 only (queries from [CLS], keys/values from every position); the
            output is `(batch, 1, hidden)`.
        """
        if cls_only:
            cls = hidden_states[:, :1]
            attended, _ = self.attention.self(cls, attention_mask, kv_states=hidden_states, **kwargs)
            hidden_states = self.attention.output(attended, cls)
        else:
            hidden_states = self.attention(hidden_states, attention_mask, cache=cache, **kwargs)
        if hasattr(self, "crossattention"):
            if encoder_hidden_states is None:
                raise ValueError(f"text layer {self.layer_idx} is a fusion layer and needs encoder_hidden_states")
            hidden_states = self.crossattention(
                hidden_states,
                encoder_hidden_states,
                encoder_attention_mask,
                cache=cache,
                group_size=group_size,
                **kwargs,
            )
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

    Grouped cross-attention (`group_size=m`): `encoder_hidden_states` has `batch // m` rows and row `g` is the source
    of the `m` consecutive sequences `g*m ... g*m + m - 1`; its keys/values are projected once for all of them. This
    is how ITM scores many candidate texts per image, and how the answer decoder scores many answers per question.

    The answer decoder (`is_decoder=True`) takes a `Cache`: an `EncoderDecoderCache` holds the self-attention keys
    and values of the tokens seen so far and the source's cross-attention keys/values, projected once.
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
        group_size: int = 1,
        cls_only: bool = False,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        text_embeds (`torch.Tensor` of shape `(batch, length, hidden)`, *optional*):
            Mode `"fusion"` only: the text-encoder output to fuse (instead of `input_ids`).
        encoder_hidden_states (`torch.Tensor` or list of them, *optional*):
            Image features (or, for the VQA decoder, question states) the fusion layers cross-attend to.
        mode (`str`, defaults to `"multimodal"`): `"text"`, `"fusion"` or `"multimodal"`.
        group_size (`int`, defaults to 1): sequences per row of `encoder_hidden_states` (grouped cross-attention).
        cls_only (`bool`): the last layer computes position 0 ([CLS]) only, the only row ITM and the classifiers
            read; `last_hidden_state` is then `(batch, 1, hidden)`. Bidirectional models only.
        cache (`Cache`, *optional*): decoder only; the keys/values of the positions already decoded (see the class
            docstring). `attention_mask` then covers the cached positions too.
        use_cache (`bool`, *optional*): decoder only; start a cache when none is given and return it.
        """
        layers = self.layer_range(mode)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if self.config.is_decoder:
            if cls_only:
                raise ValueError("cls_only applies to the bidirectional encoder, not to the causal answer decoder")
            if cache is None and use_cache:
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif cache is not None or use_cache:
            raise ValueError("a cache applies to the causal answer decoder (is_decoder=True) only")
        past_length = cache.get_seq_length() if cache is not None else 0

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
            if position_ids is None and past_length:
                position_ids = self.embeddings.position_ids[:, past_length : past_length + length]
            hidden_states = self.embeddings(input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        attention_mask = self._check_text_mask(attention_mask, batch, past_length + length, hidden_states.device)

        images, image_masks = [], []
        runs_fusion = layers.stop > self.config.fusion_layer and len(layers) > 0
        if runs_fusion:
            if encoder_hidden_states is None:
                raise ValueError(f"mode={mode!r} runs fusion layers and needs encoder_hidden_states (image features)")
            images = _as_list(encoder_hidden_states)
            masks = _as_list(encoder_attention_mask) if encoder_attention_mask is not None else [None] * len(images)
            if len(masks) != len(images):
                raise ValueError(f"got {len(images)} encoder_hidden_states but {len(masks)} encoder_attention_masks")
            if batch % group_size:
                raise ValueError(f"{batch} sequences do not split into groups of group_size={group_size}")
            sources = batch // group_size
            for image, mask in zip(images, masks):
                if image.ndim != 3 or image.shape[0] != sources or image.shape[-1] != self.config.encoder_width:
                    raise ValueError(
                        f"encoder_hidden_states must be ({sources}, tokens, {self.config.encoder_width}): one row per "
                        f"{group_size} text sequence(s) of the batch of {batch}, got {tuple(image.shape)}"
                    )
                if mask is not None and tuple(mask.shape) != tuple(image.shape[:2]):
                    raise ValueError(
                        f"encoder_attention_mask must be {tuple(image.shape[:2])} like encoder_hidden_states' first "
                        f"two dimensions, got {tuple(mask.shape)}"
                    )
            image_masks = [_SourceMasks(self.config, image, mask, group_size) for image, mask in zip(images, masks)]

        last = layers[-1] if len(layers) else None
        if self.config.is_decoder:
            self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            self_mask = create_causal_mask(self.config, hidden_states, attention_mask, self_cache)
        else:
            self_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        cls_mask = None
        if cls_only and last is not None:
            cls_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states[:, :1],
                attention_mask=attention_mask,
                encoder_hidden_states=hidden_states,
            )

        for i in layers:
            layer_cls_only = cls_only and i == last
            image_index = (i - self.config.fusion_layer) % len(images) if i >= self.config.fusion_layer else None
            query_length = group_size * (1 if layer_cls_only else hidden_states.shape[1])
            hidden_states = self.encoder.layer[i](
                hidden_states,
                cls_mask if layer_cls_only else self_mask,
                images[image_index] if image_index is not None else None,
                image_masks[image_index].for_queries(query_length) if image_index is not None else None,
                cache=cache,
                group_size=group_size,
                cls_only=layer_cls_only,
                **kwargs,
            )
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)

    @staticmethod
    def _check_text_mask(attention_mask, batch, length, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.long, device=device)
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be ({batch}, {length}) like the text (cached positions included), got "
                f"{tuple(attention_mask.shape)}"
            )
        # Read only where that costs no device synchronisation (a CPU mask, outside torch.compile): on an
        # accelerator every read would stall the queue. The processor always attends [CLS].
        if (
            attention_mask.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not bool((attention_mask[:, :1] != 0).all())
        ):
            empty = (attention_mask[:, 0] == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"texts {empty} have attention_mask 0 at position 0; every text starts with an attended [CLS]"
            )
        return attention_mask


class _SourceMasks:
    """The cross-attention mask of one source, in the format of the attention backend, built once per query length
    (grouped queries and the [CLS]-only last layer change it)."""

    def __init__(self, config: AlbefTextConfig, source: torch.Tensor, mask: torch.Tensor | None, group_size: int):
        self.config, self.source, self.mask, self.group_size = config, source, mask, group_size
        self.by_length = {}

    def for_queries(self, query_length: int) -> torch.Tensor | None:
        if self.mask is None:
            return None
        if query_length not in self.by_length:
            queries = self.source.new_empty((self.source.shape[0], query_length, 0))
            self.by_length[query_length] = create_bidirectional_mask(
                config=self.config, inputs_embeds=queries, attention_mask=self.mask, encoder_hidden_states=self.source
            )
        return self.by_length[query_length]


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
