"""transformers' model contracts, head by head, in the style of its common tests (a ModelTester per head with a tiny
config): return_dict=False, output_hidden_states / output_attentions, input embeddings and resize_token_embeddings,
save/load round trip, problem_type, and the feature getters' output type."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import transformers_albef as ta

from .tiny_models import TWO_IMAGES, tiny_batch, tiny_config


class HeadTester:
    """Builds one head with a tiny config and the inputs its forward takes."""

    def __init__(self, cls, batch=4, **config):
        self.cls, self.batch, self.config_kwargs = cls, batch, config

    def config(self):
        return tiny_config(**self.config_kwargs)

    def model(self, **overrides):
        torch.manual_seed(0)
        config = self.config()
        for key, value in overrides.items():
            setattr(config, key, value)
        return self.cls(config).eval()

    def inputs(self):
        pixel_values, ids, mask = tiny_batch(batch=self.batch)
        inputs = {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}
        if self.cls is ta.AlbefForVisualReasoning:
            inputs["pixel_values"] = torch.stack([pixel_values, pixel_values.flip(0)], dim=1)
        if self.cls is ta.AlbefForTextAssignment:
            order = torch.arange(self.batch)
            inputs.update(image0_index=order, image1_index=order.flip(0))
        return inputs

    def __repr__(self):
        return self.cls.__name__


TESTERS = [
    HeadTester(ta.AlbefModel),
    HeadTester(ta.AlbefForRetrieval),
    HeadTester(ta.AlbefForPreTraining),
    HeadTester(ta.AlbefForVisualEntailment, num_labels=3),
    HeadTester(ta.AlbefForVisualReasoning, text=TWO_IMAGES, num_labels=2),
    HeadTester(ta.AlbefForTextAssignment, text=TWO_IMAGES),
    HeadTester(ta.AlbefForQuestionAnswering),
]
VISION_LAYERS = tiny_config().vision_config.num_hidden_layers


def flatten(output):
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flatten(item)]
    return [output] if isinstance(output, torch.Tensor) else []


@pytest.mark.parametrize("tester", TESTERS, ids=repr)
def test_return_dict_false_gives_the_same_tensors_as_a_tuple(tester):
    model, inputs = tester.model(), tester.inputs()
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    want, got = flatten(as_dict.to_tuple()), flatten(as_tuple)
    assert len(want) == len(got) > 0
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("tester", TESTERS, ids=repr)
def test_hidden_states_and_attentions_reach_the_output(tester):
    model, inputs = tester.model(), tester.inputs()
    model.set_attn_implementation("eager")  # attention probabilities are returned by eager attention only
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        plain = model(**inputs)
    vision, text = out.vision_model_output, out.text_model_output
    assert len(vision.hidden_states) == VISION_LAYERS + 1 and len(vision.attentions) == VISION_LAYERS
    assert text.hidden_states is not None and len(text.hidden_states) >= 2
    assert text.attentions is not None
    assert plain.vision_model_output.hidden_states is None and plain.text_model_output.attentions is None


@pytest.mark.parametrize("tester", TESTERS, ids=repr)
def test_input_embeddings_and_resize(tester):
    model = tester.model()
    embeddings = model.get_input_embeddings()
    assert embeddings is model.text_model.embeddings.word_embeddings
    vocab = model.config.text_config.vocab_size
    model.resize_token_embeddings(vocab + 5)
    assert model.config.text_config.vocab_size == vocab + 5
    assert model.get_input_embeddings().weight.shape[0] == vocab + 5
    output = model.get_output_embeddings()
    if output is not None:
        assert output.weight.shape[0] == vocab + 5
        head = model.lm_head if hasattr(model, "lm_head") else model.mlm_head
        assert head.bias.shape[0] == vocab + 5
    inputs = tester.inputs()
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][:, 1] = vocab + 2  # a new token
    with torch.no_grad():
        model(**inputs)
    replacement = torch.nn.Embedding(vocab + 5, model.config.text_config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement


def test_resize_keeps_the_vqa_decoder_and_momentum_towers_in_step():
    model = HeadTester(ta.AlbefForQuestionAnswering, distill=True).model()
    queue_before = None
    vocab = model.config.text_config.vocab_size
    model.resize_token_embeddings(vocab + 3)
    assert model.text_decoder.get_input_embeddings().weight.shape[0] == vocab + 3
    assert model.lm_head.decoder.weight is model.text_decoder.embeddings.word_embeddings.weight
    assert model.momentum.lm_head.decoder.weight.shape[0] == vocab + 3
    pretrain = HeadTester(ta.AlbefForPreTraining).model()
    queue_before = pretrain.momentum.image_queue.clone()
    pretrain.resize_token_embeddings(vocab + 3)
    assert torch.equal(pretrain.momentum.image_queue, queue_before)  # the queues are kept
    torch.testing.assert_close(pretrain.momentum.text_model.embeddings.word_embeddings.weight,
                               pretrain.text_model.embeddings.word_embeddings.weight)  # fmt: skip


@pytest.mark.parametrize("tester", TESTERS, ids=repr)
def test_save_and_reload_give_identical_outputs(tester, tmp_path):
    model, inputs = tester.model(), tester.inputs()
    model.save_pretrained(tmp_path)
    reloaded = tester.cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want, got = flatten(model(**inputs).to_tuple()), flatten(reloaded(**inputs).to_tuple())
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize(
    "problem_type, labels, loss",
    [
        ("single_label_classification", torch.tensor([0, 2, 1, 0]), torch.nn.functional.cross_entropy),
        (
            "multi_label_classification",
            torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]]),
            torch.nn.functional.binary_cross_entropy_with_logits,
        ),
    ],
)
def test_visual_entailment_honours_problem_type(problem_type, labels, loss):
    tester = HeadTester(ta.AlbefForVisualEntailment, num_labels=3)
    model = tester.model(problem_type=problem_type)
    with torch.no_grad():
        out = model(**tester.inputs(), labels=labels)
    torch.testing.assert_close(out.loss, loss(out.logits, labels))


def test_problem_type_is_inferred_as_transformers_does():
    regression = HeadTester(ta.AlbefForVisualEntailment, num_labels=1).model()
    with torch.no_grad():
        out = regression(**HeadTester(ta.AlbefForVisualEntailment).inputs(), labels=torch.tensor([0.5, 1, 0, 2]))
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(
        out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, 1, 0, 2]))
    )
    single = HeadTester(ta.AlbefForVisualEntailment, num_labels=3).model()
    single(**HeadTester(ta.AlbefForVisualEntailment).inputs(), labels=torch.tensor([0, 1, 2, 0]))
    assert single.config.problem_type == "single_label_classification"


def test_feature_getters_return_model_outputs():
    model = HeadTester(ta.AlbefModel).model()
    pixel_values, ids, mask = tiny_batch()
    with torch.no_grad():
        image = model.get_image_features(pixel_values, output_hidden_states=True)
        text = model.get_text_features(ids, mask)
        out = model(pixel_values, ids, mask)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    torch.testing.assert_close(image.pooler_output, out.image_embeds)
    torch.testing.assert_close(text.pooler_output, out.text_embeds)
    assert len(image.hidden_states) == VISION_LAYERS + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], image.pooler_output)


@pytest.mark.parametrize(
    "tester",
    [HeadTester(ta.AlbefForPreTraining), HeadTester(ta.AlbefForQuestionAnswering, distill=True)]
    + [t for t in TESTERS if t.cls not in (ta.AlbefForPreTraining, ta.AlbefForQuestionAnswering)],
    ids=repr,
)
def test_device_map_auto_with_cpu_and_disk_offload_gives_identical_outputs(tester, tmp_path):
    """Heads whose momentum towers hold a tied LM head included (the towers are kept whole)."""
    model, inputs = tester.model(), tester.inputs()
    model.save_pretrained(tmp_path / "model")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = tester.cls.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": size * 2 // 3},
        offload_folder=tmp_path / "offload",
    ).eval()
    assert {"cpu", "disk"} <= set(offloaded.hf_device_map.values())
    with torch.no_grad():
        want, got = flatten(model(**inputs).to_tuple()), flatten(offloaded(**inputs).to_tuple())
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("mode, layers", [("text", 2), ("multimodal", 4)])
def test_negative_hidden_state_indices_count_from_the_last_layer_the_mode_runs(mode, layers):
    model = HeadTester(ta.AlbefModel).model()
    pixel_values, ids, mask = tiny_batch()
    kwargs = {"mode": mode}
    if mode == "multimodal":
        kwargs["encoder_hidden_states"] = model.vision_model(pixel_values).last_hidden_state
    with torch.no_grad():
        every = model.text_model(ids, mask, output_hidden_states=True, **kwargs).hidden_states
        last = model.text_model(ids, mask, output_hidden_states=-1, **kwargs).hidden_states
        first_and_last = model.text_model(ids, mask, output_hidden_states=[0, -1], **kwargs).hidden_states
    assert len(every) == layers + 1
    torch.testing.assert_close(last[-1], every[-1], rtol=0, atol=0)
    assert all(h is None for h in last[:-1])
    torch.testing.assert_close(first_and_last[0], every[0], rtol=0, atol=0)
