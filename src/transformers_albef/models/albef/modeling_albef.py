"""ALBEF (Align before Fuse, Li et al., NeurIPS 2021): the image tower, the text/fusion tower, the task heads and
what they train with (the losses and the momentum towers with their queues).

Layout, top to bottom: the attention kernel; the losses (pure functions); the momentum towers and MoCo queues
(training state); `AlbefPreTrainedModel`; the ViT image tower; the BERT text/fusion tower; the heads (`AlbefModel`,
retrieval, pre-training, classifiers, text assignment, VQA). This folder imports nothing else of `transformers_albef`,
so a Hub repo carries it as remote code.
"""

import copy
import functools
import importlib
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPooling,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_albef import AlbefConfig, AlbefTextConfig, AlbefVisionConfig

logger = logging.get_logger(__name__)


# === attention kernel ================================================================================================
def attend(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Run the attention backend of `module.config` (eager when none is set); `module` has `scaling`."""
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    dropout = module.config.attention_probs_dropout_prob if module.training else 0.0
    return attention(module, query, key, value, attention_mask, scaling=module.scaling, dropout=dropout, **kwargs)


def _readable_on_host(tensor: torch.Tensor) -> bool:
    """Whether validating `tensor`'s values is free: a CPU tensor outside torch.compile. On an accelerator each read
    would stall the queue (and break CUDA graphs), so input checks that need values run only here."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


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


# === losses (pure functions) =========================================================================================
HARD_NEGATIVE_STRATEGIES = ("sample", "hardest")


def soft_targets(momentum_logits: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum distillation targets: alpha * softmax(teacher) + (1 - alpha) * ground truth."""
    return alpha * F.softmax(momentum_logits, dim=1) + (1 - alpha) * hard_targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(log_softmax(logits) * targets)."""
    return -torch.sum(F.log_softmax(logits, dim=1) * targets, dim=1).mean()


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets_i2t: torch.Tensor, targets_t2i: torch.Tensor
) -> torch.Tensor:
    """Image-text contrastive loss, averaged over both directions."""
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def pick_hard_negatives(weights: torch.Tensor, strategy: str = "sample") -> torch.Tensor:
    """One negative column per row of `weights` (zero where a pair must not be drawn).

    `"sample"` draws from the weights (the original `torch.multinomial`, here one call for all rows, so no host
    syncs); `"hardest"` takes the argmax (deterministic, first index on ties), for reproducible runs and tests.
    """
    if strategy == "sample":
        return torch.multinomial(weights, 1).squeeze(1)
    if strategy == "hardest":
        return weights.argmax(dim=1)
    raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_STRATEGIES}, got {strategy!r}")


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    mlm_probability: float = 0.15,
    pad_token_id: int = 0,
    cls_token_id: int = 101,
    mask_token_id: int = 103,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original MLM masking: each token is picked with `mlm_probability` ([PAD] and [CLS] never); of the picked,
    80% become [MASK], half of the rest a random token, the rest stay. Returns `(masked_input_ids, labels)` with
    labels -100 outside the picked positions. Draws from the global RNG in the original's order (CPU draws), so a
    seed reproduces the original's masks."""
    input_ids, labels = input_ids.clone(), input_ids.clone()
    picked = torch.bernoulli(torch.full(input_ids.shape, mlm_probability)).bool().to(input_ids.device)
    picked &= (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels[~picked] = -100
    replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8)).bool().to(input_ids.device) & picked
    input_ids[replaced] = mask_token_id
    randomised = torch.bernoulli(torch.full(input_ids.shape, 0.5)).bool().to(input_ids.device) & picked & ~replaced
    random_words = torch.randint(vocab_size, input_ids.shape, dtype=torch.long).to(input_ids.device)
    input_ids[randomised] = random_words[randomised]
    return input_ids, labels


def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    """Masked-LM cross-entropy (mean over masked tokens), mixed with the distillation loss against
    softmax(teacher_logits) over the same tokens: (1 - alpha) * CE + alpha * KD.

    A batch without any masked token (possible with a few short captions) gives 0, still attached to the graph; the
    original divides by zero there and its NaN would poison the weights."""
    if not (labels != -100).any():
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if teacher_logits is None:
        return loss
    distill = -torch.sum(F.log_softmax(logits, dim=-1) * F.softmax(teacher_logits, dim=-1), dim=-1)
    return (1 - alpha) * loss + alpha * distill[labels != -100].mean()


