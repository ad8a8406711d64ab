"""Numerical parity with the original salesforce/ALBEF code, on the tiny reference fixtures (fp32, CPU)."""

import pytest
import torch
import torch.nn.functional as F

from transformers_albef import (
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForRetrieval,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
)
from transformers_albef.retrieval import recall_at_k

from .fixtures.synth import read_keys_tsv, synth_state_dict
from .parity_utils import assert_after_step, assert_close, load_fixture, max_diff, tiny_config

ATOL = 1e-5  # every fixture's meta.json says 1e-5


def build(cls, kind, checkpoint=None, attn="eager", **overrides):
    folder, inputs, outputs, meta = load_fixture(kind)
    assert meta.get("tolerance", ATOL) == ATOL
    config = tiny_config(meta, kind, **overrides)
    config._attn_implementation = attn
    model = cls.from_original(checkpoint if checkpoint is not None else folder / "checkpoint.pth", config=config)
    return model.eval(), inputs, outputs, meta


def training_state(kind):
    """The fixture's full training state (momentum towers + queues) regenerated with the fixture's synth rule:
    the retrieval/grounding checkpoints are flat inference files, like mscoco.pth."""
    return synth_state_dict(read_keys_tsv(load_fixture(kind)[0] / "keys.tsv"))


def check_itc_itm(model, inputs, outputs, meta=None):
    """image/text tower outputs, ITC features and similarities, the fused grid and ITM logits."""
    pixel_values, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        image_states = model.vision_model(pixel_values).last_hidden_state
        text_states = model.text_model(ids, mask, mode="text").last_hidden_state
        image_feat = model.get_image_features(pixel_values).pooler_output
        text_feat = model.get_text_features(ids, mask).pooler_output
        out = model(pixel_values, ids, mask)
        grid_cls, grid_itm = [], []
        for i in range(image_states.shape[0]):
            fused = model.fuse(text_states, mask, image_states[i : i + 1].expand(ids.shape[0], -1, -1))
            grid_cls.append(fused[:, 0])
            grid_itm.append(model.itm_head(fused[:, 0]))
        n = min(image_states.shape[0], ids.shape[0])
        aligned = model.fuse(text_states[:n], mask[:n], image_states[:n])
    assert_close(image_states, outputs["image_embeds"], ATOL, name="image_embeds")
    assert_close(text_states, outputs["text_embeds"], ATOL, name="text_embeds")
    assert_close(image_feat, outputs["image_feat"], ATOL, name="image_feat")
    assert_close(text_feat, outputs["text_feat"], ATOL, name="text_feat")
    assert_close(out.logits_per_image, outputs["itc_sim_i2t"], ATOL, name="itc_sim_i2t")
    assert_close(torch.stack(grid_cls), outputs["fused_cls_grid"], ATOL, name="fused_cls_grid")
    assert_close(torch.stack(grid_itm), outputs["itm_logits"], ATOL, name="itm_logits")
    valid = mask[:n, :, None].expand_as(aligned)
    assert_close(aligned, outputs["fusion_last_hidden_state_aligned"], ATOL, mask=valid, name="fusion aligned")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pretrain_eval(attn):
    model, inputs, outputs, _ = build(AlbefForPreTraining, "pretrain", attn=attn)
    check_itc_itm(model, inputs, outputs)
    with torch.no_grad():
        image_states = model.vision_model(inputs["pixel_values_train"]).last_hidden_state
        logits = model.mlm_logits(inputs["masked_input_ids"], inputs["attention_mask"], image_states)
    assert_close(logits, outputs["mlm_logits_eval"], ATOL, name="mlm_logits_eval")


def test_pretrain_train_step():
    model, inputs, outputs, _ = build(AlbefForPreTraining, "pretrain")
    model.train()
    out = model(
        inputs["pixel_values_train"],
        inputs["input_ids"],
        inputs["attention_mask"],
        return_loss=True,
        masked_input_ids=inputs["masked_input_ids"],
        mlm_labels=inputs["mlm_labels"],
        alpha=float(inputs["alpha"]),
        hard_negatives="hardest",
    )
    assert_close(out.loss_mlm, outputs["loss_mlm"], ATOL, name="loss_mlm")
    assert_close(out.loss_itc, outputs["loss_ita"], ATOL, name="loss_ita")
    assert_close(out.loss_itm, outputs["loss_itm"], ATOL, name="loss_itm")
    assert_close(out.loss, outputs["loss_mlm"] + outputs["loss_ita"] + outputs["loss_itm"], 3 * ATOL, name="loss")
    assert_after_step(model, outputs, ATOL)


