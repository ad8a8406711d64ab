"""Model cards: every template renders, its metadata parses back, every number has a source, the code runs."""

import ast
import re

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load

import transformers_albef as ta
from transformers_albef import model_card as mc

from .tiny_models import TWO_IMAGES, tiny_config

RELEASED_FILES = [
    "ALBEF.pth",
    "ALBEF_4M.pth",
    "mscoco.pth",
    "flickr30k.pth",
    "vqa.pth",
    "refcoco.pth",
    "pretrain_model_nlvr.pth",
]
EXPECTED_CARDS = {
    "ALBEF.pth": "albef-pretrain-14m",
    "ALBEF_4M.pth": "albef-pretrain-4m",
    "mscoco.pth": "albef-retrieval-coco",
    "flickr30k.pth": "albef-retrieval-flickr30k",
    "vqa.pth": "albef-vqa",
    "refcoco.pth": "albef-grounding-refcoco-plus",
    "pretrain_model_nlvr.pth": "albef-nlvr2-text-assignment",
}
# (task type, dataset type, split, metric type) -> value, as the metadata must hold them.
EXPECTED_MODEL_INDEX = {
    "albef-retrieval-coco": {
        ("image-to-text-retrieval", "yerevann/coco-karpathy", "test", "recall@1"): 77.6,
        ("text-to-image-retrieval", "yerevann/coco-karpathy", "test", "recall@1"): 60.7,
        ("image-to-text-retrieval", "nlphuji/flickr30k", "test", "recall@1"): 94.1,  # zero-shot
        ("text-to-image-retrieval", "nlphuji/flickr30k", "test", "recall@1"): 82.8,
    },
    "albef-retrieval-flickr30k": {
        ("image-to-text-retrieval", "nlphuji/flickr30k", "test", "recall@1"): 95.9,
        ("text-to-image-retrieval", "nlphuji/flickr30k", "test", "recall@1"): 85.6,
        ("image-to-text-retrieval", "nlphuji/flickr30k", "test", "recall@10"): 100.0,
    },
    "albef-vqa": {
        ("visual-question-answering", "HuggingFaceM4/VQAv2", "test-dev", "accuracy"): 75.84,
        ("visual-question-answering", "HuggingFaceM4/VQAv2", "test-std", "accuracy"): 76.04,
    },
}
# Cards whose numbers belong to other models (fine-tuned from them) or whose link to the paper row is not established.
NO_MODEL_INDEX = {
    "albef-pretrain-14m",
    "albef-pretrain-4m",
    "albef-grounding-refcoco-plus",
    "albef-nlvr2-text-assignment",
}
REPO = "someone/{}"


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _model_index(card):
    """(task type, dataset type, split, metric type) -> (value, source) from the card's YAML."""
    out = {}
    for entry in card.data.to_dict().get("model-index", []):
        for result in entry["results"]:
            source = result.get("source", {})
            for metric in result["metrics"]:
                key = (
                    result["task"]["type"],
                    result["dataset"]["type"],
                    result["dataset"].get("split"),
                    metric["type"],
                )
                out[key] = (metric["value"], source)
    return out


@pytest.fixture(scope="module", params=RELEASED_FILES)
def released(request):
    file = request.param
    card = mc.build_model_card(
        file,
        REPO.format(EXPECTED_CARDS[file]),
        conversion_command=f"python convert/convert_albef_original_to_hf.py --checkpoint {file} --output-dir out",
        conversion_report="renamed 830 keys; dropped 1 (position_ids)",
        conversion_date="2025-01-01",
    )
    return file, card


def test_card_for_checkpoint_maps_every_released_file():
    for file, name in EXPECTED_CARDS.items():
        assert mc.card_for_checkpoint(file) == name
        assert mc.card_for_checkpoint(f"/downloads/ALBEF/{file}") == name
        assert mc.card_for_checkpoint(file.upper()) == name
        assert mc.CARDS[file].name == name
    assert mc.card_for_checkpoint("ALBEF_14M.pth") == "albef-pretrain-14m"  # the README's early name
    assert mc.card_for_checkpoint("mscoco.safetensors") == "albef-retrieval-coco"
    assert mc.card_for_checkpoint("refcoco.pth", kind="grounding") == "albef-grounding-refcoco-plus"
    assert mc.card_for_checkpoint("refcoco.pth", kind="retrieval") == "albef-grounding-refcoco-plus"
    assert mc.card_for_checkpoint("flickr30k.pth", kind="retrieval_flickr") == "albef-retrieval-flickr30k"


