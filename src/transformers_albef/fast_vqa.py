"""Exact fast path for VQA answer ranking (`AlbefForQuestionAnswering.rank_answers(..., fast=True)`).

The eager re-scoring runs the causal answer decoder on k padded candidates per question, with the question states
repeated k times, and takes full-vocabulary logits at every position. The decoder is causal, so the state at
position t depends only on the question and the answer prefix up to t. Here the candidates of all questions form a
prefix tree and every distinct (question, prefix) is computed once, position by position, attending to its
ancestors' cached keys/values:

- [CLS] is computed once per question instead of once per candidate, and shared answer prefixes ("red" in
  "red and white") once per question;
- positions after an answer's last target ([SEP] and padding) are not computed at all;
- the question's cross-attention keys/values are projected once per question and layer, not once per candidate;
- full-vocabulary logits are taken once per distinct prefix that predicts a token, and only the target token's
  log-probability (`logit[target] - logsumexp(logits)`) is kept.

Every module and weight is the model's own; the result equals the eager `-sequence_lm_loss` of each candidate up to
float rounding (tests/test_fast_paths.py, and the original code's fixture).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .modeling_albef_base import attend

# Rows of full-vocabulary logits materialised at once (2048 x 30522 fp32 = 250 MB).
DEFAULT_VOCAB_CHUNK = 2048


def _heads(module: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """(batch, length, hidden) -> (batch, heads, length, head_dim)."""
    return states.view(*states.shape[:2], -1, module.head_dim).transpose(1, 2)


class _PrefixTree:
    """The distinct (question, answer prefix) nodes at each position of `tokens` (rows, length), restricted to the
    rows that still need position t (a target at t or later). Level t holds, per row, its node (-1 when not needed),
    a representative row per node, and each node's parent among the nodes of level t - 1."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, needed: torch.Tensor, first_key: torch.Tensor):
        width = int(tokens.max()) + 1
        rows = tokens.shape[0]
        self.levels = []
        row_node = first_key  # the "parent" of position 0 is the question
        for t in range(tokens.shape[1]):
            live = needed[:, t].nonzero().squeeze(1)
            if live.numel() == 0:
                break
            key = (row_node[live] * width + tokens[live, t]) * 2 + (mask[live, t] != 0)
            _, node = torch.unique(key, return_inverse=True)
            representative = torch.full((int(node.max()) + 1,), rows, dtype=torch.long, device=tokens.device)
            representative.scatter_reduce_(0, node, live, "amin")
            parent = row_node[representative]
            row_node = torch.full((rows,), -1, dtype=torch.long, device=tokens.device)
            row_node[live] = node
            self.levels.append((row_node, representative, parent))


