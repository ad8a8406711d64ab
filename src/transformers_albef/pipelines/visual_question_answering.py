"""`albef-visual-question-answering`: answers ranked from an answer list (ALBEF's VQA evaluation) or generated.

transformers 5.22 removed the `visual-question-answering` task (the name now raises, even for a registered
pipeline), hence the new name."""

from __future__ import annotations

from transformers.pipelines.base import Pipeline

from ..models.albef.modeling_albef import AlbefForQuestionAnswering
from .base import AlbefPipelineMixin, as_list, check_texts

MODES = ("rank", "generate")


class AlbefVisualQuestionAnsweringPipeline(AlbefPipelineMixin, Pipeline):
    """
    Visual question answering with [`AlbefForQuestionAnswering`].

    ```python
    >>> import transformers_albef
    >>> from transformers import pipeline

    >>> vqa = pipeline("albef-visual-question-answering", model=transformers_albef.bundled_model_path("vqa"))
    >>> vqa(image, "what colour is the shape?", top_k=2)
    [{'answer': 'red', 'score': 0.91}, {'answer': 'blue', 'score': 0.05}]
    >>> vqa(image, "what colour is the shape?", mode="generate")
    [{'answer': 'red'}]
    ```

    Inputs: `vqa(image, question)`, `vqa(image=..., question=...)`, a dict `{"image": ..., "question": ...}` or a
    list of such dicts. `image` and `question` may also be lists: of equal length (pairs), or one of them single
    (one image with several questions, or one question for several images). Images are PIL images, local paths or
    URLs; questions are cleaned as ALBEF's VQA questions (`pre_question`).

    Call arguments:

    - `answer_list` (`list[str]`, *optional*): candidate answers, ranked with
      [`AlbefForQuestionAnswering.rank_answers`] (the original evaluation); defaults to the model's
      `config.answer_list`. `score` is the probability among the re-ranked candidates.
    - `mode` (`"rank"` or `"generate"`, *optional*): ranking needs an answer list; defaults to ranking when there is
      one and to greedy generation ([`AlbefForQuestionAnswering.generate`]) otherwise. Generated answers have no
      score.
    - `top_k` (`int`, defaults to 1): answers returned per question (ranking only).
    - `rank_k` (`int`, *optional*): candidates re-scored after the first-token pre-ranking; defaults to
      `config.answer_rank_k`, at most the size of the answer list, at least `top_k`.
    - `max_new_tokens` (`int`, defaults to 10): generation length limit.

    Returns a list of `{"answer", "score"}` per question (a list of them for several questions).
    """

    _load_processor = None
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        self._answer_cache = {}
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, AlbefForQuestionAnswering):
            raise ValueError(
                f"albef-visual-question-answering needs an AlbefForQuestionAnswering, got {type(self.model).__name__}"
            )
        self._init_albef_processor()

    def __call__(self, image=None, question=None, **kwargs):
        if "images" in kwargs:
            image = kwargs.pop("images")
        if "questions" in kwargs:
            question = kwargs.pop("questions")
        if question is None and _all_dicts(image):
            inputs = image if isinstance(image, dict) else as_list(image, "inputs")
            for item in [inputs] if isinstance(inputs, dict) else inputs:
                if "image" not in item or "question" not in item:
                    raise ValueError(f"each input needs an 'image' and a 'question', got keys {sorted(item)}")
        else:
            inputs = _pair_up(image, question)
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self, answer_list=None, mode=None, top_k=None, rank_k=None, max_new_tokens=None, timeout=None
    ):
        # Only what is passed, checked on its own: `_resolve` combines them with the __init__ values and defaults.
        params = {}
        if answer_list is not None:
            params["answer_list"] = _check_answer_list(answer_list)
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
            params["mode"] = mode
        for name, value in (("top_k", top_k), ("rank_k", rank_k), ("max_new_tokens", max_new_tokens)):
            if value is not None:
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
                params[name] = value
        preprocess_params = {"timeout": timeout} if timeout is not None else {}
        return preprocess_params, params, dict(params)

    def _resolve(self, answer_list=None, mode=None, top_k=None, rank_k=None, max_new_tokens=None):
        """(mode, answer list, top_k, rank_k) of a call, with the defaults filled in and checked together."""
        answer_list = answer_list or getattr(self.model.config, "answer_list", None) or None
        mode = mode or ("rank" if answer_list else "generate")
        top_k = top_k or 1
        if mode == "generate":
            if top_k > 1:
                raise ValueError("generation gives one answer per question: `top_k` > 1 needs an answer list")
            return mode, None, 1, None
        if not answer_list:
            raise ValueError("ranking answers needs `answer_list` (the model's config has none)")
        if top_k > len(answer_list):
            raise ValueError(f"`top_k` ({top_k}) is larger than the answer list ({len(answer_list)} answers)")
        if rank_k is None:
            rank_k = max(top_k, min(self.model.config.answer_rank_k, len(answer_list)))
        if not top_k <= rank_k <= len(answer_list):
            raise ValueError(
                f"`rank_k` must be between top_k ({top_k}) and the answer list size ({len(answer_list)}), got {rank_k}"
            )
        return mode, answer_list, top_k, rank_k

    def preprocess(self, inputs, timeout=None):
        question = check_texts(inputs["question"], "questions")
        if len(question) != 1:
            raise ValueError(f"one question per image, got {question!r}")
        # The original VQA test set-up: no truncation, questions cleaned with pre_question (50 words).
        model_inputs = self.processor(text=question, clean_text="question", truncation=False, return_tensors="pt")
        model_inputs["pixel_values"] = self._encode_images([inputs["image"]], timeout)
        return model_inputs

    def _encoded_answers(self, answer_list):
        key = tuple(answer_list)
        if key not in self._answer_cache:
            self._answer_cache = {key: self.processor.encode_answers(answer_list, return_tensors="pt")}
        return self._answer_cache[key]

    def _forward(self, model_inputs, max_new_tokens=10, **params):
        mode, answer_list, top_k, rank_k = self._resolve(**params)
        pixel_values, input_ids = model_inputs["pixel_values"], model_inputs["input_ids"]
        attention_mask = model_inputs["attention_mask"]
        if mode == "generate":
            return {"answer_ids": self.model.generate(pixel_values, input_ids, attention_mask, max_new_tokens)}
        answers = self._encoded_answers(answer_list)
        ids, probs = self.model.rank_answers(
            pixel_values,
            input_ids,
            attention_mask,
            answers["input_ids"].to(input_ids.device),
            answers["attention_mask"].to(input_ids.device),
            k=rank_k,
        )
        return {"answer_ids": ids[:, :top_k], "scores": probs[:, :top_k].float()}

    def postprocess(self, model_outputs, **params):
        mode, answer_list, _, _ = self._resolve(**params)
        if mode == "generate":
            text = self.tokenizer.decode(model_outputs["answer_ids"][0], skip_special_tokens=True)
            return [{"answer": text.strip()}]
        ids, scores = model_outputs["answer_ids"][0].tolist(), model_outputs["scores"][0].tolist()
        return [{"answer": answer_list[i], "score": s} for i, s in zip(ids, scores)]


