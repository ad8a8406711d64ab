"""The L2-normalised ITC embeddings (`get_image_features` / `get_text_features`), the vectors ALBEF compares images
and texts with, as classes to pass explicitly on transformers' tasks:

    pipeline("image-feature-extraction", model=..., pipeline_class=AlbefImageFeatureExtractionPipeline)
    pipeline("feature-extraction", model=..., pipeline_class=AlbefTextFeatureExtractionPipeline)

transformers' own `image-feature-extraction` / `feature-extraction` pipelines give the same embeddings for an
`AlbefModel` (its first output with one modality); these classes add ALBEF's caption cleaning of the texts (through
the `AlbefProcessor`) and refuse the heads without ITC embeddings."""

from __future__ import annotations

from transformers.pipelines.base import Pipeline

from .base import AlbefPipelineMixin, check_texts


class _AlbefFeatureExtractionPipeline(AlbefPipelineMixin, Pipeline):
    _load_processor = None
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_itc_pipeline()

    def _sanitize_parameters(self, return_tensors=None, timeout=None):
        preprocess_params = {"timeout": timeout} if timeout is not None else {}
        postprocess_params = {"return_tensors": return_tensors} if return_tensors is not None else {}
        return preprocess_params, {}, postprocess_params

    def postprocess(self, model_outputs, return_tensors=False):
        # (1, embed_dim) per input, as transformers' feature-extraction pipelines keep the batch dimension.
        features = model_outputs["features"]
        return features if return_tensors else features.float().tolist()


class AlbefImageFeatureExtractionPipeline(_AlbefFeatureExtractionPipeline):
    """
    ALBEF image embeddings ([`AlbefModel.get_image_features`]): one L2-normalised `(1, embed_dim)` vector per image
    (a nested list, or a tensor with `return_tensors=True`). Inputs: a PIL image, a local path or URL, or a list.

    ```python
    >>> extractor = pipeline(
    ...     "image-feature-extraction",
    ...     model=transformers_albef.bundled_model_path(),
    ...     pipeline_class=AlbefImageFeatureExtractionPipeline,
    ... )
    >>> torch.cat(extractor([image_a, image_b], return_tensors=True)).shape
    torch.Size([2, 128])
    ```
    """

    def __call__(self, images=None, **kwargs):
        if images is None:
            raise ValueError(f"{self.task} needs an image or a list of images")
        if isinstance(images, tuple):
            images = list(images)
        if isinstance(images, list) and not images:
            raise ValueError("got an empty list of images")
        return super().__call__(images, **kwargs)

    def preprocess(self, image, timeout=None):
        return {"pixel_values": self._encode_images([image], timeout)}

    def _forward(self, model_inputs):
        return {"features": self.model.get_image_features(model_inputs["pixel_values"]).pooler_output}


class AlbefTextFeatureExtractionPipeline(_AlbefFeatureExtractionPipeline):
    """
    ALBEF text embeddings ([`AlbefModel.get_text_features`]): one L2-normalised `(1, embed_dim)` vector per text
    (a nested list, or a tensor with `return_tensors=True`). Texts are cleaned and encoded as ALBEF captions
    (`pre_caption`: lower case, punctuation deleted, 30 words at most).

    ```python
    >>> extractor = pipeline(
    ...     "feature-extraction",
    ...     model=transformers_albef.bundled_model_path(),
    ...     pipeline_class=AlbefTextFeatureExtractionPipeline,
    ... )
    >>> extractor("a dog in the snow", return_tensors=True).shape
    torch.Size([1, 128])
    ```
    """

    def __call__(self, texts=None, **kwargs):
        if texts is None:
            raise ValueError(f"{self.task} needs a text or a list of texts")
        checked = check_texts(texts, "texts")
        texts = checked if isinstance(texts, (list, tuple)) else checked[0]
        return super().__call__(texts, **kwargs)

    def _sanitize_parameters(self, return_tensors=None):
        return super()._sanitize_parameters(return_tensors=return_tensors)

    def preprocess(self, text):
        return self.processor(text=[text], clean_text="caption", return_tensors="pt")

    def _forward(self, model_inputs):
        return {
            "features": self.model.get_text_features(
                model_inputs["input_ids"], model_inputs["attention_mask"]
            ).pooler_output
        }
