"""Model-level checks on tiny random configurations: round trips, attention backends, gradient checkpointing,
batching, precision, compile, training state and errors."""

import logging

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
)

import transformers_albef as ta

from .tiny_models import TWO_IMAGES, tiny_batch, tiny_config


def make(cls, attn="eager", **kwargs):
    if cls is ta.AlbefForVisualReasoning or cls is ta.AlbefForTextAssignment:
        kwargs.setdefault("text", TWO_IMAGES)
    torch.manual_seed(0)
    config = tiny_config(**kwargs)
    config._attn_implementation = attn
    return cls(config).eval()


def run(model, batch=None):
    """A representative inference output of each head, as one tensor."""
    pixel_values, ids, mask = batch or tiny_batch()
    if isinstance(model, ta.AlbefForVisualReasoning):
        return model(torch.stack([pixel_values, pixel_values.flip(0)], 1), ids, mask).logits
    if isinstance(model, ta.AlbefForTextAssignment):
        batch = ids.shape[0]
        return model(
            pixel_values, ids, mask, image0_index=torch.arange(batch), image1_index=torch.arange(batch).flip(0)
        ).logits
    if isinstance(model, ta.AlbefForVisualEntailment):
        return model(pixel_values, ids, mask).logits
    if isinstance(model, ta.AlbefForQuestionAnswering):
        return model(pixel_values, ids, mask).question_states
    if isinstance(model, ta.AlbefForRetrieval):
        out = model(pixel_values, ids, mask, use_itm_head=True)
        return torch.cat([out.logits_per_image.flatten(), out.itm_logits.flatten()])
    return model(pixel_values, ids, mask).logits_per_image


HEADS = [
    ta.AlbefModel,
    ta.AlbefForRetrieval,
    ta.AlbefForPreTraining,
    ta.AlbefForQuestionAnswering,
    ta.AlbefForVisualReasoning,
    ta.AlbefForVisualEntailment,
    ta.AlbefForTextAssignment,
]


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_save_load_round_trip(cls, tmp_path):
    model = make(cls)
    with torch.no_grad():
        want = run(model)
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(run(reloaded), want)
    reloaded_config = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert {k: v for k, v in reloaded_config.items() if k != "_name_or_path"} == {
        k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"
    }


def test_auto_classes(tmp_path):
    ta.AlbefForPreTraining(tiny_config()).save_pretrained(tmp_path / "pre")
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path / "pre")) is ta.AlbefForPreTraining
    assert type(AutoModel.from_pretrained(tmp_path / "pre")) is ta.AlbefModel
    ta.AlbefForVisualEntailment(tiny_config(num_labels=3)).save_pretrained(tmp_path / "ve")
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path / "ve")) is ta.AlbefForVisualEntailment
    ta.AlbefForQuestionAnswering(tiny_config()).save_pretrained(tmp_path / "vqa")
    assert type(AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path / "vqa")) is ta.AlbefForQuestionAnswering


def test_presets_round_trip(tmp_path):
    for name in ta.ALBEF_PRESETS:
        config = ta.AlbefConfig.from_preset(name)
        config.save_pretrained(tmp_path / name)
        assert ta.AlbefConfig.from_pretrained(tmp_path / name).to_dict() == config.to_dict()
    nlvr = ta.AlbefConfig.from_preset("nlvr")
    assert (nlvr.text_config.num_hidden_layers, nlvr.vision_config.image_size, nlvr.num_labels) == (18, 384, 2)
    with pytest.raises(ValueError, match="Unknown ALBEF preset"):
        ta.AlbefConfig.from_preset("nope")


