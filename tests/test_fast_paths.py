"""The exact fast paths (fast_itm.py, fast_vqa.py) against the eager path: tiny random models, padded texts,
several candidates, both attention backends, bf16, and the original code's fixtures."""

import pytest
import torch

import transformers_albef as ta
from transformers_albef.fast_itm import (
    fuse_grouped,
    itm_match_scores,
    itm_scores_for_image,
    itm_scores_for_text,
    rerank_scores,
)
from transformers_albef.fast_vqa import answer_log_likelihoods
from transformers_albef.objectives import sequence_lm_loss
from transformers_albef.retrieval import retrieval_score_matrices

from .parity_utils import assert_close, load_fixture
from .parity_utils import tiny_config as fixture_config
from .tiny_models import TWO_IMAGES, tiny_batch, tiny_config

ATOL = 1e-5
BACKENDS = ["eager", "sdpa"]


def make(cls, attn="eager", dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    config = tiny_config(**kwargs)
    config._attn_implementation = attn
    return cls(config).eval().to(dtype)


def ragged_texts(count=7, length=9, seed=1):
    """Texts of different lengths (1 to `length` tokens), right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, 512, (count, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    for row, used in enumerate(torch.randint(1, length + 1, (count,), generator=g).tolist()):
        ids[row, used:] = 0
        mask[row, used:] = 0
    return ids, mask


def towers(model, images=3, texts=7, length=9):
    pixel_values = tiny_batch(batch=images)[0].to(model.dtype)
    ids, mask = ragged_texts(texts, length)
    with torch.no_grad():
        image_states = model.vision_model(pixel_values).last_hidden_state
        text_states = model.text_model(ids, mask, mode="text").last_hidden_state
    return pixel_values, ids, mask, image_states, text_states


# ----- ITM ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 7])
def test_itm_one_image_k_texts_equals_eager(attn, k):
    model = make(ta.AlbefForRetrieval, attn)
    _, _, mask, image_states, text_states = towers(model)
    with torch.no_grad():
        for i in range(image_states.shape[0]):
            want = model.itm_logits(text_states[:k], mask[:k], image_states[i].expand(k, -1, -1))[:, 1]
            got = itm_scores_for_image(model, image_states[i], text_states[:k], mask[:k])
            assert_close(got, want, ATOL, name=f"itm one image {attn} k={k}")


@pytest.mark.parametrize("attn", BACKENDS)
def test_itm_one_text_k_images_equals_eager(attn):
    model = make(ta.AlbefForRetrieval, attn)
    _, _, mask, image_states, text_states = towers(model)
    k = image_states.shape[0]
    with torch.no_grad():
        for t in range(text_states.shape[0]):
            want = model.itm_logits(text_states[t].expand(k, -1, -1), mask[t].expand(k, -1), image_states)[:, 1]
            got = itm_scores_for_text(model, image_states, text_states[t], mask[t])
            assert_close(got, want, ATOL, name=f"itm one text {attn}")


@pytest.mark.parametrize("max_query_tokens", [1, 20, 8192])
def test_itm_pairs_grouping_and_padding_slots(max_query_tokens):
    """Arbitrary pairs (repeats, uneven groups): batches of several images, split groups and padding slots."""
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model, images=4, texts=7)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 4, (23,), generator=g)
    texts = torch.randint(0, 7, (23,), generator=g)
    with torch.no_grad():
        want = model.itm_logits(text_states[texts], mask[texts], image_states[images])[:, 1]
        got = itm_match_scores(model, image_states, text_states, mask, images, texts, max_query_tokens)
    assert_close(got, want, ATOL, name=f"itm pairs max_query_tokens={max_query_tokens}")
    assert itm_match_scores(model, image_states, text_states, mask, images[:0], texts[:0]).shape == (0,)


def test_itm_without_text_mask_means_no_padding():
    model = make(ta.AlbefForRetrieval)
    _, _, _, image_states, text_states = towers(model)
    with torch.no_grad():
        want = model.itm_logits(text_states, None, image_states[0].expand(7, -1, -1))[:, 1]
    assert_close(itm_scores_for_image(model, image_states[:1], text_states, None), want, ATOL, name="no mask")


@pytest.mark.parametrize("attn", BACKENDS)
def test_rerank_scores_equal_the_eager_evaluation(attn):
    model = make(ta.AlbefForRetrieval, attn)
    pixel_values, ids, mask, image_states, text_states = towers(model, images=4, texts=9)
    with torch.no_grad():
        want_i2t, want_t2i = retrieval_score_matrices(model, pixel_values, ids, mask, k=3)
        sims = model.get_image_features(pixel_values) @ model.get_text_features(ids, mask).t()
    got_i2t, got_t2i = rerank_scores(model, image_states, text_states, mask, sims, k=3, max_query_tokens=40)
    assert (got_i2t == -100).sum() == (want_i2t == -100).sum() == 4 * (9 - 3)
    assert_close(got_i2t, want_i2t, ATOL, name="score_i2t")
    assert_close(got_t2i, want_t2i, ATOL, name="score_t2i")


def test_rerank_scores_match_the_original_code():
    """The original evaluation's score matrices (tests/fixtures/tiny/retrieval, produced by salesforce/ALBEF)."""
    folder, inputs, outputs, meta = load_fixture("retrieval")
    model = ta.AlbefForRetrieval.from_original(folder / "checkpoint.pth", config=fixture_config(meta, "retrieval"))
    model.eval()
    ids, mask = inputs["eval_input_ids"], inputs["eval_attention_mask"]
    with torch.no_grad():
        image_states = model.vision_model(inputs["pixel_values"]).last_hidden_state
        text_states = model.text_model(ids, mask, mode="text").last_hidden_state
        sims = model.get_image_features(inputs["pixel_values"]) @ model.get_text_features(ids, mask).t()
    score_i2t, score_t2i = rerank_scores(model, image_states, text_states, mask, sims, k=meta["config"]["k_test"])
    assert_close(score_i2t, outputs["score_matrix_i2t"], ATOL, name="fast score_matrix_i2t")
    assert_close(score_t2i, outputs["score_matrix_t2i"], ATOL, name="fast score_matrix_t2i")


def test_fuse_grouped_equals_fusion_encoder_on_every_valid_position():
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model, images=2, texts=6)
    with torch.no_grad():
        want = model.fuse(text_states, mask, image_states.repeat_interleave(3, dim=0))
        got = fuse_grouped(model.text_model, text_states, mask, image_states)
        cls = fuse_grouped(model.text_model, text_states, mask, image_states, cls_only_last=True)
    valid = mask[:, :, None].expand_as(want)
    assert_close(got, want, ATOL, mask=valid, name="fuse_grouped")
    assert cls.shape == (6, 1, want.shape[-1])
    assert_close(cls[:, 0], want[:, 0], ATOL, name="fuse_grouped cls")


