"""ALBEF for VQA: a multimodal question encoder and an answer decoder that cross-attends to the question states;
answers are ranked from a list (the original evaluation) or generated."""

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationConfig, GenerationMixin
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
    logits (`(batch, answer_length, vocab)`): decoder logits of the answer tokens, when the forward decodes
        (`question_states` given, as `generate` calls it).
    question_states (`(batch, length, hidden)`): output of the multimodal question encoder.
    cache (`EncoderDecoderCache`): the decoder's keys/values, when decoding with `use_cache`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    question_states: torch.Tensor | None = None
    cache: Cache | None = None


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
        **kwargs,
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
                logits=self.lm_head(decoded.last_hidden_state), question_states=question_states, cache=decoded.cache
            )
        if pixel_values is None or input_ids is None:
            raise ValueError("AlbefForQuestionAnswering needs pixel_values and the question's input_ids")
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
        k = k or self.config.answer_rank_k
        if answer_input_ids.ndim != 2 or num_answers == 0 or answer_input_ids.shape[1] < 2:
            raise ValueError(f"the answer list is empty (answer_input_ids {tuple(answer_input_ids.shape)})")
        if not 1 <= k <= num_answers:
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


__all__ = ["AlbefForQuestionAnswering", "AlbefQuestionAnsweringOutput", "AlbefAnswerRanking"]
