"""What `import transformers_albef` and `albef --help` cost, checked by what they import (a timing assertion would be
flaky on a shared machine): neither imports torch nor another heavy library, every public name still resolves, and
the Auto classes still know ALBEF after `import transformers_albef`, whichever of the two is imported first."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import transformers_albef as ta

# Libraries the help path must not import (each costs from tens of milliseconds to seconds).
HEAVY = ("torch", "transformers", "datasets", "accelerate", "matplotlib", "faiss", "PIL", "numpy", "safetensors")


def imported_modules(command, env=None):
    """The modules a child process imports, read from `-X importtime`'s report (`PYTHONPROFILEIMPORTTIME`: it works
    for a console script too), and its stdout."""
    env = {**os.environ, **(env or {}), "PYTHONPROFILEIMPORTTIME": "1"}
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert process.returncode == 0, process.stderr[-2000:]
    modules = {
        line.split("|")[-1].strip()
        for line in process.stderr.splitlines()
        if line.startswith("import time:") and not line.rstrip().endswith("| imported package")
    }
    assert "transformers_albef" in modules, process.stderr[-2000:]  # the report was read
    return modules, process.stdout


def heavy_ones(modules):
    """The heavy libraries among `modules` (top-level names)."""
    return sorted({name.split(".")[0] for name in modules} & set(HEAVY))


def albef_commands():
    """`albef` as installed (the console script) when it is on PATH, and `python -m transformers_albef.cli`."""
    commands = [[sys.executable, "-m", "transformers_albef.cli"]]
    script = shutil.which("albef")
    if script:
        commands.insert(0, [script])
    return commands


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["retrieve", "--help"], ["--version"]])
def test_help_imports_no_heavy_library(argv):
    for command in albef_commands():
        modules, out = imported_modules([*command, *argv])
        assert heavy_ones(modules) == [], f"{' '.join(command + argv)} imported {heavy_ones(modules)}"
        assert "albef" in out


def test_importing_the_package_is_light():
    modules, _ = imported_modules([sys.executable, "-c", "import transformers_albef"])
    assert heavy_ones(modules) == []


def test_every_public_name_resolves():
    for name in ta.__all__:
        assert getattr(ta, name) is not None, name
        assert name in dir(ta)
    assert ta.AlbefForRetrieval is ta.models.albef.AlbefForRetrieval
    assert ta.hub.save_for_hub is not None
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        ta.NotAName  # noqa: B018
    namespace = {}
    exec("from transformers_albef import *", namespace)
    assert set(ta.__all__) <= set(namespace)


# The registration contract, in fresh processes (the registration is process state): the Auto classes, the
# processor mappings and pipeline() know ALBEF whatever was imported first, without trust_remote_code.
CHECK_REGISTRATION = """
import json, sys
import transformers_albef as ta
from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

folder = ta.bundled_model_path("retrieval")
config = AutoConfig.from_pretrained(folder)
assert type(config) is ta.AlbefConfig, type(config)
assert ta.AlbefConfig in IMAGE_PROCESSOR_MAPPING and ta.AlbefConfig in PROCESSOR_MAPPING
assert type(AutoProcessor.from_pretrained(folder)) is ta.AlbefProcessor
assert type(AutoModel.from_pretrained(folder)) is ta.AlbefModel
vqa = pipeline("albef-visual-question-answering", model=ta.bundled_model_path("vqa"))
assert isinstance(vqa, ta.pipelines.AlbefVisualQuestionAnsweringPipeline)
print(json.dumps({"watcher_left": ta._registration._watcher in sys.meta_path}))
"""


@pytest.mark.parametrize(
    "first",
    [
        "",  # only `import transformers_albef`: registered when the Auto classes load
        "from transformers import AutoConfig",  # transformers' Auto classes first: registered at once
        # transformers' modeling code first: `modeling_layers` imports the Auto classes while it is half-loaded, and
        # ALBEF's modeling code needs it, so the registration must wait for the import to finish
        "import transformers_albef\nfrom transformers.modeling_layers import GradientCheckpointingLayer",
    ],
    ids=["package-only", "auto-first", "modeling-layers"],
)
def test_auto_classes_know_albef_after_importing_the_package(first):
    code = f"{first}\n{CHECK_REGISTRATION}"
    process = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert json.loads(process.stdout.splitlines()[-1]) == {"watcher_left": False}
