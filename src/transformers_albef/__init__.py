"""transformers-albef: ALBEF (Align before Fuse, Li et al., NeurIPS 2021) as a first-class transformers model.

Importing the package registers the configurations, models and processors with transformers' Auto classes (and the
ALBEF tasks with `transformers.pipeline`): at once when transformers' Auto classes are loaded already, otherwise as
soon as they are (see `_registration.py`), so that `import transformers_albef` itself stays light (no torch) and
`albef --help` is instant. The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _registration

__version__ = "0.1.0"

# public name -> the module that defines it (relative to this package)
_LAZY_NAMES = {
    "bundled_model_path": ".bundled",
    "bundled_samples_path": ".bundled",
    "AlbefGradCamOutput": ".grounding",
    **dict.fromkeys(
        (
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
        ),
        ".models.albef",
    ),
    "mask_tokens": ".models.albef.modeling_albef",
    "register_pipelines": ".pipelines",
    "chunked_retrieval_score_matrices": ".retrieval",
    "RetrievalEngine": ".retrieval_index",
    "RetrievalIndex": ".retrieval_index",
}
# submodules reachable as attributes (`ta.hub`, `ta.models.albef...`) before anything imported them
_SUBMODULES = (
    "bundled",
    "cli",
    "conversion",
    "grounding",
    "hub",
    "model_card",
    "models",
    "pipelines",
    "retrieval",
    "retrieval_backends",
    "retrieval_index",
    "training",
    "visualization",
)

__all__ = [
    "hub",
    "bundled_model_path",
    "bundled_samples_path",
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


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


if TYPE_CHECKING:  # what static tools and IDEs see: the same names, imported eagerly
    from . import hub
    from .bundled import bundled_model_path, bundled_samples_path
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

_registration.install()