def test_unknown_or_reheaded_checkpoint_gets_the_custom_card():
    assert mc.card_for_checkpoint("my_finetune.pth") == mc.FALLBACK_CARD
    assert mc.card_for_checkpoint("checkpoint_09.pth", kind="retrieval") == mc.FALLBACK_CARD
    # a pre-training checkpoint converted into a task head is an initialisation, not the released model
    assert mc.card_for_checkpoint("ALBEF.pth", kind="vqa") == mc.FALLBACK_CARD
    assert mc.card_for_checkpoint("pretrain_model_nlvr.pth", kind="nlvr") == mc.FALLBACK_CARD


def test_every_template_is_used_and_every_card_has_a_template():
    # bundled-*.md are the finished cards of the bundled models (copied by scripts/export_bundled.py), not templates.
    names = {path.stem for path in mc.default_templates_dir().glob("*.md") if not path.stem.startswith("bundled-")}
    assert names == {*mc.CARDS_BY_NAME, mc.FALLBACK_CARD}


def test_card_renders_completely(released):
    file, card = released
    spec = mc.CARDS[file]
    text = str(card)
    assert text.startswith("---\n")
    assert "{{" not in text and "{%" not in text and "}}" not in text
    assert f'from_pretrained("{REPO.format(spec.name)}")' in text
    assert f"--checkpoint {file}" in text
    assert "renamed 830 keys" in text and "<details>" in text
    assert "2025-01-01" in text
    assert spec.head_class in text and f"{spec.image_size} × {spec.image_size}" in text
    assert "BSD-3-Clause" in text and "@inproceedings{li2021align" in text and "2107.07651" in text


def test_metadata_parses_back(released, tmp_path):
    file, card = released
    spec = mc.CARDS[file]
    path = tmp_path / "README.md"
    card.save(path)
    meta = metadata_load(path)
    assert meta["license"] == "bsd-3-clause"
    assert meta["library_name"] == mc.LIBRARY_NAME == "transformers"
    assert meta.get("pipeline_tag") == spec.pipeline_tag
    assert {"albef", "vision-language"} <= set(meta["tags"])
    assert meta["datasets"] == list(spec.datasets)
    if spec.base_card:
        assert meta["base_model"] == REPO.format(spec.base_card)
    else:
        assert "base_model" not in meta
    # round trip through ModelCardData (model-index -> EvalResult list) and back to YAML
    data = ModelCardData(**meta)
    assert yaml.safe_load(data.to_yaml()) == meta
    assert ModelCard.load(path).data.to_dict() == meta
    assert len(data.eval_results or []) == len(spec.eval_results)
    for got, want in zip(data.eval_results or [], spec.eval_results):
        assert got.metric_value == want.metric_value
        assert (got.task_type, got.dataset_type, got.dataset_split, got.metric_type) == (
            want.task_type,
            want.dataset_type,
            want.dataset_split,
            want.metric_type,
        )


def test_model_index_holds_the_verified_numbers(released):
    file, card = released
    name = mc.CARDS[file].name
    index = _model_index(card)
    if name in NO_MODEL_INDEX:
        assert index == {}
        assert "model-index" not in card.data.to_dict()
        return
    for key, value in EXPECTED_MODEL_INDEX[name].items():
        assert index[key][0] == pytest.approx(value), key
    for _value, source in index.values():
        assert source["url"] == mc.PAPER_URL
        assert "arXiv:2107.07651" in source["name"] and "Table" in source["name"]


def test_every_number_has_a_source_and_appears_in_the_prose(released):
    file, card = released
    spec = mc.CARDS[file]
    text = card.text
    for result in spec.results:
        assert result.source.startswith(mc.PAPER) and re.search(r"Table \d$", result.source)
        assert result.checked_against, f"{result} was not checked against a second source"
        assert float(result.value) > 0
        assert result.value in text  # the table shows the same numbers as the metadata
        if not result.in_model_index:
            assert result.note, "a number kept out of the model-index must say why"
    for source in {s for r in spec.results for s in r.checked_against}:
        assert source in text