def test_pretrain_masking_reproduces_original_rng():
    from transformers_albef import mask_tokens

    _, inputs, _, meta = load_fixture("pretrain")
    torch.manual_seed(meta["mask_seed"])
    masked, labels = mask_tokens(inputs["input_ids"], meta["bert_config"]["vocab_size"], 0.15)
    assert torch.equal(masked, inputs["masked_input_ids"])
    assert torch.equal(labels, inputs["mlm_labels"])


@pytest.mark.parametrize("kind", ["retrieval", "grounding"])
def test_retrieval_eval(kind):
    model, inputs, outputs, meta = build(AlbefForRetrieval, kind)
    check_itc_itm(model, inputs, outputs)


def test_retrieval_evaluation_matrices():
    model, inputs, outputs, meta = build(AlbefForRetrieval, "retrieval")
    score_i2t, score_t2i = model.retrieval_scores(
        inputs["pixel_values"], inputs["eval_input_ids"], inputs["eval_attention_mask"], k=meta["config"]["k_test"]
    )
    assert_close(score_i2t, outputs["score_matrix_i2t"], ATOL, name="score_matrix_i2t")
    assert_close(score_t2i, outputs["score_matrix_t2i"], ATOL, name="score_matrix_t2i")
    with torch.no_grad():
        sims = (
            model.get_image_features(inputs["pixel_values"]).pooler_output
            @ model.get_text_features(inputs["eval_input_ids"], inputs["eval_attention_mask"]).pooler_output.t()
        )
    assert_close(sims, outputs["eval_sims_matrix"], ATOL, name="eval_sims_matrix")
    txt2img = {int(k): v for k, v in meta["txt2img"].items()}
    img2txt = {int(k): v for k, v in meta["img2txt"].items()}
    metrics = recall_at_k(score_i2t, score_t2i, txt2img, img2txt)
    assert metrics == pytest.approx(meta["itm_eval"], abs=1e-9)


@pytest.mark.parametrize("kind", ["retrieval", "grounding"])
def test_retrieval_train_step(kind):
    _, inputs, outputs, meta = load_fixture(kind)
    model, *_ = build(AlbefForRetrieval, kind, checkpoint=training_state(kind), distill=True)
    model.train()
    out = model(
        inputs["pixel_values_train"],
        inputs["input_ids"],
        inputs["attention_mask"],
        return_loss=True,
        image_ids=inputs["idx"],
        alpha=float(inputs["alpha"]),
        hard_negatives="hardest",
    )
    assert_close(out.loss_itc, outputs["loss_ita"], ATOL, name="loss_ita")
    assert_close(out.loss_itm, outputs["loss_itm"], ATOL, name="loss_itm")
    assert_after_step(model, outputs, ATOL)


def test_grounding_gradcam():
    model, inputs, outputs, meta = build(AlbefForRetrieval, "grounding")
    model.set_attn_implementation("sdpa")  # Grad-CAM must switch to eager by itself
    n = inputs["pixel_values"].shape[0]
    cam = model.gradcam(
        inputs["pixel_values"],
        inputs["input_ids"][:n],
        inputs["attention_mask"][:n],
        layer=meta["gradcam"]["block_num"],
    )
    assert_close(cam.attention_map, outputs["gradcam_attention_map"], ATOL, name="attention map")
    assert_close(cam.attention_grad, outputs["gradcam_attention_grad"], ATOL, name="attention grad")
    assert_close(cam.itm_logits, outputs["gradcam_itm_logits"], ATOL, name="gradcam itm logits")
    # The maps are ~1e-4 in size: compare relative to the reference peak.
    for name, got in (("gradcam", cam.gradcam), ("gradcam_per_token", cam.gradcam_per_token)):
        want = outputs[name]
        assert max_diff(got, want) / float(want.abs().max()) <= ATOL, name
    assert model.config._attn_implementation == "sdpa"


