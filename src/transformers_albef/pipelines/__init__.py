"""transformers pipelines for ALBEF, registered by `register_pipelines()` (called on `import transformers_albef`).

Where transformers has the task, its own pipeline works with ALBEF unmodified (the model and the tokenizer follow
its contracts): `zero-shot-image-classification` (`AlbefModel`), `image-feature-extraction` and
`feature-extraction` (`AlbefModel`: the L2-normalised ITC embedding is the first output). Nothing of transformers
is replaced. ALBEF adds tasks only where transformers has none:

| task | pipeline class | model |
|---|---|---|
| `albef-image-text-retrieval` | `AlbefImageTextRetrievalPipeline` | `AlbefForRetrieval` or `AlbefModel` |
| `albef-visual-question-answering` | `AlbefVisualQuestionAnsweringPipeline` | `AlbefForQuestionAnswering` |

and classes to pass as `pipeline(task, ..., pipeline_class=...)` for ALBEF's extras on a transformers task:
`AlbefZeroShotImageClassificationPipeline` (prompt ensembles, the original caption cleaning, ITM re-ranking of the
best labels with an `AlbefForRetrieval`), `AlbefImageFeatureExtractionPipeline` /
`AlbefTextFeatureExtractionPipeline` (one `(1, embed_dim)` vector per input). transformers 5.22+ rejects the name
`visual-question-answering` even when registered, hence the `albef-` prefix.
"""

from transformers import AutoModelForVisualQuestionAnswering
from transformers.pipelines import PIPELINE_REGISTRY

from .base import AlbefRetrievalModelLoader
from .feature_extraction import AlbefImageFeatureExtractionPipeline, AlbefTextFeatureExtractionPipeline
from .image_text_retrieval import AlbefImageTextRetrievalPipeline
from .visual_question_answering import AlbefVisualQuestionAnsweringPipeline
from .zero_shot_image_classification import AlbefZeroShotImageClassificationPipeline

ALBEF_PIPELINES = {
    "albef-image-text-retrieval": (AlbefImageTextRetrievalPipeline, AlbefRetrievalModelLoader),
    "albef-visual-question-answering": (AlbefVisualQuestionAnsweringPipeline, AutoModelForVisualQuestionAnswering),
}


def register_pipelines():
    """Register the ALBEF tasks with `transformers.pipeline` (idempotent)."""
    tasks = PIPELINE_REGISTRY.supported_tasks
    for task, (pipeline_class, model_class) in ALBEF_PIPELINES.items():
        if tasks.get(task, {}).get("impl") is not pipeline_class:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=pipeline_class, pt_model=model_class, type="multimodal"
            )
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
