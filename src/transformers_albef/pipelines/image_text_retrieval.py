"""`albef-image-text-retrieval`: rank texts for images and images for texts (ITC, re-ranked by ITM as ALBEF's
retrieval evaluation), or score aligned image-text pairs."""

from __future__ import annotations

import torch
from transformers.pipelines.base import Pipeline

from ..models.albef.modeling_albef import encode_for_retrieval, rerank_encoded
from .base import AlbefPipelineMixin, as_list, check_texts


class AlbefImageTextRetrievalPipeline(AlbefPipelineMixin, Pipeline):
    """
    Image-text retrieval and matching with ALBEF. One call ranks a set of texts against a set of images:

    ```python
    >>> import transformers_albef
    >>> from transformers import pipeline

    >>> retriever = pipeline("albef-image-text-retrieval", model=transformers_albef.bundled_model_path("retrieval"))
    >>> result = retriever(images=[cat, dog], texts=["a cat on a sofa", "a dog in the snow"], top_k=2)
    >>> result["image_to_text"][0]  # the texts for the first image, best first
    [{'text': 'a cat on a sofa', 'text_index': 0, 'score': 2.1, 'itc_score': 0.41}, ...]
    >>> result["text_to_image"][1]  # the images for the second text
    [{'image_index': 1, 'score': 1.7, 'itc_score': 0.38}, ...]
    ```

    As the original retrieval evaluation ([`AlbefForRetrieval.retrieval_scores`]), the ITC cosine similarity picks
    the `top_k` candidates of each query and the ITM head re-scores them; `score` is then the ITM "match" logit and
    only those `top_k` candidates are returned. Without ITM (`use_itm=False`, or an ITC-only [`AlbefModel`]) `score`
    is the ITC cosine similarity. `itc_score` is always the cosine similarity.

    Call arguments:

    - `images` (an image, a local path or URL, or a list of them) and `texts` (`str` or `list[str]`, cleaned as
      ALBEF captions).
    - `top_k` (`int`, *optional*): results per query; defaults to every candidate, at most `config.retrieval_k`
      when ITM re-ranks them.
    - `use_itm` (`bool`, *optional*): re-rank with ITM; defaults to whether the model has an ITM head.
    - `pairs` (`bool`, defaults to `False`): instead of ranking, score the aligned pairs (image i, text i): a list of
      `{"image_index", "text", "itc_score", "itm_score"}` with `itm_score` the ITM match probability.
    - `return_tensors` (`bool`): also return the score matrices: `itc_scores` (images, texts) and, with ITM,
      `itm_scores_i2t` (images, texts) / `itm_scores_t2i` (texts, images) with -100 outside the re-ranked top-k.
    - `batch_size`: images / texts encoded per forward pass.

    Loading by name gives [`AlbefForRetrieval`] for checkpoints saved with an ITM head, else [`AlbefModel`].
    """

    _load_processor = None
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_itc_pipeline()

    def __call__(self, images=None, texts=None, **kwargs):
        """Rank `texts` for each of `images` and `images` for each of `texts` (see the class documentation)."""
        if images is None or texts is None:
            raise ValueError("albef-image-text-retrieval needs both `images` and `texts`")
        # The whole set is one pipeline input; `batch_size` chunks the tower passes instead.
        kwargs["encode_batch_size"] = kwargs.pop("batch_size", None) or self._batch_size or 32
        return super().__call__({"images": images, "texts": texts}, **kwargs)

    def _sanitize_parameters(
        self, top_k=None, use_itm=None, pairs=None, return_tensors=None, timeout=None, encode_batch_size=None
    ):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
            forward_params["top_k"] = top_k
        if use_itm is not None:
            if use_itm and not hasattr(self.model, "itm_head"):
                raise ValueError(f"`use_itm=True` needs an AlbefForRetrieval, got {type(self.model).__name__}")
            forward_params["use_itm"] = use_itm
        if pairs is not None:
            preprocess_params["pairs"] = forward_params["pairs"] = postprocess_params["pairs"] = pairs
        if encode_batch_size is not None:
            forward_params["batch_size"] = encode_batch_size
        if return_tensors is not None:
            postprocess_params["return_tensors"] = return_tensors
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs, timeout=None, pairs=False):
        texts = check_texts(inputs["texts"], "texts")
        images = as_list(inputs["images"], "images")
        if pairs and len(images) != len(texts):
            raise ValueError(
                f"`pairs=True` scores image i with text i: got {len(images)} images and {len(texts)} texts"
            )
        model_inputs = self.processor(text=texts, clean_text="caption", return_tensors="pt")
        model_inputs["pixel_values"] = self._encode_images(images, timeout)
        model_inputs["texts"] = texts
        return model_inputs

    def _forward(self, model_inputs, top_k=None, use_itm=None, pairs=False, batch_size=32):
        model = self.model
        pixel_values, input_ids = model_inputs["pixel_values"], model_inputs["input_ids"]
        attention_mask = model_inputs["attention_mask"]
        use_itm = hasattr(model, "itm_head") if use_itm is None else use_itm
        outputs = {"texts": model_inputs["texts"]}
        if pairs:
            outputs.update(self._score_pairs(pixel_values, input_ids, attention_mask, use_itm, batch_size))
            return outputs

        # The towers run once: their ITC embeddings give the similarities, their states feed the ITM re-ranking.
        encoded = encode_for_retrieval(model, pixel_values, input_ids, attention_mask, batch_size=batch_size)
        _, image_embeds, _, text_embeds, _ = encoded
        outputs["itc_scores"] = (image_embeds @ text_embeds.t()).float()
        outputs["top_k"] = top_k
        if use_itm:
            k = top_k or model.config.retrieval_k
            outputs["itm_scores_i2t"], outputs["itm_scores_t2i"] = rerank_encoded(model, *encoded, k=k)
            outputs["top_k"] = k
        return outputs

    def _score_pairs(self, pixel_values, input_ids, attention_mask, use_itm, batch_size):
        itc, itm = [], []
        for start in range(0, input_ids.shape[0], batch_size):
            chunk = slice(start, start + batch_size)
            kwargs = {"use_itm_head": True} if use_itm else {}
            out = self.model(pixel_values[chunk], input_ids[chunk], attention_mask[chunk], **kwargs)
            itc.append((out.image_embeds * out.text_embeds).sum(-1).float())
            if use_itm:
                itm.append(out.itm_logits.float().softmax(-1)[:, 1])
        return {"pair_itc_scores": torch.cat(itc), "pair_itm_scores": torch.cat(itm) if use_itm else None}

    def postprocess(self, model_outputs, pairs=False, return_tensors=False):
        texts = model_outputs["texts"]
        if pairs:
            itm = model_outputs["pair_itm_scores"]
            results = []
            for index, (text, itc) in enumerate(zip(texts, model_outputs["pair_itc_scores"].tolist())):
                result = {"image_index": index, "text": text, "itc_score": itc}
                if itm is not None:
                    result["itm_score"] = float(itm[index])
                results.append(result)
            return results

        itc = model_outputs["itc_scores"]
        score_i2t = model_outputs.get("itm_scores_i2t")
        score_t2i = model_outputs.get("itm_scores_t2i")
        ranked_i2t = _rank(itc, score_i2t, model_outputs["top_k"])
        ranked_t2i = _rank(itc.t(), score_t2i, model_outputs["top_k"])
        result = {
            "image_to_text": [
                [{"text": texts[t], "text_index": t, "score": s, "itc_score": float(itc[i, t])} for t, s in row]
                for i, row in enumerate(ranked_i2t)
            ],
            "text_to_image": [
                [{"image_index": i, "score": s, "itc_score": float(itc[i, t])} for i, s in row]
                for t, row in enumerate(ranked_t2i)
            ],
        }
        if return_tensors:
            result["itc_scores"] = itc
            if score_i2t is not None:
                result["itm_scores_i2t"], result["itm_scores_t2i"] = score_i2t, score_t2i
        return result


def _rank(itc: torch.Tensor, itm: torch.Tensor | None, top_k: int | None) -> list[list[tuple[int, float]]]:
    """(candidate index, score) of each query row, best first: the ITM-scored top-k, else the ITC top-k."""
    scores = itc if itm is None else itm
    k = min(top_k or scores.shape[1], scores.shape[1])
    values, indices = scores.float().topk(k, dim=1)
    return [list(zip(row_indices, row_values)) for row_indices, row_values in zip(indices.tolist(), values.tolist())]