def _vqa_checks(model, inputs, outputs, meta):
    q_ids, q_mask = inputs["question_input_ids"], inputs["question_attention_mask"]
    a_ids, a_mask = inputs["answer_input_ids"], inputs["answer_attention_mask"]
    k = meta["rank_answer_k"]
    with torch.no_grad():
        image_states = model.vision_model(inputs["pixel_values"]).last_hidden_state
        states = model.encode_questions(inputs["pixel_values"], q_ids, q_mask)
        ranking = model.rank_answers(inputs["pixel_values"], q_ids, q_mask, a_ids, a_mask, k=k, return_details=True)
        start = a_ids[:1, :1].expand(q_ids.shape[0], 1)
        vocab_probs = F.softmax(model.answer_logits(start, None, states, q_mask)[:, 0], dim=1)
        decoder_q0 = model.answer_logits(
            a_ids, a_mask, states[:1].expand(a_ids.shape[0], -1, -1), q_mask[:1].expand(a_ids.shape[0], -1)
        )[:, :-1]
    assert_close(image_states, outputs["image_embeds"], ATOL, name="image_embeds")
    assert_close(states, outputs["question_states"], ATOL, name="question_states")
    assert torch.equal(ranking.topk_ids, outputs["rank_answer_topk_ids"])
    assert_close(ranking.topk_probs, outputs["rank_answer_topk_probs"], ATOL, name="topk_probs")
    assert torch.equal(ranking.prerank_ids, outputs["rank_answer_prerank_ids"])
    assert_close(ranking.prerank_scores, outputs["rank_answer_log_probs_sum"], ATOL, name="log_probs_sum")
    assert_close(vocab_probs, outputs["rank_answer_first_token_vocab_probs"], ATOL, name="first-token probs")
    assert_close(decoder_q0, outputs["decoder_logits_q0"], ATOL, name="decoder_logits_q0")
    ids, probs = model.rank_answers(inputs["pixel_values"], q_ids, q_mask, a_ids, a_mask, k=k)
    assert torch.equal(ids, ranking.topk_ids) and torch.equal(probs, ranking.topk_probs)


def test_vqa_eval():
    model, inputs, outputs, meta = build(AlbefForQuestionAnswering, "vqa", distill=True)
    _vqa_checks(model, inputs, outputs, meta)


def test_vqa_train_step():
    model, inputs, outputs, _ = build(AlbefForQuestionAnswering, "vqa", distill=True)
    model.train()
    rows = inputs["train_answer_rows"]
    out = model(
        inputs["pixel_values"],
        inputs["question_input_ids"],
        inputs["question_attention_mask"],
        answer_input_ids=inputs["answer_input_ids"][rows],
        answer_attention_mask=inputs["answer_attention_mask"][rows],
        answer_weights=inputs["train_weights"],
        answers_per_question=inputs["train_k"],
        alpha=float(inputs["alpha"]),
    )
    assert_close(out.loss, outputs["loss"], ATOL, name="vqa loss")
    assert_after_step(model, outputs, ATOL)


def test_vqa_from_pretrain():
    folder = load_fixture("pretrain")[0]
    model, inputs, outputs, meta = build(
        AlbefForQuestionAnswering, "vqa_from_pretrain", checkpoint=folder / "checkpoint.pth", distill=True
    )
    _vqa_checks(model, inputs, outputs, meta)


def test_retrieval_from_pretrain():
    folder = load_fixture("pretrain")[0]
    model, inputs, outputs, _ = build(
        AlbefForRetrieval, "retrieval_from_pretrain", checkpoint=folder / "checkpoint.pth", distill=True
    )
    assert_close(
        model.vision_model.embeddings.position_embeddings, outputs["interpolated_pos_embed"], ATOL, name="pos_embed"
    )
    assert_close(
        model.momentum.vision_model.embeddings.position_embeddings,
        outputs["interpolated_pos_embed_m"],
        ATOL,
        name="pos_embed_m",
    )
    check_itc_itm(model, inputs, outputs)


def _pairs(inputs):
    pv = inputs["pixel_values"]
    return torch.stack([pv[inputs["image0_index"]], pv[inputs["image1_index"]]], dim=1)


