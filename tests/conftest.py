import os
import pathlib

import pytest
import torch

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The models under test are tiny: one intra-op thread is as fast, and test runs do not starve other work sharing the
# cores (ALBEF_TEST_THREADS overrides).
torch.set_num_threads(int(os.environ.get("ALBEF_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    from .parity_utils import MEASURED

    if MEASURED:
        terminalreporter.section("parity with the original ALBEF code (max abs diff, fp32)")
        for (test, output), diff in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{test:45s} {output:28s} {diff:.2e}")