BACKENDS = ["sdpa"] + (["flex_attention"] if hasattr(torch.nn.attention, "flex_attention") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_attention_backends_match_eager(cls, backend):
    model = make(cls)
    with torch.no_grad():
        want = run(model)
        model.set_attn_implementation(backend)
        got = run(model)
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    assert {c._attn_implementation for c in configs} == {backend}, "the backend did not reach every tower"
    assert (got - want).abs().max() <= 1e-5


def test_vqa_ranking_backends_match_eager():
    model = make(ta.AlbefForQuestionAnswering)
    pixel_values, ids, mask = tiny_batch()
    answers, answer_mask = ids[:, :5].clone(), mask[:, :5]
    answers[:, 4] = 102
    want = model.rank_answers(pixel_values, ids, mask, answers, answer_mask, k=3)
    model.set_attn_implementation("sdpa")
    got = model.rank_answers(pixel_values, ids, mask, answers, answer_mask, k=3)
    assert torch.equal(got[0], want[0]) and (got[1] - want[1]).abs().max() <= 1e-5


def _grads(model, batch):
    model.zero_grad()
    pixel_values, ids, mask = batch
    out = model(pixel_values, ids, mask, return_loss=True, hard_negatives="hardest")
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_gradients():
    batch = tiny_batch()
    model = make(ta.AlbefForPreTraining).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    want = _grads(model, batch)
    model.load_state_dict(state)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.text_model.encoder.layer)
    assert all(layer.gradient_checkpointing for layer in model.vision_model.layers)
    torch.manual_seed(1)
    got = _grads(model, batch)
    assert want.keys() == got.keys() and len(want) > 50
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_batch_of_one_equals_row_of_batch(cls):
    model = make(cls, attn="sdpa")
    pixel_values, ids, mask = tiny_batch()
    with torch.no_grad():
        if isinstance(model, ta.AlbefForRetrieval):
            full = model(pixel_values, ids, mask, use_itm_head=True).itm_logits
            one = model(pixel_values[1:2], ids[1:2], mask[1:2], use_itm_head=True).itm_logits
        elif isinstance(model, ta.AlbefModel):
            full = torch.cat(
                [
                    model.get_text_features(ids, mask).pooler_output,
                    model.get_image_features(pixel_values).pooler_output,
                ],
                1,
            )
            one = torch.cat(
                [
                    model.get_text_features(ids[1:2], mask[1:2]).pooler_output,
                    model.get_image_features(pixel_values[1:2]).pooler_output,
                ],
                1,
            )
        elif isinstance(model, ta.AlbefForTextAssignment):
            left, right = torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])
            full = model(pixel_values, ids, mask, image0_index=left, image1_index=right).logits
            images = pixel_values[[0, 3]]  # sentence 1 with images 0 (left) and 3 (right), alone
            one = model(
                images, ids[[1, 1]], mask[[1, 1]], image0_index=torch.tensor([0, 1]), image1_index=torch.tensor([1, 0])
            ).logits[:1]
        elif isinstance(model, ta.AlbefForVisualReasoning):
            pairs = torch.stack([pixel_values, pixel_values.flip(0)], 1)
            full = model(pairs, ids, mask).logits
            one = model(pairs[1:2], ids[1:2], mask[1:2]).logits
        else:
            full = run(model, (pixel_values, ids, mask))
            one = run(model, (pixel_values[1:2], ids[1:2], mask[1:2]))
    assert (full[1:2] - one).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_without_nan(dtype):
    model = make(ta.AlbefForRetrieval, attn="sdpa").to(dtype)
    pixel_values, ids, mask = tiny_batch()
    with torch.no_grad():
        out = model(pixel_values.to(dtype), ids, mask, use_itm_head=True)
    assert out.itm_logits.dtype == dtype
    assert torch.isfinite(out.logits_per_image).all() and torch.isfinite(out.itm_logits).all()


def test_torch_compile_towers():
    model = make(ta.AlbefModel, attn="sdpa")
    pixel_values, ids, mask = tiny_batch()
    with torch.no_grad():
        want_image = model.vision_model(pixel_values).last_hidden_state
        want_text = model.text_model(ids, mask, mode="text").last_hidden_state
        # aot_eager traces forward and backward graphs without code generation (fast on CPU); fullgraph proves there
        # is no graph break.
        vision = torch.compile(model.vision_model, backend="aot_eager", fullgraph=True)
        text = torch.compile(model.text_model, backend="aot_eager", fullgraph=True)
        assert torch.allclose(vision(pixel_values).last_hidden_state, want_image, atol=1e-5)
        assert torch.allclose(text(ids, mask, mode="text").last_hidden_state, want_text, atol=1e-5)


def test_text_modes_compose():
    model = make(ta.AlbefModel)
    pixel_values, ids, mask = tiny_batch()
    with torch.no_grad():
        image = model.vision_model(pixel_values).last_hidden_state
        text = model.text_model(ids, mask, mode="text").last_hidden_state
        fused = model.text_model(text_embeds=text, attention_mask=mask, encoder_hidden_states=image, mode="fusion")
        full = model.text_model(ids, mask, encoder_hidden_states=image)
    assert torch.equal(fused.last_hidden_state, full.last_hidden_state)