def test_paper_numbers_are_the_verified_ones():
    """The values double-checked against later papers (BLIP, BEiT-3, ViCHA, SIMLA); see model_card.py."""

    def values(file, task_type, dataset_type, split="test"):
        return [
            r.value
            for r in mc.CARDS[file].results
            if r.task_type == task_type and r.dataset_type == dataset_type and r.dataset_split == split
        ]

    coco, flickr = "yerevann/coco-karpathy", "nlphuji/flickr30k"
    assert values("mscoco.pth", "image-to-text-retrieval", coco) == ["77.6", "94.3", "97.2"]
    assert values("mscoco.pth", "text-to-image-retrieval", coco) == ["60.7", "84.3", "90.5"]
    assert values("mscoco.pth", "image-to-text-retrieval", flickr) == ["94.1", "99.5", "99.7"]
    assert values("mscoco.pth", "text-to-image-retrieval", flickr) == ["82.8", "96.3", "98.1"]
    assert values("flickr30k.pth", "image-to-text-retrieval", flickr) == ["95.9", "99.8", "100.0"]
    assert values("flickr30k.pth", "text-to-image-retrieval", flickr) == ["85.6", "97.5", "98.9"]
    assert values("vqa.pth", "visual-question-answering", "HuggingFaceM4/VQAv2", "test-dev") == ["75.84"]
    assert values("vqa.pth", "visual-question-answering", "HuggingFaceM4/VQAv2", "test-std") == ["76.04"]
    assert values("pretrain_model_nlvr.pth", "visual-reasoning", "nlvr2", "dev") == ["82.55"]
    assert values("pretrain_model_nlvr.pth", "visual-reasoning", "nlvr2", "test-P") == ["83.14"]
    assert values("ALBEF_4M.pth", "image-to-text-retrieval", coco) == ["73.1", "91.4", "96.0"]
    assert values("ALBEF_4M.pth", "visual-question-answering", "HuggingFaceM4/VQAv2", "test-dev") == ["74.54"]
    grounding = [r.value for r in mc.CARDS["refcoco.pth"].results]
    assert grounding == ["58.46", "65.89", "46.25"]


def test_usage_code_is_valid_python(released):
    file, card = released
    blocks = _python_blocks(card.text)
    assert len(blocks) >= 2, "a quick start and a longer example"
    for block in blocks:
        ast.parse(block)
    quick = blocks[0].strip().splitlines()
    assert len(quick) == 3 and quick[0].startswith("import transformers_albef")


def _save_tiny(head_class, folder):
    if head_class == "AlbefForTextAssignment":
        config = tiny_config(text=TWO_IMAGES)
    elif head_class == "AlbefForVisualEntailment":
        config = tiny_config(num_labels=3)
    else:
        config = tiny_config()
    getattr(ta, head_class)(config).save_pretrained(folder)
    ta.AlbefProcessor.from_bert_vocab(image_size=32).save_pretrained(folder)


@pytest.mark.parametrize("file", RELEASED_FILES)
def test_quick_start_runs(file, tmp_path):
    """The three lines of each card load its head class and the processor (from a tiny local copy)."""
    spec = mc.CARDS[file]
    _save_tiny(spec.head_class, tmp_path)
    card = mc.build_model_card(file, str(tmp_path), conversion_command="convert")
    namespace = {}
    exec(compile(_python_blocks(card.text)[0], f"<{spec.name} quick start>", "exec"), namespace)
    assert type(namespace["model"]).__name__ == spec.head_class
    assert isinstance(namespace["processor"], ta.AlbefProcessor)


