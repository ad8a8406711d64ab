"""ALBEF's model folder: configuration, modeling, processing and image processing, self-contained."""

from .configuration_albef import ALBEF_PRESETS, AlbefConfig, AlbefTextConfig, AlbefVisionConfig
from .image_processing_albef import AlbefImageProcessor
from .modeling_albef import (
    AlbefAnswerRanking,
    AlbefClassifierOutput,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForRetrieval,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    AlbefModel,
    AlbefOutput,
    AlbefPreTrainedModel,
    AlbefQuestionAnsweringOutput,
    AlbefTextModel,
    AlbefVisionModel,
)
from .processing_albef import AlbefProcessor, pre_caption, pre_question
from .tokenization_albef import AlbefTokenizer

__all__ = [
    "ALBEF_PRESETS",
    "AlbefAnswerRanking",
    "AlbefClassifierOutput",
    "AlbefConfig",
    "AlbefForPreTraining",
    "AlbefForQuestionAnswering",
    "AlbefForRetrieval",
    "AlbefForTextAssignment",
    "AlbefForVisualEntailment",
    "AlbefForVisualReasoning",
    "AlbefImageProcessor",
    "AlbefModel",
    "AlbefOutput",
    "AlbefPreTrainedModel",
    "AlbefProcessor",
    "AlbefQuestionAnsweringOutput",
    "AlbefTextConfig",
    "AlbefTextModel",
    "AlbefTokenizer",
    "AlbefVisionConfig",
    "AlbefVisionModel",
    "pre_caption",
    "pre_question",
]
