"""ALBEF's image tower: a ViT-B/16 (DeiT layout) with pre-norm blocks and a final LayerNorm over every token."""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_albef import AlbefVisionConfig
from .modeling_albef_base import AlbefPreTrainedModel, attend


class AlbefVisionEmbeddings(nn.Module):
    def __init__(self, config: AlbefVisionConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + config.grid_size**2, config.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings.projection(pixel_values.to(self.cls_token.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, patches], dim=1) + self.position_embeddings)


class AlbefVisionAttention(nn.Module):
    def __init__(self, config: AlbefVisionConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        output, weights = attend(self, query, key, value, None, **kwargs)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1)), weights


class AlbefVisionMLP(nn.Module):
    def __init__(self, config: AlbefVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


class AlbefVisionLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: AlbefVisionConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AlbefVisionAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = AlbefVisionMLP(config)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attended, _ = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.layernorm_after(hidden_states))


class AlbefVisionModel(AlbefPreTrainedModel):
    config: AlbefVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _can_record_outputs = {"hidden_states": AlbefVisionLayer, "attentions": AlbefVisionAttention}

    def __init__(self, config: AlbefVisionConfig):
        super().__init__(config)
        self.embeddings = AlbefVisionEmbeddings(config)
        self.layers = nn.ModuleList([AlbefVisionLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings.projection

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a `ValueError` naming what is wrong with `pixel_values` (the original asserts the exact size)."""
        c, size = self.config.num_channels, self.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (batch, {c}, {size}, {size}) tensor, got {got}")
        if pixel_values.shape[1] != c:
            raise ValueError(f"pixel_values must have {c} channels, got shape {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[2:])} but this model takes {size}x{size} images. Resize "
                f"them with the model's processor, or convert the checkpoint to the new size (position embeddings are "
                f"interpolated bicubically: `from_original(..., image_size=N)`)"
            )

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""Returns `last_hidden_state` (B, 1 + N, D) after the final LayerNorm; `pooler_output` is its [CLS] token."""
        self.check_pixel_values(pixel_values)
        hidden_states = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        hidden_states = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])


__all__ = ["AlbefVisionModel"]
