"""Data path of training: ALBEF's RandAugment and transforms, the pair / task loaders (real image files, real
`datasets`), bad-record handling, and the collators feeding the tiny models."""

import logging
import math
import re

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

import transformers_albef as ta
from transformers_albef.training import transforms as tr
from transformers_albef.training.collators import (
    ImageCollator,
    NLVRCollator,
    PretrainingCollator,
    RetrievalCollator,
    VECollator,
    VQACollator,
)
from transformers_albef.training.data import BadRecordError, load_image_text_pairs, open_image
from transformers_albef.training.task_data import (
    load_answer_list,
    load_nlvr,
    load_retrieval_eval,
    load_retrieval_train,
    load_task_dataset,
    load_ve,
    load_vqa,
    retrieval_eval_index,
    vqa_answer_weights,
)

from ..tiny_models import TWO_IMAGES, tiny_config
from .data_helpers import write_images, write_json, write_jsonl

SIZE = 32
FULL_VOCAB = {"vocab_size": 30522}  # the collators emit ids of the real bert-base-uncased vocabulary
CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def processor():
    return ta.AlbefProcessor.from_bert_vocab(image_size=SIZE)


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images")


def gradient_image(width=32, height=32, gx=4.0, gy=3.0, offset=10.0) -> tuple[PIL.Image.Image, callable]:
    """A linear ramp: bilinear resampling reproduces it exactly, so a geometric op's output is known in closed form."""

    def value(x, y):
        return gx * x + gy * y + offset

    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.repeat(np.rint(value(xs, ys))[..., None], 3, axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(pixels), value


# ----- RandAugment ops -------------------------------------------------------------------------------------------
GEOMETRY = {
    # op, argument, map from an output pixel (x, y) to the input position it samples (OpenCV's pixel convention)
    "shear_x": (tr.shear_x, 0.21, lambda x, y: (x - 0.21 * y, y)),
    "shear_y": (tr.shear_y, -0.21, lambda x, y: (x, y + 0.21 * x)),
    "translate_x": (tr.translate_x, 7.0, lambda x, y: (x + 7.0, y)),
    "translate_y": (tr.translate_y, -7.0, lambda x, y: (x, y - 7.0)),
    # counter-clockwise about (W/2, H/2)
    "rotate": (
        tr.rotate,
        21.0,
        lambda x, y: (
            math.cos(math.radians(21)) * (x - 16) - math.sin(math.radians(21)) * (y - 16) + 16,
            math.sin(math.radians(21)) * (x - 16) + math.cos(math.radians(21)) * (y - 16) + 16,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_geometric_ops_move_pixels_as_the_original(name):
    op, argument, source = GEOMETRY[name]
    image, value = gradient_image()
    out = np.asarray(op(image, argument)).astype(float)
    assert out.shape == (32, 32, 3) and (out[..., 0] == out[..., 1]).all()
    inside = outside = 0
    for y in range(32):
        for x in range(32):
            sx, sy = source(x, y)
            if 0 <= sx <= 31 and 0 <= sy <= 31:
                # Bilinear on a ramp is exact: the output is the ramp at the source position, rounded.
                assert abs(out[y, x, 0] - value(sx, sy)) <= 0.5 + 1e-3, (x, y)
                inside += 1
            elif not (-1 < sx < 32 and -1 < sy < 32):
                assert (out[y, x] == 128).all(), (x, y)  # the original's fill
                outside += 1
    assert inside > 500 and outside > 20


def test_rotate_is_counter_clockwise_and_translate_moves_left():
    dot = np.zeros((20, 20, 3), np.uint8)
    dot[10, 15] = 255  # right of the centre
    rotated = np.asarray(tr.rotate(PIL.Image.fromarray(dot), 90, fill=(0, 0, 0)))[..., 0]
    assert np.unravel_index(rotated.argmax(), rotated.shape) == (5, 10)  # above the centre
    shifted = np.asarray(tr.translate_x(PIL.Image.fromarray(dot), 7))[..., 0]
    assert shifted[10, 8] == 255 and (shifted[:, -7:] == 128).all()


def test_photometric_ops():
    rng = np.random.default_rng(0)
    pixels = rng.integers(50, 151, (16, 16, 3), dtype=np.uint8)
    pixels[0, 0, 2] = 0  # the blue channel reaches 0
    image = PIL.Image.fromarray(pixels)

    assert tr.identity(image) is image
    stretched = np.asarray(tr.auto_contrast(image))
    assert [(stretched[..., c].min(), stretched[..., c].max()) for c in range(3)] == [(0, 255)] * 3
    for c in range(3):  # monotone per channel
        order = np.argsort(pixels[..., c].ravel(), kind="stable")
        assert (np.diff(stretched[..., c].ravel()[order].astype(int)) >= 0).all()
    # The original's uint8 overflow: channels whose minimum is above 0 turn white, the others are stretched.
    wrapped = np.asarray(tr.auto_contrast(image, wrap_overflow=True))
    assert (wrapped[..., :2] == 255).all() and (wrapped[..., 2] == stretched[..., 2]).all()

    low_contrast = rng.integers(100, 131, (64, 64, 3), dtype=np.uint8)
    equalized = np.asarray(tr.equalize(PIL.Image.fromarray(low_contrast))).astype(int)
    # the cumulative histogram becomes the mapping: values spread over the whole range, in order, evenly
    assert equalized.min() < 10 and equalized.max() > 240
    assert abs(np.mean(equalized) - 127.5) < 10
    order = np.argsort(low_contrast[..., 0].ravel(), kind="stable")
    assert (np.diff(equalized[..., 0].ravel()[order]) >= 0).all()
    flat = PIL.Image.new("RGB", (8, 8), (90, 90, 90))
    assert np.array_equal(np.asarray(tr.equalize(flat)), np.asarray(flat))

    levels = PIL.Image.fromarray(np.array([[[0, 100, 200]]], np.uint8))
    assert np.asarray(tr.brightness(levels, 1.36)).tolist() == [[[0, 136, 255]]]

    spot = np.full((5, 5, 3), 200, np.uint8)
    spot[2, 2] = 250
    sharpened = np.asarray(tr.sharpness(PIL.Image.fromarray(spot), 1.36)).astype(int)
    assert sharpened[2, 2, 0] == 255 and sharpened[2, 1, 0] < 200  # more contrast, saturated
    assert (sharpened[0] == 200).all() and (sharpened[:, 0] == 200).all()  # border untouched
    # (250*1.36 - 219*0.36 = 261.2 wraps to 5 in the original)
    assert np.asarray(tr.sharpness(PIL.Image.fromarray(spot), 1.36, wrap_overflow=True))[2, 2, 0] == 5


def test_randaugment_draws_the_original_policy():
    augment = tr.RandAugment(generator=torch.Generator().manual_seed(0))
    assert augment.ops == tr.ALBEF_RANDAUGMENT_OPS and augment.num_ops == 2 and augment.magnitude == 7
    plans = [augment.sample() for _ in range(4000)]
    applied = [name for plan in plans for name, _ in plan]
    # 2 ops per image, each kept with probability 0.5: one op on average, drawn uniformly over the ten.
    assert abs(len(applied) / len(plans) - 1.0) < 0.05
    for op in tr.ALBEF_RANDAUGMENT_OPS:
        assert abs(applied.count(op) / len(applied) - 0.1) < 0.02, op
    assert any(len(plan) == 2 and plan[0][0] == plan[1][0] for plan in plans)  # drawn with replacement
    arguments = {}
    for plan in plans:
        for name, args in plan:
            arguments.setdefault(name, set()).add(tuple(round(a, 6) for a in args))
    assert arguments["Identity"] == {()} and arguments["Equalize"] == {()}
    assert arguments["Brightness"] == arguments["Sharpness"] == {(1.36,)}
    assert arguments["ShearX"] == arguments["ShearY"] == {(0.21,), (-0.21,)}
    assert arguments["TranslateX"] == arguments["TranslateY"] == {(7.0,), (-7.0,)}
    assert arguments["Rotate"] == {(21.0,), (-21.0,)}


def test_training_transform_is_deterministic_under_a_seed(images):
    transform = tr.albef_train_transform(SIZE)
    image = open_image(images["big.jpg"])

    def run(seed):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for _ in range(6)])

    first = run(3)
    assert first.shape == (6, 3, SIZE, SIZE) and first.dtype == torch.float32
    assert torch.equal(first, run(3))
    assert not torch.equal(first, run(4))
    assert not torch.equal(first[0], first[1])  # fresh draws per call
    # seeded generator of RandAugment alone
    a, b = (tr.RandAugment(generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert [a.sample() for _ in range(50)] == [b.sample() for _ in range(50)]


def test_training_transform_variants(images):
    image = open_image(images["blue.png"])
    for transform in (
        tr.albef_train_transform(SIZE, scale=tr.FINETUNE_SCALE),
        tr.albef_train_transform(SIZE, scale=None),  # grounding: resize + flip + RandAugment
        tr.albef_train_transform(SIZE, randaugment=False),
    ):
        assert transform(image).shape == (3, SIZE, SIZE)
    steps = [type(step).__name__ for step in tr.albef_train_transform(SIZE).transforms]
    assert steps == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize"]
    crop = tr.albef_train_transform(SIZE).transforms[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation.value == "bicubic"
    # No flip or RandAugment and a full-image crop reduce it to the evaluation transform, up to the crop's resize.
    plain = tr.albef_train_transform(SIZE, scale=None, randaugment=False, horizontal_flip=False)
    assert torch.allclose(plain(image), tr.albef_eval_transform(SIZE)(image), atol=1e-5)


def test_eval_transform_is_the_image_processor(processor, images):
    transform = tr.albef_eval_transform(SIZE)
    for name in ("red.png", "gray.png", "alpha.png"):
        image = open_image(images[name])
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(transform(image), expected)


# ----- pair loaders ----------------------------------------------------------------------------------------------
def test_json_pairs(tmp_path, images):
    source = write_json(
        tmp_path / "pairs.json",
        [
            {"image": "red.png", "caption": "A red square."},
            {"image": "green.jpg", "caption": ["green one", "Another GREEN caption"]},
            {"image": "red.png", "caption": "the red one again"},
        ],
    )
    dataset = load_image_text_pairs(source, image_root=images["red.png"].parent)
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["image", "caption", "image_id", "record_index"]
    assert dataset["caption"] == ["A red square.", "green one", "Another GREEN caption", "the red one again"]
    assert dataset["image_id"] == [0, 1, 1, 0]  # index of the distinct image
    assert dataset["record_index"] == [0, 1, 1, 2]
    assert dataset[0]["image"] == str(images["red.png"])
    assert dataset.skipped_records.count == 0
    # Several files (the original's train_file list): ids continue across them.
    other = write_json(tmp_path / "more.json", [{"image": str(images["blue.png"]), "caption": "blue"}])
    both = load_image_text_pairs([source, other], image_root=images["red.png"].parent)
    assert both["image_id"] == [0, 1, 1, 0, 2] and both[4]["image"] == str(images["blue.png"])


def test_imagefolder_pairs_match_datasets_imagefolder(tmp_path, images):
    folder = images["red.png"].parent
    names = ["red.png", "green.jpg", "gray.png", "alpha.png"]
    write_jsonl(folder / "metadata.jsonl", [{"file_name": n, "text": f"a {n[:-4]} image"} for n in names])
    for name in ("blue.png", "big.jpg", "corrupt.jpg", "truncated.jpg"):  # files without metadata stay out
        (folder / name).rename(tmp_path / name)
    ours = load_image_text_pairs(folder)
    reference = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=tmp_path / "hf")
    assert sorted(ours["caption"]) == sorted(reference["text"])
    by_caption = {row["text"]: row["image"] for row in reference}
    for row in ours:
        ref = by_caption[row["caption"]]
        assert np.array_equal(np.asarray(open_image(row["image"])), np.asarray(ref.convert("RGB")))
    assert ours["image_id"] == [0, 1, 2, 3]


def test_streaming_gives_the_same_rows_and_batches(tmp_path, images, processor):
    records = [{"image": n, "caption": f"picture {i}"} for i, n in enumerate(["red.png", "green.jpg", "blue.png"])]
    records.append({"image": "red.png", "caption": ["red again", "and again"]})
    source = write_jsonl(tmp_path / "pairs.jsonl", records)
    root = images["red.png"].parent
    eager = load_image_text_pairs(source, image_root=root)
    stream = load_image_text_pairs(source, image_root=root, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert list(stream) == list(eager)
    # Streaming reads the file lazily: a record added later shows up on the next pass.
    write_jsonl(source, records + [{"image": "gray.png", "caption": "gray"}])
    assert [row["caption"] for row in stream][-1] == "gray"

    collator = PretrainingCollator(processor, tr.albef_eval_transform(SIZE), mask=False)
    from_stream = list(DataLoader(stream.shuffle(seed=0, buffer_size=2), batch_size=2, collate_fn=collator))
    from_eager = list(DataLoader(eager, batch_size=2, collate_fn=collator))
    assert sum(len(b["input_ids"]) for b in from_stream) == 6
    assert from_stream[0].keys() == from_eager[0].keys() == {"pixel_values", "input_ids", "attention_mask"}
    # Several source files are shards of the stream (for DataLoader workers); ids stay distinct across files.
    other = write_jsonl(tmp_path / "other.jsonl", [{"image": "red.png", "caption": "red"}])
    sharded = load_image_text_pairs([source, other], image_root=root, streaming=True)
    assert sharded.num_shards == 2
    rows = list(sharded)
    assert rows[-1]["image_id"] == 2**32 and rows[0]["image_id"] == 0


BAD_RECORDS = {
    "missing image file": ({"image": "missing.png", "caption": "x"}, "image file not found"),
    "empty caption": ({"image": "red.png", "caption": "  "}, "empty after cleaning"),
    "caption cleaned away": ({"image": "red.png", "caption": "?!..."}, "empty after cleaning"),
    "caption of the wrong type": ({"image": "red.png", "caption": 42}, "must be a string or a list of strings"),
    "caption list with a number": ({"image": "red.png", "caption": ["ok", 3]}, "caption[1] must be a string"),
    "no caption": ({"image": "red.png"}, "no 'caption'"),
    "image not a string": ({"image": 7, "caption": "x"}, "image must be a non-empty path string"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_is_named(tmp_path, images, kind):
    record, message = BAD_RECORDS[kind]
    good = {"image": "green.jpg", "caption": "fine"}
    source = write_json(tmp_path / "pairs.json", [good, good, record])
    with pytest.raises(BadRecordError, match=re.escape(message)) as error:
        load_image_text_pairs(source, image_root=images["red.png"].parent)
    assert f"{source} record 2" in str(error.value)
    if isinstance(record["image"], str):
        assert str(images["red.png"].parent / record["image"]) in str(error.value)


def test_bad_records_are_skipped_and_counted(tmp_path, images, caplog):
    records = [{"image": "red.png", "caption": "fine"}] + [record for record, _ in BAD_RECORDS.values()]
    root = images["red.png"].parent
    json_source = write_json(tmp_path / "pairs.json", records)
    with caplog.at_level(logging.WARNING):
        dataset = load_image_text_pairs(json_source, image_root=root, skip_bad_records=True)
    assert len(dataset) == 1 and dataset.skipped_records.count == len(BAD_RECORDS)
    assert f"skipped {len(BAD_RECORDS)} bad record(s)" in caplog.text and "record 1" in caplog.text

    # json lines: a line that does not parse is one more bad record; streaming counts while it reads.
    lines_source = write_jsonl(tmp_path / "pairs.jsonl", records)
    with lines_source.open("a") as handle:
        handle.write("{not json\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stream = load_image_text_pairs(lines_source, image_root=root, streaming=True, skip_bad_records=True)
        assert stream.skipped_records.count == 0  # nothing read yet
        assert len(list(stream)) == 1
    assert stream.skipped_records.count == len(BAD_RECORDS) + 1
    assert "not valid json" in caplog.text and f"({len(BAD_RECORDS) + 1} bad record(s) skipped so far)" in caplog.text
    with pytest.raises(BadRecordError, match="record 1"):
        list(load_image_text_pairs(lines_source, image_root=root, streaming=True))


def test_imagefolder_caption_of_the_wrong_type(tmp_path, images):
    folder = images["red.png"].parent
    write_jsonl(
        folder / "metadata.jsonl", [{"file_name": "red.png", "text": "ok"}, {"file_name": "gray.png", "text": 5}]
    )
    with pytest.raises(BadRecordError, match=r"metadata.jsonl record 1 \(image .*gray.png'\): text must be a string"):
        load_image_text_pairs(folder)
    assert len(load_image_text_pairs(folder, skip_bad_records=True)) == 1
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_image_text_pairs(tmp_path / "images" / "..")


def test_collators_name_undecodable_images_or_skip_them(tmp_path, images, processor, caplog):
    source = write_json(
        tmp_path / "pairs.json",
        [{"image": name, "caption": name} for name in ("red.png", "corrupt.jpg", "green.jpg", "truncated.jpg")],
    )
    dataset = load_image_text_pairs(source, image_root=images["red.png"].parent)  # the files exist
    examples = list(dataset)
    strict = PretrainingCollator(processor, tr.albef_eval_transform(SIZE))
    with pytest.raises(BadRecordError, match=r"record 1 \(image .*corrupt.jpg'\): cannot decode the image"):
        strict(examples)
    with pytest.raises(BadRecordError, match=r"record 3 \(image .*truncated.jpg'\): cannot decode the image"):
        strict([examples[3]])

    lenient = PretrainingCollator(processor, tr.albef_eval_transform(SIZE), skip_bad_records=True)
    with caplog.at_level(logging.WARNING):
        batch = lenient(examples)
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 2
    assert lenient.num_skipped == 2 and "(2 bad record(s) skipped so far)" in caplog.text
    with pytest.raises(BadRecordError, match="all 2 examples of the batch are bad"):
        lenient([examples[1], examples[3]])
    # A file deleted after loading, and a caption of the wrong type reaching a collator.
    missing = dict(examples[0], image=str(tmp_path / "gone.png"))
    with pytest.raises(BadRecordError, match="image file not found"):
        strict([missing])
    with pytest.raises(BadRecordError, match="caption must be a string, got list"):
        strict([dict(examples[0], caption=["a"])])


# ----- collators and models ----------------------------------------------------------------------------------------
def _finite(*values):
    return all(value is not None and torch.isfinite(value).all() for value in values)


def test_pretraining_collator_feeds_the_pretraining_model(tmp_path, images, processor):
    long_caption = " ".join(f"word{i}" for i in range(40))
    source = write_json(
        tmp_path / "pairs.json",
        [
            {"image": "red.png", "caption": "A RED, red square!"},
            {"image": "gray.png", "caption": long_caption},
            {"image": "alpha.png", "caption": "see-through"},
            {"image": "big.jpg", "caption": "big picture"},
        ],
    )
    dataset = load_image_text_pairs(source, image_root=images["red.png"].parent)
    collator = PretrainingCollator(processor, tr.albef_train_transform(SIZE))
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collator)))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "masked_input_ids", "mlm_labels"}
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE)
    ids = batch["input_ids"]
    assert ids.shape[1] == 25 and (ids[:, 0] == CLS).all() and not (ids == SEP).any()  # max_length 25, no [SEP]
    assert processor.tokenizer.decode(ids[0][batch["attention_mask"][0].bool()][1:]) == "a red red square"
    assert processor.tokenizer.decode(ids[2][batch["attention_mask"][2].bool()][1:]) == "see through"
    labels, masked = batch["mlm_labels"], batch["masked_input_ids"]
    assert ((labels == -100) | (labels == ids)).all() and (labels[ids == PAD] == -100).all()
    assert (labels[:, 0] == -100).all() and torch.equal(masked[labels == -100], ids[labels == -100])

    torch.manual_seed(0)
    model = ta.AlbefForPreTraining(tiny_config(text=FULL_VOCAB)).train()
    out = model(**batch, return_loss=True)
    assert _finite(out.loss, out.loss_itc, out.loss_itm, out.loss_mlm)


def test_retrieval_data_feeds_the_retrieval_model(tmp_path, images, processor):
    root = images["red.png"].parent
    train = write_json(
        tmp_path / "coco_train.json",
        [
            {"image": "red.png", "caption": "a red thing", "image_id": "coco_9"},
            {"image": "green.jpg", "caption": "a green thing", "image_id": "coco_4"},
            {"image": "red.png", "caption": "the red thing again", "image_id": "coco_9"},
            {"image": "blue.png", "caption": " ".join(["blue"] * 40), "image_id": 12},
        ],
    )
    dataset = load_retrieval_train(train, root)
    assert dataset["image_id"] == [0, 1, 0, 2]  # renumbered by first appearance, as re_train_dataset
    batch = RetrievalCollator(processor, tr.albef_train_transform(SIZE, scale=tr.FINETUNE_SCALE))(list(dataset))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}
    assert batch["image_ids"].tolist() == [0, 1, 0, 2] and batch["input_ids"].shape[1] == 30
    untruncated = RetrievalCollator(processor, tr.albef_eval_transform(SIZE), max_length=None)(list(dataset))
    assert untruncated["input_ids"].shape[1] == 31  # pre_caption keeps 30 words, [CLS] + 30
    torch.manual_seed(0)
    model = ta.AlbefForRetrieval(tiny_config(text=FULL_VOCAB, distill=True)).train()
    out = model(**batch, return_loss=True)
    assert _finite(out.loss, out.loss_itc, out.loss_itm)

    test = write_json(
        tmp_path / "coco_test.json",
        [{"image": "red.png", "caption": ["Red.", "RED!"]}, {"image": "green.jpg", "caption": ["green", "g", "gg"]}],
    )
    evaluation = load_retrieval_eval(test, root)
    assert evaluation.column_names == ["image", "caption", "image_id", "record_index"]
    assert evaluation.texts == ["red", "red", "green", "g", "gg"]
    assert evaluation.txt2img == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1} and evaluation.img2txt == {0: [0, 1], 1: [2, 3, 4]}
    assert retrieval_eval_index(evaluation) == (evaluation.texts, evaluation.txt2img, evaluation.img2txt)
    images_batch = ImageCollator(tr.albef_eval_transform(SIZE))(list(evaluation))
    assert images_batch["pixel_values"].shape == (2, 3, SIZE, SIZE) and images_batch["image_ids"].tolist() == [0, 1]
    features = model.get_image_features(pixel_values=images_batch["pixel_values"]).pooler_output
    assert _finite(features if isinstance(features, torch.Tensor) else features[0])


def test_vqa_data_feeds_the_vqa_model(tmp_path, images, processor):
    root = images["red.png"].parent
    vg_root = tmp_path / "vg"
    vg_root.mkdir()
    (vg_root / "1.jpg").write_bytes(images["green.jpg"].read_bytes())
    votes = ["yes"] * 6 + ["no"] * 3 + ["maybe"]
    train = write_json(
        tmp_path / "vqa_train.json",
        [
            {"question_id": 1, "question": "Is it red?", "answer": votes, "image": "red.png", "dataset": "vqa"},
            {
                "question_id": 2,
                "question": "What color?",
                "answer": ["blue"] * 10,
                "image": "blue.png",
                "dataset": "vqa",
            },
            {"question": "What is in the box?", "answer": "a cat", "image": "1.jpg", "dataset": "vg"},
        ],
    )
    dataset = load_vqa(train, root, vg_root)
    assert dataset["answers"] == [["yes", "no", "maybe"], ["blue"], ["a cat"]]
    assert np.allclose(dataset["weights"][0], [0.6, 0.3, 0.1]) and dataset["weights"][1:] == [[1.0], [0.5]]
    assert dataset["question_id"] == [1, 2, -1] and dataset[2]["image"] == str(vg_root / "1.jpg")
    assert vqa_answer_weights(["a", "b", "a", "a"]) == (["a", "b"], [0.75, 0.25])

    batch = VQACollator(processor, tr.albef_train_transform(SIZE, scale=tr.FINETUNE_SCALE))(list(dataset))
    assert batch["answers_per_question"].tolist() == [3, 1, 1]
    assert torch.allclose(batch["answer_weights"], torch.tensor([0.6, 0.3, 0.1, 1.0, 0.5]))
    answer_ids = batch["answer_input_ids"]
    assert answer_ids.shape[0] == 5 and (answer_ids[:, 0] == CLS).all()
    ends = batch["answer_attention_mask"].sum(1) - 1
    assert (answer_ids[torch.arange(5), ends] == SEP).all()  # "[SEP]" appended to every answer
    assert processor.tokenizer.decode(answer_ids[4, 1 : ends[4]]) == "a cat"
    assert not (batch["input_ids"] == SEP).any()
    torch.manual_seed(0)
    model = ta.AlbefForQuestionAnswering(tiny_config(text=FULL_VOCAB)).train()
    out = model(**batch)
    assert _finite(out.loss)

    # Evaluation splits: no training answers in the batch; question ids for the result file.
    test = write_json(
        tmp_path / "vqa_test.json",
        [{"question_id": 7, "question": "Why?", "image": "red.png", "dataset": "vqa"}],
    )
    test_set = load_vqa(test, root, split="test")
    assert "answers" not in test_set.column_names and "answer" not in test_set.column_names
    test_batch = VQACollator(processor, tr.albef_eval_transform(SIZE), max_length=None, max_words=50)(list(test_set))
    assert test_batch.keys() == {"pixel_values", "input_ids", "attention_mask", "question_ids"}
    assert test_batch["question_ids"].tolist() == [7]
    val_set = load_vqa(train, root, vg_root, split="val")
    assert val_set["answer"][0] == votes and val_set["answer"][2] == ["a cat"]  # human answers, for VQA accuracy
    answer_list = write_json(tmp_path / "answer_list.json", ["yes", "no", "2"])
    assert load_answer_list(answer_list) == ["yes", "no", "2"]


def test_nlvr_and_ve_data_feed_their_models(tmp_path, images, processor):
    root = images["red.png"].parent
    nlvr = write_json(
        tmp_path / "nlvr_train.json",
        [
            {"images": ["red.png", "green.jpg"], "sentence": "The left image is red.", "label": "True"},
            {"images": ["blue.png", "gray.png"], "sentence": "Both are green.", "label": "False"},
        ],
    )
    dataset = load_nlvr(nlvr, root)
    assert dataset["label"] == [1, 0] and dataset[0]["images"] == [str(root / "red.png"), str(root / "green.jpg")]
    batch = NLVRCollator(processor, tr.albef_train_transform(SIZE))(list(dataset))
    assert batch["pixel_values"].shape == (2, 2, 3, SIZE, SIZE) and batch["labels"].tolist() == [1, 0]
    torch.manual_seed(0)
    model = ta.AlbefForVisualReasoning(tiny_config(text={**TWO_IMAGES, **FULL_VOCAB})).train()
    out = model(**batch)
    assert _finite(out.loss) and out.logits.shape == (2, 2)

    (root / "12345.jpg").write_bytes(images["green.jpg"].read_bytes())
    ve = write_json(
        tmp_path / "ve_train.json",
        [
            {"image": "12345", "sentence": "A picture.", "label": "entailment"},
            {"image": "12345", "sentence": "Nothing at all.", "label": "contradiction"},
            {"image": "red.png", "sentence": "Maybe.", "label": "neutral"},
        ],
    )
    dataset = load_ve(ve, root)
    assert dataset["label"] == [2, 0, 1] and dataset[0]["image"] == str(root / "12345.jpg")  # ".jpg" as the original
    batch = VECollator(processor, tr.albef_eval_transform(SIZE))(list(dataset))
    assert batch["labels"].tolist() == [2, 0, 1] and batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    torch.manual_seed(0)
    model = ta.AlbefForVisualEntailment(tiny_config(text=FULL_VOCAB, num_labels=3)).train()
    out = model(**batch)
    assert _finite(out.loss) and out.logits.shape == (3, 3)


def test_task_loaders_check_records(tmp_path, images, processor):
    root = images["red.png"].parent
    bad_label = write_json(tmp_path / "ve.json", [{"image": "red.png", "sentence": "x", "label": "maybe"}])
    with pytest.raises(BadRecordError, match=r"ve.json record 0 \(image .*red.png'\): label must be one of"):
        load_ve(bad_label, root)
    missing = write_json(
        tmp_path / "nlvr.json",
        [
            {"images": ["red.png", "nowhere.png"], "sentence": "x", "label": "True"},
            {"images": ["red.png", "green.jpg"], "sentence": "fine", "label": "False"},
        ],
    )
    with pytest.raises(BadRecordError, match=r"record 0 \(image .*nowhere.png'\): image file not found"):
        load_nlvr(missing, root)
    kept = load_nlvr(missing, root, skip_bad_records=True)
    assert len(kept) == 1 and kept.skipped_records.count == 1
    no_vg_root = write_json(
        tmp_path / "vqa.json", [{"question": "q?", "answer": "a", "image": "1.jpg", "dataset": "vg"}]
    )
    with pytest.raises(BadRecordError, match=r"'1.jpg' is relative, but no image folder was given .*\(--vg_root"):
        load_vqa(no_vg_root, root)
    bad_question = write_json(tmp_path / "vqa2.json", [{"question": 3, "answer": ["a"], "image": "red.png"}])
    with pytest.raises(BadRecordError, match="question must be a string"):
        load_vqa(bad_question, root)
    # The collators check labels too (rows that do not come from these loaders).
    example = {"image": str(root / "red.png"), "sentence": "x", "label": 5, "record_index": 3}
    with pytest.raises(BadRecordError, match=r"record 3 .*label must be one of"):
        VECollator(processor, tr.albef_eval_transform(SIZE))([example])

    assert load_task_dataset("ve", tmp_path / "ve.json", root, skip_bad_records=True).num_rows == 0
    assert load_task_dataset(
        "retrieval", write_json(tmp_path / "r.json", [{"image": "red.png", "caption": ["a"]}]), root, train=False
    ).texts == ["a"]
    with pytest.raises(ValueError, match="Unknown task"):
        load_task_dataset("grounding", tmp_path / "ve.json", root)