def test_output_attentions_and_hidden_states():
    model = make(ta.AlbefModel)
    pixel_values, ids, mask = tiny_batch()
    with torch.no_grad():
        image = model.vision_model(pixel_values, output_attentions=True, output_hidden_states=True)
        text = model.text_model(ids, mask, encoder_hidden_states=image.last_hidden_state, output_attentions=True)
    assert len(image.attentions) == 2 and image.attentions[0].shape == (4, 2, 5, 5)
    assert len(text.attentions) == 4 and len(text.cross_attentions) == 2
    assert text.cross_attentions[0].shape == (4, 2, 7, 5)


def test_training_checkpoint_loads_silently_into_inference_head(tmp_path, caplog):
    trainer = make(ta.AlbefForRetrieval, distill=True)
    trainer.save_pretrained(tmp_path)
    inference_config = ta.AlbefConfig.from_pretrained(tmp_path)
    inference_config.distill = False
    with caplog.at_level(logging.WARNING):
        model, info = ta.AlbefForRetrieval.from_pretrained(tmp_path, config=inference_config, output_loading_info=True)
    assert model.momentum is None
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not [r for r in caplog.records if "momentum" in r.getMessage()]
    assert not any(k.startswith("momentum.") for k in model.state_dict())


def test_distillation_head_from_inference_checkpoint_copies_towers(tmp_path):
    make(ta.AlbefForRetrieval).save_pretrained(tmp_path)
    config = ta.AlbefConfig.from_pretrained(tmp_path)
    config.distill = True
    model = ta.AlbefForRetrieval.from_pretrained(tmp_path, config=config)
    assert torch.equal(
        model.momentum.text_model.embeddings.word_embeddings.weight, model.text_model.embeddings.word_embeddings.weight
    )
    assert not any(p.requires_grad for p in model.momentum.parameters())


def test_tied_weights_survive_reload(tmp_path):
    pre = make(ta.AlbefForPreTraining)
    assert pre.mlm_head.decoder.weight is pre.text_model.embeddings.word_embeddings.weight
    assert pre.momentum.mlm_head.decoder.weight is pre.momentum.text_model.embeddings.word_embeddings.weight
    pre.save_pretrained(tmp_path / "pre")
    pre = ta.AlbefForPreTraining.from_pretrained(tmp_path / "pre")
    assert pre.mlm_head.decoder.weight is pre.text_model.embeddings.word_embeddings.weight
    assert pre.momentum.mlm_head.decoder.weight is pre.momentum.text_model.embeddings.word_embeddings.weight
    nlvr = make(ta.AlbefForVisualReasoning)
    nlvr.save_pretrained(tmp_path / "nlvr")
    nlvr = ta.AlbefForVisualReasoning.from_pretrained(tmp_path / "nlvr")
    layers = nlvr.text_model.encoder.layer
    for first in (2, 4):
        for name in ("key", "value"):
            a, b = (
                getattr(layers[first].crossattention.self, name),
                getattr(layers[first + 1].crossattention.self, name),
            )
            assert a.weight is b.weight and a.bias is b.bias
    assert layers[2].crossattention.self.query.weight is not layers[3].crossattention.self.query.weight


def test_momentum_update_and_queue_across_steps():
    model = make(ta.AlbefForPreTraining).train()
    pixel_values, ids, mask = tiny_batch()
    before = model.momentum.vision_proj.weight.clone()
    online = model.vision_proj.weight.detach().clone()
    model(pixel_values, ids, mask, return_loss=True, hard_negatives="hardest")
    assert torch.allclose(model.momentum.vision_proj.weight, before * 0.995 + online * 0.005, atol=1e-7)
    assert int(model.momentum.queue_ptr) == 4
    model(pixel_values, ids, mask, return_loss=True)
    assert int(model.momentum.queue_ptr) == 0  # queue of 8 wrapped after two batches of 4


def test_momentum_update_pairs_every_tower_parameter_by_name():
    model = make(ta.AlbefForPreTraining)
    with torch.no_grad():
        for param in model.parameters():  # online weights away from the EMA copies, so every pair moves
            if not any(param is m for m in model.momentum.parameters()):
                param.add_(1.0)
    before = {name: p.clone() for name, p in model.momentum.named_parameters()}
    model.momentum.update(model)
    online = dict(model.named_parameters(remove_duplicate=False))
    for name, param in model.momentum.named_parameters():
        assert torch.allclose(param, torch.lerp(before[name], online[name], 0.005)), name
    with pytest.raises(ValueError, match="the head has no such parameter"):
        model.momentum.update(model.vision_model)  # a module with other parameter names


