"""ALBEF through `transformers.pipeline(...)`, on the bundled models with their real tokenizer.

transformers' own `zero-shot-image-classification`, `image-feature-extraction` and `feature-extraction` pipelines
work with ALBEF unmodified, and importing `transformers_albef` replaces none of them; ALBEF's extras are classes
passed as `pipeline_class=`, and only the tasks transformers lacks are registered (`albef-image-text-retrieval`,
`albef-visual-question-answering`).

The bundled weights may be random or trained: the tests check behaviour (inputs, shapes, errors) and that every
result equals the model methods called directly, never the quality of the answers."""

import importlib
import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.feature_extraction import FeatureExtractionPipeline
from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline

import transformers_albef
from transformers_albef import (
    AlbefForQuestionAnswering,
    AlbefForRetrieval,
    AlbefImageProcessor,
    AlbefModel,
    AlbefProcessor,
    AlbefTokenizer,
)
from transformers_albef.pipelines import (
    AlbefImageFeatureExtractionPipeline,
    AlbefImageTextRetrievalPipeline,
    AlbefTextFeatureExtractionPipeline,
    AlbefVisualQuestionAnsweringPipeline,
    AlbefZeroShotImageClassificationPipeline,
    register_pipelines,
)

RETRIEVAL = str(transformers_albef.bundled_model_path("retrieval"))
VQA = str(transformers_albef.bundled_model_path("vqa"))
CLS, SEP = 101, 102
ZERO_SHOT = "zero-shot-image-classification"
LABELS = ["red circle", "blue square", "green triangle", "yellow star"]
CAPTIONS = ["A red circle.", "a blue square", "a green triangle!", "a red square on white"]
ALBEF_TASKS = {
    "albef-image-text-retrieval": AlbefImageTextRetrievalPipeline,
    "albef-visual-question-answering": AlbefVisualQuestionAnsweringPipeline,
}


