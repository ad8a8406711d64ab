"""Model cards for converted ALBEF checkpoints.

One card template per checkpoint that salesforce/ALBEF released lives in the repository's top-level `model_cards/`
folder (Jinja2 templates rendered by `huggingface_hub.ModelCard.from_template`). This module holds the data that goes
into the cards' YAML metadata (`CARDS`: head class, pipeline tag, datasets, base model and the paper's results as
`huggingface_hub.EvalResult`s, each with its source) and fills a template:

    card = build_model_card("mscoco.pth", repo_id="someone/albef-retrieval-coco",
                            conversion_command="python convert/convert_albef_original_to_hf.py ...",
                            conversion_report=str(model.conversion_report))
    card.save("albef-retrieval-coco/README.md")

A checkpoint that is not one of the released files (a custom fine-tune) gets the generic `albef-custom` card, which
carries no evaluation results.

Metadata choices:
- `library_name` is `"transformers"`: the folders are transformers folders (`save_pretrained` layout, safetensors)
  and `transformers_albef.hub.save_for_hub` ships the model code with `auto_map` entries, so transformers' Auto
  classes load them with `trust_remote_code=True` even without this package (the Hub tags such repos `custom_code`
  and its generated snippet adds the flag). A repository published *without* that code should use
  `"transformers-albef"` instead (`build_model_card(..., library_name=...)`), since `model_type="albef"` is not part
  of transformers and the Hub's snippet would then fail.
- `eval_results` (the `model-index`) only holds numbers the paper reports *for the model in the repository*. Numbers
  of models fine-tuned from a pre-trained checkpoint, or whose link to the released file is not established, are
  shown in the card's prose table only (`PaperResult.in_model_index=False`), with the reason.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PAPER_URL = "https://arxiv.org/abs/2107.07651"
PAPER = "ALBEF paper (Li et al., NeurIPS 2021, arXiv:2107.07651)"
LICENSE = "bsd-3-clause"
LIBRARY_NAME = "transformers"
BASE_TAGS = ("albef", "vision-language")
FALLBACK_CARD = "albef-custom"
DEFAULT_INSTALL_COMMAND = "pip install transformers-albef"
CONVERT_SCRIPT = "python convert/convert_albef_original_to_hf.py"

# Later papers that print the ALBEF rows: the numbers below were checked against them (the paper's own tables
# could not be opened where this module was written).
BLIP = "BLIP (Li et al., ICML 2022, arXiv:2201.12086)"
BEIT3 = "BEiT-3 (Wang et al., arXiv:2208.10442)"
VICHA = "ViCHA (Shukor et al., BMVC 2022, arXiv:2208.13628)"
SIMLA = "SIMLA (Khan et al., ECCV 2022, arXiv:2203.14395)"

# Hugging Face Hub dataset ids used in `datasets:` and in the model-index.
COCO = "yerevann/coco-karpathy"
FLICKR30K = "nlphuji/flickr30k"
VQAV2 = "HuggingFaceM4/VQAv2"
VISUAL_GENOME = "ranjaykrishna/visual_genome"
CC3M = "google-research-datasets/conceptual_captions"
CC12M = "google-research-datasets/conceptual_12m"
SBU = "vicenteor/sbu_captions"
REFCOCO_PLUS = "lmms-lab/RefCOCOplus"
PRETRAIN_4M = (COCO, VISUAL_GENOME, CC3M, SBU)
PRETRAIN_14M = (COCO, VISUAL_GENOME, CC3M, SBU, CC12M)

# Head class and pipeline tag of each converter kind (`convert_albef_original_to_hf.py --kind`), for custom cards.
KIND_HEADS = {
    "pretrain": "AlbefForPreTraining",
    "retrieval": "AlbefForRetrieval",
    "grounding": "AlbefForRetrieval",
    "vqa": "AlbefForQuestionAnswering",
    "nlvr": "AlbefForVisualReasoning",
    "text_assignment": "AlbefForTextAssignment",
    "ve": "AlbefForVisualEntailment",
    "itc": "AlbefModel",
}
# Converter kinds that are settings of another kind.
KIND_ALIASES = {"retrieval_coco": "retrieval", "retrieval_flickr": "retrieval"}
KIND_PIPELINE_TAGS = {
    "pretrain": "zero-shot-image-classification",
    "retrieval": "zero-shot-image-classification",
    "itc": "zero-shot-image-classification",
    "vqa": "visual-question-answering",
}
KIND_TAGS = {
    "pretrain": ("pretraining", "image-text-retrieval"),
    "retrieval": ("image-text-retrieval", "image-text-matching"),
    "grounding": ("visual-grounding", "grad-cam"),
    "vqa": ("visual-question-answering",),
    "nlvr": ("visual-reasoning", "nlvr2"),
    "text_assignment": ("visual-reasoning", "nlvr2", "pretraining"),
    "ve": ("visual-entailment", "snli-ve"),
    "itc": ("image-text-retrieval",),
}


@dataclass(frozen=True)
class PaperResult:
    """One number reported in the ALBEF paper, with where it comes from.

    `value` is kept as the paper prints it (`"100.0"`, `"75.84"`); the metadata gets `float(value)`.
    `in_model_index=False` keeps the number out of the YAML `model-index` (it is then only shown in the card's
    table, e.g. results of a model fine-tuned *from* the checkpoint); `note` says why or adds context.
    """

    task_type: str
    task_name: str
    dataset_type: str
    dataset_name: str
    dataset_split: str
    metric_type: str
    metric_name: str
    value: str
    source: str
    checked_against: tuple[str, ...] = ()
    in_model_index: bool = True
    note: str = ""

    def to_eval_result(self) -> EvalResult:
        return EvalResult(
            task_type=self.task_type,
            task_name=self.task_name,
            dataset_type=self.dataset_type,
            dataset_name=self.dataset_name,
            dataset_split=self.dataset_split,
            metric_type=self.metric_type,
            metric_name=self.metric_name,
            metric_value=float(self.value),
            source_name=self.source,
            source_url=PAPER_URL,
        )


@dataclass(frozen=True)
class CardSpec:
    """What the card of one released checkpoint says in its metadata."""

    name: str  # card name = template file stem = suggested repository name
    checkpoint_file: str  # the released file (salesforce/ALBEF README)
    head_class: str
    kinds: tuple[str, ...]  # converter kinds this card describes; the first is the default
    image_size: int
    pipeline_tag: str | None
    tags: tuple[str, ...]
    datasets: tuple[str, ...]
    base_card: str | None = None  # the card of the checkpoint this one was fine-tuned from
    results: tuple[PaperResult, ...] = ()
    config_overrides: dict = field(default_factory=dict)  # `from_original(..., **config_overrides)`
    aliases: tuple[str, ...] = ()  # other file names of the same checkpoint

    @property
    def template(self) -> str:
        return f"{self.name}.md"

    @property
    def eval_results(self) -> list[EvalResult]:
        return [result.to_eval_result() for result in self.results if result.in_model_index]

    def default_conversion_command(self, kind: str | None = None, checkpoint_file: str | None = None) -> str:
        """The converter call for this card (`--kind` left out when unknown: the checkpoint's own kind)."""
        checkpoint = checkpoint_file or self.checkpoint_file
        command = f"{CONVERT_SCRIPT} --checkpoint {checkpoint} --output-dir {self.name}"
        return f"{command} --kind {kind}" if kind else command


def _retrieval(
    dataset_type: str,
    dataset_name: str,
    tr: tuple[str, str, str],
    ir: tuple[str, str, str],
    table: str,
    checked_against: tuple[str, ...],
    zero_shot: bool = False,
    in_model_index: bool = True,
    note: str = "",
) -> tuple[PaperResult, ...]:
    """R@1/5/10 of image-to-text (TR) and text-to-image (IR) retrieval on one test set."""
    setting = "zero-shot" if zero_shot else "fine-tuned"
    rows = []
    for task_type, short, task_name, values in (
        ("image-to-text-retrieval", "TR", "Image-to-text retrieval", tr),
        ("text-to-image-retrieval", "IR", "Text-to-image retrieval", ir),
    ):
        for k, value in zip((1, 5, 10), values):
            rows.append(
                PaperResult(
                    task_type=task_type,
                    task_name=f"{task_name} ({setting})",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split="test",
                    metric_type=f"recall@{k}",
                    metric_name=f"{short}@{k}",
                    value=value,
                    source=f"{PAPER}, {table}",
                    checked_against=checked_against,
                    in_model_index=in_model_index,
                    note=note,
                )
            )
    return tuple(rows)


def _accuracy(
    task_type: str,
    task_name: str,
    dataset_type: str,
    dataset_name: str,
    split: str,
    value: str,
    table: str,
    checked_against: tuple[str, ...],
    in_model_index: bool = True,
    note: str = "",
) -> PaperResult:
    return PaperResult(
        task_type=task_type,
        task_name=task_name,
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=split,
        metric_type="accuracy",
        metric_name=f"Accuracy ({split})",
        value=value,
        source=f"{PAPER}, {table}",
        checked_against=checked_against,
        in_model_index=in_model_index,
        note=note,
    )


COCO_5K = "COCO 5K test (Karpathy split)"
FLICKR_1K = "Flickr30K 1K test"
_FROM_14M = "model fine-tuned from this checkpoint (not in the model-index)"
_FROM_4M = "model fine-tuned from this checkpoint; no fine-tuned 4M model was released (not in the model-index)"

# 14M rows: fine-tuned retrieval (Table 2), zero-shot Flickr30K with the COCO-fine-tuned model (Table 3),
# VQA and NLVR2 (Table 4). Checked against BLIP Tables 5, 6 and 8 and BEiT-3's comparison tables.
_COCO_14M = dict(
    tr=("77.6", "94.3", "97.2"), ir=("60.7", "84.3", "90.5"), table="Table 2", checked_against=(BLIP, BEIT3)
)
_FLICKR_14M = dict(
    tr=("95.9", "99.8", "100.0"), ir=("85.6", "97.5", "98.9"), table="Table 2", checked_against=(BLIP, BEIT3)
)
_ZS_FLICKR_14M = dict(
    tr=("94.1", "99.5", "99.7"), ir=("82.8", "96.3", "98.1"), table="Table 3", checked_against=(BLIP,)
)
# 4M rows, checked against ViCHA Tables 1-3 and SIMLA Tables 2-3 (both print ALBEF's 4M rows).
_COCO_4M = dict(
    tr=("73.1", "91.4", "96.0"), ir=("56.8", "81.5", "89.2"), table="Table 2", checked_against=(VICHA, SIMLA)
)
_FLICKR_4M = dict(
    tr=("94.3", "99.4", "99.8"), ir=("82.8", "96.7", "98.4"), table="Table 2", checked_against=(VICHA, SIMLA)
)
_ZS_FLICKR_4M = dict(
    tr=("90.5", "98.8", "99.7"), ir=("76.8", "93.7", "96.7"), table="Table 3", checked_against=(VICHA, SIMLA)
)


def _table4_accuracy(task: tuple[str, str, str, str], splits: dict[str, str], checked: tuple[str, ...], **kwargs):
    """Accuracy rows of one Table 4 task; `task` is (task type, task name, dataset type, dataset name)."""
    return tuple(_accuracy(*task, split, value, "Table 4", checked, **kwargs) for split, value in splits.items())


_VQA = ("visual-question-answering", "Visual question answering", VQAV2, "VQA v2")
_NLVR2 = ("visual-reasoning", "Visual reasoning (NLVR2)", "nlvr2", "NLVR2")
_SNLI_VE = ("visual-entailment", "Visual entailment (SNLI-VE)", "snli-ve", "SNLI-VE")


def _vqa(test_dev: str, test_std: str, checked: tuple[str, ...], **kwargs) -> tuple[PaperResult, ...]:
    return _table4_accuracy(_VQA, {"test-dev": test_dev, "test-std": test_std}, checked, **kwargs)


def _nlvr2(dev: str, test_p: str, checked: tuple[str, ...], **kwargs) -> tuple[PaperResult, ...]:
    return _table4_accuracy(_NLVR2, {"dev": dev, "test-P": test_p}, checked, **kwargs)


def _snli_ve(val: str, test: str, checked: tuple[str, ...], **kwargs) -> tuple[PaperResult, ...]:
    return _table4_accuracy(_SNLI_VE, {"val": val, "test": test}, checked, **kwargs)


def _grounding(val: str, test_a: str, test_b: str, **kwargs) -> tuple[PaperResult, ...]:
    return tuple(
        PaperResult(
            task_type="visual-grounding",
            task_name="Weakly-supervised visual grounding",
            dataset_type=REFCOCO_PLUS,
            dataset_name="RefCOCO+",
            dataset_split=split,
            metric_type="accuracy",
            metric_name=f"Accuracy@IoU0.5 ({split})",
            value=value,
            source=f"{PAPER}, Table 5",
            checked_against=(VICHA, SIMLA),
            **kwargs,
        )
        for split, value in (("val", val), ("testA", test_a), ("testB", test_b))
    )


_GROUNDING_NOTE = (
    "not in the model-index: ViCHA and SIMLA list this row as ALBEF pre-trained on 4M images, while the authors "
    "say the released checkpoints come from 14M pre-training (salesforce/ALBEF#12), so it is not established that "
    "refcoco.pth is the model behind it"
)

_SPECS = (
    CardSpec(
        name="albef-pretrain-14m",
        checkpoint_file="ALBEF.pth",
        aliases=("ALBEF_14M.pth",),
        head_class="AlbefForPreTraining",
        kinds=("pretrain",),
        image_size=256,
        pipeline_tag="zero-shot-image-classification",
        tags=KIND_TAGS["pretrain"],
        datasets=PRETRAIN_14M,
        results=(
            *_retrieval(COCO, COCO_5K, **_COCO_14M, in_model_index=False, note=_FROM_14M),
            *_retrieval(FLICKR30K, FLICKR_1K, **_FLICKR_14M, in_model_index=False, note=_FROM_14M),
            *_retrieval(
                FLICKR30K,
                FLICKR_1K,
                **_ZS_FLICKR_14M,
                zero_shot=True,
                in_model_index=False,
                note="the COCO-fine-tuned model (mscoco.pth) evaluated on Flickr30K, not this checkpoint "
                "(salesforce/ALBEF#29, #89)",
            ),
            *_vqa("75.84", "76.04", (BLIP, BEIT3), in_model_index=False, note=_FROM_14M),
            *_nlvr2(
                "82.55",
                "83.14",
                (BLIP, BEIT3),
                in_model_index=False,
                note="after text-assignment pre-training and NLVR2 fine-tuning (not in the model-index)",
            ),
        ),
    ),
    CardSpec(
        name="albef-pretrain-4m",
        checkpoint_file="ALBEF_4M.pth",
        head_class="AlbefForPreTraining",
        kinds=("pretrain",),
        image_size=256,
        pipeline_tag="zero-shot-image-classification",
        tags=KIND_TAGS["pretrain"],
        datasets=PRETRAIN_4M,
        results=(
            *_retrieval(COCO, COCO_5K, **_COCO_4M, in_model_index=False, note=_FROM_4M),
            *_retrieval(FLICKR30K, FLICKR_1K, **_FLICKR_4M, in_model_index=False, note=_FROM_4M),
            *_retrieval(
                FLICKR30K,
                FLICKR_1K,
                **_ZS_FLICKR_4M,
                zero_shot=True,
                in_model_index=False,
                note="a COCO-fine-tuned 4M model evaluated on Flickr30K (not released; not in the model-index)",
            ),
            *_vqa("74.54", "74.70", (VICHA,), in_model_index=False, note=_FROM_4M),
            *_nlvr2("80.24", "80.50", (VICHA,), in_model_index=False, note=_FROM_4M),
            *_snli_ve("80.14", "80.30", (VICHA,), in_model_index=False, note=_FROM_4M),
        ),
    ),
    CardSpec(
        name="albef-retrieval-coco",
        checkpoint_file="mscoco.pth",
        head_class="AlbefForRetrieval",
        kinds=("retrieval",),
        image_size=384,
        pipeline_tag="zero-shot-image-classification",
        tags=KIND_TAGS["retrieval"],
        datasets=(COCO,),
        base_card="albef-pretrain-14m",
        results=(
            *_retrieval(COCO, COCO_5K, **_COCO_14M),
            *_retrieval(
                FLICKR30K,
                FLICKR_1K,
                **_ZS_FLICKR_14M,
                zero_shot=True,
                note="this COCO model evaluated on Flickr30K without Flickr30K training (salesforce/ALBEF#89); a user "
                "reported reproducing these numbers with the released COCO model (salesforce/ALBEF#29)",
            ),
        ),
        config_overrides={"retrieval_k": 256},
    ),
    CardSpec(
        name="albef-retrieval-flickr30k",
        checkpoint_file="flickr30k.pth",
        head_class="AlbefForRetrieval",
        kinds=("retrieval",),
        image_size=384,
        pipeline_tag="zero-shot-image-classification",
        tags=KIND_TAGS["retrieval"],
        datasets=(FLICKR30K,),
        base_card="albef-pretrain-14m",
        results=_retrieval(FLICKR30K, FLICKR_1K, **_FLICKR_14M),
        config_overrides={"retrieval_k": 128},
    ),
    CardSpec(
        name="albef-vqa",
        checkpoint_file="vqa.pth",
        head_class="AlbefForQuestionAnswering",
        kinds=("vqa",),
        image_size=384,
        pipeline_tag="visual-question-answering",
        tags=KIND_TAGS["vqa"],
        datasets=(VQAV2, VISUAL_GENOME),
        base_card="albef-pretrain-14m",
        results=_vqa("75.84", "76.04", (BLIP, BEIT3)),
        config_overrides={"answer_rank_k": 128},
    ),
    CardSpec(
        name="albef-grounding-refcoco-plus",
        checkpoint_file="refcoco.pth",
        head_class="AlbefForRetrieval",
        kinds=("grounding", "retrieval"),
        image_size=384,
        pipeline_tag=None,
        tags=KIND_TAGS["grounding"],
        datasets=(REFCOCO_PLUS,),
        base_card="albef-pretrain-14m",
        results=_grounding("58.46", "65.89", "46.25", in_model_index=False, note=_GROUNDING_NOTE),
    ),
    CardSpec(
        name="albef-nlvr2-text-assignment",
        checkpoint_file="pretrain_model_nlvr.pth",
        head_class="AlbefForTextAssignment",
        kinds=("text_assignment",),
        image_size=256,
        pipeline_tag=None,
        tags=KIND_TAGS["text_assignment"],
        datasets=PRETRAIN_4M,
        base_card="albef-pretrain-14m",
        results=_nlvr2(
            "82.55",
            "83.14",
            (BLIP, BEIT3),
            in_model_index=False,
            note="after NLVR2 fine-tuning from this checkpoint; the fine-tuned model was not released "
            "(not in the model-index)",
        ),
    ),
)

# Released file name -> card data (the brief's `CARDS`), and the same by card name.
CARDS: dict[str, CardSpec] = {spec.checkpoint_file: spec for spec in _SPECS}
CARDS_BY_NAME: dict[str, CardSpec] = {spec.name: spec for spec in _SPECS}
_FILE_NAMES = {name.lower(): spec.name for spec in _SPECS for name in (spec.checkpoint_file, *spec.aliases)}

CUSTOM_CARD = CardSpec(
    name=FALLBACK_CARD,
    checkpoint_file="",
    head_class="AlbefModel",
    kinds=tuple(KIND_HEADS),
    image_size=384,
    pipeline_tag=None,
    tags=(),
    datasets=(),
)


def _stem(path: str | Path) -> str:
    name = Path(str(path)).name.lower()
    for suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def card_for_checkpoint(path: str | Path, kind: str | None = None) -> str:
    """The card name for a checkpoint file: one of the released files (`ALBEF.pth`, `ALBEF_4M.pth`, `mscoco.pth`,
    `flickr30k.pth`, `refcoco.pth`, `vqa.pth`, `pretrain_model_nlvr.pth`, matched by file name in any folder, any
    case, with `.pth`/`.pt`/`.bin`/`.safetensors`) or `"albef-custom"` for anything else. When `kind` (the converter's
    `--kind`) is given and is not a kind the released card describes (e.g. `ALBEF.pth` converted into a VQA head,
    which is an untrained initialisation), the custom card is returned too."""
    kind = KIND_ALIASES.get(kind, kind)
    stems = {_stem(name): card for name, card in _FILE_NAMES.items()}
    card = stems.get(_stem(path))
    if card is None:
        return FALLBACK_CARD
    if kind is not None and kind not in CARDS_BY_NAME[card].kinds:
        return FALLBACK_CARD
    return card


def default_templates_dir() -> Path:
    """The repository's `model_cards/` folder, found next to `src/` (editable installs and source checkouts)."""
    return Path(__file__).resolve().parents[2] / "model_cards"


def _resolve_spec(
    card_name_or_checkpoint_file: str | Path, kind: str | None
) -> tuple[CardSpec, str | None, str | None]:
    """The card spec, the checkpoint's file name (None for a card name) and, for a released file converted into
    another head (custom card), the card of that released file (its base model)."""
    text = str(card_name_or_checkpoint_file)
    if text in CARDS_BY_NAME:
        return CARDS_BY_NAME[text], None, None
    if text == FALLBACK_CARD:
        return CUSTOM_CARD, None, None
    released = card_for_checkpoint(text)
    name = card_for_checkpoint(text, kind)
    if name == FALLBACK_CARD:
        return CUSTOM_CARD, Path(text).name, None if released == FALLBACK_CARD else released
    return CARDS_BY_NAME[name], Path(text).name, None


def results_table(results: tuple[PaperResult, ...] | list[PaperResult]) -> str:
    """The card's Markdown table of paper results: the same numbers as the metadata, R@1/5/10 (or any metrics of one
    task, dataset and split from one source) on one row, with numbered notes."""
    if not results:
        return "_No published results for this checkpoint._"
    groups: list[list[PaperResult]] = []
    for r in results:
        key = (r.task_name, r.dataset_name, r.dataset_split, r.source, r.in_model_index, r.note, r.checked_against)
        last = groups[-1][0] if groups else None
        if last is not None and key == (
            last.task_name,
            last.dataset_name,
            last.dataset_split,
            last.source,
            last.in_model_index,
            last.note,
            last.checked_against,
        ):
            groups[-1].append(r)
        else:
            groups.append([r])
    notes = list(dict.fromkeys(r.note for r in results if r.note))
    lines = [
        "| task | dataset | split | metric | value | in model-index | source | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in groups:
        first = group[0]
        metric = " / ".join(r.metric_name for r in group)
        value = " / ".join(r.value for r in group)
        source = first.source.replace(f"{PAPER}, ", "ALBEF paper, ")
        note = f"({notes.index(first.note) + 1})" if first.note else ""
        lines.append(
            f"| {first.task_name} | {first.dataset_name} | {first.dataset_split} | {metric} | {value} | "
            f"{'yes' if first.in_model_index else 'no'} | {source} | {note} |"
        )
    if notes:
        lines.append("")
        lines.extend(f"({i}) {note[0].upper()}{note[1:]}." for i, note in enumerate(notes, 1))
    sources = sorted({name for r in results for name in r.checked_against})
    if sources:
        lines.append("")
        lines.append(
            f"The ALBEF paper is {PAPER_URL}. Each value was checked against the ALBEF rows printed by at least one "
            "later paper: " + "; ".join(sources) + "."
        )
    return "\n".join(lines)


def _model_kind(model) -> str | None:
    name = type(model).__name__
    return next((kind for kind, head in KIND_HEADS.items() if head == name), None)


def build_model_card(
    card_name_or_checkpoint_file: str | Path,
    repo_id: str,
    conversion_command: str | None = None,
    conversion_report: str = "",
    templates_dir: str | Path | None = None,
    *,
    model=None,
    kind: str | None = None,
    base_model: str | None = None,
    head_class: str | None = None,
    image_size: int | None = None,
    conversion_date: str | None = None,
    install_command: str = DEFAULT_INSTALL_COMMAND,
    library_name: str = LIBRARY_NAME,
) -> ModelCard:
    """Fill the card template of a released checkpoint (by card name, e.g. `"albef-retrieval-coco"`, or by file,
    e.g. `"mscoco.pth"`) or the generic custom card for any other file.

    Args:
        card_name_or_checkpoint_file: a card name (`CARDS_BY_NAME`, or `"albef-custom"`) or a checkpoint path.
        repo_id: the Hub repository (or local folder) the converted model is published as; used in the code.
        conversion_command: the command that produced the folder (default: the standard converter call).
        conversion_report: the converter's key report (`str(model.conversion_report)`), shown folded.
        templates_dir: folder with the `*.md` templates (default: the repository's `model_cards/`).
        model: the converted model. Its class and image size pick the card: a released file converted into another
            head, or to another resolution, gets the custom card (it is an initialisation, not the released model).
        kind: the converter's `--kind` (`"retrieval_flickr"` counts as `"retrieval"`); same effect as `model`.
            Without `model`, `kind` or `head_class` the custom card's code reads the class from `config.json`.
        base_model: the `base_model` metadata. Default for fine-tuned cards (and for a released file converted
            into another head): that checkpoint's card name in `repo_id`'s namespace (e.g.
            `someone/albef-pretrain-14m`); pass `""` for none.
        head_class / image_size: for the custom card (default: from `model`, else the class from `kind`).
        conversion_date: ISO date shown in the card (default: today, UTC).
        install_command: the install line shown in the card.
        library_name: the `library_name` metadata (see the module docstring).
    """
    kind = KIND_ALIASES.get(kind, kind)
    if model is not None:
        kind = kind or _model_kind(model)
        head_class = head_class or type(model).__name__
        image_size = image_size or model.config.vision_config.image_size
    if head_class is not None and kind is None:
        kind = next((k for k, head in KIND_HEADS.items() if head == head_class), None)
    spec, file_name, origin_card = _resolve_spec(card_name_or_checkpoint_file, kind)
    if spec is not CUSTOM_CARD and model is not None:
        if head_class != spec.head_class or image_size != spec.image_size:
            spec, file_name, origin_card = CUSTOM_CARD, file_name or spec.checkpoint_file, spec.name
    custom = spec is CUSTOM_CARD
    templates = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    template_path = templates / spec.template
    if not template_path.is_file():
        where = "the given templates_dir" if templates_dir is not None else "the repository's model_cards/ folder"
        raise FileNotFoundError(
            f"Model card template {spec.template!r} not found in {where} ({templates}). The templates ship with the "
            "source repository, not with the installed package: pass templates_dir=<checkout>/model_cards."
        )

    if custom:
        # Without `model`, `kind` or `head_class` the card reads the class from the saved config.json instead.
        head = head_class or KIND_HEADS.get(kind)
        size = image_size
        pipeline_tag = KIND_PIPELINE_TAGS.get(kind)
        tags = (*BASE_TAGS, *KIND_TAGS.get(kind, ()))
    else:
        kind = kind or spec.kinds[0]
        head, size, pipeline_tag = spec.head_class, spec.image_size, spec.pipeline_tag
        tags = (*BASE_TAGS, *spec.tags)

    base_card = spec.base_card or origin_card
    if base_model is None and base_card and "/" in repo_id:
        base_model = f"{repo_id.rsplit('/', 1)[0]}/{base_card}"
    eval_results = spec.eval_results or None
    model_name = repo_id.rstrip("/").split("/")[-1]
    card_data = ModelCardData(
        library_name=library_name,
        license=LICENSE,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        datasets=list(spec.datasets) or None,
        base_model=base_model or None,
        eval_results=eval_results,
        model_name=model_name if eval_results else None,
    )
    if conversion_command is None:
        conversion_command = spec.default_conversion_command(kind, file_name)
    from . import __version__

    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        base_model_repo=base_model or "",
        conversion_command=conversion_command.strip(),
        conversion_report=(conversion_report or "").strip(),
        conversion_date=conversion_date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        package_version=__version__,
        install_command=install_command,
        results_table=results_table(spec.results),
        head_class=head,
        image_size=size,
        kind=kind or "custom",
        checkpoint_file=file_name or spec.checkpoint_file or "a custom checkpoint",
    )
    # Jinja leaves the blank lines of `{% if %}` blocks; keep the Markdown tidy.
    card.content = re.sub(r"\n{3,}", "\n\n", card.content)
    return card


__all__ = [
    "CARDS",
    "CARDS_BY_NAME",
    "CUSTOM_CARD",
    "CardSpec",
    "FALLBACK_CARD",
    "PaperResult",
    "build_model_card",
    "card_for_checkpoint",
    "default_templates_dir",
    "results_table",
]
