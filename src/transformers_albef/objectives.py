"""ALBEF's training objectives as plain functions: ITC with soft targets, ITM hard-negative mining, MLM masking and the
distilled cross-entropies. The heads compose them; the data collators reuse `mask_tokens`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
