"""Pre-training under 2 processes (torchrun, gloo on CPU) against a 1-process run over the same global batches.

What the algorithm says (the original's `concat_all_gather` + `_dequeue_and_enqueue`):
- after each step, every process holds the same queues and pointer, whose newest columns are the momentum features
  of the global batch in rank order (rank 0's pairs, then rank 1's);
- so the queues of a 2-process run with 2 pairs per process equal those of a 1-process run with 4 pairs per step
  on the same data order, as long as the momentum towers are the same. They are with lr = 0 (the towers stay at the
  initial weights): that isolates the gather/enqueue/sharding logic from the optimisation;
- the losses differ by design: a process's ITC positives and in-batch negatives are its own 2 pairs (the other
  rank's features of the step reach it only through the queue, after the loss), its ITM hard negatives are drawn
  from its own batch, and its MLM mean runs over its own masked tokens. Each process's ITC loss is therefore the
  1-process ITC loss of its local batch against the current queue, which the test checks at step 1.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from tests.training.pretrain_utils import cli_args, fresh_accelerate, records, torchrun, write_config, write_pairs
from transformers_albef.training.pretrain import (
    PretrainingArguments,
    build_config,
    build_model,
    main,
    parse_args,
    pretrain,
    read_metrics,
)

STEPS = 3
PER_PROCESS = 2
QUEUE = 16


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data, config = write_pairs(root / "data", count=16), write_config(root / "tiny.json", queue_size=QUEUE)
    frozen = dict(lr=0.0, warmup_lr=0.0, min_lr=0.0, max_steps=STEPS, augment=False, save_steps=0)

    two = torchrun(cli_args(data, config, root / "two", batch_size=PER_PROCESS, **frozen), root / "two-records")
    assert two.returncode == 0, two.stderr[-5000:]

    one_records = {}

    def record(state):
        momentum = state.accelerator.unwrap_model(state.model).momentum
        one_records[state.step] = {
            "image_queue": momentum.image_queue.clone(),
            "text_queue": momentum.text_queue.clone(),
            "queue_ptr": momentum.queue_ptr.clone(),
            **{k: v.clone() for k, v in state.batch.items()},
        }

    with fresh_accelerate():
        args = cli_args(data, config, root / "one", batch_size=2 * PER_PROCESS, **frozen)
        pretrain(parse_args(args), step_callback=record)
    return {
        "root": root,
        "data": data,
        "config": config,
        "two": [records(root / "two-records", rank) for rank in (0, 1)],
        "one": one_records,
        "two_metrics": read_metrics(root / "two"),
        "one_metrics": read_metrics(root / "one"),
    }


def test_queues_identical_on_both_ranks(runs):
    rank0, rank1 = runs["two"]
    assert sorted(rank0) == sorted(rank1) == list(range(1, STEPS + 1))
    for step in rank0:
        for name in ("image_queue", "text_queue", "queue_ptr"):
            assert torch.equal(rank0[step][name], rank1[step][name]), (step, name)
        assert int(rank0[step]["queue_ptr"]) == (step * 2 * PER_PROCESS) % QUEUE
        # Each rank trained on its own pairs.
        assert not torch.equal(rank0[step]["pixel_values"], rank1[step]["pixel_values"])


def test_queue_columns_hold_both_ranks_momentum_features(runs):
    """Recompute each rank's momentum features of each step's local batch (the towers did not move, lr = 0) and
    find them at columns [step*4 + rank*2, +2) of the final queue."""
    args = PretrainingArguments(train_data=[str(runs["data"])], output_dir="unused", config=str(runs["config"]))
    args.image_size = 32
    set_seed(args.seed)  # the run builds its model right after set_seed(seed)
    model = build_model(args, build_config(args)).eval()
    final = runs["two"][0][STEPS]
    momentum = model.momentum
    with torch.no_grad():
        for step in range(1, STEPS + 1):
            for rank in (0, 1):
                batch = runs["two"][rank][step]
                image = momentum.vision_model(batch["pixel_values"]).last_hidden_state[:, 0]
                image = F.normalize(momentum.vision_proj(image), dim=-1)
                text = momentum.text_model(batch["input_ids"], batch["attention_mask"], mode="text")
                text = F.normalize(momentum.text_proj(text.last_hidden_state[:, 0]), dim=-1)
                start = ((step - 1) * 2 * PER_PROCESS + rank * PER_PROCESS) % QUEUE
                columns = slice(start, start + PER_PROCESS)
                # The model here is rebuilt from the seed, not loaded: a match also shows both runs started from
                # the same weights.
                torch.testing.assert_close(final["image_queue"][:, columns], image.T, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(final["text_queue"][:, columns], text.T, atol=1e-5, rtol=1e-5)


def test_two_processes_match_one_process_at_global_batch(runs):
    one, (rank0, rank1) = runs["one"], runs["two"]
    for step in range(1, STEPS + 1):
        # Same data order: the global batch of step s is rank 0's pairs then rank 1's.
        global_pixels = torch.cat([rank0[step]["pixel_values"], rank1[step]["pixel_values"]])
        torch.testing.assert_close(one[step]["pixel_values"], global_pixels, atol=0, rtol=0)
        for name in ("image_queue", "text_queue"):
            torch.testing.assert_close(one[step][name], rank0[step][name], atol=1e-5, rtol=1e-5)
        assert torch.equal(one[step]["queue_ptr"], rank0[step]["queue_ptr"])


def test_losses_differ_by_design_and_follow_local_itc(runs):
    """Step 1: each rank's ITC loss is the ITC loss of its local batch against the initial queue (a 1-process
    forward of the initial model); the logged 2-process loss is their mean, and differs from the 1-process run's
    ITC loss over the 4 pairs (more in-batch negatives)."""
    args = PretrainingArguments(train_data=[str(runs["data"])], output_dir="unused", config=str(runs["config"]))
    args.image_size = 32
    local = []
    for rank in (0, 1):
        set_seed(args.seed)
        model = build_model(args, build_config(args))
        inputs = ("pixel_values", "input_ids", "attention_mask", "masked_input_ids", "mlm_labels")
        batch = {k: runs["two"][rank][1][k] for k in inputs}
        with torch.no_grad():
            out = model(**batch, return_loss=True, alpha=0.0)
        torch.testing.assert_close(out.loss_itc, runs["two"][rank][1]["loss_itc"], atol=1e-5, rtol=1e-5)
        local.append(out.loss_itc.item())
    two_step1 = runs["two_metrics"][0]
    one_step1 = runs["one_metrics"][0]
    assert two_step1["step"] == one_step1["step"] == 1
    assert math.isclose(two_step1["loss_itc"], sum(local) / 2, rel_tol=1e-5)
    assert not math.isclose(two_step1["loss_itc"], one_step1["loss_itc"], rel_tol=1e-3)
    # alpha ramps over the first epoch (16 pairs / 4 per step = 4 steps): alpha * step / 4 at steps 0, 1, 2.
    for row in runs["one_metrics"] + runs["two_metrics"]:
        assert math.isclose(row["alpha"], 0.4 * min(1.0, (row["step"] - 1) / 4), abs_tol=1e-12)


def test_queue_size_divisibility_error_two_processes(runs, tmp_path):
    """The check counts the processes (2 x 3 pairs do not tile a queue of 16) and stops the run before training."""
    args = cli_args(runs["data"], runs["config"], tmp_path / "bad", batch_size=3, max_steps=1)
    result = torchrun(args, tmp_path / "records")
    assert result.returncode != 0
    assert "queue_size (16) must be divisible by the global batch size (6 = 2 process(es) x --batch-size 3)" in (
        result.stdout + result.stderr
    )
    assert not (tmp_path / "bad" / "logs").exists()  # refused before training started


def test_queue_size_divisibility_error_single_process(runs, tmp_path, capsys):
    with fresh_accelerate():
        status = main(cli_args(runs["data"], runs["config"], tmp_path / "out", batch_size=3, max_steps=1))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "albef-pretrain: error: queue_size (16) must be divisible by the global batch size (3 = 1" in err