def check_nlvr(model, inputs, outputs, meta=None):
    pairs = _pairs(inputs)
    assert torch.equal(torch.cat([pairs[:, 0], pairs[:, 1]]), inputs["pixel_values_pair"])
    with torch.no_grad():
        logits = model(pairs, inputs["input_ids"], inputs["attention_mask"]).logits
        image_states = model.vision_model(inputs["pixel_values"]).last_hidden_state
    assert_close(image_states, outputs["image_embeds"], ATOL, name="image_embeds")
    assert_close(logits, outputs["logits"], ATOL, name="nlvr logits")


def test_nlvr():
    model, inputs, outputs, _ = build(AlbefForVisualReasoning, "nlvr", distill=True)
    check_nlvr(model, inputs, outputs)
    pairs = _pairs(inputs)
    model.train()
    out = model(
        pairs, inputs["input_ids"], inputs["attention_mask"], labels=inputs["targets"], alpha=float(inputs["alpha"])
    )
    assert_close(out.loss, outputs["loss"], ATOL, name="nlvr loss")
    assert_after_step(model, outputs, ATOL)


def check_ve(model, inputs, outputs, meta=None):
    with torch.no_grad():
        logits = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).logits
        image_states = model.vision_model(inputs["pixel_values"]).last_hidden_state
    assert_close(image_states, outputs["image_embeds"], ATOL, name="image_embeds")
    assert_close(logits, outputs["logits"], ATOL, name="ve logits")


def test_ve():
    model, inputs, outputs, _ = build(AlbefForVisualEntailment, "ve", distill=True, num_labels=3)
    check_ve(model, inputs, outputs)
    model.train()
    out = model(
        inputs["pixel_values"],
        inputs["input_ids"],
        inputs["attention_mask"],
        labels=inputs["targets"],
        alpha=float(inputs["alpha"]),
    )
    assert_close(out.loss, outputs["loss"], ATOL, name="ve loss")
    assert_after_step(model, outputs, ATOL)


def check_text_assignment(model, inputs, outputs, meta=None):
    with torch.no_grad():
        image_states = model.vision_model(inputs["pixel_values"]).last_hidden_state
        weights = model.assignment_weights(image_states)
        left, right, labels = model.sample_assignment(weights, draws=inputs["rand_values"], hard_negatives="hardest")
        out = model(
            inputs["pixel_values"],
            inputs["input_ids"],
            inputs["attention_mask"],
            image0_index=left,
            image1_index=right,
            labels=labels,
        )
        feat = F.normalize(model.vision_proj(image_states[:, 0]), dim=-1)
    assert_close(image_states, outputs["image_embeds"], ATOL, name="image_embeds")
    assert_close(feat, outputs["image_feat"], ATOL, name="image_feat")
    assert_close(weights, outputs["ta_weights"], ATOL, name="ta_weights")
    assert torch.equal(left, outputs["ta_image0_index"])
    assert torch.equal(right, outputs["ta_image1_index"])
    assert torch.equal(labels, outputs["ta_labels"])
    assert_close(out.logits, outputs["ta_logits"], ATOL, name="ta_logits")
    assert_close(out.logits, outputs["ta_logits_direct"], ATOL, name="ta_logits_direct")
    assert_close(out.loss, outputs["loss"], ATOL, name="ta loss")


def test_text_assignment():
    model, inputs, outputs, _ = build(AlbefForTextAssignment, "pretrain_nlvr", num_labels=3)
    check_text_assignment(model, inputs, outputs)


def check_pos_embed_interpolation(model, inputs, outputs, meta=None):
    assert_close(
        model.vision_model.embeddings.position_embeddings, outputs["interpolated_pos_embed"], ATOL, name="pos_embed"
    )


# Eval-mode checks of each fixture kind: the converter's tests run them on the folders it writes.
EVAL_CHECKS = {
    "pretrain": [check_itc_itm],
    "retrieval": [check_itc_itm],
    "grounding": [check_itc_itm],
    "retrieval_from_pretrain": [check_pos_embed_interpolation, check_itc_itm],
    "vqa": [_vqa_checks],
    "vqa_from_pretrain": [_vqa_checks],
    "nlvr": [check_nlvr],
    "ve": [check_ve],
    "pretrain_nlvr": [check_text_assignment],
}