def _all_dicts(value) -> bool:
    return isinstance(value, dict) or (isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value))


def _pair_up(image, question):
    """`{"image", "question"}` inputs from images and questions given separately (lists pair up or broadcast)."""
    if image is None or question is None:
        raise ValueError("albef-visual-question-answering needs an image and a question")
    many_images, many_questions = isinstance(image, (list, tuple)), isinstance(question, (list, tuple))
    if not many_images and not many_questions:
        return {"image": image, "question": question}
    images, questions = as_list(image, "images"), as_list(question, "questions")
    if many_images and many_questions and len(images) != len(questions):
        raise ValueError(
            f"got {len(images)} images and {len(questions)} questions: pass as many of each, or a single one of either"
        )
    if not many_images:
        images = images * len(questions)
    if not many_questions:
        questions = questions * len(images)
    return [{"image": i, "question": q} for i, q in zip(images, questions)]


def _check_answer_list(answer_list) -> list[str]:
    if isinstance(answer_list, str):
        raise ValueError("`answer_list` must be a list of answers, not a single string")
    answers = check_texts(list(answer_list), "answers in `answer_list`")
    duplicates = sorted({a for a in answers if answers.count(a) > 1})
    if duplicates:
        raise ValueError(f"`answer_list` has duplicate answers: {duplicates}")
    return answers


__all__ = ["AlbefVisualQuestionAnsweringPipeline"]