def test_internal_masking_and_sampling_run():
    model = make(ta.AlbefForPreTraining).train()
    out = model(*tiny_batch(), return_loss=True)
    assert torch.isfinite(out.loss) and out.loss_mlm is not None
    out.loss.backward()


def test_pretraining_scores_only_masked_positions():
    """The training forward projects only the masked positions onto the vocabulary: the logits and the loss equal
    those of the full-sequence projection (which the original computes) at those positions."""
    from transformers_albef.models.albef.modeling_albef import mlm_loss

    model = make(ta.AlbefForPreTraining).eval()  # no dropout: the two computations see the same activations
    pixel_values, ids, mask = tiny_batch()
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 2], labels[1, 1] = ids[0, 1], ids[1, 2], ids[1, 1]
    masked_ids = ids.masked_fill(labels != -100, model.config.text_config.mask_token_id)
    with torch.no_grad():
        image_states = model.vision_model(pixel_values).last_hidden_state
        full = model.mlm_logits(masked_ids, mask, image_states)
        out = model(pixel_values, ids, mask, return_loss=True, masked_input_ids=masked_ids, mlm_labels=labels, alpha=0)
    assert out.mlm_logits.shape == (3, model.config.text_config.vocab_size)
    torch.testing.assert_close(out.mlm_logits, full[labels != -100], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss_mlm, mlm_loss(full, labels), atol=1e-5, rtol=0)


# ----- bad input -----------------------------------------------------------------------------------------------
def test_bad_pixel_values():
    model = make(ta.AlbefModel)
    _, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="3 channels"):
        model.get_image_features(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model.get_image_features(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="interpolated"):
        model.get_image_features(torch.randn(2, 3, 48, 48))


def test_bad_text():
    model = make(ta.AlbefModel)
    pixel_values, ids, mask = tiny_batch()
    mask = mask.clone()
    mask[2] = 0
    with pytest.raises(ValueError, match=r"texts \[2\] have attention_mask 0 at position 0"):
        model.get_text_features(ids, mask)
    left_padded = torch.ones_like(mask)
    left_padded[1, 0] = 0  # [CLS] is what the heads read: a left-padded text would be read at a pad
    with pytest.raises(ValueError, match=r"texts \[1\]"):
        model.get_text_features(ids, left_padded)
    with pytest.raises(ValueError, match="length >= 1"):
        model.get_text_features(ids[:, :0])


def test_mismatched_pairs():
    model = make(ta.AlbefForRetrieval, distill=True)
    pixel_values, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="4 images and 3 texts"):
        model(pixel_values, ids[:3], mask[:3], use_itm_head=True)
    with pytest.raises(ValueError, match="image_ids"):
        model(pixel_values, ids, mask, return_loss=True)


def test_nlvr_needs_two_images():
    model = make(ta.AlbefForVisualReasoning)
    pixel_values, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="exactly two images"):
        model(pixel_values, ids, mask)
    with pytest.raises(ValueError, match="exactly two images"):
        model(torch.stack([pixel_values] * 3, 1), ids, mask)


def test_rank_answers_bad_k():
    model = make(ta.AlbefForQuestionAnswering)
    pixel_values, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="between 1 and the number of answers"):
        model.rank_answers(pixel_values, ids, mask, ids[:2, :4], mask[:2, :4], k=3)
    with pytest.raises(ValueError, match="empty"):
        model.rank_answers(pixel_values, ids, mask, ids[:0, :4], mask[:0, :4], k=1)


def test_queue_size_must_divide_global_batch():
    model = make(ta.AlbefForPreTraining, queue_size=6).train()
    with pytest.raises(ValueError, match=r"queue_size \(6\) must be divisible by the global batch size \(4"):
        model(*tiny_batch(), return_loss=True, hard_negatives="hardest")


def test_init_momentum_in_half_precision():
    model = make(ta.AlbefForRetrieval).to(torch.bfloat16)
    model.init_momentum()
    assert model.momentum.image_queue.dtype == torch.bfloat16 and model.momentum.queue_ptr.dtype == torch.long
    pixel_values, ids, mask = tiny_batch()
    out = model(pixel_values.to(torch.bfloat16), ids, mask, return_loss=True, image_ids=torch.arange(4))
    assert torch.isfinite(out.loss)
    assert "momentum.text_model.embeddings.word_embeddings.weight" in model.state_dict()


