"""Tiny random configurations for fast model tests."""

import torch

from transformers_albef import AlbefConfig

TEXT = dict(
    vocab_size=512,
    hidden_size=32,
    num_hidden_layers=4,
    fusion_layer=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16
)
TWO_IMAGES = dict(num_hidden_layers=6, num_fused_images=2, share_cross_attention_kv=True)


def tiny_config(text=None, **kwargs) -> AlbefConfig:
    kwargs.setdefault("embed_dim", 16)
    kwargs.setdefault("queue_size", 8)
    kwargs.setdefault("decoder_num_hidden_layers", 2)
    return AlbefConfig(text_config={**TEXT, **(text or {})}, vision_config=dict(VISION), **kwargs)


def tiny_batch(batch=4, length=7, seed=0, image_size=32):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=g)
    input_ids = torch.randint(104, 512, (batch, length), generator=g)
    input_ids[:, 0] = 101
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch, 2):  # every other text padded
        input_ids[row, length - 2 :] = 0
        attention_mask[row, length - 2 :] = 0
    return pixel_values, input_ids, attention_mask
