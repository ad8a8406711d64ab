"""benchmarks/host_overhead.py: its count of what a GPU would synchronise on (checked on small cases), a tiny run
end to end into a temporary file, and the sync counts of the model's hot paths (regressions show up here, on the
CPU, before any GPU run)."""

from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "host_overhead.py"


@pytest.fixture(scope="module")
def host():
    return load_script("benchmarks/host_overhead.py")


def test_sync_counter_follows_device_tensors(host):
    counter = host.SyncCounter()
    weight = torch.randn(4, 3)
    on_host = torch.arange(4)
    counter.on_device(weight)
    with counter:
        device = weight.device  # read off a device tensor: names the device
        x = weight @ torch.ones(3)  # an operator with a device input: its result is on the device
        float(x[0]), x.sum().item(), bool(x.any())  # three reads
        x.tolist()
        on_host.tolist(), int(on_host[0])  # host tensors: free
        x.cpu()
        moved = x.to("cpu")  # a copy back: a read; the copy is a host tensor
        moved.tolist()
        x[x > 0], x.nonzero()  # two implicit syncs
        x[on_host]  # a host index is copied to the device first
        on_host.to(device), on_host.to(device, non_blocking=True)  # one blocking copy
        torch.tensor([1, 2], device=device), torch.zeros(3, device=device)  # a copy, then a fill (no copy)
        torch.tensor([], device=device)  # nothing to copy
        torch.zeros(1).to(weight.device).item()  # a copy, then a read
    report = counter.report()
    assert report["counts"] == {"DtoH reads": 7, "implicit syncs": 2, "blocking HtoD": 4}, report
    sites = [site for entries in report["sites"].values() for site, _ in entries]
    assert all("test_benchmarks_host_overhead.py" in site for site in sites), sites


def test_tiny_run_writes_its_section_and_the_hot_paths_do_not_synchronise(host, tmp_path):
    repo_file = REPO / "BENCHMARKS.md"
    before = repo_file.read_bytes() if repo_file.exists() else None
    output = tmp_path / "BENCHMARKS.md"
    output.write_text(
        "# Speed benchmarks\n\nINTRO\n\n<!-- host-overhead:cpu -->\nOLD\n<!-- /host-overhead:cpu -->\n\nEND\n"
    )
    assert host.main(["--size", "tiny", "--repeats", "1", "--output", str(output)]) == 0
    text = output.read_text()
    assert "OLD" not in text and "INTRO" in text and "END" in text
    assert text.count(host.BEGIN) == 1 and text.count(host.END) == 1
    section = text.split(host.BEGIN)[1].split(host.END)[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in section.splitlines() if line.startswith("| ")}
    for name in host.PATHS:
        assert name in rows, name

    def counts(name):
        return [float(rows[name][i]) for i in (3, 4, 5)]

    assert counts("image") == [0, 0, 0]  # the vision tower reads nothing back
    # Text tower: transformers' check whether the padding mask can be skipped (`padding_mask.all()`) only.
    assert counts("text") == [1, 0, 0] and "masking_utils" in rows["text"][6]
    # Grouped ITM: its index planning reads the text mask once (a host copy); nothing else waits for the device.
    implicit, htod = counts("itm")[1:]
    assert implicit == 0 and htod == 0, rows["itm"]
    assert counts("rank")[1:] == [0, 0] and counts("step")[1:] == [0, 0]
    # Pre-training: no blocking copy (ITM labels are made on the device) and no read of the queue pointer; the MLM's
    # masked-token selection is what is left.
    assert counts("pretrain")[2] == 0 and "enqueue" not in rows["pretrain"][6], rows["pretrain"]
    assert "mlm" in rows["pretrain"][6]
    assert (repo_file.read_bytes() if repo_file.exists() else None) == before