def test_training_without_momentum_says_how_to_fix():
    model = make(ta.AlbefForRetrieval)
    pixel_values, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="init_momentum"):
        model(pixel_values, ids, mask, return_loss=True, image_ids=torch.arange(4))
    model.init_momentum()
    assert model(pixel_values, ids, mask, return_loss=True, image_ids=torch.arange(4)).loss is not None


def test_gradcam_shapes_and_modes():
    model = make(ta.AlbefForRetrieval, text={"attention_probs_dropout_prob": 0.5})
    pixel_values, ids, mask = tiny_batch()
    model.train()  # Grad-CAM runs in eval mode (no dropout on the maps) and restores the mode
    first, second = model.gradcam(pixel_values, ids, mask), model.gradcam(pixel_values, ids, mask)
    assert torch.equal(first.gradcam, second.gradcam) and model.training
    model.eval()
    pixel_values, ids, mask = tiny_batch()
    itm = model.gradcam(pixel_values, ids, mask)
    assert itm.gradcam.shape == (4, 2, 2) and itm.gradcam_per_token.shape == (4, 7, 2, 2)
    itc = model.gradcam(pixel_values, ids, mask, mode="itc", layer=1)
    assert itc.gradcam.shape == (4, 2, 2) and itc.gradcam_per_token is None
    with pytest.raises(ValueError, match="fusion layer"):
        model.gradcam(pixel_values, ids, mask, layer=0)
    with pytest.raises(ValueError, match="mode"):
        model.gradcam(pixel_values, ids, mask, mode="xyz")


def test_gradcam_switches_to_eager_through_the_public_api_and_restores_the_backend():
    model = make(ta.AlbefForRetrieval)
    model.set_attn_implementation("sdpa")
    pixel_values, ids, mask = tiny_batch()
    seen = []
    layer = model.text_model.encoder.layer[-2].crossattention.self
    hook = layer.register_forward_hook(lambda module, args, out: seen.append(module.config._attn_implementation))
    cam = model.gradcam(pixel_values, ids, mask)
    hook.remove()
    assert seen == ["eager"] and cam.attention_map is not None
    backends = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert backends == {"sdpa"}  # the user's choice is back


@pytest.mark.parametrize(
    "config_class, kwargs, message",
    [
        (ta.AlbefTextConfig, dict(hidden_size=30, num_attention_heads=4), "multiple of num_attention_heads"),
        (ta.AlbefTextConfig, dict(fusion_layer=20), r"fusion_layer \(20\) must lie in \[0, 12\]"),
        (ta.AlbefTextConfig, dict(share_cross_attention_kv=True, num_hidden_layers=11), "must be even"),
        (ta.AlbefVisionConfig, dict(image_size=100), r"multiple of patch_size \(16\)"),
    ],
)
def test_invalid_configs_are_refused(config_class, kwargs, message):
    with pytest.raises(Exception, match=message) as error:
        config_class(**kwargs)
    assert isinstance(error.value, ValueError) or isinstance(error.value.__cause__, ValueError)


def test_mlm_loss_without_masked_tokens_is_zero_not_nan():
    from transformers_albef.models.albef.modeling_albef import mlm_loss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for teacher in (None, torch.randn(2, 5, 11)):
        loss = mlm_loss(logits, labels, teacher, alpha=0.4)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    labels[0, 1] = 3
    expected = torch.nn.functional.cross_entropy(logits[0, 1:2], labels[0, 1:2])
    torch.testing.assert_close(mlm_loss(logits, labels), expected)


@pytest.mark.parametrize("cls, num_labels", [(ta.AlbefForVisualReasoning, 2), (ta.AlbefForTextAssignment, 3)])
def test_shared_cross_attention_projections_are_initialised_when_a_checkpoint_lacks_them(cls, num_labels):
    """NLVR2's paired fusion layers share their key/value projections: a checkpoint without them (e.g. a new model
    saved with an empty state dict) must still get real, tied, initialised tensors."""
    config = tiny_config(text=TWO_IMAGES, num_labels=num_labels)
    model = cls.from_pretrained(None, config=config, state_dict={})
    assert not [name for name, p in model.named_parameters() if p.device.type == "meta"]
    layers = model.text_model.encoder.layer
    for first, second in model.text_model.encoder.shared_kv_pairs():
        for name in ("key", "value"):
            a, b = getattr(layers[first].crossattention.self, name), getattr(layers[second].crossattention.self, name)
            assert a.weight is b.weight and a.bias is b.bias
            assert 0 < float(a.weight.std()) < 0.1  # initialised (std 0.02), not left empty
