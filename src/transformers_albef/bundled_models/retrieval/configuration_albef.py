"""ALBEF configurations: the ViT-B/16 image tower, the BERT text/fusion tower and the composite model."""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


def _check_positive_ints(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


@strict
class AlbefVisionConfig(PreTrainedConfig):
    r"""
    Configuration of ALBEF's image encoder, a DeiT/ViT-B/16 with pre-norm blocks and a final LayerNorm over all tokens.

    Defaults are the released checkpoints' (ViT-B/16, LayerNorm eps 1e-6, no dropout). Pre-trained checkpoints run at
    `image_size=256`, fine-tuned ones at 384.
    """

    model_type = "albef_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 256
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check()  # here, so that the error reads as ours (strict's validators wrap it in a generic message)

    def validate_architecture(self):
        super().validate_architecture()
        self._check()

    def _check(self):
        _check_positive_ints(
            self,
            ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
             "patch_size", "num_channels"),
        )  # fmt: skip
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")


@strict
class AlbefTextConfig(PreTrainedConfig):
    r"""
    Configuration of ALBEF's BERT, which is one stack holding both the text encoder and the fusion encoder.

    Layers `[0, fusion_layer)` are the unimodal text encoder; layers `[fusion_layer, num_hidden_layers)` add
    cross-attention to image features of width `encoder_width`.

    fusion_layer (`int`, defaults to 6):
        Index of the first layer with cross-attention (the "text"/"fusion" split).
    encoder_width (`int`, defaults to 768):
        Width of the states the fusion layers cross-attend to (the vision hidden size; the question width for the
        VQA answer decoder).
    num_fused_images (`int`, defaults to 1):
        NLVR2 uses 2: fusion layer `L` cross-attends to image `(L - fusion_layer) % 2`, so the 18-layer NLVR2 encoder
        is 6 text layers followed by 6 pairs of (image 0, image 1) layers.
    share_cross_attention_kv (`bool`, defaults to `False`):
        NLVR2: in each pair of fusion layers, the first layer's cross-attention key/value projections are the second
        layer's.
    is_decoder (`bool`, defaults to `False`):
        Causal self-attention (the VQA answer decoder).
    """

    model_type = "albef_text_model"
    base_config_key = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    fusion_layer: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    encoder_width: int = 768
    num_fused_images: int = 1
    share_cross_attention_kv: bool = False
    is_decoder: bool = False
    pad_token_id: int | None = 0
    cls_token_id: int | None = 101
    sep_token_id: int | None = 102
    mask_token_id: int | None = 103
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check()

    def validate_architecture(self):
        super().validate_architecture()
        self._check()

    def _check(self):
        _check_positive_ints(
            self,
            ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "encoder_width", "num_fused_images"),
        )  # fmt: skip
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            raise ValueError(f"fusion_layer ({self.fusion_layer}) must lie in [0, {self.num_hidden_layers}]")
        if self.num_fused_images < 1:
            raise ValueError(f"num_fused_images must be >= 1, got {self.num_fused_images}")
        if self.share_cross_attention_kv and (self.num_hidden_layers - self.fusion_layer) % 2:
            raise ValueError(
                "share_cross_attention_kv pairs fusion layers, so num_hidden_layers - fusion_layer must be even, got "
                f"{self.num_hidden_layers} - {self.fusion_layer}"
            )


