"""Pieces shared by every ALBEF module: the eager attention kernel and the `PreTrainedModel` base class."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_albef import AlbefConfig

logger = logging.get_logger(__name__)


def attend(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Run the attention backend of `module.config` (eager when none is set); `module` has `scaling`."""
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    dropout = module.config.attention_probs_dropout_prob if module.training else 0.0
    return attention(module, query, key, value, attention_mask, scaling=module.scaling, dropout=dropout, **kwargs)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v, on (batch, heads, length, head_dim) inputs; returns (B, T, H, D) and the
    attention probabilities, which Grad-CAM differentiates through (so they are the tensor used in the product)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(dropped, value).transpose(1, 2).contiguous()
    return output, probs


class AlbefPreTrainedModel(PreTrainedModel):
    config: AlbefConfig
    base_model_prefix = "albef"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["AlbefVisionLayer", "AlbefTextLayer", "AlbefTextEmbeddings", "AlbefVisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Every head's loss is already a mean over its batch: Trainer must not rescale it by the number of processes.
    accepts_loss_kwargs = False
    # Momentum towers and queues are training state: an inference head loads a training checkpoint silently.
    _keys_to_ignore_on_load_unexpected = [r"^momentum\."]

    # Training state (momentum.py): heads that train with distillation set `self.momentum` in their __init__ (None
    # when `config.distill` is off) and build it in `_new_momentum`.
    # Which modules the momentum towers copy; heads without a distilled training forward set
    # `trains_with_momentum = False`. `tied_weights` are {tied: source} pairs of the head (momentum twins added).
    momentum_module_names: tuple[str, ...] = ()
    trains_with_momentum = True
    tied_weights: dict[str, str] = {}

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers looks for its registry call in each model file's source; ALBEF's is in `attend` (this file).
        return True

    def _finish_init(self):
        """`post_init`, with the training state (`config.distill`) built first and started from the online weights."""
        self.momentum = self._new_momentum() if self.config.distill and self.trains_with_momentum else None
        self._tied_weights_keys = self._head_tied_keys()
        self.post_init()
        if self.momentum is not None:
            self.momentum.copy_from(self)

    def _head_tied_keys(self) -> dict[str, str]:
        tied = dict(self.tied_weights)
        if getattr(self, "momentum", None) is not None:
            tied.update({f"momentum.{k}": f"momentum.{v}" for k, v in self.tied_weights.items()})
        return tied

    def _new_momentum(self):
        from .momentum import AlbefMomentum

        return AlbefMomentum(self, self.momentum_module_names, momentum=self.config.momentum)

    def init_momentum(self):
        """Create the momentum towers (copies of the current weights) and queues, for training with distillation."""
        self.config.distill = True
        self.momentum = self._new_momentum().to(device=self.device, dtype=self.dtype)
        self.momentum.copy_from(self)
        self._tied_weights_keys = self._head_tied_keys()
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)
        return self

    def _require_momentum(self):
        if getattr(self, "momentum", None) is None:
            raise ValueError(
                f"{type(self).__name__} has no momentum towers/queues (config.distill=False). Training with "
                "return_loss=True needs them (the queues hold momentum features): call model.init_momentum() first, "
                "or load with distill=True. To train without distillation, as the original's distill=False, pass "
                "alpha=0."
            )
        return self.momentum

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        momentum = getattr(model, "momentum", None)
        if momentum is not None:
            momentum.requires_grad_(False)  # loading re-creates the parameters
        if momentum is not None and any(k.startswith("momentum.") and "queue" not in k for k in info["missing_keys"]):
            logger.info("The checkpoint has no momentum towers: starting them from the loaded weights.")
            momentum.copy_from(model)
        return (model, info) if want_info else model

    @classmethod
    def from_original(
        cls, checkpoint, config: AlbefConfig | None = None, image_size: int | None = None, **config_overrides
    ):
        """Build this head from an original salesforce/ALBEF checkpoint (a path or a state dict, in any released
        format). Without `config` the standard configuration of this head's kind is built from the checkpoint's
        shapes, with `config_overrides` on top (e.g. `retrieval_k=128` for flickr30k.pth); `image_size` converts to
        another resolution (position embeddings interpolated bicubically; a pre-training checkpoint converted to a
        fine-tuning head defaults to the fine-tuning size, 384). The key report is kept on
        `model.conversion_report`."""
        from .conversion import from_original

        return from_original(cls, checkpoint, config=config, image_size=image_size, **config_overrides)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Imported here: the towers import this module.
        from .modeling_albef_text import AlbefPredictionHead, AlbefTextEmbeddings
        from .modeling_albef_vision import AlbefVisionEmbeddings

        if isinstance(module, AlbefVisionEmbeddings):
            std = module.config.initializer_range
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.position_embeddings, std=std)
        elif isinstance(module, AlbefTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, AlbefPredictionHead):
            init.zeros_(module.bias)
        if isinstance(getattr(module, "temp", None), nn.Parameter):
            init.constant_(module.temp, self.config.temp)
        if isinstance(getattr(module, "image_queue", None), torch.Tensor):
            init.copy_(module.image_queue, nn.functional.normalize(torch.randn_like(module.image_queue), dim=0))
            init.copy_(module.text_queue, nn.functional.normalize(torch.randn_like(module.text_queue), dim=0))
            init.zeros_(module.queue_ptr)
            if hasattr(module, "idx_queue"):
                init.constant_(module.idx_queue, -100)
