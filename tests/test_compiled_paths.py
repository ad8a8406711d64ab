"""The units a GPU run compiles (issue 17) trace whole: no graph break, hence no host synchronisation inside them.

`torch._dynamo.explain` runs each unit through Dynamo (the graphs are not compiled, so this is fast) and counts the
graphs and the breaks between them; a break is a host read, a data-dependent shape or an untraceable call. The
units: the vision tower, the text tower (mode "text"), the fusion layers with grouped cross-attention (what
`itm_logits_for_pairs` runs per batch), the question encoder, one cached answer-decoder step, `rank_answers` whole, and
the training forwards (retrieval ITC + ITM; pre-training, whose masked-token selection is the one place left that
breaks). tests/test_grouped_and_cached.py checks the towers, the grouped ITM and a decoder step with eager attention
and the "eager" backend; these add sdpa (the GPU default), the public entry points and the training forwards.

The inductor test (it compiles C++ on the CPU, ~15 s) compiles the vision and text towers, checks them against
eager in fp32, and reads the generated code to see that attention stays one `scaled_dot_product_attention` call and is
not decomposed into matmul + softmax."""

import re
import shutil

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import transformers_albef as ta
from transformers_albef.models.albef.modeling_albef import mask_tokens

from .parity_utils import assert_close
from .tiny_models import tiny_batch, tiny_config

ATOL = 1e-5
BACKENDS = ["eager", "sdpa"]


def make(cls, attn="sdpa", **kwargs):
    torch.manual_seed(0)
    config = tiny_config(**kwargs)
    config._attn_implementation = attn
    return cls(config).eval()


def explain(fn, *args):
    """Dynamo's account of `fn(*args)` (which it runs once) and its breaks as lines: reason, where."""
    torch._dynamo.reset()
    result = torch._dynamo.explain(fn)(*args)
    breaks = [
        f"{b.reason.splitlines()[0][:160]} at "
        + ", ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})" for f in b.user_stack[-2:])
        for b in result.break_reasons
    ]
    return result, breaks


def assert_traces_whole(fn, *args):
    result, breaks = explain(fn, *args)
    assert result.graph_break_count == 0 and result.graph_count == 1, "\n".join(breaks)
    return result


def full_graph(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)


# ----- inference units ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
@torch.no_grad()
def test_towers_trace_whole(attn):
    model = make(ta.AlbefForRetrieval, attn)
    pixel_values, ids, mask = tiny_batch(batch=4, length=9)  # odd rows padded
    assert_traces_whole(lambda x: model.get_image_features(x).pooler_output, pixel_values)
    assert_traces_whole(lambda i, m: model.get_text_features(i, m).pooler_output, ids, mask)
    want = model.get_text_features(ids, mask).pooler_output
    got = full_graph(lambda i, m: model.get_text_features(i, m).pooler_output)(ids, mask)
    assert_close(got, want, ATOL, name=f"compiled text features {attn}")


@pytest.mark.parametrize("attn", BACKENDS)
@torch.no_grad()
def test_grouped_itm_batch_traces_whole(attn):
    """The fusion forward that `itm_logits_for_pairs` runs for each planned batch: `group_size` texts per image,
    [CLS]-only last layer. The planning around it reads host tensors only (it is not compiled)."""
    model = make(ta.AlbefForRetrieval, attn)
    pixel_values, ids, mask = tiny_batch(batch=6, length=9)
    image_states = model.vision_model(pixel_values[:2]).last_hidden_state
    text_states = model.text_model(ids, mask, mode="text").last_hidden_state

    def grouped_itm(text_states, mask, image_states):
        fused = model.fuse(text_states, mask, image_states, group_size=3, cls_only=True)
        return model.itm_head(fused[:, 0])

    assert_traces_whole(grouped_itm, text_states, mask, image_states)
    want = model.itm_logits_for_pairs(
        image_states, text_states, mask, torch.arange(2).repeat_interleave(3), torch.arange(6)
    )
    assert_close(full_graph(grouped_itm)(text_states, mask, image_states), want, ATOL, name=f"grouped ITM {attn}")


@pytest.mark.parametrize("attn", BACKENDS)
@torch.no_grad()
def test_question_encoder_decoder_step_and_rank_answers_trace_whole(attn):
    model = make(ta.AlbefForQuestionAnswering, attn)
    pixel_values, ids, mask = tiny_batch(batch=2, length=8)
    answers = torch.tensor([[101, 200, 201, 102], [101, 200, 102, 0], [101, 300, 102, 0], [101, 301, 302, 102]])
    assert_traces_whole(lambda p, i, m: model.encode_questions(p, i, m), pixel_values, ids, mask)
    states = model.encode_questions(pixel_values, ids, mask)

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    model(answer_input_ids=answers[:2, :1], question_states=states, question_attention_mask=mask, cache=cache)

    def step(tokens, cache):
        return model(answer_input_ids=tokens, question_states=states, question_attention_mask=mask, cache=cache).logits

    assert_traces_whole(step, answers[:2, 1:2], cache)  # explain runs the step: the cache now holds 2 positions
    want = model.answer_logits(answers[:2, :3], None, states, mask)[:, 2]
    got = full_graph(step)(answers[:2, 2:3], cache)
    assert_close(got[:, 0], want, ATOL, name=f"compiled decoder step {attn}")

    answer_mask = (answers != 0).long()
    assert_traces_whole(lambda *a: model.rank_answers(*a, k=3), pixel_values, ids, mask, answers, answer_mask)


