"""transformers pipelines for ALBEF, registered by `register_pipelines()` (called on `import transformers_albef`).

| task | pipeline class | model |
|---|---|---|
| `zero-shot-image-classification` | `AlbefZeroShotImageClassificationPipeline` | `AlbefModel` (`AlbefForRetrieval`) |
| `albef-image-text-retrieval` | `AlbefImageTextRetrievalPipeline` | `AlbefForRetrieval` or `AlbefModel` |
| `albef-visual-question-answering` | `AlbefVisualQuestionAnsweringPipeline` | `AlbefForQuestionAnswering` |
| `albef-image-feature-extraction` | `AlbefImageFeatureExtractionPipeline` | `AlbefModel` |
| `albef-text-feature-extraction` | `AlbefTextFeatureExtractionPipeline` | `AlbefModel` |

`zero-shot-image-classification` keeps its name: its implementation is replaced by a subclass that encodes ALBEF
prompts with the `AlbefProcessor` and is transformers' own pipeline for every other model. The other tasks are new
names (transformers 5.22+ rejects `visual-question-answering` even when registered).
"""

from transformers import AutoModel, AutoModelForVisualQuestionAnswering
from transformers.pipelines import PIPELINE_REGISTRY

from .base import AlbefRetrievalModelLoader
from .feature_extraction import AlbefImageFeatureExtractionPipeline, AlbefTextFeatureExtractionPipeline
from .image_text_retrieval import AlbefImageTextRetrievalPipeline
from .visual_question_answering import AlbefVisualQuestionAnsweringPipeline
from .zero_shot_image_classification import AlbefZeroShotImageClassificationPipeline

ALBEF_PIPELINES = {
    "albef-image-text-retrieval": (AlbefImageTextRetrievalPipeline, AlbefRetrievalModelLoader),
    "albef-visual-question-answering": (AlbefVisualQuestionAnsweringPipeline, AutoModelForVisualQuestionAnswering),
    "albef-image-feature-extraction": (AlbefImageFeatureExtractionPipeline, AutoModel),
    "albef-text-feature-extraction": (AlbefTextFeatureExtractionPipeline, AutoModel),
}
ZERO_SHOT_TASK = "zero-shot-image-classification"


def register_pipelines():
    """Register the ALBEF tasks with `transformers.pipeline` (idempotent)."""
    tasks = PIPELINE_REGISTRY.supported_tasks
    for task, (pipeline_class, model_class) in ALBEF_PIPELINES.items():
        if tasks.get(task, {}).get("impl") is not pipeline_class:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=pipeline_class, pt_model=model_class, type="multimodal"
            )
    # Only the implementation changes: the task keeps its model classes and default checkpoint.
    tasks[ZERO_SHOT_TASK] = {**tasks[ZERO_SHOT_TASK], "impl": AlbefZeroShotImageClassificationPipeline}
    # `register_pipeline` marks a class as remote code, which `Pipeline.save_pretrained` would copy next to the model
    # (relative imports and all) and name in its config; these pipelines come with the package instead.
    for pipeline_class, _ in ALBEF_PIPELINES.values():
        if "_registered_impl" in pipeline_class.__dict__:
            del pipeline_class._registered_impl


__all__ = [
    "AlbefImageFeatureExtractionPipeline",
    "AlbefImageTextRetrievalPipeline",
    "AlbefTextFeatureExtractionPipeline",
    "AlbefVisualQuestionAnsweringPipeline",
    "AlbefZeroShotImageClassificationPipeline",
    "register_pipelines",
]
