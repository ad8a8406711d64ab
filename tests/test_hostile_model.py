"""Hostile input to the model folder, table-driven: every case names the bad input, the call, the error class and
what its message must say (what was wrong, where, what was expected). The tools' side (CLI, converter, training,
Hub folders) is in test_hostile_tools.py, the retrieval index's in the retrieval tests."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BertTokenizer, GenerationConfig

import transformers_albef as ta

from .tiny_models import TWO_IMAGES, tiny_batch, tiny_config

torch.manual_seed(0)
MODELS = {
    "itc": ta.AlbefModel(tiny_config()).eval(),
    "retrieval": ta.AlbefForRetrieval(tiny_config()).eval(),
    "pretrain": ta.AlbefForPreTraining(tiny_config()).eval(),
    "ve": ta.AlbefForVisualEntailment(tiny_config(num_labels=3)).eval(),
    "nlvr": ta.AlbefForVisualReasoning(tiny_config(text=TWO_IMAGES, num_labels=2)).eval(),
    "ta": ta.AlbefForTextAssignment(tiny_config(text=TWO_IMAGES)).eval(),
    "vqa": ta.AlbefForQuestionAnswering(tiny_config()).eval(),
}
PIXELS, IDS, MASK = tiny_batch(batch=4)
PAIRS = torch.stack([PIXELS, PIXELS.flip(0)], dim=1)
ANSWERS = torch.tensor([[101, 200, 102, 0], [101, 201, 202, 102], [101, 203, 102, 0]])
ANSWER_MASK = (ANSWERS != 0).long()
PROCESSOR = ta.AlbefProcessor.from_bert_vocab(32)
STATES = MODELS["retrieval"].vision_model(PIXELS).last_hidden_state.detach()
TEXT_STATES = MODELS["retrieval"].text_model(IDS, MASK, mode="text").last_hidden_state.detach()


def ids_with(value, dtype=torch.long):
    ids = IDS.clone().to(dtype)
    ids[0, 1] = value
    return ids


def mask_with(row, column, value=0):
    mask = MASK.clone()
    mask[row, column] = value
    return mask


def heads(*names):
    return [MODELS[name] for name in names]


# (case id, call, exception class, message regex)
CASES = [
    # ----- pixel values, every head that takes images -----
    *[
        (
            f"{name}: uint8 pixels",
            lambda m=m, n=name: m(PAIRS.byte() if n == "nlvr" else PIXELS.byte(), IDS, MASK),
            TypeError,
            r"pixel_values must be floating point.*uint8",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: NaN pixels",
            lambda m=m, n=name: m(torch.full_like(PAIRS if n == "nlvr" else PIXELS, float("nan")), IDS, MASK),
            ValueError,
            r"NaN or infinite",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: infinite pixels",
            lambda m=m, n=name: m(torch.full_like(PAIRS if n == "nlvr" else PIXELS, float("inf")), IDS, MASK),
            ValueError,
            r"NaN or infinite",
        )
        for name, m in MODELS.items()
        if name != "nlvr"
    ],
    *[
        (
            f"{name}: wrong image size",
            lambda m=m: m(torch.zeros(4, 3, 48, 48), IDS, MASK),
            ValueError,
            r"\(48, 48\) but this model takes 32x32",
        )
        for name, m in MODELS.items()
        if name != "nlvr"
    ],
    *[
        (
            f"{name}: 3-D pixels",
            lambda m=m: m(torch.zeros(3, 32, 32), IDS[:1], MASK[:1]),
            ValueError,
            r"pixel_values must be a \(batch, (3|channels), (32|height), (32|width)\) tensor, got \(3, 32, 32\)",
        )
        for name, m in MODELS.items()
        if name != "nlvr"
    ],
    *[
        (f"{name}: one channel", lambda m=m: m(torch.zeros(4, 1, 32, 32), IDS, MASK), ValueError, r"3 channels")
        for name, m in MODELS.items()
        if name != "nlvr"
    ],
    (
        "nlvr: one image per sentence",
        lambda: MODELS["nlvr"](PIXELS, IDS, MASK),
        ValueError,
        r"exactly two images per sentence",
    ),
    (
        "nlvr: three images per sentence",
        lambda: MODELS["nlvr"](torch.zeros(4, 3, 3, 32, 32), IDS, MASK),
        ValueError,
        r"exactly two images per sentence",
    ),
    (
        "itc: empty image batch",
        lambda: MODELS["itc"].get_image_features(torch.zeros(0, 3, 32, 32)),
        ValueError,
        r"empty batch \(0 images\)",
    ),
    (
        "itc: pixel list instead of tensor",
        lambda: MODELS["itc"].get_image_features([[0.0]]),
        ValueError,
        r"must be a \(batch, 3, 32, 32\) tensor, got list",
    ),
    # ----- token ids -----
    *[
        (
            f"{name}: id beyond the vocabulary",
            lambda m=m, n=name: m(PAIRS if n == "nlvr" else PIXELS, ids_with(512), MASK),
            ValueError,
            r"input_ids must lie in \[0, 512\).*512",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: negative id",
            lambda m=m, n=name: m(PAIRS if n == "nlvr" else PIXELS, ids_with(-1), MASK),
            ValueError,
            r"input_ids must lie in \[0, 512\).*-1",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: float ids",
            lambda m=m, n=name: m(PAIRS if n == "nlvr" else PIXELS, IDS.float(), MASK),
            TypeError,
            r"input_ids must be integer token ids, got torch.float32",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: text longer than the position table",
            lambda m=m, n=name: m(
                PAIRS if n == "nlvr" else PIXELS, torch.ones(4, 65, dtype=torch.long), torch.ones(4, 65)
            ),
            ValueError,
            r"65 tokens long but the model has 64 positions",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: mask of another shape",
            lambda m=m, n=name: m(PAIRS if n == "nlvr" else PIXELS, IDS, MASK[:, :3]),
            ValueError,
            r"attention_mask must be \(4, 7\)",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: [CLS] masked out",
            lambda m=m, n=name: m(PAIRS if n == "nlvr" else PIXELS, IDS, mask_with(2, 0)),
            ValueError,
            r"texts \[2\] have attention_mask 0 at position 0",
        )
        for name, m in MODELS.items()
    ],
    *[
        (
            f"{name}: more images than texts",
            lambda m=m, n=name: m(
                torch.cat([PIXELS, PIXELS]),
                IDS,
                MASK,
                **({"use_itm_head": True} if n in ("retrieval", "pretrain") else {}),
            ),
            ValueError,
            r"8 images and 4 texts",
        )
        for name, m in MODELS.items()
        if name not in ("itc", "nlvr")
    ],
    ("itc: no input at all", lambda: MODELS["itc"](), ValueError, r"needs pixel_values, input_ids or both"),
    (
        "itc: empty text batch",
        lambda: MODELS["itc"].get_text_features(torch.zeros(0, 4, dtype=torch.long)),
        ValueError,
        r"empty batch \(0 texts\)",
    ),
    ("itc: zero-length text", lambda: MODELS["itc"].get_text_features(IDS[:, :0]), ValueError, r"length >= 1"),
    ("itc: 1-D ids", lambda: MODELS["itc"].get_text_features(IDS[0]), ValueError, r"must be \(batch, length\)"),
    (
        "itc: ids as a list",
        lambda: MODELS["itc"].get_text_features([[101, 5]]),
        TypeError,
        r"input_ids must be a torch.Tensor",
    ),
    (
        "itc: fused states of unpaired batches",
        lambda: MODELS["itc"](PIXELS[:2], IDS, MASK, output_fused_states=True),
        ValueError,
        r"2 images and 4 texts",
    ),
    (
        "itc: fused states from one modality",
        lambda: MODELS["itc"](PIXELS, output_fused_states=True),
        ValueError,
        r"pass pixel_values and input_ids",
    ),
    # ----- text tower modes -----
    (
        "text: unknown mode",
        lambda: MODELS["itc"].text_model(IDS, MASK, mode="both"),
        ValueError,
        r"mode must be one of",
    ),
    (
        "text: fusion without image states",
        lambda: MODELS["itc"].text_model(IDS, MASK),
        ValueError,
        r"needs encoder_hidden_states",
    ),
    (
        "text: fusion mode with ids",
        lambda: MODELS["itc"].text_model(IDS, MASK, mode="fusion", encoder_hidden_states=STATES),
        ValueError,
        r'mode="fusion" takes text_embeds',
    ),
    (
        "text: image states of another width",
        lambda: MODELS["itc"].text_model(IDS, MASK, encoder_hidden_states=torch.zeros(4, 5, 16)),
        ValueError,
        r"\(4, tokens, 32\)",
    ),
    (
        "text: group size that does not divide",
        lambda: MODELS["itc"].text_model(IDS, MASK, encoder_hidden_states=STATES[:1], group_size=3),
        ValueError,
        r"groups of group_size=3",
    ),
    (
        "text: group size zero",
        lambda: MODELS["itc"].text_model(IDS, MASK, encoder_hidden_states=STATES, group_size=0),
        ValueError,
        r"group_size must be a positive int",
    ),
    (
        "text: image mask of another shape",
        lambda: MODELS["itc"].text_model(
            IDS, MASK, encoder_hidden_states=STATES, encoder_attention_mask=torch.ones(4, 3)
        ),
        ValueError,
        r"encoder_attention_mask must be \(4, 5\)",
    ),
    (
        "text: a cache on an encoder",
        lambda: MODELS["itc"].text_model(IDS, MASK, mode="text", cache=object()),
        ValueError,
        r"cache applies to the causal answer decoder",
    ),
    (
        "text: [CLS]-only on the decoder",
        lambda: MODELS["vqa"].text_decoder(IDS, MASK, encoder_hidden_states=TEXT_STATES, cls_only=True),
        ValueError,
        r"cls_only applies to the",
    ),
    # ----- grouped ITM -----
    (
        "itm pairs: index past the texts",
        lambda: MODELS["retrieval"].itm_logits_for_pairs(
            STATES, TEXT_STATES, MASK, torch.tensor([0]), torch.tensor([9])
        ),
        ValueError,
        r"text_index must lie in \[0, 4\)",
    ),
    (
        "itm pairs: negative image index",
        lambda: MODELS["retrieval"].itm_logits_for_pairs(
            STATES, TEXT_STATES, MASK, torch.tensor([-1]), torch.tensor([0])
        ),
        ValueError,
        r"image_index must lie in",
    ),
    (
        "itm pairs: lists of different lengths",
        lambda: MODELS["retrieval"].itm_logits_for_pairs(
            STATES, TEXT_STATES, MASK, torch.tensor([0, 1]), torch.tensor([0])
        ),
        ValueError,
        r"differ",
    ),
    (
        "itm pairs: 2-D image states",
        lambda: MODELS["retrieval"].itm_logits_for_pairs(
            STATES[0], TEXT_STATES, MASK, torch.tensor([0]), torch.tensor([0])
        ),
        ValueError,
        r"image_states must be \(images, tokens, hidden\)",
    ),
    (
        "itm pairs: mask of another shape",
        lambda: MODELS["retrieval"].itm_logits_for_pairs(
            STATES, TEXT_STATES, MASK[:2], torch.tensor([0]), torch.tensor([0])
        ),
        ValueError,
        r"text_attention_mask must be \(4, 7\)",
    ),
    (
        "itm pairs: [CLS] masked",
        lambda: MODELS["retrieval"].itm_logits_for_pairs(
            STATES, TEXT_STATES, mask_with(1, 0), torch.tensor([0]), torch.tensor([1])
        ),
        ValueError,
        r"texts \[1\] have attention_mask 0 at position 0",
    ),
    (
        "retrieval_scores: k=0",
        lambda: MODELS["retrieval"].retrieval_scores(PIXELS, IDS, MASK, k=0),
        ValueError,
        r"k must be a positive int, got 0",
    ),
    (
        "retrieval_scores: k=-3",
        lambda: MODELS["retrieval"].retrieval_scores(PIXELS, IDS, MASK, k=-3),
        ValueError,
        r"k must be a positive int, got -3",
    ),
    (
        "retrieval_scores: k=2.5",
        lambda: MODELS["retrieval"].retrieval_scores(PIXELS, IDS, MASK, k=2.5),
        ValueError,
        r"k must be a positive int",
    ),
    # ----- training forwards -----
    (
        "retrieval loss without image ids",
        lambda: MODELS["retrieval"](PIXELS, IDS, MASK, return_loss=True),
        ValueError,
        r"needs image_ids",
    ),
    (
        "retrieval loss without momentum",
        lambda: MODELS["retrieval"](PIXELS, IDS, MASK, return_loss=True, image_ids=torch.arange(4)),
        ValueError,
        r"init_momentum",
    ),
    (
        "retrieval loss: image ids of another length",
        lambda: MODELS["retrieval"](PIXELS, IDS, MASK, return_loss=True, image_ids=torch.arange(3)),
        ValueError,
        r"image_ids has 3 entries for 4",
    ),
    (
        "pretraining: labels without masked ids",
        lambda: MODELS["pretrain"](PIXELS, IDS, MASK, return_loss=True, mlm_labels=IDS),
        ValueError,
        r"masked_input_ids and mlm_labels together",
    ),
    (
        "pretraining: unknown hard-negative strategy",
        lambda: MODELS["pretrain"](PIXELS, IDS, MASK, return_loss=True, hard_negatives="easiest"),
        ValueError,
        r"hard_negatives must be one of",
    ),
    (
        "vqa: answers per question that do not add up",
        lambda: MODELS["vqa"](PIXELS, IDS, MASK, answer_input_ids=ANSWERS, answers_per_question=[1, 1, 1, 1]),
        ValueError,
        r"answers_per_question \[1, 1, 1, 1\] must have one entry per question",
    ),
    (
        "vqa: decoding and encoding at once",
        lambda: MODELS["vqa"](PIXELS, IDS, MASK, question_states=TEXT_STATES, answer_input_ids=ANSWERS),
        ValueError,
        r"not both",
    ),
    (
        "vqa: decoding without answer tokens",
        lambda: MODELS["vqa"](question_states=TEXT_STATES),
        ValueError,
        r"needs answer_input_ids",
    ),
    ("vqa: no question", lambda: MODELS["vqa"](), ValueError, r"needs pixel_values and the question's input_ids"),
    # ----- answer ranking and generation -----
    *[
        (
            f"rank_answers: k={bad!r}",
            lambda bad=bad: MODELS["vqa"].rank_answers(PIXELS, IDS, MASK, ANSWERS, ANSWER_MASK, k=bad),
            ValueError,
            r"k must be between 1 and the number of answers \(3\), got",
        )
        for bad in (0, -1, 1.5)
    ],
    (
        "rank_answers: k above the list",
        lambda: MODELS["vqa"].rank_answers(PIXELS, IDS, MASK, ANSWERS, ANSWER_MASK, k=4),
        ValueError,
        r"number of answers \(3\), got 4",
    ),
    (
        "rank_answers: empty answer list",
        lambda: MODELS["vqa"].rank_answers(PIXELS, IDS, MASK, ANSWERS[:0], ANSWER_MASK[:0], k=1),
        ValueError,
        r"the answer list is empty",
    ),
    (
        "rank_answers: answers of one token",
        lambda: MODELS["vqa"].rank_answers(PIXELS, IDS, MASK, ANSWERS[:, :1], ANSWER_MASK[:, :1], k=1),
        ValueError,
        r"the answer list is empty",
    ),
    (
        "rank_answers: mask of another shape",
        lambda: MODELS["vqa"].rank_answers(PIXELS, IDS, MASK, ANSWERS, ANSWER_MASK[:, :2], k=2),
        ValueError,
        r"answer_attention_mask \(3, 2\) must match",
    ),
    *[
        (
            f"generate: max_new_tokens={bad!r}",
            lambda bad=bad: MODELS["vqa"].generate(PIXELS, IDS, MASK, max_new_tokens=bad),
            ValueError,
            r"max_new_tokens must be a positive int",
        )
        for bad in (0, -1, 1.5, True, "5")
    ],
    ("generate: no image", lambda: MODELS["vqa"].generate(input_ids=IDS), ValueError, r"needs pixel_values"),
    (
        "generate: unpaired batches",
        lambda: MODELS["vqa"].generate(PIXELS[:2], IDS, MASK),
        ValueError,
        r"2 images and 4 texts",
    ),
    (
        "generate: beams with fewer returns asked than allowed",
        lambda: MODELS["vqa"].generate(PIXELS, IDS, MASK, num_beams=2, num_return_sequences=3),
        ValueError,
        r"num_return_sequences",
    ),
    (
        "generate: a config with max_new_tokens=0",
        lambda: MODELS["vqa"].generate(PIXELS, IDS, MASK, generation_config=GenerationConfig(max_new_tokens=0)),
        ValueError,
        r"max_new_tokens",
    ),
    # ----- Grad-CAM -----
    (
        "gradcam: unknown mode",
        lambda: MODELS["retrieval"].gradcam(PIXELS, IDS, MASK, mode="rollout"),
        ValueError,
        r"mode must be one of",
    ),
    (
        "gradcam: a layer without cross-attention",
        lambda: MODELS["retrieval"].gradcam(PIXELS, IDS, MASK, layer=0),
        ValueError,
        r"fusion layer",
    ),
    (
        "gradcam: unpaired batches",
        lambda: MODELS["retrieval"].gradcam(PIXELS[:2], IDS, MASK),
        ValueError,
        r"2 images and 4 texts",
    ),
    # ----- processor and image processor -----
    ("processor: nothing to process", lambda: PROCESSOR(), ValueError, r"needs `images`, `text` or both"),
    ("processor: empty text", lambda: PROCESSOR(text=""), ValueError, r"empty texts at positions \[0\]"),
    (
        "processor: blank text in a batch",
        lambda: PROCESSOR(text=["a cat", "   "]),
        ValueError,
        r"empty texts at positions \[1\]",
    ),
    ("processor: empty list of texts", lambda: PROCESSOR(text=[]), ValueError, r"empty list of texts"),
    ("processor: a number as text", lambda: PROCESSOR(text=5), ValueError, r"string or a sequence of strings"),
    ("processor: mixed list", lambda: PROCESSOR(text=["a", 3]), ValueError, r"string or a sequence of strings"),
    (
        "processor: unknown cleaning",
        lambda: PROCESSOR(text="a", clean_text="tweet"),
        ValueError,
        r"`clean_text` must be 'caption', 'question' or None",
    ),
    ("processor: max_length 0", lambda: PROCESSOR(text="a", max_length=0), ValueError, r"at least 1"),
    (
        "processor: no special tokens",
        lambda: PROCESSOR(text="a", add_special_tokens=False),
        ValueError,
        r"always start with \[CLS\]",
    ),
    (
        "processor: unsupported option",
        lambda: PROCESSOR(text="a", return_overflowing_tokens=True),
        ValueError,
        r"does not support these text options",
    ),
    ("processor: empty answers", lambda: PROCESSOR.encode_answers(["yes", ""]), ValueError, r"empty texts"),
    (
        "processor: tokenizer without vocabulary",
        lambda: ta.AlbefProcessor(ta.AlbefImageProcessor(size=32), BertTokenizer()),
        ValueError,
        r"only its 5 special tokens, no vocabulary",
    ),
    (
        "image: 0x0 picture",
        lambda: PROCESSOR(images=PIL.Image.new("RGB", (0, 0))),
        ValueError,
        r"image 0 is 0x0 pixels",
    ),
    ("image: 0-wide array", lambda: PROCESSOR(images=np.zeros((5, 0, 3), np.uint8)), ValueError, r"is 5x0 pixels"),
    (
        "image: NaN array",
        lambda: PROCESSOR(images=np.full((8, 8, 3), np.nan, np.float32)),
        ValueError,
        r"image 0 holds NaN or infinite values",
    ),
    (
        "image: already rescaled floats",
        lambda: PROCESSOR(images=np.full((8, 8, 3), 0.5, np.float32)),
        ValueError,
        r"values in \[0, 1\], which do_rescale=True would divide by 255 again",
    ),
    (
        "image: two channels",
        lambda: PROCESSOR(images=np.zeros((8, 8, 2), np.uint8)),
        ValueError,
        r"1 \(grayscale\), 3 \(RGB\) or 4 \(RGBA\) channels",
    ),
    (
        "image: 5-D array",
        lambda: PROCESSOR(images=np.zeros((1, 1, 8, 8, 3), np.uint8)),
        ValueError,
        r"expects arrays of shape",
    ),
    ("image: empty list", lambda: PROCESSOR(images=[]), ValueError, r"empty list of images"),
    ("image: a dict", lambda: PROCESSOR(images={"a": 1}), ValueError, r"expects PIL images, numpy arrays"),
    # ----- configuration -----
    (
        "config: hidden size not a multiple of heads",
        lambda: ta.AlbefTextConfig(hidden_size=30, num_attention_heads=4),
        ValueError,
        r"multiple of num_attention_heads",
    ),
    (
        "config: fusion layer past the layers",
        lambda: ta.AlbefTextConfig(fusion_layer=20),
        ValueError,
        r"fusion_layer \(20\) must lie in \[0, 12\]",
    ),
    (
        "config: image size not a multiple of the patch",
        lambda: ta.AlbefVisionConfig(image_size=100),
        ValueError,
        r"multiple of patch_size \(16\)",
    ),
    (
        "config: unknown preset",
        lambda: ta.AlbefConfig.from_preset("coco_large"),
        ValueError,
        r"Unknown ALBEF preset 'coco_large'",
    ),
]


def _case_id(case):
    return case[0]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_hostile_input_gets_a_clear_error(case):
    _, call, error, message = case
    with pytest.raises(Exception) as raised:
        with torch.no_grad():
            call()
    got = raised.value
    # Config validators wrap the ValueError; what the user reads first is still ours.
    cause = got if isinstance(got, error) else got.__cause__
    assert isinstance(cause, error), f"{type(got).__name__}: {got}"
    import re

    assert re.search(message, str(cause)), str(cause)


def test_there_are_enough_cases():
    assert len(CASES) >= 150