def draw(colour: str, shape: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image


def resolve(impl):
    """A task entry's `impl`: a class, or (transformers' lazy entries) its dotted path."""
    if isinstance(impl, str):
        module, _, name = impl.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return impl


@pytest.fixture(scope="module")
def images():
    return [draw("red", "circle"), draw("blue", "square"), draw("green", "triangle")]


@pytest.fixture(scope="module")
def image_paths(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"image_{index}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def standard_classifier():
    """transformers' own zero-shot pipeline on the ALBEF folder (nothing passed but the model)."""
    return pipeline(ZERO_SHOT, model=RETRIEVAL)


@pytest.fixture(scope="module")
def classifier():
    return pipeline(ZERO_SHOT, model=RETRIEVAL, pipeline_class=AlbefZeroShotImageClassificationPipeline)


@pytest.fixture(scope="module")
def retriever():
    return pipeline("albef-image-text-retrieval", model=RETRIEVAL)


@pytest.fixture(scope="module")
def vqa():
    return pipeline("albef-visual-question-answering", model=VQA)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP folder (model, BERT tokenizer, image processor): a non-ALBEF zero-shot model."""
    from transformers import BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tokenizer = BertTokenizer(
        vocab=str(transformers_albef.models.albef.processing_albef.BERT_VOCAB), model_max_length=77
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, eos_token_id=SEP,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=16,
        ),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


# References computed without any pipeline: the folder's own tokenizer, image processor and processor.
TOKENIZER = AlbefTokenizer.from_pretrained(RETRIEVAL)
IMAGE_PROCESSOR = AlbefImageProcessor.from_pretrained(RETRIEVAL)
PROCESSOR = AlbefProcessor.from_pretrained(RETRIEVAL)


def pixels(images, processor=IMAGE_PROCESSOR):
    return processor(images=images, return_tensors="pt")["pixel_values"]


def captions(texts):
    """ALBEF captions as the original datasets clean them (what the ALBEF pipeline classes encode)."""
    return PROCESSOR(text=texts, clean_text="caption", return_tensors="pt")


def tokens(texts):
    """Texts as the tokenizer alone encodes them (what transformers' pipelines encode)."""
    return TOKENIZER(texts, padding=True, return_tensors="pt")


def scores_by_label(result, labels):
    got = {r["label"]: r["score"] for r in result}
    assert sorted(got) == sorted(labels)
    assert [r["score"] for r in result] == sorted(got.values(), reverse=True)
    return torch.tensor([got[label] for label in labels])


# Registration: transformers' tasks untouched, ALBEF's own tasks added


def test_registration_is_idempotent_and_adds_only_the_albef_tasks():
    before = {task: dict(entry) for task, entry in PIPELINE_REGISTRY.supported_tasks.items()}
    register_pipelines()
    assert PIPELINE_REGISTRY.supported_tasks == before
    supported = PIPELINE_REGISTRY.get_supported_tasks()
    for task, pipeline_class in ALBEF_TASKS.items():
        assert task in supported and PIPELINE_REGISTRY.supported_tasks[task]["impl"] is pipeline_class
    # transformers has these tasks: ALBEF's classes are passed as `pipeline_class=`, not registered.
    assert "albef-image-feature-extraction" not in supported and "albef-text-feature-extraction" not in supported


def test_import_leaves_the_transformers_task_entries_untouched():
    """In a fresh interpreter: every task entry transformers had compares equal after
    `import transformers_albef`, and the only new tasks are the `albef-` ones."""
    script = textwrap.dedent(
        """
        import json
        from transformers.pipelines import PIPELINE_REGISTRY

        before = {task: dict(entry) for task, entry in PIPELINE_REGISTRY.supported_tasks.items()}
        import transformers_albef  # noqa: F401

        after = PIPELINE_REGISTRY.supported_tasks
        changed = [task for task, entry in before.items() if after.get(task) != entry]
        print(json.dumps({"changed": changed, "added": sorted(set(after) - set(before))}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"changed": [], "added": sorted(ALBEF_TASKS)}


def test_zero_shot_task_is_transformers_pipeline_for_albef_and_clip(standard_classifier, tiny_clip, images):
    entry = PIPELINE_REGISTRY.supported_tasks[ZERO_SHOT]
    assert resolve(entry["impl"]) is ZeroShotImageClassificationPipeline
    assert entry["default"]["model"][0] == "openai/clip-vit-base-patch32"
    assert type(standard_classifier) is ZeroShotImageClassificationPipeline
    clip = pipeline(ZERO_SHOT, model=tiny_clip)
    assert type(clip) is ZeroShotImageClassificationPipeline
    assert len(clip(images[0], candidate_labels=LABELS)) == len(LABELS)


def test_removed_vqa_task_name_still_raises():
    with pytest.raises(Exception, match="image-text-to-text"):
        pipeline("visual-question-answering", model=VQA)


# transformers' own pipelines on ALBEF models


def test_standard_zero_shot_encodes_prompts_with_the_albef_tokenizer(standard_classifier, images):
    assert isinstance(standard_classifier.model, AlbefModel)
    assert isinstance(standard_classifier.tokenizer, AlbefTokenizer)
    assert isinstance(standard_classifier.image_processor, AlbefImageProcessor)
    inputs = standard_classifier.preprocess(
        images[0], candidate_labels=["red circle", "blue"], hypothesis_template="{}"
    )
    text = inputs["text_inputs"][0]
    assert "token_type_ids" not in text
    # [CLS] tokens, no [SEP], as ALBEF was trained.
    assert standard_classifier.tokenizer.convert_ids_to_tokens(text["input_ids"][0]) == ["[CLS]", "red", "circle"]
    assert (text["input_ids"][:, 0] == CLS).all() and not (text["input_ids"] == SEP).any()


@pytest.mark.parametrize("template", [None, "{}", "a picture of {}."])
def test_standard_zero_shot_equals_the_model_logits(standard_classifier, images, template):
    kwargs = {} if template is None else {"hypothesis_template": template}
    result = standard_classifier(images[0], candidate_labels=LABELS, **kwargs)
    template = "This is a photo of {}." if template is None else template  # transformers' default
    with torch.no_grad():
        out = standard_classifier.model(
            pixel_values=pixels(images[:1]), **tokens([template.format(x) for x in LABELS])
        )
    assert out.logits_per_image.dtype == torch.float32
    torch.testing.assert_close(scores_by_label(result, LABELS), out.logits_per_image.softmax(-1)[0])


def test_standard_zero_shot_batches_and_reads_paths(standard_classifier, images, image_paths):
    one_by_one = [standard_classifier(image, candidate_labels=LABELS) for image in images]
    batched = standard_classifier([str(p) for p in image_paths], candidate_labels=LABELS, batch_size=2)
    assert len(batched) == len(images)
    for single, batch in zip(one_by_one, batched):
        assert [r["label"] for r in single] == [r["label"] for r in batch]
        torch.testing.assert_close([r["score"] for r in single], [r["score"] for r in batch], atol=1e-5, rtol=0)


def test_standard_and_albef_zero_shot_agree_on_clean_prompts(standard_classifier, classifier, images):
    """Lower-case prompts without punctuation need no caption cleaning: both pipelines score them alike."""
    for image in images:
        standard = standard_classifier(image, candidate_labels=LABELS, hypothesis_template="a picture of {}")
        albef = classifier(image, candidate_labels=LABELS)  # "a picture of {}" is its default
        torch.testing.assert_close(scores_by_label(albef, LABELS), scores_by_label(standard, LABELS))


def test_standard_image_feature_extraction_equals_get_image_features(images, image_paths):
    extractor = pipeline("image-feature-extraction", model=RETRIEVAL)
    assert type(extractor) is ImageFeatureExtractionPipeline and isinstance(extractor.model, AlbefModel)
    features = extractor(images, return_tensors=True)
    embed_dim = extractor.model.config.embed_dim
    assert len(features) == 3 and all(f.shape == (1, embed_dim) for f in features)
    with torch.no_grad():
        expected = extractor.model.get_image_features(pixels(images)).pooler_output
    torch.testing.assert_close(torch.cat(features), expected)
    torch.testing.assert_close(torch.cat(features).norm(dim=-1), torch.ones(3))
    from_paths = extractor([str(p) for p in image_paths], batch_size=2)
    torch.testing.assert_close(torch.tensor(from_paths).squeeze(1), expected, atol=1e-5, rtol=0)


def test_standard_feature_extraction_equals_get_text_features():
    extractor = pipeline("feature-extraction", model=RETRIEVAL)
    assert type(extractor) is FeatureExtractionPipeline and isinstance(extractor.tokenizer, AlbefTokenizer)
    assert isinstance(extractor.model, AlbefModel)
    embed_dim = extractor.model.config.embed_dim
    with torch.no_grad():
        # One text at a time, encoded by the tokenizer alone (no caption cleaning: "A red circle." keeps its ".").
        expected = torch.cat([extractor.model.get_text_features(**tokens([text])).pooler_output for text in CAPTIONS])
    single = extractor(CAPTIONS[0], return_tensors=True)
    assert single.shape == (1, embed_dim)
    torch.testing.assert_close(single, expected[:1])
    batched = extractor(CAPTIONS, return_tensors=True, batch_size=2)  # padded batches
    torch.testing.assert_close(torch.cat(batched), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(batched).norm(dim=-1), torch.ones(len(CAPTIONS)))
    assert torch.tensor(extractor(CAPTIONS[1])).shape == (1, embed_dim)


# ALBEF's extras on zero-shot classification: `pipeline_class=AlbefZeroShotImageClassificationPipeline`


def test_albef_zero_shot_encodes_prompts_with_the_albef_processor(classifier, images):
    assert type(classifier) is AlbefZeroShotImageClassificationPipeline
    assert isinstance(classifier.model, AlbefModel) and isinstance(classifier.processor, AlbefProcessor)
    inputs = classifier.preprocess(images[0], candidate_labels=["Red-Circle!", "blue"], hypothesis_template="{}")
    ids = inputs["text_inputs"][0]["input_ids"]
    assert "token_type_ids" not in inputs["text_inputs"][0]
    # [CLS] + cleaned caption ("red circle"), no [SEP], as ALBEF was trained.
    assert classifier.tokenizer.convert_ids_to_tokens(ids[0]) == ["[CLS]", "red", "circle"]
    assert (ids[:, 0] == CLS).all() and not (ids == SEP).any()
    assert ids.tolist() == PROCESSOR(text=["Red-Circle!", "blue"], clean_text="caption")["input_ids"]


def test_albef_zero_shot_equals_the_model_logits(classifier, images):
    labels = ["Red circle!", "blue-square", "green triangle", "yellow star"]
    result = classifier(images[0], candidate_labels=labels)
    prompts = [f"a picture of {label}" for label in labels]  # the default template, cleaned by the processor
    with torch.no_grad():
        out = classifier.model(pixel_values=pixels(images[:1]), **captions(prompts))
    got = scores_by_label(result, labels)  # the labels come back as given
    torch.testing.assert_close(got, out.logits_per_image.softmax(-1)[0])
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-5)


def test_albef_zero_shot_prompt_ensemble_averages_normalised_text_embeddings(classifier, images):
    templates = ["a picture of {}", "a photo of a {}."]
    result = classifier(images[1], candidate_labels=LABELS, hypothesis_template=templates)
    model = classifier.model
    with torch.no_grad():
        image = model.get_image_features(pixels(images[1:2])).pooler_output
        prompts = [[template.format(label) for label in LABELS] for template in templates]
        per_template = [model.get_text_features(**captions(texts)).pooler_output for texts in prompts]
        text = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    expected = (image @ text.t() / model.temp).softmax(-1)[0]
    torch.testing.assert_close(scores_by_label(result, LABELS), expected)


def test_albef_zero_shot_batches_and_reads_paths(classifier, images, image_paths):
    one_by_one = [classifier(image, candidate_labels=LABELS) for image in images]
    batched = classifier([str(p) for p in image_paths], candidate_labels=LABELS, batch_size=2)
    assert len(batched) == len(images)
    for single, batch in zip(one_by_one, batched):
        assert [r["label"] for r in single] == [r["label"] for r in batch]
        torch.testing.assert_close([r["score"] for r in single], [r["score"] for r in batch], atol=1e-5, rtol=0)
    # pathlib paths are accepted too
    from_path = classifier(image_paths[0], candidate_labels=LABELS)
    assert from_path == classifier(str(image_paths[0]), candidate_labels=LABELS)


def test_albef_zero_shot_itm_rerank(images):
    model = AlbefForRetrieval.from_pretrained(RETRIEVAL)
    classifier = pipeline(
        ZERO_SHOT, model=model, processor=PROCESSOR, pipeline_class=AlbefZeroShotImageClassificationPipeline
    )
    assert classifier.model is model and classifier.processor is PROCESSOR
    plain = classifier(images[0], candidate_labels=LABELS)
    reranked = classifier(images[0], candidate_labels=LABELS, rerank_top_k=2)
    # The ITC top 2 come first, ordered by ITM; ITC scores are unchanged; the rest keep their ITC order.
    assert {r["label"] for r in reranked[:2]} == {r["label"] for r in plain[:2]}
    assert [r["label"] for r in reranked[2:]] == [r["label"] for r in plain[2:]]
    assert all("itm_score" not in r for r in reranked[2:])
    assert reranked[0]["itm_score"] >= reranked[1]["itm_score"]
    itc = {r["label"]: r["score"] for r in plain}
    assert all(r["score"] == pytest.approx(itc[r["label"]]) for r in reranked)
    labels = [r["label"] for r in reranked[:2]]
    with torch.no_grad():
        out = model(
            pixel_values=pixels([images[0]] * 2),
            **captions([f"a picture of {label}" for label in labels]),
            use_itm_head=True,
        )
    torch.testing.assert_close(torch.tensor([r["itm_score"] for r in reranked[:2]]), out.itm_logits.softmax(-1)[:, 1])


def test_albef_zero_shot_itm_rerank_averages_over_templates(images):
    model = AlbefForRetrieval.from_pretrained(RETRIEVAL)
    classifier = pipeline(
        ZERO_SHOT, model=model, processor=PROCESSOR, pipeline_class=AlbefZeroShotImageClassificationPipeline
    )
    templates = ["a picture of {}", "an emoji of {}"]
    reranked = classifier(images[1], candidate_labels=LABELS, hypothesis_template=templates, rerank_top_k=len(LABELS))
    assert all("itm_score" in r for r in reranked)
    prompts = [template.format(r["label"]) for r in reranked for template in templates]
    with torch.no_grad():
        out = model(pixel_values=pixels([images[1]] * len(prompts)), **captions(prompts), use_itm_head=True)
    expected = out.itm_logits.softmax(-1)[:, 1].view(len(LABELS), len(templates)).mean(1)
    torch.testing.assert_close(torch.tensor([r["itm_score"] for r in reranked]), expected)
    assert expected.tolist() == sorted(expected.tolist(), reverse=True)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            classifier(images[1], candidate_labels=LABELS, rerank_top_k=bad)


def test_albef_zero_shot_errors(classifier, images):
    with pytest.raises(ValueError, match="candidate_labels"):
        classifier(images[0])
    with pytest.raises(ValueError, match="empty"):
        classifier(images[0], candidate_labels=[])
    with pytest.raises(ValueError, match="unique"):
        classifier(images[0], candidate_labels=["cat", "cat"])
    with pytest.raises(ValueError, match="template"):
        classifier(images[0], candidate_labels=["cat"], hypothesis_template="a photo")
    with pytest.raises(ValueError, match="AlbefForRetrieval"):
        classifier(images[0], candidate_labels=["cat", "dog"], rerank_top_k=1)  # AlbefModel has no ITM head
    with pytest.raises(ValueError, match="image"):
        classifier(None, candidate_labels=["cat"])
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        classifier(images[0], candidate_labels=["cat"], tokenizer_kwargs={"padding": "max_length"})


def test_albef_zero_shot_refuses_other_models_and_processors(tiny_clip):
    with pytest.raises(ValueError, match="for ALBEF models, got CLIPModel"):
        pipeline(ZERO_SHOT, model=tiny_clip, pipeline_class=AlbefZeroShotImageClassificationPipeline)
    with pytest.raises(ValueError, match="AlbefModel or AlbefForRetrieval, got AlbefForQuestionAnswering"):
        pipeline(
            ZERO_SHOT,
            model=AlbefForQuestionAnswering.from_pretrained(VQA),
            processor=AlbefProcessor.from_pretrained(VQA),
            pipeline_class=AlbefZeroShotImageClassificationPipeline,
        )
    from transformers import CLIPProcessor

    with pytest.raises(ValueError, match="AlbefProcessor"):
        pipeline(
            ZERO_SHOT,
            model=AlbefModel.from_pretrained(RETRIEVAL),
            processor=CLIPProcessor.from_pretrained(tiny_clip),
            pipeline_class=AlbefZeroShotImageClassificationPipeline,
        )


def test_albef_zero_shot_finds_the_processor_of_a_model_object(images, tmp_path):
    """A model passed as an object: the processor comes from its folder, or from `tokenizer=` + `image_processor=`;
    with neither the error says what to pass."""
    model = AlbefModel.from_pretrained(RETRIEVAL)
    expected = pipeline(ZERO_SHOT, model=model, pipeline_class=AlbefZeroShotImageClassificationPipeline)
    assert isinstance(expected.processor, AlbefProcessor)
    from_parts = pipeline(
        ZERO_SHOT,
        model=model,
        tokenizer=TOKENIZER,
        image_processor=IMAGE_PROCESSOR,
        pipeline_class=AlbefZeroShotImageClassificationPipeline,
    )
    assert from_parts.processor.tokenizer is TOKENIZER
    assert from_parts(images[0], candidate_labels=LABELS) == expected(images[0], candidate_labels=LABELS)
    constructed = AlbefZeroShotImageClassificationPipeline(model=model, processor=PROCESSOR)  # without pipeline()
    assert constructed(images[0], candidate_labels=LABELS) == expected(images[0], candidate_labels=LABELS)
    model.save_pretrained(tmp_path)  # the folder has no processor
    with pytest.raises(ValueError, match="processor="):
        pipeline(
            ZERO_SHOT,
            model=AlbefModel.from_pretrained(tmp_path),
            pipeline_class=AlbefZeroShotImageClassificationPipeline,
        )


def test_albef_zero_shot_save_and_reload(classifier, images, tmp_path, capsys):
    classifier.save_pretrained(tmp_path)
    assert "custom_pipelines" not in json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / "processor_config.json").is_file()
    reloaded = pipeline(ZERO_SHOT, model=str(tmp_path), pipeline_class=AlbefZeroShotImageClassificationPipeline)
    assert "custom code" not in capsys.readouterr().out  # no remote-code question (it would wait on a terminal)
    kwargs = {"candidate_labels": LABELS, "hypothesis_template": ["a picture of {}", "a photo of {}"]}
    expected, got = classifier(images[0], **kwargs), reloaded(images[0], **kwargs)
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    torch.testing.assert_close([r["score"] for r in got], [r["score"] for r in expected], atol=1e-5, rtol=0)
    # Loaded by name without `pipeline_class`, the folder gives transformers' pipeline.
    assert type(pipeline(ZERO_SHOT, model=str(tmp_path))) is ZeroShotImageClassificationPipeline


# Image-text retrieval


def test_retrieval_equals_the_original_evaluation(retriever, images):
    assert isinstance(retriever, AlbefImageTextRetrievalPipeline) and isinstance(retriever.model, AlbefForRetrieval)
    result = retriever(images=images, texts=CAPTIONS, top_k=2, return_tensors=True)
    model = retriever.model
    inputs = captions(CAPTIONS)
    pixel_values = pixels(images)
    with torch.no_grad():
        score_i2t, score_t2i = model.retrieval_scores(pixel_values, inputs["input_ids"], inputs["attention_mask"], k=2)
        itc = (
            model.get_image_features(pixel_values).pooler_output @ model.get_text_features(**inputs).pooler_output.t()
        )
    torch.testing.assert_close(result["itm_scores_i2t"], score_i2t)
    torch.testing.assert_close(result["itm_scores_t2i"], score_t2i)
    torch.testing.assert_close(result["itc_scores"], itc)

    assert len(result["image_to_text"]) == len(images) and len(result["text_to_image"]) == len(CAPTIONS)
    for i, ranked in enumerate(result["image_to_text"]):
        assert [r["text_index"] for r in ranked] == score_i2t[i].topk(2).indices.tolist()
        assert [r["text"] for r in ranked] == [CAPTIONS[r["text_index"]] for r in ranked]
        for r in ranked:
            assert r["score"] == pytest.approx(float(score_i2t[i, r["text_index"]]), abs=1e-6)
            assert r["itc_score"] == pytest.approx(float(itc[i, r["text_index"]]), abs=1e-6)
    for t, ranked in enumerate(result["text_to_image"]):
        assert [r["image_index"] for r in ranked] == score_t2i[t].topk(2).indices.tolist()
        assert [r["score"] for r in ranked] == pytest.approx(score_t2i[t].topk(2).values.tolist(), abs=1e-6)


def test_retrieval_itc_only_and_defaults(retriever, images):
    result = retriever(images=images[:2], texts=CAPTIONS, use_itm=False)
    model = retriever.model
    with torch.no_grad():
        itc = (
            model.get_image_features(pixels(images[:2])).pooler_output
            @ model.get_text_features(**captions(CAPTIONS)).pooler_output.t()
        )
    for i, ranked in enumerate(result["image_to_text"]):
        assert len(ranked) == len(CAPTIONS)  # every candidate by default
        assert [r["text_index"] for r in ranked] == itc[i].argsort(descending=True).tolist()
        assert all(r["score"] == r["itc_score"] for r in ranked)
    assert [len(ranked) for ranked in result["text_to_image"]] == [2] * len(CAPTIONS)
    # With ITM and no top_k, every candidate is re-ranked (fewer than config.retrieval_k here).
    assert len(retriever(images=images[:2], texts=CAPTIONS)["image_to_text"][0]) == len(CAPTIONS)


def test_retrieval_single_inputs_paths_and_batch_size(retriever, images, image_paths):
    reference = retriever(images=images, texts=CAPTIONS, top_k=3)
    chunked = retriever(images=[str(p) for p in image_paths], texts=CAPTIONS, top_k=3, batch_size=2)
    for expected, got in zip(reference["image_to_text"], chunked["image_to_text"]):
        assert [r["text_index"] for r in expected] == [r["text_index"] for r in got]
        assert [r["score"] for r in expected] == pytest.approx([r["score"] for r in got], abs=1e-5)
    single = retriever(images=images[0], texts="a red circle")
    assert len(single["image_to_text"]) == 1 and len(single["image_to_text"][0]) == 1
    assert single["image_to_text"][0][0]["text"] == "a red circle"


def test_retrieval_pairs_are_matched_with_itm(retriever, images):
    result = retriever(images=images, texts=CAPTIONS[:3], pairs=True)
    with torch.no_grad():
        out = retriever.model(pixel_values=pixels(images), **captions(CAPTIONS[:3]), use_itm_head=True)
    assert [r["image_index"] for r in result] == [0, 1, 2] and [r["text"] for r in result] == CAPTIONS[:3]
    torch.testing.assert_close(torch.tensor([r["itm_score"] for r in result]), out.itm_logits.softmax(-1)[:, 1])
    torch.testing.assert_close(
        torch.tensor([r["itc_score"] for r in result]), (out.image_embeds * out.text_embeds).sum(-1)
    )


def test_retrieval_loads_an_itc_only_checkpoint_as_albef_model(images, tmp_path):
    AlbefModel.from_pretrained(RETRIEVAL).save_pretrained(tmp_path)
    AlbefProcessor.from_pretrained(RETRIEVAL).save_pretrained(tmp_path)
    retriever = pipeline("albef-image-text-retrieval", model=str(tmp_path))
    assert type(retriever.model) is AlbefModel
    result = retriever(images=images, texts=CAPTIONS[:3], pairs=True)
    assert len(result) == 3 and all("itm_score" not in r for r in result)
    with pytest.raises(ValueError, match="AlbefForRetrieval"):
        retriever(images=images, texts=CAPTIONS, use_itm=True)


def test_retrieval_errors(retriever, images):
    with pytest.raises(ValueError, match="both"):
        retriever(images=images)
    with pytest.raises(ValueError, match="empty"):
        retriever(images=images, texts=[])
    with pytest.raises(ValueError, match="non-empty strings"):
        retriever(images=images, texts=["a cat", ""])
    with pytest.raises(ValueError, match="3 images and 4 texts"):
        retriever(images=images, texts=CAPTIONS, pairs=True)
    with pytest.raises(ValueError, match="top_k"):
        retriever(images=images, texts=CAPTIONS, top_k=0)


def test_retrieval_save_and_reload(retriever, images, tmp_path, capsys):
    retriever.save_pretrained(tmp_path)
    assert "custom_pipelines" not in json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / "processor_config.json").is_file()
    reloaded = pipeline("albef-image-text-retrieval", model=str(tmp_path))
    assert "custom code" not in capsys.readouterr().out
    assert reloaded(images=images, texts=CAPTIONS) == retriever(images=images, texts=CAPTIONS)


# Visual question answering


def test_vqa_ranks_the_config_answer_list(vqa, images):
    assert isinstance(vqa, AlbefVisualQuestionAnsweringPipeline)
    assert isinstance(vqa.model, AlbefForQuestionAnswering)
    answer_list = vqa.model.config.answer_list
    assert answer_list  # the bundled VQA model carries its answer list
    result = vqa(images[0], "What colour is the shape?", top_k=3)
    assert len(result) == 3 and all(r["answer"] in answer_list for r in result)
    assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)

    question = vqa.processor(
        text=["What colour is the shape?"], clean_text="question", truncation=False, return_tensors="pt"
    )
    answers = vqa.processor.encode_answers(answer_list, return_tensors="pt")
    k = min(vqa.model.config.answer_rank_k, len(answer_list))
    ids, probs = vqa.model.rank_answers(
        pixels(images[:1], vqa.processor), question["input_ids"], question["attention_mask"],
        answers["input_ids"], answers["attention_mask"], k=k,
    )  # fmt: skip
    assert [r["answer"] for r in result] == [answer_list[i] for i in ids[0, :3].tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in result]), probs[0, :3])


def test_vqa_with_an_answer_list_and_rank_k(vqa, images):
    answer_list = ["red", "blue", "green", "circle", "square"]
    result = vqa(image=images[1], question="what colour is it?", answer_list=answer_list, top_k=2, rank_k=3)
    question = vqa.processor(text=["what colour is it?"], clean_text="question", truncation=False, return_tensors="pt")
    answers = vqa.processor.encode_answers(answer_list, return_tensors="pt")
    ids, probs = vqa.model.rank_answers(
        pixels(images[1:2], vqa.processor), question["input_ids"], question["attention_mask"],
        answers["input_ids"], answers["attention_mask"], k=3,
    )  # fmt: skip
    assert [r["answer"] for r in result] == [answer_list[i] for i in ids[0, :2].tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in result]), probs[0, :2])


def test_vqa_generates_without_an_answer_list(vqa, images):
    result = vqa(images[0], "what shape is it?", mode="generate", max_new_tokens=4)
    assert len(result) == 1 and set(result[0]) == {"answer"}
    question = vqa.processor(text=["what shape is it?"], clean_text="question", return_tensors="pt")
    generated = vqa.model.generate(
        pixels(images[:1], vqa.processor), question["input_ids"], question["attention_mask"], 4
    )
    assert result[0]["answer"] == vqa.tokenizer.decode(generated[0], skip_special_tokens=True).strip()


def test_vqa_without_config_answer_list_generates(images, tmp_path):
    model = AlbefForQuestionAnswering.from_pretrained(VQA)
    model.config.answer_list = None
    vqa = pipeline("albef-visual-question-answering", model=model, processor=AlbefProcessor.from_pretrained(VQA))
    assert set(vqa(images[0], "what shape is it?", max_new_tokens=2)[0]) == {"answer"}
    with pytest.raises(ValueError, match="answer_list"):
        vqa(images[0], "what shape is it?", mode="rank")
    assert vqa(images[0], "what shape?", answer_list=["circle", "square"])[0]["answer"] in ("circle", "square")


def test_vqa_input_forms_and_batching(vqa, images, image_paths):
    question = "what is the colour of the shape?"
    singles = [vqa(image, question, top_k=2) for image in images]
    assert vqa({"image": images[0], "question": question}, top_k=2) == singles[0]
    as_dicts = vqa([{"image": str(p), "question": question} for p in image_paths], top_k=2)
    broadcast = vqa(image=images, question=question, top_k=2, batch_size=2)
    paired = vqa(images, [question] * 3, top_k=2, batch_size=3)
    for results in (as_dicts, broadcast, paired):
        assert len(results) == 3
        for expected, got in zip(singles, results):
            assert [r["answer"] for r in expected] == [r["answer"] for r in got]
            assert [r["score"] for r in expected] == pytest.approx([r["score"] for r in got], abs=1e-5)
    several_questions = vqa(images[0], [question, "is it round?"])
    assert len(several_questions) == 2 and several_questions[0] == singles[0][:1]


def test_vqa_errors(vqa, images):
    with pytest.raises(ValueError, match="duplicate"):
        vqa(images[0], "what colour?", answer_list=["red", "red"])
    with pytest.raises(ValueError, match="empty"):
        vqa(images[0], "what colour?", answer_list=[])
    with pytest.raises(ValueError, match="single string"):
        vqa(images[0], "what colour?", answer_list="red")
    with pytest.raises(ValueError, match="larger than the answer list"):
        vqa(images[0], "what colour?", answer_list=["red", "blue"], top_k=3)
    with pytest.raises(ValueError, match="rank_k"):
        vqa(images[0], "what colour?", answer_list=["red", "blue"], rank_k=5)
    with pytest.raises(ValueError, match="3 images and 2 questions"):
        vqa(images, ["what colour?", "what shape?"])
    with pytest.raises(ValueError, match="top_k"):
        vqa(images[0], "what colour?", mode="generate", top_k=2)
    with pytest.raises(ValueError, match="mode"):
        vqa(images[0], "what colour?", mode="classify")
    with pytest.raises(ValueError, match="question"):
        vqa(images[0])
    with pytest.raises(ValueError, match="'image' and a 'question'"):
        vqa([{"image": images[0]}])


def test_vqa_needs_a_vqa_model():
    with pytest.raises(ValueError, match="AlbefForQuestionAnswering"):
        pipeline(
            "albef-visual-question-answering",
            model=AlbefModel.from_pretrained(RETRIEVAL),
            processor=AlbefProcessor.from_pretrained(RETRIEVAL),
        )


# ALBEF's feature-extraction classes: `pipeline_class=AlbefImageFeatureExtractionPipeline` / `...Text...`


def test_albef_image_features_equal_get_image_features(images, image_paths):
    extractor = pipeline(
        "image-feature-extraction", model=RETRIEVAL, pipeline_class=AlbefImageFeatureExtractionPipeline
    )
    assert type(extractor) is AlbefImageFeatureExtractionPipeline and isinstance(extractor.model, AlbefModel)
    features = extractor(images, return_tensors=True)
    assert len(features) == 3 and features[0].shape == (1, extractor.model.config.embed_dim)
    with torch.no_grad():
        expected = extractor.model.get_image_features(pixels(images)).pooler_output
    torch.testing.assert_close(torch.cat(features), expected)
    torch.testing.assert_close(torch.cat(features).norm(dim=-1), torch.ones(3))
    from_paths = extractor([str(p) for p in image_paths], batch_size=2)
    torch.testing.assert_close(torch.tensor(from_paths).squeeze(1), expected, atol=1e-5, rtol=0)
    assert torch.tensor(extractor(images[0])).shape == (1, extractor.model.config.embed_dim)
    with pytest.raises(ValueError, match="empty"):
        extractor([])


def test_albef_text_features_equal_get_text_features_of_cleaned_captions():
    extractor = pipeline("feature-extraction", model=RETRIEVAL, pipeline_class=AlbefTextFeatureExtractionPipeline)
    assert type(extractor) is AlbefTextFeatureExtractionPipeline and isinstance(extractor.processor, AlbefProcessor)
    features = extractor(CAPTIONS, return_tensors=True, batch_size=2)
    with torch.no_grad():
        expected = extractor.model.get_text_features(**captions(CAPTIONS)).pooler_output
    torch.testing.assert_close(torch.cat(features), expected, atol=1e-5, rtol=0)
    single = extractor("A red circle.", return_tensors=True)
    torch.testing.assert_close(single, expected[:1])
    # The caption cleaning is the difference with transformers' pipeline: the same vector as the clean text there.
    standard = pipeline("feature-extraction", model=extractor.model, tokenizer=TOKENIZER)
    torch.testing.assert_close(single, standard("a red circle", return_tensors=True))
    with pytest.raises(ValueError, match="non-empty"):
        extractor(["a cat", 3])


def test_albef_feature_extraction_shares_a_model_and_processor(images):
    shared = {"model": AlbefForRetrieval.from_pretrained(RETRIEVAL), "processor": PROCESSOR}
    image_features = pipeline("image-feature-extraction", pipeline_class=AlbefImageFeatureExtractionPipeline, **shared)
    text_features = pipeline("feature-extraction", pipeline_class=AlbefTextFeatureExtractionPipeline, **shared)
    assert image_features.model is text_features.model is shared["model"]
    with torch.no_grad():
        out = shared["model"](pixel_values=pixels(images[:1]), **captions(CAPTIONS[:1]))
    torch.testing.assert_close(image_features(images[0], return_tensors=True), out.image_embeds)
    torch.testing.assert_close(text_features(CAPTIONS[0], return_tensors=True), out.text_embeds)


@pytest.mark.parametrize(
    "task, pipeline_class",
    [
        ("image-feature-extraction", AlbefImageFeatureExtractionPipeline),
        ("feature-extraction", AlbefTextFeatureExtractionPipeline),
    ],
)
def test_albef_feature_extraction_needs_itc_embeddings(task, pipeline_class):
    with pytest.raises(ValueError, match="AlbefModel"):
        pipeline(
            task,
            model=AlbefForQuestionAnswering.from_pretrained(VQA),
            processor=AlbefProcessor.from_pretrained(VQA),
            pipeline_class=pipeline_class,
        )


# Device and dtype


@pytest.mark.parametrize("pipeline_class", [None, AlbefZeroShotImageClassificationPipeline], ids=["standard", "albef"])
def test_zero_shot_device_and_dtype(images, pipeline_class):
    low_precision = pipeline(
        ZERO_SHOT, model=RETRIEVAL, device="cpu", dtype=torch.bfloat16, pipeline_class=pipeline_class
    )
    assert low_precision.model.dtype == torch.bfloat16 and low_precision.device.type == "cpu"
    result = low_precision(images[0], candidate_labels=LABELS, hypothesis_template="a picture of {}")
    reference = pipeline(ZERO_SHOT, model=RETRIEVAL, pipeline_class=pipeline_class)(
        images[0], candidate_labels=LABELS, hypothesis_template="a picture of {}"
    )
    low = {r["label"]: r["score"] for r in result}
    # The trained model's logit scale is 1/temp ~ 120: bf16's 2^-8 relative rounding of the embeddings moves the
    # probabilities by a few hundredths, not the decision.
    assert result[0]["label"] == reference[0]["label"]
    assert all(low[r["label"]] == pytest.approx(r["score"], abs=0.05) for r in reference)


def test_albef_tasks_device_and_dtype(images):
    vqa = pipeline("albef-visual-question-answering", model=VQA, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert len(vqa(images[0], "what colour?", top_k=2)) == 2
    retriever = pipeline("albef-image-text-retrieval", model=RETRIEVAL, dtype=torch.bfloat16)
    assert retriever(images=images, texts=CAPTIONS, return_tensors=True)["itc_scores"].dtype == torch.float32


# The README


def readme_python_blocks(start: str, end: str) -> list[str]:
    """The ```python blocks of README.md between the headings `start` and `end`."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index(start) : readme.index(end)]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def test_the_readme_pipeline_snippets_run(capsys, monkeypatch, tmp_path):
    """Every python block of the README's pipeline material (the bundled models and "Pipelines and the command
    line", up to its retrieval-index part) runs as written, from any directory, offline: the files it names ship
    with the package."""
    blocks = readme_python_blocks("## The bundled models", "### Corpus-scale retrieval")
    assert blocks and any("pipeline_class=AlbefZeroShotImageClassificationPipeline" in block for block in blocks)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all(line.startswith("[{") for line in printed)
    assert list(tmp_path.iterdir()) == []  # nothing written where it was run


def test_bundled_samples_path():
    folder = transformers_albef.bundled_samples_path()
    assert (folder / "samples.json").is_file() and (folder / "NOTICE").is_file()
    assert transformers_albef.bundled_samples_path("emoji_tiger.png") == folder / "emoji_tiger.png"
    for name in ("no_such_picture.png", "../NOTICE", "samples"):
        with pytest.raises(FileNotFoundError, match="emoji_blue_heart.png"):
            transformers_albef.bundled_samples_path(name)
