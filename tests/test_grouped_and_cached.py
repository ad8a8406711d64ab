"""The model's one path against the per-pair / uncached computation it replaces: grouped ITM (each image's keys and
values projected once for its candidate texts, [CLS]-only last fusion layer, padding trimmed), the cached answer
decoder (rank_answers, generate), the original code's fixtures, bf16, and graph-break-free tracing."""

import warnings

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import transformers_albef as ta
from transformers_albef.models.albef.modeling_albef import sequence_lm_loss
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


def per_pair_itm(model, text_states, mask, image_states):
    """ITM logits the way the original computes them: every position of every fusion layer, one image row per
    text (no grouping, no [CLS]-only layer, no trimming)."""
    fused = model.text_model(
        text_embeds=text_states, attention_mask=mask, encoder_hidden_states=image_states, mode="fusion"
    ).last_hidden_state
    return model.itm_head(fused[:, 0])


def per_row_retrieval(model, pixel_values, ids, mask, k):
    """The original evaluation loop: one fusion batch per image row and per text row, the image repeated."""
    with torch.no_grad():
        image_states = model.vision_model(pixel_values).last_hidden_state
        text_states = model.text_model(ids, mask, mode="text").last_hidden_state
        sims = (
            model.get_image_features(pixel_values).pooler_output @ model.get_text_features(ids, mask).pooler_output.t()
        )
        i2t = torch.full(sims.shape, -100.0)
        for i in range(sims.shape[0]):
            top = sims[i].topk(min(k, sims.shape[1])).indices
            i2t[i, top] = per_pair_itm(model, text_states[top], mask[top], image_states[i].expand(len(top), -1, -1))[
                :, 1
            ]
        t2i = torch.full(sims.t().shape, -100.0)
        for t in range(sims.shape[1]):
            top = sims[:, t].topk(min(k, sims.shape[0])).indices
            t2i[t, top] = per_pair_itm(
                model, text_states[t].expand(len(top), -1, -1), mask[t].expand(len(top), -1), image_states[top]
            )[:, 1]
    return i2t, t2i


# ----- grouped ITM --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 7])
def test_itm_one_image_k_texts_equals_per_pair(attn, k):
    model = make(ta.AlbefForRetrieval, attn)
    _, _, mask, image_states, text_states = towers(model)
    with torch.no_grad():
        for i in range(image_states.shape[0]):
            want = per_pair_itm(model, text_states[:k], mask[:k], image_states[i].expand(k, -1, -1))
            got = model.itm_logits_for_image(image_states[i], text_states[:k], mask[:k])
            assert got.shape == (k, 2)
            assert_close(got, want, ATOL, name=f"itm one image {attn} k={k}")


@pytest.mark.parametrize("max_query_tokens", [1, 20, 8192])
def test_itm_pairs_grouping_and_padding_slots(max_query_tokens):
    """Arbitrary pairs (repeats, uneven groups): batches of several images, split groups and padding slots."""
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model, images=4, texts=7)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 4, (23,), generator=g)
    texts = torch.randint(0, 7, (23,), generator=g)
    with torch.no_grad():
        want = per_pair_itm(model, text_states[texts], mask[texts], image_states[images])
        got = model.itm_logits_for_pairs(image_states, text_states, mask, images, texts, max_query_tokens)
        empty = model.itm_logits_for_pairs(image_states, text_states, mask, images[:0], texts[:0])
    assert_close(got, want, ATOL, name=f"itm pairs max_query_tokens={max_query_tokens}")
    assert empty.shape == (0, 2)


def test_itm_aligned_pairs_and_no_mask():
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model, images=7)
    with torch.no_grad():
        assert_close(
            model.itm_logits(text_states, mask, image_states),
            per_pair_itm(model, text_states, mask, image_states),
            ATOL,
            name="aligned",
        )
        want = per_pair_itm(model, text_states, None, image_states[0].expand(7, -1, -1))
        assert_close(model.itm_logits_for_image(image_states[:1], text_states, None), want, ATOL, name="no mask")


