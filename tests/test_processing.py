"""Tests of ALBEF's text cleaning, processor and image processor against the original code's outputs.

The fixtures under `fixtures/processing/` were produced by the original salesforce/ALBEF code (see
`fixtures/NOTICE`); `fixtures/bert-base-uncased-vocab.txt` is the real bert-base-uncased vocabulary.
`images.safetensors` is stored in a smaller, lossless form: `load_images` rebuilds the original float32 arrays
bit for bit (checked against the sha256 of the original arrays, and against the original file when it is present).
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, BertTokenizer
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

import transformers_albef  # noqa: F401  (registers the Auto classes, see require_auto_registration)
from transformers_albef.models.albef.image_processing_albef import AlbefImageProcessor
from transformers_albef.models.albef.processing_albef import AlbefProcessor, pre_caption, pre_question

FIXTURES = Path(__file__).parent / "fixtures"
PROCESSING = FIXTURES / "processing"
from transformers_albef.models.albef.processing_albef import BERT_VOCAB as VOCAB  # noqa: E402  (the real bert-base-uncased vocab)

CLS, SEP, PAD = 101, 102, 0

CLEANING_CASES = json.loads((PROCESSING / "text_cleaning.json").read_text(encoding="utf-8"))["cases"]
TOKENIZATION = json.loads((PROCESSING / "tokenization.json").read_text(encoding="utf-8"))
# The original files (read-only), when this checkout sits next to them; the tests comparing with them skip otherwise.
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "fixtures"
REFERENCE_FIXTURES = Path(os.environ.get("ALBEF_REFERENCE_FIXTURES", SHARED_FIXTURES))


def rebuild_pixel_values(resized: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The original's ToTensor + Normalize on a (3, S, S) uint8 image, in the same float32 arithmetic."""
    return (resized.astype(np.float32) / np.float32(255) - mean[:, None, None]) / std[:, None, None]