def test_itm_bf16_within_tolerance():
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model)
    with torch.no_grad():
        want = model.itm_logits(text_states, mask, image_states[0].expand(7, -1, -1))[:, 1]
        model.to(torch.bfloat16)
        eager = model.itm_logits(text_states.bfloat16(), mask, image_states[0].bfloat16().expand(7, -1, -1))[:, 1]
    got = itm_scores_for_image(model, image_states[0].bfloat16(), text_states.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    scale = float(want.abs().max())
    assert float((got.float() - want).abs().max()) <= 2e-2 * scale + 1e-3
    assert float((got.float() - eager.float()).abs().max()) <= 2e-2 * scale + 1e-3


def test_itm_fast_path_refuses_models_it_does_not_fit():
    vqa = make(ta.AlbefForQuestionAnswering)
    with pytest.raises(ValueError, match="no ITM head"):
        itm_scores_for_image(vqa, torch.zeros(1, 5, 32), torch.zeros(2, 3, 32), None)
    nlvr = make(ta.AlbefForVisualReasoning, text=TWO_IMAGES)
    with pytest.raises(ValueError, match="num_fused_images"):
        fuse_grouped(nlvr.text_model, torch.zeros(2, 3, 32), torch.ones(2, 3), torch.zeros(1, 5, 32))


# ----- VQA ----------------------------------------------------------------------------------------------------------
def answer_list(count=40, length=7, seed=1, vocab=(104, 120)):
    """`[CLS] a1 .. an [SEP]` answers of 1-4 tokens from a small vocabulary, so that many share prefixes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(count, length, dtype=torch.long)
    ids[:, 0] = 101
    for row, size in enumerate(torch.randint(1, min(5, length - 1), (count,), generator=g).tolist()):
        ids[row, 1 : 1 + size] = torch.randint(*vocab, (size,), generator=g)
        ids[row, 1 + size] = 102
    return ids, (ids != 0).long()


def vqa_inputs(questions=4):
    pixel_values, ids, mask = tiny_batch(batch=questions, length=8)  # odd rows padded
    answers, answer_mask = answer_list()
    return pixel_values, ids, mask, answers, answer_mask


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("k", [1, 10, 40])
def test_rank_answers_fast_equals_eager(attn, k):
    model = make(ta.AlbefForQuestionAnswering, attn)
    inputs = vqa_inputs()
    want = model.rank_answers(*inputs, k=k, return_details=True)
    got = model.rank_answers(*inputs, k=k, return_details=True, fast=True)
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert torch.equal(got.prerank_ids, want.prerank_ids)
    assert_close(got.topk_probs, want.topk_probs, ATOL, name=f"vqa topk_probs {attn} k={k}")
    assert_close(got.prerank_scores, want.prerank_scores, ATOL, name=f"vqa scores {attn} k={k}")
    ids, probs = model.rank_answers(*inputs, k=k, fast=True)
    assert torch.equal(ids, got.topk_ids) and torch.equal(probs, got.topk_probs)


def test_rank_answers_fast_single_question():
    model = make(ta.AlbefForQuestionAnswering)
    pixel_values, ids, mask, answers, answer_mask = vqa_inputs()
    inputs = (pixel_values[1:2], ids[1:2], mask[1:2], answers, answer_mask)  # a padded question
    want = model.rank_answers(*inputs, k=12, return_details=True)
    got = model.rank_answers(*inputs, k=12, return_details=True, fast=True)
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert_close(got.prerank_scores, want.prerank_scores, ATOL, name="vqa scores, one question")


def test_answer_log_likelihoods_equal_eager_decoder_loss():
    """Candidates with shared prefixes, repeated candidates and a question batch with padding."""
    model = make(ta.AlbefForQuestionAnswering)
    pixel_values, ids, mask, answers, answer_mask = vqa_inputs(questions=3)
    g = torch.Generator().manual_seed(5)
    candidates = torch.randint(0, answers.shape[0], (3, 12), generator=g)
    candidates[1, :4] = candidates[1, 0]  # the same answer several times
    with torch.no_grad():
        states = model.encode_questions(pixel_values, ids, mask)
        flat = answers[candidates.flatten()]
        logits = model.answer_logits(
            flat, answer_mask[candidates.flatten()], states.repeat_interleave(12, 0), mask.repeat_interleave(12, 0)
        )
        want = -sequence_lm_loss(logits[:, :-1], flat.masked_fill(flat == 0, -100)[:, 1:]).view(3, 12)
    got = answer_log_likelihoods(model, states, mask, answers, answer_mask, candidates)
    small_chunks = answer_log_likelihoods(model, states, mask, answers, None, candidates, vocab_chunk=3)
    assert_close(got, want, ATOL, name="answer log-likelihoods")
    assert_close(small_chunks, want, ATOL, name="answer log-likelihoods, small vocabulary chunks")


def test_rank_answers_fast_matches_the_original_code():
    """The original `rank_answer` outputs (tests/fixtures/tiny/vqa, produced by salesforce/ALBEF)."""
    folder, inputs, outputs, meta = load_fixture("vqa")
    config = fixture_config(meta, "vqa", distill=True)
    model = ta.AlbefForQuestionAnswering.from_original(folder / "checkpoint.pth", config=config).eval()
    ranking = model.rank_answers(
        inputs["pixel_values"],
        inputs["question_input_ids"],
        inputs["question_attention_mask"],
        inputs["answer_input_ids"],
        inputs["answer_attention_mask"],
        k=meta["rank_answer_k"],
        return_details=True,
        fast=True,
    )
    assert torch.equal(ranking.topk_ids, outputs["rank_answer_topk_ids"])
    assert_close(ranking.topk_probs, outputs["rank_answer_topk_probs"], ATOL, name="fast topk_probs")
    assert_close(ranking.prerank_scores, outputs["rank_answer_log_probs_sum"], ATOL, name="fast log_probs_sum")


def test_rank_answers_fast_bf16_within_tolerance():
    model = make(ta.AlbefForQuestionAnswering)
    inputs = vqa_inputs()
    want = model.rank_answers(*inputs, k=10, return_details=True)
    model.to(torch.bfloat16)
    pixel_values, *rest = inputs
    got = model.rank_answers(pixel_values.bfloat16(), *rest, k=10, return_details=True, fast=True)
    eager = model.rank_answers(pixel_values.bfloat16(), *rest, k=10, return_details=True)
    assert got.topk_probs.dtype == torch.bfloat16
    # Compare the scores of the same candidates (bf16 may order near-ties differently).
    assert torch.equal(got.prerank_ids, eager.prerank_ids)
    scale = float(want.prerank_scores.abs().max())
    assert float((got.prerank_scores.float() - eager.prerank_scores.float()).abs().max()) <= 2e-2 * scale
    same = got.prerank_ids == want.prerank_ids
    diff = (got.prerank_scores.float() - want.prerank_scores).abs()[same]
    assert float(diff.max()) <= 2e-2 * scale


# ----- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_fast_paths_on_cuda_match_cpu_eager(attn):
    retrieval = make(ta.AlbefForRetrieval)
    pixel_values, ids, mask, image_states, text_states = towers(retrieval, images=4, texts=9)
    with torch.no_grad():
        sims = retrieval.get_image_features(pixel_values) @ retrieval.get_text_features(ids, mask).t()
        want = retrieval_score_matrices(retrieval, pixel_values, ids, mask, k=3)
    retrieval.cuda().set_attn_implementation(attn)
    # Text states may stay on the CPU (a memory-mapped cache): batches are moved to the images' device.
    got = rerank_scores(retrieval, image_states.cuda(), text_states, mask, sims.cuda(), k=3)
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, 1e-4, name=f"cuda rerank {attn}")

    vqa = make(ta.AlbefForQuestionAnswering)
    inputs = vqa_inputs()
    want = vqa.rank_answers(*inputs, k=10)
    vqa.cuda().set_attn_implementation(attn)
    got = vqa.rank_answers(*(x.cuda() for x in inputs), k=10, fast=True)
    assert torch.equal(got[0].cpu(), want[0])
    assert_close(got[1].cpu(), want[1], 1e-4, name=f"cuda vqa {attn}")