def test_grouped_fusion_equals_repeated_source_on_every_valid_position():
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model, images=2, texts=6)
    with torch.no_grad():
        want = model.fuse(text_states, mask, image_states.repeat_interleave(3, dim=0))
        got = model.fuse(text_states, mask, image_states, group_size=3)
        cls = model.fuse(text_states, mask, image_states, group_size=3, cls_only=True)
    valid = mask[:, :, None].expand_as(want).bool()
    assert_close(got, want, ATOL, mask=valid, name="grouped fusion")
    assert cls.shape == (6, 1, want.shape[-1])
    assert_close(cls[:, 0], want[:, 0], ATOL, name="grouped fusion, [CLS] only")


def test_grouped_fusion_checks_its_shapes():
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model, images=2, texts=6)
    with pytest.raises(ValueError, match="groups of group_size=4"):
        model.fuse(text_states, mask, image_states, group_size=4)
    with pytest.raises(ValueError, match=r"\(3, tokens, 32\)"):
        model.fuse(text_states, mask, image_states, group_size=2)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        model.fuse(text_states, mask, image_states, group_size=0)
    with pytest.raises(ValueError, match="text_index must lie in"):
        model.itm_logits_for_pairs(image_states, text_states, mask, torch.tensor([0]), torch.tensor([6]))
    with pytest.raises(ValueError, match="differ"):
        model.itm_logits_for_pairs(image_states, text_states, mask, torch.tensor([0, 1]), torch.tensor([0]))


def test_grouped_fusion_of_two_images_per_text():
    """NLVR2's alternating sources take the same grouping."""
    model = make(ta.AlbefForVisualReasoning, text=TWO_IMAGES)
    pixel_values, ids, mask = tiny_batch(batch=4)
    with torch.no_grad():
        images = model.vision_model(pixel_values).last_hidden_state
        want = model.text_model(
            ids, mask, encoder_hidden_states=[images[:2].repeat_interleave(2, 0), images[2:].repeat_interleave(2, 0)]
        )
        got = model.text_model(ids, mask, encoder_hidden_states=[images[:2], images[2:]], group_size=2, cls_only=True)
    assert_close(got.last_hidden_state[:, 0], want.last_hidden_state[:, 0], ATOL, name="nlvr grouped [CLS]")


@pytest.mark.parametrize("attn", BACKENDS)
def test_retrieval_scores_equal_the_per_row_loop(attn):
    model = make(ta.AlbefForRetrieval, attn)
    pixel_values, ids, mask, _, _ = towers(model, images=4, texts=9)
    want_i2t, want_t2i = per_row_retrieval(model, pixel_values, ids, mask, k=3)
    got_i2t, got_t2i = model.retrieval_scores(pixel_values, ids, mask, k=3)
    assert (got_i2t == -100).sum() == (want_i2t == -100).sum() == 4 * (9 - 3)
    assert_close(got_i2t, want_i2t, ATOL, name="score_i2t")
    assert_close(got_t2i, want_t2i, ATOL, name="score_t2i")
    chunked = ta.chunked_retrieval_score_matrices(
        model, pixel_values, ids, mask, k=3, image_chunk_size=3, fusion_batch_size=2
    )
    assert_close(chunked[0], want_i2t, ATOL, name="chunked score_i2t")
    assert_close(chunked[1], want_t2i, ATOL, name="chunked score_t2i")


def test_grouped_retrieval_matches_the_original_code():
    """The original evaluation's score matrices (tests/fixtures/tiny/retrieval, produced by salesforce/ALBEF)."""
    folder, inputs, outputs, meta = load_fixture("retrieval")
    model = ta.AlbefForRetrieval.from_original(folder / "checkpoint.pth", config=fixture_config(meta, "retrieval"))
    model.eval()
    ids, mask = inputs["eval_input_ids"], inputs["eval_attention_mask"]
    score_i2t, score_t2i = retrieval_score_matrices(model, inputs["pixel_values"], ids, mask, meta["config"]["k_test"])
    assert_close(score_i2t, outputs["score_matrix_i2t"], ATOL, name="grouped score_matrix_i2t")
    assert_close(score_t2i, outputs["score_matrix_t2i"], ATOL, name="grouped score_matrix_t2i")


def test_itm_bf16_within_tolerance():
    model = make(ta.AlbefForRetrieval)
    _, _, mask, image_states, text_states = towers(model)
    with torch.no_grad():
        want = per_pair_itm(model, text_states, mask, image_states[0].expand(7, -1, -1))[:, 1]
        model.to(torch.bfloat16)
        got = model.itm_logits_for_image(image_states[0].bfloat16(), text_states.bfloat16(), mask)[:, 1]
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).abs().max()) <= 2e-2 * float(want.abs().max()) + 1e-3