def test_custom_card_for_an_unknown_file(tmp_path):
    card = mc.build_model_card(
        "/work/runs/my_vqa_finetune.pth", "me/albef-vqa-custom", kind="vqa", conversion_report="", base_model=""
    )
    text = str(card)
    meta = card.data.to_dict()
    assert "model-index" not in meta and "base_model" not in meta
    assert meta["license"] == "bsd-3-clause" and meta["pipeline_tag"] == "visual-question-answering"
    assert "my_vqa_finetune.pth" in text and "AlbefForQuestionAnswering" in text
    assert "--checkpoint my_vqa_finetune.pth" in text and "--kind vqa" in text
    assert "<details>" not in text  # no report given
    assert "{{" not in text and "{%" not in text
    for block in _python_blocks(card.text):
        ast.parse(block)
    _save_tiny("AlbefForQuestionAnswering", tmp_path)
    local = mc.build_model_card("my_vqa_finetune.pth", str(tmp_path), kind="vqa")
    namespace = {}
    exec(_python_blocks(local.text)[0], namespace)
    assert isinstance(namespace["model"], ta.AlbefForQuestionAnswering)


def test_released_file_in_another_head_gets_custom_card_based_on_it():
    card = mc.build_model_card("ALBEF.pth", "someone/albef-vqa-init", kind="vqa", library_name="transformers-albef")
    meta = card.data.to_dict()
    assert "model-index" not in meta
    assert meta["base_model"] == "someone/albef-pretrain-14m"
    assert meta["library_name"] == "transformers-albef"
    assert "AlbefForQuestionAnswering" in str(card) and "initialisation" in str(card)


def test_custom_card_without_head_reads_the_class_from_the_config(tmp_path):
    """What the converter knows is enough: with no model or kind the code loads the class named in config.json."""
    _save_tiny("AlbefForVisualEntailment", tmp_path)
    card = mc.build_model_card("checkpoint.pth", str(tmp_path), conversion_command="convert")
    text = str(card)
    assert "model-index" not in card.data.to_dict() and "pipeline_tag" not in card.data.to_dict()
    assert "config.json" in text and "{{" not in text
    assert "|\n\n|" not in text  # the table stays one block
    namespace = {}
    exec(_python_blocks(card.text)[0], namespace)
    assert isinstance(namespace["model"], ta.AlbefForVisualEntailment)


def test_card_by_name_and_default_command():
    card = mc.build_model_card("albef-retrieval-flickr30k", "someone/albef-retrieval-flickr30k")
    assert "--checkpoint flickr30k.pth" in str(card) and "--kind retrieval" in str(card)
    assert mc.CARDS["flickr30k.pth"].config_overrides == {"retrieval_k": 128}


def test_missing_templates_dir_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="templates_dir"):
        mc.build_model_card("mscoco.pth", "someone/x", templates_dir=tmp_path / "nowhere")


def test_templates_dir_can_be_given(tmp_path):
    (tmp_path / "albef-vqa.md").write_text("---\n{{ card_data }}\n---\n\n# {{ repo_id }}\n", encoding="utf-8")
    card = mc.build_model_card("vqa.pth", "someone/albef-vqa", templates_dir=tmp_path)
    assert card.text.strip() == "# someone/albef-vqa"
    assert card.data.license == "bsd-3-clause"


@pytest.mark.parametrize(
    "file, head, kwargs, expected",
    [
        ("refcoco.pth", "AlbefForRetrieval", {}, "Weakly-supervised visual grounding"),
        ("flickr30k.pth", "AlbefForRetrieval", {"kind": "retrieval_flickr"}, "fine-tuned on Flickr30K"),
        ("ALBEF.pth", "AlbefForPreTraining", {"image_size": 256}, "pre-trained on 14M images"),
        ("ALBEF.pth", "AlbefForQuestionAnswering", {}, "converted from `ALBEF.pth`"),  # an initialisation
        ("ALBEF.pth", "AlbefForPreTraining", {"image_size": 384}, "converted from `ALBEF.pth`"),  # another resolution
        ("checkpoint.pth", "AlbefForVisualReasoning", {}, "converted from `checkpoint.pth`"),
    ],
)
def test_the_converted_model_picks_the_card(file, head, kwargs, expected):
    """The converter passes the model: its class and image size decide between the released and the custom card."""
    size = kwargs.pop("image_size", 384)

    class Config:
        class vision_config:
            image_size = size

    model = type(head, (), {"config": Config})()
    card = mc.build_model_card(file, "someone/out", model=model, conversion_command="convert", **kwargs)
    assert expected in card.text
    assert f"`{head}`" in card.text
    if "converted from" in expected:
        assert "model-index" not in card.data.to_dict()