def sequence_lm_loss(
    shifted_logits: torch.Tensor,
    shifted_labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-sequence summed next-token NLL (the answer decoder's `reduction='none'` loss), optionally mixed with the
    summed distillation loss against softmax(teacher_logits)."""
    batch = shifted_logits.shape[0]
    nll = (
        F.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), reduction="none"
        )
        .view(batch, -1)
        .sum(1)
    )
    if teacher_logits is None:
        return nll
    distill = -torch.sum(F.log_softmax(shifted_logits, dim=-1) * F.softmax(teacher_logits, dim=-1), dim=-1)
    distill = (distill * (shifted_labels != -100)).sum(1)
    return (1 - alpha) * nll + alpha * distill


def distilled_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    """(1 - alpha) * CE(logits, labels) + alpha * KD(logits, softmax(teacher_logits)) (NLVR2, SNLI-VE)."""
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is None:
        return loss
    return (1 - alpha) * loss + alpha * soft_cross_entropy(logits, F.softmax(teacher_logits, dim=1))


# === momentum towers and MoCo queues (training state) ================================================================
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0 (no gradient; the identity in a single process)."""
    if world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class AlbefMomentum(nn.Module):
    """EMA copies of `module_names` of `head` and, when `queue_size` is set, the image/text feature queues (columns
    are L2-normalised features) plus, with `image_ids`, the queue of the image ids that own them (-100 = empty)."""

    def __init__(
        self,
        head: nn.Module,
        module_names: Sequence[str],
        momentum: float,
        queue_size: int = 0,
        embed_dim: int = 0,
        image_ids: bool = False,
    ):
        super().__init__()
        self.module_names = tuple(module_names)
        self.momentum = momentum
        self.queue_size = queue_size
        # One deepcopy of all modules together keeps weights shared between them shared (tied LM head).
        for name, module in zip(self.module_names, copy.deepcopy([getattr(head, n) for n in self.module_names])):
            module.requires_grad_(False)
            setattr(self, name, module)
        if queue_size:
            self.register_buffer("image_queue", torch.empty(embed_dim, queue_size))
            self.register_buffer("text_queue", torch.empty(embed_dim, queue_size))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            if image_ids:
                self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
            self.reset_queues()

    @torch.no_grad()
    def reset_queues(self):
        if not self.queue_size:
            return
        self.image_queue.copy_(F.normalize(torch.randn_like(self.image_queue), dim=0))
        self.text_queue.copy_(F.normalize(torch.randn_like(self.text_queue), dim=0))
        self.queue_ptr.zero_()
        if hasattr(self, "idx_queue"):
            self.idx_queue.fill_(-100)

    def _pairs(self, head: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Runs every training step: one walk over the head instead of a dotted lookup per parameter (3.6x less host
        # time for ViT-B + BERT).
        by_name = dict(head.named_parameters(remove_duplicate=False))
        online, ema = [], []
        for name, param in self.named_parameters():  # shared weights are listed once
            if name not in by_name:
                raise ValueError(f"the momentum towers have {name!r} but the head has no such parameter")
            online.append(by_name[name])
            ema.append(param)
        return online, ema

    @torch.no_grad()
    def copy_from(self, head: nn.Module):
        """Start the momentum towers from the online weights (the original `copy_params`)."""
        online, ema = self._pairs(head)
        torch._foreach_copy_(ema, online)

    @torch.no_grad()
    def update(self, head: nn.Module):
        """ema = ema * m + online * (1 - m), written as one foreach lerp (ema += (1 - m) * (online - ema)): a single
        pass over the tensors, 1.6x the two-kernel form on CPU (BENCHMARKS.md), equal up to float rounding."""
        online, ema = self._pairs(head)
        torch._foreach_lerp_(ema, online, 1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor | None = None):
        """Write this step's momentum features of every process at the queue pointer, then advance it."""
        image_feats = gather_across_processes(image_feat)
        text_feats = gather_across_processes(text_feat)
        batch = image_feats.shape[0]
        if self.queue_size % batch:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be divisible by the global batch size ({batch} = "
                f"{world_size()} process(es) x {image_feat.shape[0]}); change the batch size or queue_size"
            )
        # The columns ptr .. ptr + batch - 1, found on the device: reading the pointer would synchronise with it.
        columns = (self.queue_ptr + torch.arange(batch, device=self.queue_ptr.device)) % self.queue_size
        self.image_queue.index_copy_(1, columns, image_feats.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, columns, text_feats.T.to(self.text_queue.dtype))
        if image_ids is not None and hasattr(self, "idx_queue"):
            ids = gather_across_processes(image_ids.view(-1, 1)).T.to(self.idx_queue.dtype)
            self.idx_queue.index_copy_(1, columns, ids)
        self.queue_ptr.add_(batch).remainder_(self.queue_size)


# === base class ======================================================================================================
class AlbefPreTrainedModel(PreTrainedModel):
    config: AlbefConfig
    base_model_prefix = "albef"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The momentum towers stay whole: their tied LM head would otherwise be split from its source (and they are
    # training state, not what offloading is for).
    _no_split_modules = [
        "AlbefVisionLayer",
        "AlbefTextLayer",
        "AlbefTextEmbeddings",
        "AlbefVisionEmbeddings",
        "AlbefMomentum",
    ]
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
        return AlbefMomentum(self, self.momentum_module_names, momentum=self.config.momentum)

    def init_momentum(self):
        """Create the momentum towers (copies of the current weights) and queues, for training with distillation."""
        self.config.distill = True
        self.momentum = self._new_momentum().to(device=self.device, dtype=self.dtype)
        self.momentum.copy_from(self)
        self._tied_weights_keys = self._head_tied_keys()
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)
        return self

    # ----- embeddings ------------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        """The word embeddings of the text tower (the question encoder for VQA)."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.set_input_embeddings(value)

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resizing of the text tower's word embeddings and the LM head, plus what ALBEF adds: the VQA
        answer decoder's own word embeddings (the source its LM head is tied to), the LM heads' bias, and the
        momentum towers (rebuilt from the resized weights; the feature queues are kept)."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.weight.shape[0]
        if "text_decoder" in self._modules:
            decoder = self.text_decoder
            resized = self._get_resized_embeddings(decoder.get_input_embeddings(), size, mean_resizing=mean_resizing)
            decoder.set_input_embeddings(resized)
            decoder.config.vocab_size = size
        for head_name in ("lm_head", "mlm_head"):
            head = getattr(self, head_name, None)
            if head is not None and head.bias.shape[0] != size:
                bias = head.bias.new_zeros(size)
                kept = min(size, head.bias.shape[0])
                bias[:kept] = head.bias.detach()[:kept]
                head.bias = nn.Parameter(bias, requires_grad=head.bias.requires_grad)
        if getattr(self, "momentum", None) is not None:
            old = self.momentum
            self.momentum = self._new_momentum().to(device=embeddings.weight.device, dtype=embeddings.weight.dtype)
            self.momentum.copy_from(self)
            for name, buffer in old.named_buffers():
                self.momentum.get_buffer(name).copy_(buffer)
        return embeddings

    def _require_momentum(self):
        if getattr(self, "momentum", None) is None:
            raise ValueError(
                f"{type(self).__name__} has no momentum towers/queues (config.distill=False). Training with "
                "return_loss=True needs them (the queues hold momentum features): call model.init_momentum() first, "
                "or load with distill=True. To train without distillation, as the original's distill=False, pass "
                "alpha=0."
            )
        return self.momentum

    def remote_code_auto_map(self) -> dict[str, str]:
        """`config.json`'s `auto_map` for this head: AutoConfig, AutoModel (`AlbefModel`, the towers of any
        checkpoint) and each task Auto class that loads this head or one of its bases (`AUTO_CLASSES`); a head that
        no task Auto class fits is AutoModel's in its own repo."""
        entries = {"AutoConfig": f"configuration_albef.{type(self.config).__name__}"}
        for auto_class, name in AUTO_CLASSES.items():
            if auto_class == "AutoModel" or isinstance(self, globals()[name]):
                entries[auto_class] = f"modeling_albef.{name}"
        if self._auto_class is not None:
            entries[self._auto_class] = f"modeling_albef.{type(self).__name__}"
        return entries

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, plus the model folder's code files and the `auto_map` entries
        (`remote_code_auto_map`): the saved folder loads with `trust_remote_code=True` where this package is not
        installed. `push_to_hub` and the Trainer's push go through here."""
        self.config.auto_map = self.remote_code_auto_map()
        return super().save_pretrained(save_directory, *args, **kwargs)

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
        `model.conversion_report`.

        A thin entry to the converter, which lives in the `transformers-albef` package (not in the model's code)."""
        from_original = _package_tool("conversion", "from_original", "converting an original checkpoint")
        return from_original(cls, checkpoint, config=config, image_size=image_size, **config_overrides)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
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


# === image tower =====================================================================================================
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
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (0 images); pass at least one image")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be floating point (normalised by the model's image processor), got "
                f"{pixel_values.dtype}: run the images through AlbefImageProcessor / AlbefProcessor first"
            )
        if _readable_on_host(pixel_values) and not bool(torch.isfinite(pixel_values).all()):
            bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"pixel_values of images {bad} hold NaN or infinite values")

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPooling:
        r"""Returns `last_hidden_state` (B, 1 + N, D) after the final LayerNorm; `pooler_output` is its [CLS] token."""
        self.check_pixel_values(pixel_values)
        hidden_states = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        hidden_states = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])


# === text / fusion tower =============================================================================================
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
        # NLVR2: the two layers of each fusion pair share their cross-attention key/value projections; they are
        # tied through `AlbefTextModel._tied_weights_keys` (the same tensors), so loading fills or initialises them.

    def shared_kv_pairs(self) -> list[tuple[int, int]]:
        if not self.config.share_cross_attention_kv:
            return []
        return [(i, i + 1) for i in range(self.config.fusion_layer, self.config.num_hidden_layers, 2)]


def _as_list(states):
    return list(states) if isinstance(states, (list, tuple)) else [states]


def _hidden_state_indices_of_the_mode(forward):
    """`output_hidden_states` may select hidden states by index; negative indices count from the last layer that the
    call's `mode` runs (transformers would count from `num_hidden_layers`, a layer `mode="text"` never reaches)."""
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        selected = kwargs.get("output_hidden_states")
        if not isinstance(selected, bool) and isinstance(selected, (int, list, tuple)):
            bound = signature.bind_partial(self, *args, **kwargs)
            count = len(self.layer_range(bound.arguments.get("mode", "multimodal"))) + 1
            indices = [selected] if isinstance(selected, int) else list(selected)
            kwargs["output_hidden_states"] = [i + count if i < 0 else i for i in indices]
        return forward(self, *args, **kwargs)

    return wrapper


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
        # The second layer of each pair holds the shared projections (as the original checkpoints store them); the
        # first one's are tied to them.
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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @_hidden_state_indices_of_the_mode
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
        **kwargs: Unpack[TransformersKwargs],
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
        elif (
            cache is not None
        ):  # an encoder has nothing to cache (`use_cache` is ignored, as transformers' encoders do)
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
            self._check_input_ids(input_ids, past_length)
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

    def _check_input_ids(self, input_ids: torch.Tensor, past_length: int = 0) -> None:
        """Shape, type and (on the CPU, where reading them costs no device synchronisation) range of the ids."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids is an empty batch (0 texts); pass at least one text")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        positions = self.config.max_position_embeddings
        if past_length + input_ids.shape[1] > positions:
            raise ValueError(
                f"the text is {past_length + input_ids.shape[1]} tokens long but the model has {positions} positions; "
                f"truncate it (the processor does: truncation=True, max_length=...)"
            )
        vocab = self.config.vocab_size
        if _readable_on_host(input_ids):
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"input_ids must lie in [0, {vocab}) (the vocabulary), got values from {low} to {high}: the text "
                    "was encoded with another tokenizer, or the vocabulary was resized without the model"
                )

    @staticmethod
    def _check_text_mask(attention_mask, batch, length, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.long, device=device)
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be ({batch}, {length}) like the text (cached positions included), got "
                f"{tuple(attention_mask.shape)}"
            )
        # The processor always attends [CLS]; a hand-made mask is checked where that is free.
        if _readable_on_host(attention_mask) and not bool((attention_mask[:, :1] != 0).all()):
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


# === heads ===========================================================================================================


class _OutputWithTowers(ModelOutput):
    """An output that nests the towers' outputs: `to_tuple` flattens them into tuples too (`return_dict=False`)."""

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class AlbefOutput(_OutputWithTowers):
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


@dataclass
class AlbefClassifierOutput(_OutputWithTowers):
    r"""
    logits (`(batch, num_labels)`); loss when labels are given.
    fused_last_hidden_state (`(batch, length, hidden)`): the multimodal text model's output.
    hidden_states / attentions: those of the multimodal text model (the states the classifier reads), as
        `text_model_output` holds them.
    vision_model_output / text_model_output: the towers' outputs (`hidden_states` / `attentions` /
        `cross_attentions` with `output_hidden_states` / `output_attentions`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    fused_last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    vision_model_output: BaseModelOutput | None = None
    text_model_output: BaseModelOutput | None = None


def _check_pairs(pixel_values: torch.Tensor, input_ids: torch.Tensor, what: str):
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim not in (4, 5):
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"{what}: pixel_values must be a (batch, channels, height, width) tensor, got {got}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{what}: input_ids must be a (batch, length) tensor, got {got}")
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


def _package_tool(module: str, name: str, what: str):
    """`transformers_albef.<module>.<name>`: tools live in the package, which remote-code models may lack."""
    try:
        return getattr(importlib.import_module(f"transformers_albef.{module}"), name)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the transformers-albef package (pip install transformers-albef); this model's own code "
            "does not carry it"
        ) from error


@torch.no_grad()
def encode_for_retrieval(model, pixel_values, input_ids, attention_mask, batch_size: int = 256):
    """`(image_states, image_embeds, text_states, text_embeds, attention_mask)`: tower outputs and normalised ITC
    embeddings of every image and text, `batch_size` at a time on the model's device."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    text_states, text_embeds, image_states, image_embeds = [], [], [], []
    for start in range(0, input_ids.shape[0], batch_size):
        stop = start + batch_size
        states = model.text_model(input_ids[start:stop], attention_mask[start:stop], mode="text").last_hidden_state
        text_states.append(states)
        text_embeds.append(F.normalize(model.text_proj(states[:, 0]), dim=-1))
    for start in range(0, pixel_values.shape[0], batch_size):
        states = model.vision_model(pixel_values[start : start + batch_size].to(device)).last_hidden_state
        image_states.append(states)
        image_embeds.append(F.normalize(model.vision_proj(states[:, 0]), dim=-1))
    return (
        torch.cat(image_states),
        torch.cat(image_embeds),
        torch.cat(text_states),
        torch.cat(text_embeds),
        attention_mask,
    )


@torch.no_grad()
def rerank_encoded(model, image_states, image_embeds, text_states, text_embeds, text_mask, k: int):
    """The original evaluation's score matrices from `encode_for_retrieval`'s outputs: ITC top `k` both ways, each
    candidate re-scored by the ITM match logit, -100 elsewhere. Every candidate pair goes into one grouped ITM
    call; a pair both lists hold is fused once."""
    num_images, num_texts = image_states.shape[0], text_states.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    sims = image_embeds @ text_embeds.t()
    k_texts, k_images = min(k, num_texts), min(k, num_images)
    top_texts = sims.topk(k_texts, dim=1).indices.cpu()  # (images, k)
    top_images = sims.t().topk(k_images, dim=1).indices.cpu()  # (texts, k)
    keys = torch.cat(
        [
            torch.arange(num_images).repeat_interleave(k_texts) * num_texts + top_texts.flatten(),
            top_images.flatten() * num_texts + torch.arange(num_texts).repeat_interleave(k_images),
        ]
    )
    unique, inverse = torch.unique(keys, return_inverse=True)
    match = model.itm_logits_for_pairs(image_states, text_states, text_mask, unique // num_texts, unique % num_texts)
    pair_scores = match[:, 1].float()[inverse.to(sims.device)]
    score_i2t = torch.full((num_images, num_texts), -100.0, device=sims.device)
    score_t2i = torch.full((num_texts, num_images), -100.0, device=sims.device)
    score_i2t.scatter_(1, top_texts.to(sims.device), pair_scores[: num_images * k_texts].view(num_images, k_texts))
    score_t2i.scatter_(1, top_images.to(sims.device), pair_scores[num_images * k_texts :].view(num_texts, k_images))
    return score_i2t, score_t2i


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
    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """The vision tower's output with `pooler_output` the L2-normalised ITC image embedding `(batch, embed_dim)`
        (`output_hidden_states` / `output_attentions` / `return_dict` as for the tower)."""
        output = self.vision_model(pixel_values, **kwargs)
        output.pooler_output = F.normalize(self.vision_proj(output.last_hidden_state[:, 0]), dim=-1)
        return output

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """The text encoder's output (the layers before the fusion split) with `pooler_output` the L2-normalised ITC
        text embedding `(batch, embed_dim)`."""
        output = self.text_model(input_ids, attention_mask, mode="text", **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=output.last_hidden_state,
            pooler_output=F.normalize(self.text_proj(output.last_hidden_state[:, 0]), dim=-1),
            hidden_states=output.hidden_states,
            attentions=output.attentions,
        )

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

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_fused_states: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AlbefOutput:
        r"""
        The ITC similarities of every image with every text (`logits_per_image`, computed in float32 whatever the
        model's dtype: bf16 would round near-equal similarities together), and the embeddings. With one modality
        only (as transformers' feature-extraction pipelines call it), that modality's embeddings and tower output.

        output_fused_states (`bool`): also run the fusion encoder on aligned pairs (image i, text i).
        """
        if pixel_values is None and input_ids is None:
            raise ValueError("AlbefModel needs pixel_values, input_ids or both")
        vision_out = text_out = image_embeds = text_embeds = logits_per_image = fused = None
        if pixel_values is not None:
            vision_out = self.vision_model(pixel_values, **kwargs)
            image_embeds = F.normalize(self.vision_proj(vision_out.last_hidden_state[:, 0]), dim=-1)
        if input_ids is not None:
            text_out = self.text_model(input_ids, attention_mask, mode="text", **kwargs)
            text_embeds = F.normalize(self.text_proj(text_out.last_hidden_state[:, 0]), dim=-1)
        if vision_out is not None and text_out is not None:
            logits_per_image = image_embeds.float() @ text_embeds.float().t() / self.temp.float()
        if output_fused_states:
            if vision_out is None or text_out is None:
                raise ValueError("output_fused_states fuses image i with text i: pass pixel_values and input_ids")
            _check_pairs(pixel_values, input_ids, "output_fused_states")
            fused = self.fuse(text_out.last_hidden_state, attention_mask, vision_out.last_hidden_state)
        return AlbefOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t() if logits_per_image is not None else None,
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
            # Index tensors planned on the host go to the device without waiting for it (a blocking copy would
            # synchronise the stream); the rows that are real pairs are picked by index, not by a device-side mask.
            on_text_device = texts.to(text_states.device, non_blocking=True)
            fused = self.text_model(
                text_embeds=text_states[on_text_device, :used].to(device),
                attention_mask=text_attention_mask[on_text_device, :used].to(device),
                encoder_hidden_states=image_states[images.to(device, non_blocking=True)],
                mode="fusion",
                group_size=per_group,
                cls_only=True,
            ).last_hidden_state
            kept = valid.nonzero().flatten()
            rows = torch.stack([pairs[kept], kept]).to(device, non_blocking=True)
            logits[rows[0]] = self.itm_head(fused[:, 0]).index_select(0, rows[1]).to(logits.dtype)
        return logits

    @can_return_tuple
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
        **kwargs: Unpack[TransformersKwargs],
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
        labels_on = {"dtype": torch.long, "device": itm_logits.device}  # made there: a copy would synchronise
        itm_labels = torch.cat([torch.ones(batch, **labels_on), torch.zeros(2 * batch, **labels_on)])
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
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
        the ITM "match" logit, and leave -100 elsewhere. Returns `(score_i2t (images, texts), score_t2i)`.

        Every candidate pair is scored in one grouped ITM call (`itm_logits_for_pairs`), a pair both directions
        select once. For corpora that do not fit in memory, see `transformers_albef.RetrievalEngine`."""
        encoded = encode_for_retrieval(self, pixel_values, input_ids, attention_mask)
        return rerank_encoded(self, *encoded, k=self.config.retrieval_k if k is None else k)

    def gradcam(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mode: str = "itm",
        layer: int | None = None,
    ):
        """Grad-CAM grounding maps of each text on its image (see `transformers_albef.grounding.gradcam`, which this
        calls: Grad-CAM and its pictures live in the `transformers-albef` package, not in the model's code)."""
        gradcam = _package_tool("grounding", "gradcam", "Grad-CAM")
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

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.mlm_head.decoder = new_embeddings

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

    @can_return_tuple
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
        **kwargs: Unpack[TransformersKwargs],
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

    def _vision(self, pixel_values: torch.Tensor, towers: nn.Module, **kwargs):
        """(what the text model cross-attends to, the vision tower's output)."""
        output = towers.vision_model(pixel_values, **kwargs)
        return output.last_hidden_state, output

    def _forward_towers(self, pixel_values, input_ids, attention_mask, towers: nn.Module, **kwargs):
        images, vision_output = self._vision(pixel_values, towers, **kwargs)
        text_output = towers.text_model(input_ids, attention_mask, encoder_hidden_states=images, **kwargs)
        return towers.classifier(text_output.last_hidden_state[:, 0]), vision_output, text_output

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        alpha: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AlbefClassifierOutput:
        r"""
        labels: when given, the loss is computed as `config.problem_type` says (inferred as transformers does when
            unset: `"regression"` for one label, `"single_label_classification"` for integer labels `(batch,)`,
            else `"multi_label_classification"`). Single-label classification is the original's: with momentum
            towers (`config.distill`) the distilled loss `(1 - alpha) * CE + alpha * KD`, the momentum towers updated.
        """
        _check_pairs(pixel_values, input_ids, type(self).__name__)
        logits, vision_output, text_output = self._forward_towers(
            pixel_values, input_ids, attention_mask, self, **kwargs
        )
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, pixel_values, input_ids, attention_mask, alpha)
        return AlbefClassifierOutput(
            loss=loss,
            logits=logits,
            fused_last_hidden_state=text_output.last_hidden_state,
            hidden_states=text_output.hidden_states,
            attentions=text_output.attentions,
            vision_model_output=vision_output,
            text_model_output=text_output,
        )

    def _loss(self, logits, labels, pixel_values, input_ids, attention_mask, alpha):
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if self.config.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int) and labels.ndim == 1:
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
        if self.config.problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        teacher = None
        if self.momentum is not None and self.training:
            with torch.no_grad():
                self.momentum.update(self)
                teacher = self._forward_towers(pixel_values, input_ids, attention_mask, self.momentum)[0]
        alpha = self.config.alpha if alpha is None else alpha
        return distilled_classification_loss(logits, labels.view(-1), teacher, alpha)


class AlbefForVisualEntailment(_AlbefClassifier):
    """SNLI-VE: 3-way logits, 0 contradiction, 1 neutral, 2 entailment."""


class AlbefForVisualReasoning(_AlbefClassifier):
    """NLVR2: is the sentence true of the image pair? `pixel_values` are (batch, 2, 3, H, W); logits index 1 = true.

    The text model has `num_fused_images=2`: its fusion layers alternate between image 0 and image 1."""

    def _vision(self, pixel_values, towers, **kwargs):
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                f"NLVR2 takes exactly two images per sentence: pixel_values of shape (batch, 2, 3, H, W), got "
                f"{tuple(pixel_values.shape)}"
            )
        # One tower pass over both images, pair by pair (every image is encoded independently, so the order is free);
        # the output is returned as (batch, 2, ...), like the input.
        output = towers.vision_model(pixel_values.flatten(0, 1), **kwargs)
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                output[key] = value.unflatten(0, (-1, 2))
            elif isinstance(value, tuple):
                output[key] = tuple(v.unflatten(0, (-1, 2)) if v is not None else None for v in value)
        states = output.last_hidden_state
        return [states[:, 0], states[:, 1]], output


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
        # As in the original: text_proj and temp are never used, vision_proj only without gradient (drawing the
        # assignment), so none of them trains.
        for frozen in (self.text_proj, self.vision_proj):
            frozen.requires_grad_(False)
        self.temp.requires_grad_(False)

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

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image0_index: torch.Tensor | None = None,
        image1_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        hard_negatives: str = "sample",
        **kwargs: Unpack[TransformersKwargs],
    ) -> AlbefClassifierOutput:
        r"""
        pixel_values (`(batch, 3, H, W)`): image b belongs to sentence b.
        image0_index / image1_index / labels: an explicit assignment; sampled as the original when omitted.
        """
        _check_pairs(pixel_values, input_ids, "Text assignment")
        vision_output = self.vision_model(pixel_values, **kwargs)
        image_states = vision_output.last_hidden_state
        if image0_index is None:
            weights = self.assignment_weights(image_states)
            image0_index, image1_index, labels = self.sample_assignment(weights, hard_negatives=hard_negatives)
        text_output = self.text_model(
            input_ids,
            attention_mask,
            encoder_hidden_states=[image_states[image0_index], image_states[image1_index]],
            **kwargs,
        )
        logits = self.ta_head(text_output.last_hidden_state[:, 0])
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return AlbefClassifierOutput(
            loss=loss,
            logits=logits,
            fused_last_hidden_state=text_output.last_hidden_state,
            hidden_states=text_output.hidden_states,
            attentions=text_output.attentions,
            vision_model_output=vision_output,
            text_model_output=text_output,
        )


