"""ALBEF for VQA: a multimodal question encoder and an answer decoder that cross-attends to the question states;
answers are ranked from a list (the original evaluation) or generated."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_albef import AlbefConfig
from .modeling_albef import _check_pairs
from .modeling_albef_base import AlbefPreTrainedModel
from .modeling_albef_text import AlbefPredictionHead, AlbefTextModel
from .modeling_albef_vision import AlbefVisionModel
from .objectives import sequence_lm_loss


@dataclass
class AlbefQuestionAnsweringOutput(ModelOutput):
    r"""
    loss: weighted answer loss, `sum(weight * per-answer loss) / number of questions` (with `answer_input_ids`).
    question_states (`(batch, length, hidden)`): output of the multimodal question encoder.
    """

    loss: torch.Tensor | None = None
    question_states: torch.Tensor | None = None


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


class AlbefForQuestionAnswering(AlbefPreTrainedModel):
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

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def encode_questions(self, pixel_values, input_ids, attention_mask=None, towers: nn.Module | None = None):
        """Question states: the full multimodal text model over the question, cross-attending to the image."""
        towers = towers or self
        _check_pairs(pixel_values, input_ids, "VQA")
        image_states = towers.vision_model(pixel_values).last_hidden_state
        return towers.text_model(input_ids, attention_mask, encoder_hidden_states=image_states).last_hidden_state

    def answer_logits(self, answer_ids, answer_mask, question_states, question_mask, towers: nn.Module | None = None):
        """Decoder logits (batch, length, vocab) at every answer position (position t predicts token t + 1)."""
        towers = towers or self
        states = towers.text_decoder(
            answer_ids, answer_mask, encoder_hidden_states=question_states, encoder_attention_mask=question_mask
        ).last_hidden_state
        return towers.lm_head(states)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        answer_input_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answers_per_question: torch.Tensor | list[int] | None = None,
        alpha: float | None = None,
        **kwargs,
    ) -> AlbefQuestionAnsweringOutput:
        r"""
        answer_input_ids / answer_attention_mask (`(total_answers, length)`): `[CLS] answer [SEP]` of every
            training answer, grouped by question (see the processor's answer encoding).
        answers_per_question (`(batch,)`): how many consecutive answers belong to each question (default 1 each).
        answer_weights (`(total_answers,)`): weight of each answer (VQA: count / annotators; default 1).
        alpha (`float`): distillation weight when the momentum towers exist and the model is training.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        question_states = self.encode_questions(pixel_values, input_ids, attention_mask)
        if answer_input_ids is None:
            return AlbefQuestionAnsweringOutput(question_states=question_states)

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
        return AlbefQuestionAnsweringOutput(loss=loss, question_states=question_states)

    @torch.no_grad()
    def rank_answers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor,
        k: int | None = None,
        return_details: bool = False,
        fast: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | AlbefAnswerRanking:
        """The original `rank_answer`: keep the `k` answers whose first token is most likely after [CLS], re-score
        each by `log p(first token) + sum of log p(answer tokens)` and return `(topk_ids, topk_probs)` sorted by the
        softmax of those scores. As in the original, the first token's log-probability is counted twice (the sum
        already includes it); LAVIS drops the first term, so rankings can differ slightly from LAVIS's.

        `fast=True` re-scores the candidates with `fast_vqa.answer_log_likelihoods` (question keys/values shared by
        the k candidates, vocabulary logits only once per answer prefix): the same result up to float rounding."""
        num_answers = answer_input_ids.shape[0]
        k = k or self.config.answer_rank_k
        if num_answers == 0 or answer_input_ids.shape[1] < 2:
            raise ValueError(f"the answer list is empty (answer_input_ids {tuple(answer_input_ids.shape)})")
        if not 1 <= k <= num_answers:
            raise ValueError(f"k must be between 1 and the number of answers ({num_answers}), got {k}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad = self.config.text_config.pad_token_id
        states = self.encode_questions(pixel_values, input_ids, attention_mask)
        num_questions = states.shape[0]

        start = answer_input_ids[:1, :1].expand(num_questions, 1)
        first_logits = self.answer_logits(start, None, states, attention_mask)[:, 0]
        first_token_probs = F.softmax(first_logits, dim=1).index_select(1, answer_input_ids[:, 1])
        topk_probs, topk_ids = first_token_probs.topk(k, dim=1)

        if fast:
            from .fast_vqa import answer_log_likelihoods

            log_likelihoods = answer_log_likelihoods(
                self, states, attention_mask, answer_input_ids, answer_attention_mask, topk_ids
            )
            scores = (topk_probs.float().log() + log_likelihoods).to(topk_probs.dtype)
        else:
            candidates = answer_input_ids[topk_ids.flatten()]
            candidate_mask = answer_attention_mask[topk_ids.flatten()]
            logits = self.answer_logits(
                candidates,
                candidate_mask,
                states.repeat_interleave(k, dim=0),
                attention_mask.repeat_interleave(k, dim=0),
            )
            targets = candidates.masked_fill(candidates == pad, -100)
            nll = sequence_lm_loss(logits[:, :-1], targets[:, 1:])
            scores = (topk_probs.reshape(-1).log() - nll).view(num_questions, k)
        probs, rerank = F.softmax(scores, dim=-1).topk(k, dim=1)
        ids = torch.gather(topk_ids, 1, rerank)
        if not return_details:
            return ids, probs
        return AlbefAnswerRanking(ids, probs, first_token_probs, topk_ids, scores)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 10,
    ) -> torch.Tensor:
        """Greedy open-ended answers: `[CLS] tokens... [SEP]` ids (padded with [PAD] after [SEP])."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tc = self.config.text_config
        states = self.encode_questions(pixel_values, input_ids, attention_mask)
        answers = torch.full((states.shape[0], 1), tc.cls_token_id, dtype=torch.long, device=states.device)
        done = torch.zeros(states.shape[0], dtype=torch.bool, device=states.device)
        for _ in range(max_new_tokens):
            next_token = self.answer_logits(answers, None, states, attention_mask)[:, -1].argmax(-1)
            next_token = next_token.masked_fill(done, tc.pad_token_id)
            answers = torch.cat([answers, next_token[:, None]], dim=1)
            done |= next_token == tc.sep_token_id
            if bool(done.all()):
                break
        return answers


__all__ = ["AlbefForQuestionAnswering", "AlbefQuestionAnsweringOutput", "AlbefAnswerRanking"]