def test_itm_methods_are_on_the_heads_that_have_an_itm_head():
    assert not hasattr(make(ta.AlbefForQuestionAnswering), "itm_logits_for_pairs")
    assert hasattr(make(ta.AlbefForPreTraining), "itm_logits_for_pairs")


# ----- cached answer decoder ----------------------------------------------------------------------------------------
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


@torch.no_grad()
def uncached_ranking(model, pixel_values, ids, mask, answers, answer_mask, k):
    """The original `rank_answer`: the decoder run from scratch on every candidate, the question repeated k times."""
    states = model.encode_questions(pixel_values, ids, mask)
    start = answers[:1, :1].expand(states.shape[0], 1)
    first = model.answer_logits(start, None, states, mask)[:, 0]
    probs = first.softmax(1).index_select(1, answers[:, 1])
    topk_probs, topk_ids = probs.topk(k, dim=1)
    candidates = answers[topk_ids.flatten()]
    logits = model.answer_logits(
        candidates, answer_mask[topk_ids.flatten()], states.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    )
    nll = sequence_lm_loss(logits[:, :-1], candidates.masked_fill(candidates == 0, -100)[:, 1:])
    return topk_ids, (topk_probs.reshape(-1).log() - nll).view(-1, k)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("k", [1, 10, 40])
def test_rank_answers_equals_uncached_decoding(attn, k):
    model = make(ta.AlbefForQuestionAnswering, attn)
    inputs = vqa_inputs()
    want_ids, want_scores = uncached_ranking(model, *inputs, k=k)
    got = model.rank_answers(*inputs, k=k, return_details=True)
    assert torch.equal(got.prerank_ids, want_ids)
    assert_close(got.prerank_scores, want_scores, ATOL, name=f"vqa scores {attn} k={k}")
    order = want_scores.softmax(-1).argsort(dim=1, descending=True)
    assert torch.equal(got.topk_ids, torch.gather(want_ids, 1, order))
    ids, probs = model.rank_answers(*inputs, k=k)
    assert torch.equal(ids, got.topk_ids) and torch.equal(probs, got.topk_probs)


def test_rank_answers_single_question_and_one_token_answers():
    model = make(ta.AlbefForQuestionAnswering)
    pixel_values, ids, mask, answers, answer_mask = vqa_inputs()
    inputs = (pixel_values[1:2], ids[1:2], mask[1:2], answers, answer_mask)  # a padded question
    want_ids, want_scores = uncached_ranking(model, *inputs, k=12)
    got = model.rank_answers(*inputs, k=12, return_details=True)
    assert torch.equal(got.prerank_ids, want_ids)
    assert_close(got.prerank_scores, want_scores, ATOL, name="vqa scores, one question")
    short = answers[:, :2].clone()  # `[CLS] token`: nothing left to decode after the first token
    want_ids, want_scores = uncached_ranking(model, *inputs[:3], short, (short != 0).long(), k=5)
    got = model.rank_answers(*inputs[:3], short, None, k=5, return_details=True)
    assert_close(got.prerank_scores, want_scores, ATOL, name="vqa scores, one-token answers")


def test_rank_answers_matches_the_original_code():
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
    )
    assert torch.equal(ranking.topk_ids, outputs["rank_answer_topk_ids"])
    assert_close(ranking.topk_probs, outputs["rank_answer_topk_probs"], ATOL, name="topk_probs")
    assert_close(ranking.prerank_scores, outputs["rank_answer_log_probs_sum"], ATOL, name="log_probs_sum")