# === visual question answering =======================================================================================
@dataclass
class AlbefQuestionAnsweringOutput(_OutputWithTowers):
    r"""
    loss: weighted answer loss, `sum(weight * per-answer loss) / number of questions` (with `answer_input_ids`).
    logits (`(batch, answer_length, vocab)`): decoder logits of the answer tokens, when the forward decodes
        (`question_states` given, as `generate` calls it).
    question_states (`(batch, length, hidden)`): output of the multimodal question encoder.
    cache (`EncoderDecoderCache`): the decoder's keys/values, when decoding with `use_cache`.
    hidden_states / attentions: the question encoder's (as `text_model_output` holds them), or the decoder's when
        decoding.
    vision_model_output / text_model_output: the towers' outputs when encoding (`hidden_states` / `attentions` with
        `output_hidden_states` / `output_attentions`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    question_states: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    vision_model_output: BaseModelOutput | None = None
    text_model_output: BaseModelOutput | None = None


@dataclass
class AlbefAnswerRanking(ModelOutput):
    r"""
    topk_ids / topk_probs (`(questions, k)`): answer-list indices after re-ranking and their probabilities (softmax
        over the k re-scored candidates).
    first_token_probs (`(questions, answers)`): probability of each answer's first token given [CLS].
    prerank_ids / prerank_scores (`(questions, k)`): the first-token top-k and their scores before re-ranking.
    """

    topk_ids: torch.Tensor | None = None
    topk_probs: torch.Tensor | None = None
    first_token_probs: torch.Tensor | None = None
    prerank_ids: torch.Tensor | None = None
    prerank_scores: torch.Tensor | None = None


# Rows (answers x positions) of full-vocabulary logits materialised at once while ranking answers.
ANSWER_LOGIT_ROWS = 4096


class AlbefForQuestionAnswering(AlbefPreTrainedModel, GenerationMixin):
    """VQA: `rank_answers` ranks a fixed answer list as the original evaluation; `generate` decodes open-ended
    answers with transformers' generation (greedy, beam search, sampling, `GenerationConfig`), the question encoded
    once and the decoder's keys/values cached."""

    config: AlbefConfig
    main_input_name = "pixel_values"
    momentum_module_names = ("vision_model", "text_model", "text_decoder", "lm_head")
    tied_weights = {"lm_head.decoder.weight": "text_decoder.embeddings.word_embeddings.weight"}

    def __init__(self, config: AlbefConfig):
        super().__init__(config)
        decoder_config = config.decoder_config()
        self.vision_model = AlbefVisionModel(config.vision_config)
        self.text_model = AlbefTextModel(config.text_config)
        self.text_decoder = AlbefTextModel(decoder_config)
        self.lm_head = AlbefPredictionHead(decoder_config)
        self._finish_init()
        self.generation_config = self._answer_generation_config(self.generation_config)

    def _answer_generation_config(self, config: GenerationConfig | None) -> GenerationConfig:
        """`config` (a copy) with what answers need where it is unset: they are `[CLS] tokens [SEP]`, padded with
        [PAD], and at most 10 new tokens unless a length is asked for."""
        config = copy.deepcopy(config) if config is not None else GenerationConfig()
        text = self.config.text_config
        for name, value in (("bos", text.cls_token_id), ("eos", text.sep_token_id), ("pad", text.pad_token_id)):
            if getattr(config, f"{name}_token_id") is None:
                setattr(config, f"{name}_token_id", value)
        if config.max_new_tokens is None and config.max_length == GenerationConfig().max_length:
            config.max_new_tokens = 10
        return config

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoder builds its own EncoderDecoderCache (self-attention + the question's cross-attention keys/values).
        return False

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head.decoder = new_embeddings

    def encode_questions(self, pixel_values, input_ids, attention_mask=None, towers: nn.Module | None = None):
        """Question states: the full multimodal text model over the question, cross-attending to the image."""
        return self._encode(pixel_values, input_ids, attention_mask, towers)[1].last_hidden_state

    def _encode(self, pixel_values, input_ids, attention_mask=None, towers: nn.Module | None = None, **kwargs):
        """(vision tower output, question encoder output)."""
        towers = towers or self
        _check_pairs(pixel_values, input_ids, "VQA")
        vision_output = towers.vision_model(pixel_values, **kwargs)
        text_output = towers.text_model(
            input_ids, attention_mask, encoder_hidden_states=vision_output.last_hidden_state, **kwargs
        )
        return vision_output, text_output

    def answer_logits(self, answer_ids, answer_mask, question_states, question_mask, towers: nn.Module | None = None):
        """Decoder logits (batch, length, vocab) at every answer position (position t predicts token t + 1)."""
        towers = towers or self
        states = towers.text_decoder(
            answer_ids, answer_mask, encoder_hidden_states=question_states, encoder_attention_mask=question_mask
        ).last_hidden_state
        return towers.lm_head(states)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        answer_input_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answers_per_question: torch.Tensor | list[int] | None = None,
        alpha: float | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AlbefQuestionAnsweringOutput:
        r"""
        Two uses. Training/encoding: `pixel_values` + question `input_ids` (+ answers for the loss). Decoding (what
        `generate` calls): `question_states` (+ `question_attention_mask`) from `encode_questions` and
        `answer_input_ids`, the answer tokens to decode (only the new ones when `cache` holds the earlier ones);
        returns their `logits` and the `cache`.

        answer_input_ids / answer_attention_mask (`(total_answers, length)`): `[CLS] answer [SEP]` of every
            training answer, grouped by question (see the processor's answer encoding).
        answers_per_question (`(batch,)`): how many consecutive answers belong to each question (default 1 each).
        answer_weights (`(total_answers,)`): weight of each answer (VQA: count / annotators; default 1).
        alpha (`float`): distillation weight when the momentum towers exist and the model is training.
        question_states / question_attention_mask: decoding only, see above.
        cache (`EncoderDecoderCache`) / use_cache: decoding only; the decoder's cached keys/values.
        """
        if question_states is not None:
            if pixel_values is not None or input_ids is not None:
                raise ValueError("pass either pixel_values + input_ids (encode) or question_states (decode), not both")
            if answer_input_ids is None:
                raise ValueError("decoding from question_states needs answer_input_ids (the answer tokens so far)")
            decoded = self.text_decoder(
                answer_input_ids,
                answer_attention_mask,
                encoder_hidden_states=question_states,
                encoder_attention_mask=question_attention_mask,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            return AlbefQuestionAnsweringOutput(
                logits=self.lm_head(decoded.last_hidden_state),
                question_states=question_states,
                cache=decoded.cache,
                hidden_states=decoded.hidden_states,
                attentions=decoded.attentions,
            )
        if pixel_values is None or input_ids is None:
            raise ValueError("AlbefForQuestionAnswering needs pixel_values and the question's input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_output, text_output = self._encode(pixel_values, input_ids, attention_mask, **kwargs)
        question_states = text_output.last_hidden_state
        towers = {
            "hidden_states": text_output.hidden_states,
            "attentions": text_output.attentions,
            "vision_model_output": vision_output,
            "text_model_output": text_output,
        }
        if answer_input_ids is None:
            return AlbefQuestionAnsweringOutput(question_states=question_states, **towers)

        batch = input_ids.shape[0]
        repeats = torch.as_tensor(
            answers_per_question if answers_per_question is not None else [1] * batch, device=input_ids.device
        )
        if repeats.numel() != batch or int(repeats.sum()) != answer_input_ids.shape[0]:
            raise ValueError(
                f"answers_per_question {repeats.tolist()} must have one entry per question ({batch}) summing to the "
                f"number of answers ({answer_input_ids.shape[0]})"
            )
        weights = answer_weights if answer_weights is not None else torch.ones(answer_input_ids.shape[0])
        weights = weights.to(question_states.device, question_states.dtype)
        if answer_attention_mask is None:
            answer_attention_mask = (answer_input_ids != self.config.text_config.pad_token_id).long()
        targets = answer_input_ids.masked_fill(answer_input_ids == self.config.text_config.pad_token_id, -100)
        states = question_states.repeat_interleave(repeats, dim=0)
        masks = attention_mask.repeat_interleave(repeats, dim=0)

        teacher = None
        if self.momentum is not None and self.training:
            with torch.no_grad():
                self.momentum.update(self)
                states_m = self.encode_questions(pixel_values, input_ids, attention_mask, towers=self.momentum)
                states_m = states_m.repeat_interleave(repeats, dim=0)
                teacher = self.answer_logits(answer_input_ids, answer_attention_mask, states_m, masks, self.momentum)
                teacher = teacher[:, :-1]
        logits = self.answer_logits(answer_input_ids, answer_attention_mask, states, masks)
        alpha = self.config.alpha if alpha is None else alpha
        per_answer = sequence_lm_loss(logits[:, :-1], targets[:, 1:], teacher, alpha)
        loss = (weights * per_answer).sum() / batch
        return AlbefQuestionAnsweringOutput(loss=loss, logits=logits, question_states=question_states, **towers)

    @torch.no_grad()
    def rank_answers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor | None,
        k: int | None = None,
        return_details: bool = False,
        fast: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | AlbefAnswerRanking:
        """The original `rank_answer`: keep the `k` answers whose first token is most likely after [CLS], re-score
        each by `log p(first token) + sum of log p(answer tokens)` and return `(topk_ids, topk_probs)` sorted by the
        softmax of those scores. As in the original, the first token's log-probability is counted twice (the sum
        already includes it); LAVIS drops the first term, so rankings can differ slightly from LAVIS's.

        The decoder runs [CLS] once per question; its cached keys/values are then shared by the question's `k`
        candidates, which are decoded together in one pass (the question's cross-attention keys/values projected
        once for all of them)."""
        if fast is not None:
            warnings.warn(
                "rank_answers(fast=...) is deprecated and ignored: the cached decoder is the only path now",
                FutureWarning,
                stacklevel=2,
            )
        num_answers = answer_input_ids.shape[0]
        k = self.config.answer_rank_k if k is None else k
        if answer_input_ids.ndim != 2 or num_answers == 0 or answer_input_ids.shape[1] < 2:
            raise ValueError(f"the answer list is empty (answer_input_ids {tuple(answer_input_ids.shape)})")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_answers:
            raise ValueError(f"k must be between 1 and the number of answers ({num_answers}), got {k}")
        pad = self.config.text_config.pad_token_id
        if answer_attention_mask is None:
            answer_attention_mask = (answer_input_ids != pad).long()
        if answer_attention_mask.shape != answer_input_ids.shape:
            raise ValueError(
                f"answer_attention_mask {tuple(answer_attention_mask.shape)} must match answer_input_ids "
                f"{tuple(answer_input_ids.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encode_questions(pixel_values, input_ids, attention_mask)
        num_questions = states.shape[0]

        # [CLS] once per question; the cache keeps its keys/values and the question's cross-attention keys/values.
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = answer_input_ids[:1, :1].expand(num_questions, 1)
        first = self.text_decoder(
            start, None, encoder_hidden_states=states, encoder_attention_mask=attention_mask, cache=cache
        )
        first_logits = self.lm_head(first.last_hidden_state)[:, 0]
        first_token_probs = F.softmax(first_logits, dim=1).index_select(1, answer_input_ids[:, 1])
        topk_probs, topk_ids = first_token_probs.topk(k, dim=1)

        candidates = answer_input_ids[topk_ids.flatten()]
        candidate_mask = answer_attention_mask[topk_ids.flatten()]
        targets = candidates.masked_fill(candidates == pad, -100)[:, 1:]
        # The answer's first token, predicted by [CLS] (shared by the question's k candidates).
        nll = F.cross_entropy(first_logits.repeat_interleave(k, dim=0), targets[:, 0], reduction="none")
        if candidates.shape[1] > 2:
            # The rest: the candidates' tokens after [CLS] (the last one predicts nothing), k rows per question.
            cache.self_attention_cache.batch_repeat_interleave(k)
            rest = self.text_decoder(
                candidates[:, 1:-1],
                candidate_mask[:, :-1],
                encoder_hidden_states=states,
                encoder_attention_mask=attention_mask,
                cache=cache,
                group_size=k,
            ).last_hidden_state
            nll = nll + self._answer_nll(rest, targets[:, 1:])
        scores = (topk_probs.reshape(-1).log() - nll).view(num_questions, k)
        probs, rerank = F.softmax(scores, dim=-1).topk(k, dim=1)
        ids = torch.gather(topk_ids, 1, rerank)
        if not return_details:
            return ids, probs
        return AlbefAnswerRanking(ids, probs, first_token_probs, topk_ids, scores)

    def _answer_nll(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL of each row (`targets` -100 = not scored), the vocabulary logits taken a bounded
        number of rows at a time."""
        rows, length = targets.shape
        flat_states, flat_targets = states.reshape(rows * length, -1), targets.reshape(-1)
        nll = []
        for begin in range(0, rows * length, ANSWER_LOGIT_ROWS):
            logits = self.lm_head(flat_states[begin : begin + ANSWER_LOGIT_ROWS])
            nll.append(F.cross_entropy(logits, flat_targets[begin : begin + ANSWER_LOGIT_ROWS], reduction="none"))
        return torch.cat(nll).view(rows, length).sum(1)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        generation_config=None,
        **kwargs,
    ) -> torch.Tensor:
        """Open-ended answers `[CLS] tokens... [SEP]` (padded with [PAD] after [SEP]), with transformers' generation:
        the question is encoded once, then the decoder runs with a cache. Every `generate` option works
        (`num_beams`, `do_sample`, `generation_config`, `num_return_sequences`, `return_dict_in_generate`, ...);
        the default is greedy with `max_new_tokens=10`."""
        if pixel_values is None or input_ids is None:
            raise ValueError("generate needs pixel_values and the question's input_ids")
        if max_new_tokens is not None:
            if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
            kwargs["max_new_tokens"] = max_new_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encode_questions(pixel_values, input_ids, attention_mask)
        start = torch.full(
            (states.shape[0], 1), self.config.text_config.cls_token_id, dtype=torch.long, device=states.device
        )
        return super().generate(
            input_ids=start,
            generation_config=self._answer_generation_config(generation_config or self.generation_config),
            question_states=states,
            question_attention_mask=attention_mask,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = True,
        **kwargs,
    ) -> dict:
        """Generation step inputs: the answer tokens not yet in the cache, decoded against the question states."""
        if cache is None and use_cache:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {
            "answer_input_ids": input_ids[:, seen:],
            "answer_attention_mask": attention_mask,
            "question_states": question_states,
            "question_attention_mask": question_attention_mask,
            "cache": cache,
            "use_cache": use_cache,
        }
        inputs.update({key: kwargs[key] for key in ("output_attentions", "output_hidden_states") if key in kwargs})
        return inputs


# ===== remote code =================================================================================================
# The Auto class that loads each head (transformers_albef/__init__.py registers the same table); `save_pretrained`
# writes it into `auto_map` with the code files, so a saved folder loads with `trust_remote_code=True` alone.
AUTO_CLASSES = {
    "AutoModel": "AlbefModel",
    "AutoModelForPreTraining": "AlbefForPreTraining",
    "AutoModelForZeroShotImageClassification": "AlbefModel",
    "AutoModelForSequenceClassification": "AlbefForVisualEntailment",
    "AutoModelForVisualQuestionAnswering": "AlbefForQuestionAnswering",
}
AlbefModel.register_for_auto_class("AutoModel")
AlbefForPreTraining.register_for_auto_class("AutoModelForPreTraining")
AlbefForVisualEntailment.register_for_auto_class("AutoModelForSequenceClassification")
AlbefForQuestionAnswering.register_for_auto_class("AutoModelForVisualQuestionAnswering")
# No task Auto class fits these: in their own repos, AutoModel loads them.
for _head in (AlbefForRetrieval, AlbefForVisualReasoning, AlbefForTextAssignment, AlbefVisionModel, AlbefTextModel):
    _head.register_for_auto_class("AutoModel")


__all__ = [
    "AUTO_CLASSES",
    "AlbefPreTrainedModel",
    "AlbefVisionModel",
    "AlbefTextModel",
    "AlbefModel",
    "AlbefForRetrieval",
    "AlbefForPreTraining",
    "AlbefForVisualEntailment",
    "AlbefForVisualReasoning",
    "AlbefForTextAssignment",
    "AlbefForQuestionAnswering",
    "AlbefOutput",
    "AlbefClassifierOutput",
    "AlbefQuestionAnsweringOutput",
    "AlbefAnswerRanking",
]