@strict
class AlbefConfig(PreTrainedConfig):
    r"""
    Configuration of an ALBEF model: image tower, text/fusion tower and the settings of every task head.

    embed_dim (`int`, defaults to 256): size of the ITC embeddings (`vision_proj` / `text_proj`).
    temp (`float`, defaults to 0.07): initial value of the learnable ITC temperature.
    queue_size (`int`, defaults to 65536): length of the MoCo feature queues (training state).
    momentum (`float`, defaults to 0.995): EMA factor of the momentum towers.
    alpha (`float`, defaults to 0.4): momentum-distillation weight (the caller ramps it up during warm-up).
    mlm_probability (`float`, defaults to 0.15): masking probability of the MLM objective.
    distill (`bool`, defaults to `False`): build the momentum towers (and, for ITC heads, the queues). Training
        checkpoints set it; inference checkpoints carry no momentum weights.
    decoder_num_hidden_layers (`int`, defaults to 6): layers of the VQA answer decoder (each with cross-attention
        to the question states).
    retrieval_k (`int`, defaults to 256): ITC candidates re-ranked by ITM in retrieval evaluation (128 for Flickr30K).
    answer_rank_k (`int`, defaults to 128): first-token candidates re-scored by `rank_answers` in VQA.
    gradcam_layer (`int`, *optional*): text layer whose cross-attention Grad-CAM reads; defaults to
        `fusion_layer + 2`, the third cross-attention layer (block 8 of the 12-layer BERT).
    answer_list (`list[str]`, *optional*): the candidate answers a VQA model was trained to rank (its
        `answer_list.json`); the VQA pipeline and `albef vqa` rank them when no other list is given.
    """

    # What Trainer's prediction loop leaves out of the gathered predictions: per-token states and tower outputs.
    keys_to_ignore_at_inference = [
        "fused_last_hidden_state",
        "image_embeds",
        "text_embeds",
        "question_states",
        "cache",
        "vision_model_output",
        "text_model_output",
    ]
    model_type = "albef"
    sub_configs_defaults = {"text_config": AlbefTextConfig, "vision_config": AlbefVisionConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    mlm_probability: float = 0.15
    distill: bool = False
    decoder_num_hidden_layers: int = 6
    retrieval_k: int = 256
    answer_rank_k: int = 128
    gradcam_layer: int | None = None
    answer_list: list[str] | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self._check()  # before transformers' validators, so that the error reads as ours
        super().__post_init__(**kwargs)
        # The fusion layers cross-attend to image tokens.
        self.text_config.encoder_width = self.vision_config.hidden_size

    def validate_architecture(self):
        super().validate_architecture()
        self._check()

    def _check(self):
        _check_positive_ints(
            self, ("embed_dim", "queue_size", "decoder_num_hidden_layers", "retrieval_k", "answer_rank_k")
        )
        for name in ("momentum", "alpha", "mlm_probability"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"AlbefConfig.{name} must be a number between 0 and 1, got {value!r}")
        if isinstance(self.temp, bool) or not isinstance(self.temp, (int, float)) or not self.temp > 0:
            raise ValueError(f"AlbefConfig.temp must be a number above 0, got {self.temp!r}")

    def decoder_config(self) -> AlbefTextConfig:
        """The VQA answer decoder: the text config with `decoder_num_hidden_layers` causal layers, each with
        cross-attention to the question states (original: `fusion_layer=0`, `num_hidden_layers=6`)."""
        config = copy.deepcopy(self.text_config)
        config.num_hidden_layers = self.decoder_num_hidden_layers
        config.fusion_layer = 0
        config.num_fused_images = 1
        config.share_cross_attention_kv = False
        config.encoder_width = self.text_config.hidden_size
        config.is_decoder = True
        return config

    @classmethod
    def from_preset(cls, name: str, **overrides) -> AlbefConfig:
        """Full-size configuration of a released checkpoint kind (see `ALBEF_PRESETS`); `overrides` are passed on."""
        if name not in ALBEF_PRESETS:
            raise ValueError(f"Unknown ALBEF preset {name!r}; expected one of {sorted(ALBEF_PRESETS)}")
        preset = copy.deepcopy(ALBEF_PRESETS[name])
        text = {**preset.pop("text_config", {}), **overrides.pop("text_config", {})}
        vision = {**preset.pop("vision_config", {}), **overrides.pop("vision_config", {})}
        return cls(text_config=text, vision_config=vision, **{**preset, **overrides})


_NLVR_TEXT = {"num_hidden_layers": 18, "num_fused_images": 2, "share_cross_attention_kv": True}

# Data only: one entry per released checkpoint kind (ALBEF configs/*.yaml). Anything not listed is the default.
ALBEF_PRESETS: dict[str, dict] = {
    "pretrain": {"vision_config": {"image_size": 256}, "distill": True},
    "retrieval_coco": {"vision_config": {"image_size": 384}, "retrieval_k": 256},
    "retrieval_flickr": {"vision_config": {"image_size": 384}, "retrieval_k": 128},
    "grounding": {"vision_config": {"image_size": 384}},
    "vqa": {"vision_config": {"image_size": 384}, "answer_rank_k": 128},
    "nlvr": {"vision_config": {"image_size": 384}, "text_config": _NLVR_TEXT, "num_labels": 2},
    "text_assignment": {"vision_config": {"image_size": 256}, "text_config": _NLVR_TEXT, "num_labels": 3},
    "ve": {
        "vision_config": {"image_size": 384},
        "id2label": {0: "contradiction", 1: "neutral", 2: "entailment"},
        "label2id": {"contradiction": 0, "neutral": 1, "entailment": 2},
    },
}


# Saved configs name their code (auto_map), so a folder loads with trust_remote_code=True without this package.
for _config in (AlbefConfig, AlbefTextConfig, AlbefVisionConfig):
    _config.register_for_auto_class()

__all__ = ["AlbefConfig", "AlbefTextConfig", "AlbefVisionConfig", "ALBEF_PRESETS"]
