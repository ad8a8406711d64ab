"""Trainer fine-tuning of every task on tiny real data (PNG files, the bundled vocabulary, the data package's
collators and loaders), the evaluation protocols, the alpha warm-up, the recipe defaults, the command line and a
2-process run."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from transformers_albef import AlbefForRetrieval, pre_caption
from transformers_albef.retrieval import recall_at_k
from transformers_albef.training.callbacks import AlphaWarmupCallback
from transformers_albef.training.data import open_image
from transformers_albef.training.finetune import RECIPES, build_trainer, finetuning_arguments, main, parse_args
from transformers_albef.training.metrics import VQAAccuracy
from transformers_albef.training.optim import weight_decay_groups
from transformers_albef.training.trainer import RetrievalEvaluator, VQAEvaluator

from ..tiny_models import tiny_config
from .finetune_helpers import (
    ANSWER_LIST,
    VOCAB,
    eval_rows,
    processor,
    tiny_model,
    train_rows,
    training_args,
    write_images,
)

REPO = Path(__file__).resolve().parents[2]
TASKS = ("retrieval", "vqa", "nlvr", "ve")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


def test_recipes_are_the_original_fine_tuning_hyperparameters(tmp_path):
    # configs/*.yaml: (lr, epochs, per-GPU train / test batch, alpha warm-up, k_test)
    expected = {
        "retrieval_coco": (1e-5, 5, 32, 64, True, 256),
        "retrieval_flickr": (1e-5, 10, 32, 64, True, 128),
        "vqa": (2e-5, 8, 32, 16, True, 128),
        "nlvr": (2e-5, 10, 16, 16, True, None),
        "ve": (2e-5, 5, 32, 64, False, None),
    }
    for name, (lr, epochs, train_bs, eval_bs, warm_up, k_test) in expected.items():
        recipe = RECIPES[name]
        got = (recipe.learning_rate, recipe.num_train_epochs, recipe.train_batch_size, recipe.eval_batch_size)
        assert got + (recipe.alpha_warm_up, recipe.k_test) == (lr, epochs, train_bs, eval_bs, warm_up, k_test), name
        assert (recipe.alpha, recipe.weight_decay, recipe.min_lr, recipe.warmup_lr) == (0.4, 0.02, 1e-6, 1e-5)
    args = finetuning_arguments("retrieval", str(tmp_path), retrieval_set="flickr")
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (1e-5, 10, 32)
    assert (args.weight_decay, args.max_grad_norm, args.dataloader_drop_last) == (0.02, 0.0, True)
    assert not args.remove_unused_columns
    assert finetuning_arguments("vqa", str(tmp_path)).warmup_steps == 400  # warmup_epochs 4 x 100 iterations


def test_command_line_takes_task_defaults_and_overrides(tmp_path):
    _, args = parse_args(["--task", "vqa", "--output-dir", str(tmp_path)])
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (2e-5, 8, 32)
    assert args.eval_strategy == "no"  # VQA.py evaluates once, after training
    ft, args = parse_args(
        ["--task", "retrieval", "--retrieval-set", "flickr", "--learning_rate", "3e-5", "--output_dir", str(tmp_path)]
    )
    assert (ft.retrieval_set, args.learning_rate, args.num_train_epochs) == ("flickr", 3e-5, 10)


@pytest.mark.parametrize("task", TASKS)
def test_finetune_changes_weights_and_evaluates(task, images, tmp_path):
    model = tiny_model(task)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = build_trainer(
        task,
        model,
        processor(),
        train_rows(task, images),
        eval_rows(task, images),
        training_args(task, tmp_path),
        answer_list=ANSWER_LIST,
    )
    # every head's loss is already a mean: Trainer must not rescale it across processes
    assert type(model).accepts_loss_kwargs is False and trainer.model_accepts_loss_kwargs is False
    assert model.momentum is not None  # every original recipe distils
    momentum_before = {n: p.detach().clone() for n, p in model.momentum.named_parameters()}

    result = trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(result.training_loss)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    unchanged = [n for n in trainable if torch.equal(before[n], model.get_parameter(n))]
    assert not unchanged, f"not updated: {unchanged}"
    assert any(not torch.equal(p, model.momentum.get_parameter(n)) for n, p in momentum_before.items())
    if task == "retrieval":  # 2 steps x 4 pairs were queued (queue of 8)
        assert int(model.momentum.queue_ptr) == 0 and (model.momentum.idx_queue >= 0).all()

    metrics = trainer.evaluate()
    if task == "retrieval":
        for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
            assert 0 <= metrics[f"eval_{key}"] <= 100
        assert metrics["eval_txt_r10"] == metrics["eval_img_r10"] == 100  # 4 images, 8 captions
    elif task == "vqa":
        assert metrics["eval_num_questions"] == 3 and 0 <= metrics["eval_vqa_accuracy"] <= 1
    else:
        assert 0 <= metrics["eval_accuracy"] <= 1 and math.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("task", ["nlvr", "ve"])
def test_classification_evaluation_sees_every_example_without_augmentation(task, images, tmp_path):
    args = training_args(task, tmp_path, per_device_eval_batch_size=4)  # 6 examples: a last batch of 2
    assert args.dataloader_drop_last
    eval_set = eval_rows(task, images)
    trainer = build_trainer(task, tiny_model(task), processor(), eval_dataset=eval_set, args=args)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"]  # the evaluation transform is deterministic
    prediction = trainer.predict(eval_set)
    assert prediction.predictions.shape == (6, 2 if task == "nlvr" else 3)
    assert prediction.metrics["test_accuracy"] == pytest.approx(
        (prediction.predictions.argmax(-1) == prediction.label_ids).mean()
    )


def test_retrieval_evaluator_runs_the_itc_topk_itm_protocol(images, tmp_path):
    model = tiny_model("retrieval").eval()
    args = training_args("retrieval", tmp_path)
    per_image = eval_rows("retrieval", images)  # the original val/test layout: 4 images x 2 captions
    evaluator = RetrievalEvaluator(processor(), k_test=3)
    metrics = evaluator(model, per_image, args)
    score_i2t, score_t2i = evaluator.scores
    assert score_i2t.shape == (4, 8) and score_t2i.shape == (8, 4)
    # only the ITC top-3 of each row are re-scored; the rest stay at -100
    assert ((score_i2t != -100).sum(1) == 3).all() and ((score_t2i != -100).sum(1) == 3).all()

    # a re-scored entry is the ITM "match" logit of the pair, from the evaluation inputs
    texts = [pre_caption(c) for captions in per_image["caption"] for c in captions]
    text = processor()(text=texts, padding="max_length", max_length=30, truncation=True, return_tensors="pt")
    pixels = processor()(images=[open_image(per_image[0]["image"])], return_tensors="pt")["pixel_values"]
    top = (score_i2t[0] != -100).nonzero().flatten()
    with torch.no_grad():
        states = model.text_model(text["input_ids"][top], text["attention_mask"][top], mode="text").last_hidden_state
        image = model.vision_model(pixels).last_hidden_state.expand(len(top), -1, -1)
        itm = model.itm_logits(states, text["attention_mask"][top], image)
    assert score_i2t[0, top] == pytest.approx(itm[:, 1], abs=1e-5)
    txt2img = [0, 0, 1, 1, 2, 2, 3, 3]
    img2txt = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert metrics == pytest.approx(recall_at_k(score_i2t, score_t2i, txt2img, img2txt))

    # the same set as one row per caption with image ids: the same metrics
    pairs = [
        {"image": path, "caption": caption, "image_id": image_id}
        for image_id, (path, captions) in enumerate(zip(per_image["image"], per_image["caption"]))
        for caption in captions
    ]
    assert evaluator(model, datasets.Dataset.from_list(pairs), args) == pytest.approx(metrics)


def test_vqa_evaluator_ranks_the_answer_list(images, tmp_path):
    model = tiny_model("vqa").eval()
    args = training_args("vqa", tmp_path, per_device_eval_batch_size=2)  # 3 questions: batches of 2 and 1
    dataset = eval_rows("vqa", images)
    evaluator = VQAEvaluator(processor(), ANSWER_LIST, k_test=4, result_dir=tmp_path)
    metrics = evaluator(model, dataset, args)

    proc = processor()
    inputs = proc(
        images=[open_image(p) for p in dataset["image"]],
        text=list(dataset["question"]),
        clean_text="question",
        truncation=False,
        return_tensors="pt",
    )
    answers = proc.encode_answers(ANSWER_LIST, return_tensors="pt")
    ids, _ = model.rank_answers(
        **inputs, answer_input_ids=answers["input_ids"], answer_attention_mask=answers["attention_mask"], k=4
    )
    expected = [ANSWER_LIST[i] for i in ids[:, 0].tolist()]
    assert [p["answer"] for p in evaluator.predictions] == expected
    assert [p["question_id"] for p in evaluator.predictions] == [11, 12, 13]
    saved = json.loads((tmp_path / "vqa_result_step0.json").read_text())
    assert saved == evaluator.predictions
    accuracy = VQAAccuracy().compute(predictions=expected, references=dataset["answer"])["vqa_accuracy"]
    assert metrics == {"num_questions": 3.0, "vqa_accuracy": pytest.approx(accuracy)}


def test_alpha_warmup_callback_values():
    callback = AlphaWarmupCallback(alpha=0.4, steps_in_first_epoch=4)
    assert [callback.alpha_at(s) for s in range(7)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert AlphaWarmupCallback(alpha=0.4, warm_up=False).alpha_at(0) == 0.4
    with pytest.raises(ValueError):
        AlphaWarmupCallback(alpha=1.5)


def _alphas_seen(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("alpha")), with_kwargs=True)
    return seen


@pytest.mark.parametrize(
    "warm_up, accumulation, steps, expected",
    [
        # 8 examples, batch 2: 4 updates in the first epoch
        (True, 1, 6, [0.0, 0.1, 0.2, 0.3, 0.4, 0.4]),
        # 2 micro-batches per update: 2 updates per epoch, the same alpha for both micro-batches
        (True, 2, 3, [0.0, 0.0, 0.2, 0.2, 0.4, 0.4]),
        (None, 1, 2, [0.4, 0.4]),  # SNLI-VE's recipe: no warm-up
    ],
)
def test_alpha_reaches_the_forward(warm_up, accumulation, steps, expected, images, tmp_path):
    model = tiny_model("ve")
    seen = _alphas_seen(model)
    args = training_args(
        "ve", tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation, max_steps=steps
    )
    trainer = build_trainer("ve", model, processor(), train_rows("ve", images), args=args, alpha_warm_up=warm_up)
    trainer.train()
    assert seen == pytest.approx(expected)
    logged = [entry["alpha"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(expected[::accumulation])
    # the original schedule: linear warm-up from 1e-5 to 2e-5 over 100 steps, then cosine
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert rates == pytest.approx([1e-5 + 1e-5 * step / 100 for step in range(steps)])


def test_weight_decay_follows_the_original_rule(images, tmp_path):
    model = tiny_model("retrieval")
    trainer = build_trainer(
        "retrieval", model, processor(), train_rows("retrieval", images), args=training_args("retrieval", tmp_path)
    )
    decayed = set(trainer.get_decay_parameter_names(model))
    trainable_decayed, _ = weight_decay_groups(model)
    assert decayed & {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable_decayed)
    assert "temp" in decayed  # 0-D: decayed, as the original
    assert not any(name.endswith(".bias") or "norm" in name.lower() for name in decayed)
    optimizer = trainer.create_optimizer()
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 0.02]


def _write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    return env


# A few CPU steps (Trainer flags pass through the script).
TINY_RUN = "--max_steps 2 --per_device_train_batch_size 4 --dataloader_num_workers 0 --use_cpu --report_to none"
TINY_RUN = TINY_RUN.split()


def _flags(**options) -> list[str]:
    return [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def test_command_line_retrieval_on_original_annotations(images, tmp_path):
    """The documented command, on original-format annotation files and a tiny config."""
    names = [Path(p).name for p in images]
    train = [{"image": names[i // 2], "caption": f"A photo; number {i}.", "image_id": f"id{i // 2}"} for i in range(8)]
    test = [{"image": names[i], "caption": [f"photo {i}", f"picture {i}"]} for i in range(4)]
    config = tiny_config(text=VOCAB)
    config.to_json_file(tmp_path / "tiny.json")
    out = tmp_path / "out"
    flags = _flags(
        task="retrieval",
        config=tmp_path / "tiny.json",
        train_data=_write_json(tmp_path / "train.json", train),
        eval_data=_write_json(tmp_path / "test.json", test),
        image_root=Path(images[0]).parent,
        output_dir=out,
        k_test=2,
        save_strategy="no",
    )
    command = [sys.executable, "-m", "transformers_albef.training.finetune", *flags, *TINY_RUN]
    done = subprocess.run(command, env=_env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["eval_r_mean"] <= 100
    reloaded = AlbefForRetrieval.from_pretrained(out)
    assert reloaded.config.embed_dim == config.embed_dim and (out / "processor_config.json").exists()


def test_command_line_vqa_in_process(images, tmp_path):
    names = [Path(p).name for p in images]
    question = {"question": "What is in the picture?", "answer": ["red", "red", "blue"], "dataset": "vqa"}
    train = [{**question, "question_id": i, "image": names[i]} for i in range(8)]
    val = [{"question_id": 100 + i, "question": "Colour?", "answer": ["red"] * 3, "image": names[i]} for i in range(3)]
    tiny_config(text=VOCAB).to_json_file(tmp_path / "tiny.json")
    flags = _flags(
        task="vqa",
        config=tmp_path / "tiny.json",
        train_data=_write_json(tmp_path / "train.json", train),
        eval_data=_write_json(tmp_path / "val.json", val),
        image_root=Path(images[0]).parent,
        answer_list=_write_json(tmp_path / "answers.json", ANSWER_LIST),
        output_dir=tmp_path / "out",
        k_test=3,
        save_strategy="no",
        eval_strategy="no",
    )
    metrics = main([*flags, *TINY_RUN])
    assert math.isfinite(metrics["train_loss"]) and metrics["eval_num_questions"] == 3
    result = json.loads((tmp_path / "out" / "vqa_result_step2.json").read_text())
    assert [r["question_id"] for r in result] == [100, 101, 102] and all(r["answer"] in ANSWER_LIST for r in result)


def test_two_processes_log_the_mean_loss_not_a_multiple(images, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo): Trainer logs the mean over processes of the model's mean loss (a head
    with `accepts_loss_kwargs = True` would be logged, and trained, at twice its loss when the batch has labels)."""
    worker = Path(__file__).parent / "finetune_ddp_worker.py"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    port = ["--master_port", str(_free_port())]
    command = [sys.executable, *launcher, *port, str(worker), str(Path(images[0]).parent), str(tmp_path)]
    done = subprocess.run(command, env=_env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for task in ("retrieval", "ve"):
        per_rank = [rank[task]["model_losses"] for rank in ranks]
        assert ranks[0][task]["world_size"] == 2 and len(per_rank[0]) == len(per_rank[1]) == 2
        assert per_rank[0] != per_rank[1]  # each process saw its own batches
        mean = [(a + b) / 2 for a, b in zip(*per_rank)]
        assert ranks[0][task]["logged"] == pytest.approx(mean, rel=1e-5), task
    # the feature queue holds both processes' features: 2 steps x (2 processes x 2 pairs)
    assert ranks[0]["retrieval"]["queue_ptr"] == ranks[1]["retrieval"]["queue_ptr"] == 8
    # the evaluation split across the processes gives both the matrices of the original one-process evaluation
    for rank in ranks:
        for split, single in zip(rank["evaluation"]["split"], rank["evaluation"]["single_process"]):
            torch.testing.assert_close(torch.tensor(split), torch.tensor(single), atol=1e-5, rtol=0)
    assert ranks[0]["evaluation"]["metrics"] == ranks[1]["evaluation"]["metrics"]


def test_vqa_fine_tuning_starts_from_a_pretrained_folder(tmp_path):
    """As VQA.py: the answer decoder starts as the pre-trained encoder's embeddings, fusion layers and MLM head."""
    from transformers_albef import AlbefForPreTraining, AlbefForQuestionAnswering
    from transformers_albef.training.finetune import load_model

    pretrained = AlbefForPreTraining(tiny_config(distill=True))
    pretrained.save_pretrained(tmp_path)
    model = load_model(AlbefForQuestionAnswering, str(tmp_path))
    text = pretrained.config.text_config
    assert model.config.decoder_num_hidden_layers == text.num_hidden_layers - text.fusion_layer
    source, target = pretrained.state_dict(), model.state_dict()
    for key, value in target.items():
        if key.startswith("text_decoder.encoder.layer."):
            index, rest = key.split(".")[3], ".".join(key.split(".")[4:])
            origin = f"text_model.encoder.layer.{int(index) + text.fusion_layer}.{rest}"
        elif key.startswith(("text_decoder.", "lm_head.")):
            origin = key.replace("text_decoder.", "text_model.", 1).replace("lm_head.", "mlm_head.", 1)
        elif key.startswith(("vision_model.", "text_model.")):
            origin = key
        else:
            continue
        torch.testing.assert_close(value, source[origin], rtol=0, atol=0, msg=key)
    # Fine-tuning without distillation drops the momentum towers the pre-training folder brought.
    args = finetuning_arguments("vqa", str(tmp_path / "out"))
    trainer = build_trainer("vqa", model, processor(), args=args, distill=False)
    assert trainer.model.momentum is None