def load_images(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays of the original images.safetensors (`source_raw.*`, `source_rgb.*`, `pixel_values_{256,384}.*`).

    The file stores `source_raw.*`, the resized uint8 images `resized_{256,384}.*` (3, S, S) and the CLIP
    `normalize.mean` / `normalize.std` (float32) the original used; `source_rgb.*` is `.convert("RGB")` of
    `source_raw.*`, as the original did. Returns the arrays and the sha256 of the original arrays (file metadata).
    """
    stored = load_file(path)
    with safe_open(path, framework="np") as handle:
        sha256 = json.loads(handle.metadata()["sha256"])
    mean, std = stored["normalize.mean"], stored["normalize.std"]
    assert mean.dtype == std.dtype == np.float32
    images = {}
    for key, array in stored.items():
        kind, name = key.split(".", 1)
        if kind == "source_raw":
            images[key] = array
            images[f"source_rgb.{name}"] = np.asarray(PIL.Image.fromarray(array).convert("RGB"))
        elif kind.startswith("resized_"):
            images[f"pixel_values_{kind.removeprefix('resized_')}.{name}"] = rebuild_pixel_values(array, mean, std)
    return images, sha256


IMAGES, IMAGES_SHA256 = load_images(PROCESSING / "images.safetensors")
IMAGE_NAMES = sorted(key.split(".", 1)[1] for key in IMAGES if key.startswith("source_raw."))


def build_tokenizer() -> BertTokenizer:
    # `vocab=`, not `vocab_file=`: in transformers 5.x the latter is ignored and leaves a 5-token vocabulary.
    tokenizer = BertTokenizer(vocab=str(VOCAB), model_max_length=512)
    assert len(tokenizer) == 30522
    return tokenizer


@pytest.fixture(scope="module")
def processor() -> AlbefProcessor:
    return AlbefProcessor(AlbefImageProcessor(), build_tokenizer())


def require_auto_registration():
    """The Auto round trips need `import transformers_albef` to register the ALBEF processors."""
    try:
        config_class = type(AutoConfig.for_model("albef"))
    except ValueError:
        pytest.fail("REGISTRATION MISSING: `import transformers_albef` did not register AlbefConfig with AutoConfig")
    if config_class not in IMAGE_PROCESSOR_MAPPING or config_class not in PROCESSOR_MAPPING:
        pytest.fail(
            "REGISTRATION MISSING: `import transformers_albef` must register AlbefImageProcessor with "
            "AutoImageProcessor and AlbefProcessor with AutoProcessor for AlbefConfig"
        )


# Text cleaning


@pytest.mark.parametrize("case", CLEANING_CASES, ids=[repr(c["input"])[:40] for c in CLEANING_CASES])
def test_text_cleaning_matches_original(case):
    assert pre_caption(case["input"]) == case["pre_caption_30"]
    assert pre_caption(case["input"], 30) == case["pre_caption_30"]
    assert pre_question(case["input"]) == case["pre_question_50"]
    assert pre_question(case["input"], 30) == case["pre_question_30"]


# Tokenization


def _texts_for(call_name: str) -> list[str]:
    return TOKENIZATION["questions"] if call_name.startswith("questions") else TOKENIZATION["captions"]


TEXT_CALLS = [name for name in TOKENIZATION["calls"] if not name.startswith("answers")]


@pytest.mark.parametrize("call_name", TEXT_CALLS)
def test_text_call_patterns_match_original(processor, call_name):
    reference = TOKENIZATION["calls"][call_name]
    call = reference["call"]
    # The original scripts pass these options explicitly; anything absent was the tokenizer default (off).
    kwargs = {
        "padding": call["padding"],
        "truncation": call.get("truncation", False),
        "max_length": call.get("max_length"),
    }

    # The original scripts encode the empty captions of their datasets too.
    kwargs["allow_empty_text"] = True
    encoded = processor(text=_texts_for(call_name), **kwargs)
    assert encoded["input_ids"] == reference["input_ids"]
    assert encoded["attention_mask"] == reference["attention_mask"]
    assert "token_type_ids" not in encoded

    tensors = processor(text=_texts_for(call_name), return_tensors="pt", **kwargs)
    assert torch.equal(tensors["input_ids"], torch.tensor(reference["input_ids"]))
    assert torch.equal(tensors["attention_mask"], torch.tensor(reference["attention_mask"]))


@pytest.mark.parametrize("call_name", TEXT_CALLS)
def test_clean_text_option_applies_original_cleaning(processor, call_name):
    reference = TOKENIZATION["calls"][call_name]
    call = reference["call"]
    kind = "question" if call_name.startswith("questions") else "caption"
    raw = [case["input"] for case in CLEANING_CASES]
    encoded = processor(
        text=raw,
        clean_text=kind,
        allow_empty_text=True,  # the original's cleaning cases include empty captions
        padding=call["padding"],
        truncation=call.get("truncation", False),
        max_length=call.get("max_length"),
    )
    assert encoded["input_ids"] == reference["input_ids"]


def test_per_text_without_padding(processor):
    expected = TOKENIZATION["per_text_no_padding"]
    options = {"padding": False, "truncation": False, "max_length": None, "allow_empty_text": True}
    batch = processor(text=TOKENIZATION["captions"], **options)
    assert batch["input_ids"] == expected
    for text, ids in zip(TOKENIZATION["captions"], expected, strict=True):
        single = processor(text=text, **options)
        assert single["input_ids"] == [ids]
        assert single["attention_mask"] == [[1] * len(ids)]


def test_empty_text_is_refused_unless_allowed(processor):
    for empty in ("", "   ", ["a", ""]):
        with pytest.raises(ValueError, match="empty texts at positions"):
            processor(text=empty)
    assert processor(text="", allow_empty_text=True)["input_ids"] == [[CLS]]
    assert processor(text=["", "a"], allow_empty_text=True)["input_ids"] == [[CLS, PAD], [CLS, 1037]]
    # Emptied by the original cleaning only: encoded as the original does.
    assert pre_caption("...") == ""
    assert processor(text="...", clean_text="caption")["input_ids"] == [[CLS]]


def test_answers_end_with_sep(processor):
    reference = TOKENIZATION["calls"]["answers_vqa (VQA.py:46/83, answer+'[SEP]')"]
    answers = [answer.removesuffix("[SEP]") for answer in TOKENIZATION["answers_with_eos"]]
    encoded = processor.encode_answers(answers, allow_empty_text=True)  # the reference list holds an empty answer
    assert encoded["input_ids"] == reference["input_ids"]
    with pytest.raises(ValueError, match="empty texts"):
        processor.encode_answers(answers)
    assert encoded["attention_mask"] == reference["attention_mask"]
    # The original's own recipe (append the string "[SEP]") gives the same ids through `__call__`.
    assert processor(text=TOKENIZATION["answers_with_eos"], truncation=False)["input_ids"] == reference["input_ids"]


def test_truncation_counts_only_cls(processor):
    encoded = processor(text="a dog is running", max_length=4)
    assert encoded["input_ids"] == [[CLS, 1037, 3899, 2003]]
    # 29 word pieces survive max_length=30, and no [SEP] is appended.
    long_text = " ".join(["dog"] * 40)
    ids = processor(text=long_text)["input_ids"][0]
    assert ids == [CLS] + [3899] * 29
    # Without max_length, truncation falls back to the tokenizer's model_max_length.
    assert len(processor(text=long_text * 20, max_length=None)["input_ids"][0]) == 512
    # Answers keep [SEP] as a word piece when truncated, like the original.
    truncated_answer = processor.encode_answers(["black and white"], truncation=True, max_length=3)
    assert truncated_answer["input_ids"] == [[CLS, 2304, 1998]]


def test_padding_options(processor):
    encoded = processor(text=["a b c", "a"], padding="max_length", max_length=8, return_token_type_ids=True)
    assert encoded["input_ids"] == [[CLS, 1037, 1038, 1039, 0, 0, 0, 0], [CLS, 1037, 0, 0, 0, 0, 0, 0]]
    assert encoded["attention_mask"] == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert encoded["token_type_ids"] == [[0] * 8, [0] * 8]
    assert processor(text=["a b c", "a"], pad_to_multiple_of=8)["input_ids"][1] == [CLS, 1037] + [PAD] * 6


# Images


def test_image_fixture_rebuilds_original_arrays():
    """The rebuilt arrays are the original's, bit for bit (sha256 of the original file's float32 / uint8 arrays)."""
    kinds = ("source_rgb", "pixel_values_256", "pixel_values_384")
    expected_keys = {f"{kind}.{name}" for kind in kinds for name in IMAGE_NAMES}
    assert set(IMAGES_SHA256) == expected_keys
    assert len(IMAGE_NAMES) == 4
    for key, digest in IMAGES_SHA256.items():
        array = IMAGES[key]
        if key.startswith("pixel_values_"):
            size = int(key.split(".", 1)[0].removeprefix("pixel_values_"))
            assert array.dtype == np.float32 and array.shape == (3, size, size)
        else:
            assert array.dtype == np.uint8
        assert hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest() == digest, key


@pytest.mark.skipif(
    not (REFERENCE_FIXTURES / "processing" / "images.safetensors").is_file(), reason="original fixtures not present"
)
def test_processing_fixtures_match_original_files():
    original = load_file(REFERENCE_FIXTURES / "processing" / "images.safetensors")
    assert set(original) == set(IMAGES)
    for key, array in original.items():
        rebuilt = IMAGES[key]
        assert rebuilt.dtype == array.dtype and rebuilt.shape == array.shape, key
        assert np.array_equal(rebuilt.view(np.uint8), array.view(np.uint8)), key  # bit-identical (max abs diff 0)
    for name in ("images_meta.json", "text_cleaning.json", "tokenization.json"):
        assert (PROCESSING / name).read_bytes() == (REFERENCE_FIXTURES / "processing" / name).read_bytes(), name


@pytest.mark.parametrize("size", [384, 256])
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_pixel_values_match_original(name, size):
    image_processor = AlbefImageProcessor() if size == 384 else AlbefImageProcessor(size=256)
    expected = torch.from_numpy(IMAGES[f"pixel_values_{size}.{name}"])
    raw = IMAGES[f"source_raw.{name}"]
    for image in (PIL.Image.fromarray(raw), raw):  # RGBA / L PIL images, and the same pixels as arrays
        pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (1, 3, size, size)
        assert pixel_values.dtype == torch.float32
        torch.testing.assert_close(pixel_values[0], expected, atol=1e-6, rtol=0)


def test_image_batches_and_layouts():
    image_processor = AlbefImageProcessor()
    names = IMAGE_NAMES
    batch = image_processor([PIL.Image.fromarray(IMAGES[f"source_raw.{n}"]) for n in names], return_tensors="pt")
    expected = torch.stack([torch.from_numpy(IMAGES[f"pixel_values_384.{n}"]) for n in names])
    torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-6, rtol=0)

    rgb = IMAGES["source_raw.rgb_333x517"]
    channels_first = torch.from_numpy(rgb).permute(2, 0, 1)
    stacked = np.stack([rgb, rgb])
    expected_rgb = torch.from_numpy(IMAGES["pixel_values_384.rgb_333x517"])
    for images, count in ((channels_first, 1), (stacked, 2), ([[rgb, rgb], [rgb]], 3)):
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (count, 3, 384, 384)
        torch.testing.assert_close(pixel_values[-1], expected_rgb, atol=1e-6, rtol=0)


def test_processor_images_and_text(processor):
    image = PIL.Image.fromarray(IMAGES["source_raw.rgb_480x640"])
    inputs = processor(images=[image, image], text=["a dog", "a cat on a mat"], return_tensors="pt")
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask"}
    assert inputs["pixel_values"].shape == (2, 3, 384, 384)
    assert inputs["input_ids"].tolist() == [[CLS, 1037, 3899, 0, 0, 0], [CLS, 1037, 4937, 2006, 1037, 13523]]
    assert processor.model_input_names == ["pixel_values", "input_ids", "attention_mask"]


def test_image_processor_save_and_load(tmp_path):
    AlbefImageProcessor(size=256).save_pretrained(tmp_path)
    reloaded = AlbefImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.size.height, reloaded.size.width) == (256, 256)
    assert reloaded.resample == PIL.Image.Resampling.BICUBIC
    assert tuple(reloaded.image_mean) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(reloaded.image_std) == (0.26862954, 0.26130258, 0.27577711)


# Save / reload


def _assert_albef_text_convention(processor: AlbefProcessor):
    reference = TOKENIZATION["calls"]["captions_retrieval_eval (Retrieval.py:90)"]
    encoded = processor(
        text=TOKENIZATION["captions"], padding="max_length", truncation=True, max_length=30, allow_empty_text=True
    )
    assert encoded["input_ids"] == reference["input_ids"]
    assert processor(text="a dog")["input_ids"] == [[CLS, 1037, 3899]]
    assert processor.encode_answers(["yes"])["input_ids"] == [[CLS, 2748, SEP]]


def test_save_and_reload_keeps_no_sep_convention(processor, tmp_path):
    require_auto_registration()  # AlbefProcessor.from_pretrained loads its image processor via AutoImageProcessor
    AlbefProcessor(AlbefImageProcessor(size=256), processor.tokenizer).save_pretrained(tmp_path)
    reloaded = AlbefProcessor.from_pretrained(tmp_path)

    # The reloaded tokenizer is ALBEF's: called directly (as transformers' pipelines do), it adds no [SEP] either.
    assert type(reloaded.tokenizer).__name__ == "AlbefTokenizer"
    assert reloaded.tokenizer("a dog")["input_ids"] == [CLS, 1037, 3899]
    assert reloaded.tokenizer("a dog", "a cat")["input_ids"] == [CLS, 1037, 3899, SEP, 1037, 4937, SEP]
    _assert_albef_text_convention(reloaded)
    assert isinstance(reloaded.image_processor, AlbefImageProcessor)
    assert (reloaded.image_processor.size.height, reloaded.image_processor.size.width) == (256, 256)


def test_auto_classes_round_trip(processor, tmp_path):
    require_auto_registration()
    processor.save_pretrained(tmp_path)

    auto_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(auto_processor, AlbefProcessor)
    _assert_albef_text_convention(auto_processor)

    # The default backend of AutoImageProcessor must be the exact (PIL) one.
    auto_image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(auto_image_processor, AlbefImageProcessor)
    assert auto_image_processor.backend == "pil"
    image = PIL.Image.fromarray(IMAGES["source_raw.rgba_200x301"])
    for loaded in (auto_image_processor, auto_processor.image_processor):
        torch.testing.assert_close(
            loaded(image, return_tensors="pt")["pixel_values"][0],
            torch.from_numpy(IMAGES["pixel_values_384.rgba_200x301"]),
            atol=1e-6,
            rtol=0,
        )


# Bad inputs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs `images`, `text` or both"),
        ({"text": []}, "empty list of texts"),
        ({"text": 5}, "string or a sequence of strings"),
        ({"text": ["a", None]}, "string or a sequence of strings"),
        ({"text": "a", "clean_text": "title"}, "`clean_text` must be"),
        ({"text": "a", "max_length": 0}, "at least 1"),
        ({"text": "a", "add_special_tokens": False}, "always start with \\[CLS\\]"),
        ({"text": "a", "text_pair": "b"}, "text_pair"),
        ({"images": []}, "empty list of images"),
    ],
)
def test_processor_rejects_bad_input(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 2, 8, 8, 3), dtype=np.uint8), r"got shape \(2, 2, 8, 8, 3\)"),
        (np.zeros((10,), dtype=np.uint8), r"got shape \(10,\)"),
        (np.zeros((8, 9, 2), dtype=np.uint8), r"1 \(grayscale\), 3 \(RGB\) or 4 \(RGBA\) channels.*\(8, 9, 2\)"),
        (torch.zeros(5, 8, 9, dtype=torch.uint8), r"channels.*\(5, 8, 9\)"),
        ([], "empty list of images"),
        ([[]], "empty list of images"),
        (3, "got int"),
    ],
)
def test_image_processor_rejects_bad_input(images, message):
    with pytest.raises(ValueError, match=message):
        AlbefImageProcessor()(images)


def test_processor_needs_bert_special_tokens():
    tokenizer = build_tokenizer()
    tokenizer.cls_token = None
    with pytest.raises(ValueError, match="cls_token"):
        AlbefProcessor(AlbefImageProcessor(), tokenizer)