def test_rank_answers_fast_flag_is_a_deprecated_no_op():
    model = make(ta.AlbefForQuestionAnswering)
    inputs = vqa_inputs()
    want = model.rank_answers(*inputs, k=5)
    with pytest.warns(FutureWarning, match="fast=.*deprecated"):
        got = model.rank_answers(*inputs, k=5, fast=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rank_answers_bf16_within_tolerance():
    model = make(ta.AlbefForQuestionAnswering)
    inputs = vqa_inputs()
    want = model.rank_answers(*inputs, k=10, return_details=True)
    model.to(torch.bfloat16)
    pixel_values, *rest = inputs
    got = model.rank_answers(pixel_values.bfloat16(), *rest, k=10, return_details=True)
    assert got.topk_probs.dtype == torch.bfloat16
    same = got.prerank_ids == want.prerank_ids  # bf16 may order near-ties differently
    scale = float(want.prerank_scores.abs().max())
    assert float((got.prerank_scores.float() - want.prerank_scores).abs()[same].max()) <= 2e-2 * scale


@torch.no_grad()
def uncached_greedy(model, pixel_values, ids, mask, max_new_tokens):
    """Greedy decoding that recomputes the whole prefix at every step (the decoder without a cache)."""
    text = model.config.text_config
    states = model.encode_questions(pixel_values, ids, mask)
    answers = torch.full((states.shape[0], 1), text.cls_token_id)
    done = torch.zeros(states.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        next_token = model.answer_logits(answers, None, states, mask)[:, -1].argmax(-1)
        next_token = next_token.masked_fill(done, text.pad_token_id)
        answers = torch.cat([answers, next_token[:, None]], dim=1)
        done |= next_token == text.sep_token_id
        if bool(done.all()):
            break
    return answers


def decoding_model(attn="eager"):
    """A tiny VQA model whose greedy answers end at different steps (its [SEP] logit is raised)."""
    model = make(ta.AlbefForQuestionAnswering, attn)
    with torch.no_grad():
        model.lm_head.bias[102] += 2.5
    return model


@pytest.mark.parametrize("attn", BACKENDS)
def test_greedy_generate_equals_uncached_greedy(attn):
    model = decoding_model(attn)
    pixel_values, ids, mask, _, _ = vqa_inputs()
    want = uncached_greedy(model, pixel_values, ids, mask, max_new_tokens=6)
    got = model.generate(pixel_values, ids, mask, max_new_tokens=6)
    assert torch.equal(got, want)
    assert (got[:, 0] == 101).all()
    uncached = model.generate(pixel_values, ids, mask, max_new_tokens=6, use_cache=False)
    assert torch.equal(uncached, want)


def test_generate_supports_transformers_generation():
    model = decoding_model()
    pixel_values, ids, mask, _, _ = vqa_inputs(questions=2)
    assert type(model).can_generate()
    default = model.generate(pixel_values, ids, mask)
    assert default.shape[1] <= 11  # [CLS] + max_new_tokens=10
    beams = model.generate(pixel_values, ids, mask, num_beams=3, max_new_tokens=5)
    beams_uncached = model.generate(pixel_values, ids, mask, num_beams=3, max_new_tokens=5, use_cache=False)
    assert torch.equal(beams, beams_uncached)  # the cache is reordered with the beams
    assert (beams[:, 0] == 101).all()
    three = model.generate(pixel_values, ids, mask, num_beams=3, num_return_sequences=3, max_new_tokens=4)
    assert three.shape[0] == 6
    torch.manual_seed(0)
    sampled = model.generate(pixel_values, ids, mask, do_sample=True, top_k=5, max_new_tokens=4)
    assert sampled.shape[0] == 2 and (sampled[:, 0] == 101).all()
    config = GenerationConfig(max_new_tokens=2, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    assert model.generate(pixel_values, ids, mask, generation_config=config).shape[1] <= 3
    out = model.generate(pixel_values, ids, mask, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert len(out.scores) == out.sequences.shape[1] - 1


def test_generate_checks_its_arguments():
    model = decoding_model()
    pixel_values, ids, mask, _, _ = vqa_inputs(questions=2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
            model.generate(pixel_values, ids, mask, max_new_tokens=bad)
    with pytest.raises(ValueError, match="needs pixel_values"):
        model.generate(input_ids=ids)


def test_one_cached_decoder_step_equals_the_full_prefix():
    model = decoding_model()
    pixel_values, ids, mask, answers, _ = vqa_inputs(questions=3)
    prefix = answers[:3, :4]
    with torch.no_grad():
        states = model.encode_questions(pixel_values[:3], ids[:3], mask[:3])
        want = model.answer_logits(prefix, None, states, mask[:3])
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        head = model(
            answer_input_ids=prefix[:, :3], question_states=states, question_attention_mask=mask[:3], cache=cache
        )
        step = model(
            answer_input_ids=prefix[:, 3:],
            question_states=states,
            question_attention_mask=mask[:3],
            answer_attention_mask=torch.ones(3, 4, dtype=torch.long),
            cache=head.cache,
        )
    assert head.cache.get_seq_length() == 4
    assert_close(head.logits, want[:, :3], ATOL, name="cached prefix")
    assert_close(step.logits[:, 0], want[:, 3], ATOL, name="cached step")


# ----- no host synchronisation: the hot paths trace whole ------------------------------------------------------------
def full_graph(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)


@torch.no_grad()
def test_towers_and_grouped_itm_trace_without_graph_breaks():
    model = make(ta.AlbefForRetrieval)
    pixel_values, ids, mask, image_states, text_states = towers(model, images=2, texts=6)
    vision = full_graph(lambda x: model.vision_model(x).last_hidden_state)
    assert_close(vision(pixel_values), image_states, ATOL, name="compiled vision tower")
    text = full_graph(lambda i, m: model.text_model(i, m, mode="text").last_hidden_state)
    assert_close(text(ids, mask), text_states, ATOL, name="compiled text tower")

    def grouped_itm(text_states, mask, image_states):
        fused = model.text_model(
            text_embeds=text_states,
            attention_mask=mask,
            encoder_hidden_states=image_states,
            mode="fusion",
            group_size=3,
            cls_only=True,
        ).last_hidden_state
        return model.itm_head(fused[:, 0])

    want = per_pair_itm(model, text_states, mask, image_states.repeat_interleave(3, 0))
    assert_close(full_graph(grouped_itm)(text_states, mask, image_states), want, ATOL, name="compiled grouped ITM")


@torch.no_grad()
def test_a_decoder_step_traces_without_graph_breaks():
    model = decoding_model()
    pixel_values, ids, mask, answers, _ = vqa_inputs(questions=2)
    states = model.encode_questions(pixel_values[:2], ids[:2], mask[:2])
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    model(answer_input_ids=answers[:2, :1], question_states=states, question_attention_mask=mask[:2], cache=cache)

    def step(tokens, cache):
        return model(answer_input_ids=tokens, question_states=states, question_attention_mask=mask[:2], cache=cache)

    got = full_graph(step)(answers[:2, 1:2], cache).logits
    want = model.answer_logits(answers[:2, :2], None, states, mask[:2])[:, 1]
    assert_close(got[:, 0], want, ATOL, name="compiled decoder step")


# ----- warnings ------------------------------------------------------------------------------------------------------
def test_model_paths_raise_no_future_warnings():
    """transformers' deprecations (e.g. renamed mask arguments) would become errors in a later 5.x."""
    retrieval = make(ta.AlbefForRetrieval, distill=True)
    vqa = decoding_model("sdpa")
    pixel_values, ids, mask = tiny_batch(batch=4)
    answers, answer_mask = answer_list()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        retrieval(pixel_values, ids, mask, use_itm_head=True)
        retrieval.retrieval_scores(pixel_values, ids, mask, k=2)
        retrieval.train()
        retrieval(pixel_values, ids, mask, return_loss=True, image_ids=torch.arange(4), alpha=0.4)
        vqa.rank_answers(pixel_values, ids, mask, answers, answer_mask, k=4)
        vqa.generate(pixel_values, ids, mask, max_new_tokens=3)
        vqa.generate(pixel_values, ids, mask, max_new_tokens=3, num_beams=2)
        vqa.train()
        vqa(pixel_values, ids, mask, answer_input_ids=answers[:4], answer_attention_mask=answer_mask[:4])


# ----- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_grouped_and_cached_paths_on_cuda_match_cpu(attn):
    retrieval = make(ta.AlbefForRetrieval)
    pixel_values, ids, mask, _, _ = towers(retrieval, images=4, texts=9)
    want = per_row_retrieval(retrieval, pixel_values, ids, mask, k=3)
    retrieval.cuda().set_attn_implementation(attn)
    got = retrieval.retrieval_scores(pixel_values.cuda(), ids.cuda(), mask.cuda(), k=3)
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, 1e-4, name=f"cuda retrieval {attn}")

    vqa = make(ta.AlbefForQuestionAnswering)
    inputs = vqa_inputs()
    want = vqa.rank_answers(*inputs, k=10)
    vqa.cuda().set_attn_implementation(attn)
    got = vqa.rank_answers(*(x.cuda() for x in inputs), k=10)
    assert torch.equal(got[0].cpu(), want[0])
    assert_close(got[1].cpu(), want[1], 1e-4, name=f"cuda vqa {attn}")