@torch.no_grad()
def answer_log_likelihoods(
    model: nn.Module,
    question_states: torch.Tensor,
    question_mask: torch.Tensor,
    answer_input_ids: torch.Tensor,
    answer_attention_mask: torch.Tensor | None,
    candidate_ids: torch.Tensor,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """Summed log-probability (float32) of each candidate answer under the decoder, `(questions, k)`.

    question_states / question_mask (`(questions, length, hidden)` / `(questions, length)`): the question encoder's
    output. answer_input_ids / answer_attention_mask (`(answers, length)`): the tokenised answer list
    (`[CLS] answer [SEP]`, padded). candidate_ids (`(questions, k)`): answer-list rows to score for each question.
    Equals `-sequence_lm_loss(logits[:, :-1], targets[:, 1:])` of `AlbefForQuestionAnswering.answer_logits` on the
    candidates with the question states repeated k times (targets: the answer ids, padding ignored).
    """
    pad = model.config.text_config.pad_token_id
    num_questions, k = candidate_ids.shape
    if question_states.shape[0] != num_questions:
        raise ValueError(f"{question_states.shape[0]} question states for {num_questions} rows of candidate_ids")
    if question_mask is None:
        question_mask = torch.ones(question_states.shape[:2], dtype=torch.long, device=question_states.device)
    candidates = answer_input_ids[candidate_ids.flatten()]
    mask = (
        answer_attention_mask[candidate_ids.flatten()]
        if answer_attention_mask is not None
        else (candidates != pad).long()
    )
    # Position t predicts token t + 1; positions with no target at t or later are never needed.
    targets = candidates[:, 1:]
    has_target = targets != pad
    needed = has_target.flip(1).cummax(1).values.flip(1)
    question_of_row = torch.arange(num_questions, device=candidates.device).repeat_interleave(k)
    tree = _PrefixTree(candidates[:, :-1], mask[:, :-1], needed, question_of_row)

    decoder, lm_head = model.text_decoder, model.lm_head
    config = decoder.config
    layers = list(decoder.encoder.layer)
    # Question keys/values, once per question and layer.
    question_kv = [
        (
            _heads(layer.crossattention.self, layer.crossattention.self.key(question_states)),
            _heads(layer.crossattention.self, layer.crossattention.self.value(question_states)),
        )
        for layer in layers
    ]
    past = [None] * len(layers)  # per layer: keys/values of every node's positions 0..t-1 (previous level's nodes)

    total = torch.zeros(num_questions * k, dtype=torch.float32, device=candidates.device)
    for t, (row_node, representative, parent) in enumerate(tree.levels):
        count = representative.numel()
        tokens = candidates[representative, t : t + 1]
        hidden = decoder.embeddings(tokens, position_ids=torch.full_like(tokens, t))
        # A node attends to its ancestors and itself (causal order is implicit), with their padding mask.
        self_mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=mask[representative, : t + 1],
            encoder_hidden_states=hidden.expand(-1, t + 1, -1),
        )
        questions = question_of_row[representative]
        cross_mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=question_mask[questions],
            encoder_hidden_states=hidden.expand(-1, question_states.shape[1], -1),
        )
        for i, (layer, (question_keys, question_values)) in enumerate(zip(layers, question_kv)):
            attention = layer.attention.self
            keys, values = _heads(attention, attention.key(hidden)), _heads(attention, attention.value(hidden))
            if past[i] is not None:
                keys = torch.cat([past[i][0][parent], keys], dim=2)
                values = torch.cat([past[i][1][parent], values], dim=2)
            past[i] = (keys, values)
            attended, _ = attend(attention, _heads(attention, attention.query(hidden)), keys, values, self_mask)
            hidden = layer.attention.output(attended.reshape(count, 1, -1), hidden)

            cross = layer.crossattention.self
            if num_questions == 1:  # a view, no copy per node
                question_keys, question_values = (
                    x.expand(count, -1, -1, -1) for x in (question_keys, question_values)
                )
            else:
                question_keys, question_values = question_keys[questions], question_values[questions]
            attended, _ = attend(cross, _heads(cross, cross.query(hidden)), question_keys, question_values, cross_mask)
            hidden = layer.crossattention.output(attended.reshape(count, 1, -1), hidden)
            hidden = layer.output(layer.intermediate(hidden), hidden)

        # Log-probabilities of the targets at t: one vocabulary row per node that predicts something.
        rows = (has_target[:, t] & (row_node >= 0)).nonzero().squeeze(1)
        nodes, inverse = torch.unique(row_node[rows], return_inverse=True)
        wanted = targets[rows, t]
        for start in range(0, nodes.numel(), vocab_chunk):
            logits = lm_head(hidden[nodes[start : start + vocab_chunk], 0]).float()
            normaliser = torch.logsumexp(logits, dim=-1)
            here = ((inverse >= start) & (inverse < start + vocab_chunk)).nonzero().squeeze(1)
            local = inverse[here] - start
            total.index_add_(0, rows[here], logits[local, wanted[here]] - normaliser[local])
    return total.view(num_questions, k)


__all__ = ["answer_log_likelihoods"]
