"""What every ALBEF pipeline shares: the `AlbefProcessor` (the original caption/question cleaning lives there),
image loading, checkpoint-dependent model loading and saving with the processor."""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import AutoConfig
from transformers.image_utils import load_image

from ..models.albef.modeling_albef import AlbefForRetrieval, AlbefModel
from ..models.albef.processing_albef import AlbefProcessor


def is_albef_model(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "albef"


def as_list(value, what: str) -> list:
    """One item or a list/tuple of items as a non-empty list."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"got an empty list of {what}")
    return items


def load_images(images, timeout: float | None = None) -> list:
    """PIL images from PIL images, local paths (`str` or `os.PathLike`) or URLs."""
    loaded = []
    for image in images:
        if image is None:
            raise ValueError("got None where an image was expected")
        loaded.append(load_image(os.fspath(image) if isinstance(image, os.PathLike) else image, timeout=timeout))
    return loaded


def check_texts(texts: Sequence, what: str) -> list[str]:
    texts = as_list(texts, what)
    bad = [text for text in texts if not isinstance(text, str) or not text.strip()]
    if bad:
        raise ValueError(f"{what} must be non-empty strings, got {bad[:3]!r}")
    return texts


class AlbefPipelineMixin:
    """Resolves the pipeline's `AlbefProcessor` and saves it with the model.

    ALBEF texts are `[CLS] tokens` without `[SEP]` (the `AlbefTokenizer` alone does that), cleaned as the original
    datasets (only the processor does that: `clean_text=`). The processor comes from, in order: the `processor`
    argument, the loaded `tokenizer` and `image_processor`, or the model's folder (`name_or_path`)."""

    # No video input: transformers would otherwise try an `AutoVideoProcessor` from the folder's image processor
    # `auto_map` (a folder saved by a pipeline has one), which asks about remote code on a terminal.
    _load_video_processor = False

    def _init_albef_processor(self):
        if self.processor is not None and not isinstance(self.processor, AlbefProcessor):
            raise ValueError(f"ALBEF pipelines need an AlbefProcessor, got {type(self.processor).__name__}")
        if self.processor is None and self.tokenizer is not None and self.image_processor is not None:
            self.processor = AlbefProcessor(self.image_processor, self.tokenizer)
        error = None
        if self.processor is None and os.path.isdir(str(self.model.name_or_path)):
            try:
                self.processor = AlbefProcessor.from_pretrained(self.model.name_or_path)
            except OSError as missing:  # a folder without the processor's files
                error = missing
        if self.processor is None:
            raise ValueError(
                f"{type(self).__name__} could not find the model's processor: pass `processor=AlbefProcessor...` "
                "(or `tokenizer=` and `image_processor=`) to `pipeline()`"
            ) from error
        # Batching pads text with this tokenizer.
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor

    def _init_itc_pipeline(self):
        """For the pipelines that read ITC embeddings (and ITM when the head exists): refuse other ALBEF heads."""
        if not isinstance(self.model, AlbefModel):
            raise ValueError(
                f"{self.task} reads ITC embeddings: it needs an AlbefModel or AlbefForRetrieval, got "
                f"{type(self.model).__name__}"
            )
        self._init_albef_processor()

    def _encode_images(self, images, timeout=None):
        pixel_values = self.processor(images=load_images(images, timeout), return_tensors="pt")["pixel_values"]
        return pixel_values.to(self.dtype)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the model, tokenizer and image processor (as every pipeline) and the processor, so that
        `pipeline(task, model=save_directory)` finds everything again."""
        super().save_pretrained(save_directory, **kwargs)
        if isinstance(self.processor, AlbefProcessor):
            self.processor.save_pretrained(save_directory)


class AlbefRetrievalModelLoader:
    """Loads a checkpoint for the retrieval pipeline as the head it was saved as: `AlbefForRetrieval` (ITC + ITM)
    when its `architectures` name a head with an ITM classifier, else `AlbefModel` (ITC only), so that an ITC-only
    checkpoint never gets a randomly initialised ITM head."""

    _itm_architectures = ("AlbefForRetrieval", "AlbefForPreTraining")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "local_files_only") if key in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        has_itm = any(name in cls._itm_architectures for name in config.architectures or ())
        model_class = AlbefForRetrieval if has_itm else AlbefModel
        return model_class.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