# ----- training forwards --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_retrieval_training_forward_traces_whole(attn):
    """ITC with the momentum queues (enqueued on the device, no pointer read) and ITM with hard negatives."""
    model = make(ta.AlbefForRetrieval, attn, distill=True).train()
    pixel_values, ids, mask = tiny_batch(batch=4, length=9)
    image_ids = torch.tensor([0, 1, 0, 2])
    ptr = int(model.momentum.queue_ptr)

    def loss(pixel_values, ids, mask, image_ids):
        return model(pixel_values, ids, mask, return_loss=True, image_ids=image_ids, hard_negatives="sample").loss

    assert_traces_whole(loss, pixel_values, ids, mask, image_ids)
    assert int(model.momentum.queue_ptr) == (ptr + 4) % model.config.queue_size  # the traced step enqueued


def test_pretraining_forward_breaks_only_at_the_masked_token_selection():
    """ITC + ITM trace whole. The MLM loss scores the masked tokens only (boolean indexing, whose size depends on the
    mask: the vocabulary projection is then ~7x smaller) and checks for an empty selection; those are its breaks,
    and the only ones (any other would be reported at its own line)."""
    model = make(ta.AlbefForPreTraining, "sdpa").train()
    pixel_values, ids, mask = tiny_batch(batch=4, length=9)
    torch.manual_seed(1)
    masked_ids, labels = mask_tokens(ids, model.config.text_config.vocab_size)

    def loss(pixel_values, ids, mask, masked_ids, labels):
        return model(pixel_values, ids, mask, return_loss=True, masked_input_ids=masked_ids, mlm_labels=labels).loss

    result, breaks = explain(loss, pixel_values, ids, mask, masked_ids, labels)
    assert result.graph_break_count, "the masked-token selection traces now: drop it from this test's exceptions"
    for b in result.break_reasons:
        inner = b.user_stack[-1]
        selection = inner.name in ("mlm_logits", "mlm_loss") or (
            inner.name == "forward" and "mlm_labels[masked]" in (inner.line or "")
        )
        assert selection, "\n".join(breaks)


# ----- inductor on the CPU ------------------------------------------------------------------------------------------
SDPA_CALL = re.compile(r"torch\.ops\.aten\._scaled_dot_product_\w+\.default\(")
KERNEL_NAME = re.compile(r"\b(?:cpp|triton)_\w+")


def compiled_code(fn, *args):
    """`fn(*args)` compiled by inductor (whole graph), and the Python + C++ code it generated."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    with torch.no_grad():
        result, code = run_and_get_code(compiled, *args)
    return result, "\n".join(code)


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on the CPU"
)
def test_inductor_keeps_sdpa_and_matches_eager():
    """Inductor (C++ on the CPU, ~15 s) compiles the vision tower and the text tower whole; their outputs equal eager
    in fp32, and every attention layer is a call of the fused SDPA kernel in the generated code: attention was not
    decomposed into matmul + softmax (no generated kernel computes a softmax)."""
    model = make(ta.AlbefForRetrieval, "sdpa")
    pixel_values, ids, mask = tiny_batch(batch=4, length=9)  # odd rows padded: the text tower's SDPA takes a mask
    with torch.no_grad():
        want_image = model.vision_model(pixel_values).last_hidden_state
        want_text = model.text_model(ids, mask, mode="text").last_hidden_state
    got_image, image_code = compiled_code(lambda x: model.vision_model(x).last_hidden_state, pixel_values)
    got_text, text_code = compiled_code(lambda i, m: model.text_model(i, m, mode="text").last_hidden_state, ids, mask)
    assert_close(got_image, want_image, 1e-4, name="inductor vision tower")
    valid = mask[:, :, None].expand_as(want_text).bool()
    assert_close(got_text, want_text, 1e-4, mask=valid, name="inductor text tower")
    layers = {"vision": model.config.vision_config.num_hidden_layers, "text": model.config.text_config.fusion_layer}
    for name, code in (("vision", image_code), ("text", text_code)):
        assert len(SDPA_CALL.findall(code)) == layers[name], f"{name}: SDPA calls in the generated code"
        kernels = set(KERNEL_NAME.findall(code))
        assert kernels and not [k for k in kernels if "softmax" in k], f"{name}: attention decomposed: {kernels}"
