"""transformers-albef: ALBEF (Align before Fuse, Li et al., NeurIPS 2021) as a first-class transformers model.

Importing the package registers the configurations, models and processors with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)

from . import hub
from .bundled import bundled_model_path
from .grounding import AlbefGradCamOutput
from .models.albef import (
    ALBEF_PRESETS,
    AlbefAnswerRanking,
    AlbefClassifierOutput,
    AlbefConfig,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForRetrieval,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    AlbefImageProcessor,
    AlbefModel,
    AlbefOutput,
    AlbefPreTrainedModel,
    AlbefProcessor,
    AlbefQuestionAnsweringOutput,
    AlbefTextConfig,
    AlbefTextModel,
    AlbefTokenizer,
    AlbefVisionConfig,
    AlbefVisionModel,
    pre_caption,
    pre_question,
)
from .models.albef.modeling_albef import mask_tokens
from .pipelines import register_pipelines
from .retrieval import chunked_retrieval_score_matrices
from .retrieval_index import RetrievalEngine, RetrievalIndex

__version__ = "0.1.0"


def _register():
    for config in (AlbefConfig, AlbefTextConfig, AlbefVisionConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoModel.register(AlbefTextConfig, AlbefTextModel, exist_ok=True)
    AutoModel.register(AlbefVisionConfig, AlbefVisionModel, exist_ok=True)
    AutoModelForPreTraining.register(AlbefConfig, AlbefForPreTraining, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoModelForSequenceClassification.register(AlbefConfig, AlbefForVisualEntailment, exist_ok=True)
    AutoModelForVisualQuestionAnswering.register(AlbefConfig, AlbefForQuestionAnswering, exist_ok=True)
    # One exact (PIL) implementation serves both backends: torchvision resizing differs from the original's.
    AutoImageProcessor.register(
        AlbefConfig,
        image_processor_classes={"pil": AlbefImageProcessor, "torchvision": AlbefImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(AlbefConfig, AlbefProcessor, exist_ok=True)
    AutoTokenizer.register(AlbefConfig, fast_tokenizer_class=AlbefTokenizer, exist_ok=True)


_register()
register_pipelines()

__all__ = [
    "hub",
    "bundled_model_path",
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
    "AlbefGradCamOutput",
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
    "RetrievalEngine",
    "RetrievalIndex",
    "chunked_retrieval_score_matrices",
    "mask_tokens",
    "pre_caption",
    "pre_question",
    "register_pipelines",
]
