"""ALBEF's extras on `zero-shot-image-classification`, as a class to pass explicitly:

    pipeline("zero-shot-image-classification", model=..., pipeline_class=AlbefZeroShotImageClassificationPipeline)

transformers' own pipeline already works with ALBEF models (the `AlbefTokenizer` encodes the prompts as ALBEF does,
`[CLS] tokens` without `[SEP]`); this subclass adds prompt ensembles, the original caption cleaning of the prompts
(through the `AlbefProcessor`) and ITM re-ranking of the best labels. It accepts ALBEF models only."""

from __future__ import annotations

from collections import UserDict

import torch
import torch.nn.functional as F
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline

from ..models.albef.modeling_albef import AlbefModel
from .base import AlbefPipelineMixin, check_texts, is_albef_model

DEFAULT_TEMPLATE = "a picture of {}"


class AlbefZeroShotImageClassificationPipeline(AlbefPipelineMixin, ZeroShotImageClassificationPipeline):
    """
    Zero-shot image classification with ALBEF's image-text contrastive (ITC) embeddings, with prompt ensembles and
    optional re-ranking of the best labels with the image-text matching (ITM) head.

    ```python
    >>> import transformers_albef
    >>> from transformers import pipeline
    >>> from transformers_albef.pipelines import AlbefZeroShotImageClassificationPipeline

    >>> classifier = pipeline(
    ...     "zero-shot-image-classification",
    ...     model=transformers_albef.bundled_model_path("retrieval"),
    ...     pipeline_class=AlbefZeroShotImageClassificationPipeline,
    ... )
    >>> # the bundled model was trained on bare emoji names: "{}" (the label alone) is its template
    >>> image = transformers_albef.bundled_samples_path("emoji_blue_heart.png")
    >>> labels = ["blue heart", "sunflower", "tiger"]
    >>> classifier(image, candidate_labels=labels, hypothesis_template=["{}", "{} emoji"])
    [{'score': 0.76, 'label': 'blue heart'}, {'score': 0.18, 'label': 'tiger'}, {'score': 0.06, 'label': 'sunflower'}]
    ```

    The call accepts:

    - `candidate_labels` (`str` or `list[str]`): the labels, unique.
    - `hypothesis_template` (`str` or `list[str]`, defaults to `"a picture of {}"`): the prompt(s) a label is put in.
      With several templates a label's text embedding is the normalised mean over its prompts (prompt ensembling).
      Prompts are cleaned as ALBEF captions (`pre_caption`: lower case, punctuation deleted, 30 words at most) and
      encoded without `[SEP]`. Use the kind of text the model was trained on: the default suits ALBEF's
      checkpoints, trained on image captions; the bundled retrieval model (`bundled_model_path("retrieval")`) was
      trained on bare lower-case emoji names ("blue heart", "tiger"), so pass `hypothesis_template="{}"` (or an
      ensemble such as `["{}", "{} emoji"]`) with it. (transformers' own pipeline defaults to
      `"This is a photo of {}."`, which does not suit it either.)
    - `rerank_top_k` (`int`, *optional*): re-score the `k` best labels of each image with the ITM head (match
      probability, averaged over the templates) and put them first, in that order; each of them gets an
      `itm_score`. Needs an [`AlbefForRetrieval`]: pass `model=AlbefForRetrieval.from_pretrained(...)` (loading
      by name gives the task's ITC-only [`AlbefModel`]).

    `score` is always the softmax over the labels of the ITC logits (`logits_per_image`), as for CLIP. The processor
    is the `processor=` argument, else built from the loaded tokenizer and image processor, else read from the
    model's folder.
    """

    # Soft: a model passed as an object needs only `processor=`.
    _load_tokenizer = None
    _load_image_processor = None

    def __init__(self, model, **kwargs):
        if not is_albef_model(model):
            raise ValueError(
                f"{type(self).__name__} is for ALBEF models, got {type(model).__name__}: for other models use "
                "transformers' own zero-shot-image-classification pipeline (leave out `pipeline_class`)"
            )
        super().__init__(model=model, **kwargs)
        self._init_albef_processor()

    def check_model_type(self, supported_models):
        if not isinstance(self.model, AlbefModel):
            raise ValueError(
                f"zero-shot-image-classification uses ALBEF's ITC embeddings: it needs an AlbefModel or "
                f"AlbefForRetrieval, got {type(self.model).__name__}"
            )

    def __call__(self, image=None, candidate_labels=None, **kwargs):
        if "images" in kwargs:
            image = kwargs.pop("images")
        if image is None:
            raise ValueError("zero-shot-image-classification needs an image (or a list of images)")
        if candidate_labels is None:
            raise ValueError("zero-shot-image-classification needs `candidate_labels`")
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(self, tokenizer_kwargs=None, rerank_top_k=None, **kwargs):
        if tokenizer_kwargs is not None:
            raise ValueError("ALBEF prompts are encoded by its processor: `tokenizer_kwargs` is not supported")
        names = ("candidate_labels", "hypothesis_template", "timeout")
        preprocess_params = {name: kwargs[name] for name in names if name in kwargs}
        forward_params = {}
        if rerank_top_k is not None:
            if not hasattr(self.model, "itm_head"):
                raise ValueError(
                    f"`rerank_top_k` needs the ITM head of an AlbefForRetrieval, got {type(self.model).__name__}: "
                    "pass model=AlbefForRetrieval.from_pretrained(...)"
                )
            if isinstance(rerank_top_k, bool) or not isinstance(rerank_top_k, int) or rerank_top_k < 1:
                raise ValueError(f"`rerank_top_k` must be a positive integer, got {rerank_top_k!r}")
            forward_params["rerank_top_k"] = rerank_top_k
        return preprocess_params, forward_params, {}

    def preprocess(self, image, candidate_labels=None, hypothesis_template=None, timeout=None):
        hypothesis_template = DEFAULT_TEMPLATE if hypothesis_template is None else hypothesis_template
        labels = check_texts(candidate_labels, "candidate_labels")
        if len(set(labels)) != len(labels):
            raise ValueError(f"candidate_labels must be unique, got {labels}")
        templates = check_texts(hypothesis_template, "hypothesis templates")
        if any("{}" not in template for template in templates):
            raise ValueError(f"every hypothesis template needs a '{{}}' for the label, got {templates}")
        # Label-major: the prompts of label i are rows i * T ... i * T + T - 1.
        prompts = [template.format(label) for label in labels for template in templates]
        inputs = {"pixel_values": self._encode_images([image], timeout), "candidate_labels": labels}
        # Wrapped in a list so that batching leaves the prompts alone (every image of a call has the same labels).
        inputs["text_inputs"] = [self.processor(text=prompts, clean_text="caption", return_tensors="pt")]
        inputs["num_templates"] = len(templates)
        return inputs

    def _forward(self, model_inputs, rerank_top_k=None):
        labels = model_inputs.pop("candidate_labels")
        text_inputs = model_inputs.pop("text_inputs")
        num_templates = model_inputs.pop("num_templates")
        # Unbatched: [encoding]; batched: one [encoding] per image, all the same.
        text_inputs = text_inputs[0] if isinstance(text_inputs[0], UserDict) else text_inputs[0][0]
        num_templates = num_templates if isinstance(num_templates, int) else num_templates[0]
        model = self.model
        pixel_values = model_inputs["pixel_values"]
        input_ids, attention_mask = text_inputs["input_ids"], text_inputs["attention_mask"]

        image_states = model.vision_model(pixel_values).last_hidden_state
        image_embeds = F.normalize(model.vision_proj(image_states[:, 0]), dim=-1)
        text_states = model.text_model(input_ids, attention_mask, mode="text").last_hidden_state
        text_embeds = F.normalize(model.text_proj(text_states[:, 0]), dim=-1)
        # Prompt ensemble: mean of a label's normalised prompt embeddings, normalised again.
        label_embeds = text_embeds.view(-1, num_templates, text_embeds.shape[-1]).mean(1)
        label_embeds = F.normalize(label_embeds, dim=-1) if num_templates > 1 else label_embeds
        # In float32, as the model's own ITC logits (1 / temp is large: half precision would round them coarsely).
        logits = image_embeds.float() @ label_embeds.float().t() / model.temp.float()
        outputs = {"candidate_labels": labels, "logits": logits}
        if rerank_top_k is not None:
            outputs["itm_labels"], outputs["itm_scores"] = self._rerank(
                logits, image_states, text_states, attention_mask, num_templates, rerank_top_k
            )
        return outputs

    def _rerank(self, logits, image_states, text_states, attention_mask, num_templates, k):
        """ITM match probability of each image with each prompt of its `k` best labels, averaged over prompts."""
        k = min(k, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (images, k)
        prompt_ids = (top[:, :, None] * num_templates + torch.arange(num_templates, device=top.device)).flatten(1)
        # Every (image, prompt) pair in one grouped ITM call: each image's keys/values are projected once.
        images = torch.arange(len(prompt_ids), device=prompt_ids.device).repeat_interleave(prompt_ids.shape[1])
        itm = self.model.itm_logits_for_pairs(image_states, text_states, attention_mask, images, prompt_ids.flatten())
        scores = itm.float().softmax(-1)[:, 1].view(len(prompt_ids), k, num_templates).mean(2)
        order = scores.argsort(dim=1, descending=True)
        return torch.gather(top, 1, order), torch.gather(scores, 1, order)

    def postprocess(self, model_outputs):
        labels = model_outputs["candidate_labels"]
        scores = model_outputs["logits"][0].float().softmax(-1).tolist()
        results = sorted(
            ({"score": score, "label": label} for score, label in zip(scores, labels)), key=lambda r: -r["score"]
        )
        if model_outputs.get("itm_labels") is None:
            return results
        by_label = {result["label"]: result for result in results}
        reranked = []
        for index, itm_score in zip(model_outputs["itm_labels"][0].tolist(), model_outputs["itm_scores"][0].tolist()):
            by_label[labels[index]]["itm_score"] = itm_score
            reranked.append(by_label[labels[index]])
        return reranked + [result for result in results if "itm_score" not in result]
