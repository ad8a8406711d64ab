"""Publishing on the Hub, against the loopback Hub of `hub_server.py` (see `hub_fixtures.py`; nothing reaches the
internet): push -> `from_pretrained` with identical outputs, loading with `trust_remote_code=True` where the package
cannot be imported, updating a repo, and a server error in the middle of a push."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

import transformers_albef as ta
from transformers_albef.hub import (
    HubPushError,
    push_folder,
    push_to_hub,
    save_for_hub,
    unreachable_code_files,
)

from .hub_fixtures import WITHOUT_THE_PACKAGE, hub_fixture  # noqa: F401  (the `hub` fixture)
from .parity_utils import load_fixture
from .parity_utils import tiny_config as fixture_config
from .tiny_models import tiny_config

CLS, SEP = 101, 102
CARD = "---\nlicense: bsd-3-clause\nlibrary_name: transformers\n---\n\n# tiny ALBEF\n\nA test model.\n"


# The outputs the tests compare, as source: the remote-code subprocess runs the same code on what it loaded.
OUTPUTS = r"""
import PIL.Image
import torch

TEXTS = ["a man riding a horse", "a dog on the grass", "what color is the cat ?"]
ANSWERS = ["red", "blue", "yes"]


def process(processor, image_paths):
    images = [PIL.Image.open(p) for p in image_paths]
    return processor(images=images + images[:1], text=TEXTS, return_tensors="pt")


def itc_outputs(model, processor, image_paths, prefix=""):
    with torch.no_grad():
        return {f"{prefix}logits_per_image": model(**process(processor, image_paths)).logits_per_image}


def retrieval_outputs(model, processor, image_paths, prefix=""):
    inputs = process(processor, image_paths)
    with torch.no_grad():
        out = model(**inputs, use_itm_head=True)
        i2t, t2i = model.retrieval_scores(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], k=2)
    return {
        f"{prefix}input_ids": inputs["input_ids"],
        f"{prefix}pixel_values": inputs["pixel_values"],
        f"{prefix}logits_per_image": out.logits_per_image,
        f"{prefix}itm_logits": out.itm_logits,
        f"{prefix}score_i2t": i2t,
        f"{prefix}score_t2i": t2i,
    }


def vqa_outputs(model, processor, image_paths, prefix=""):
    inputs = process(processor, image_paths)
    answers = processor.encode_answers(ANSWERS, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, answer_input_ids=answers["input_ids"], answer_attention_mask=answers["attention_mask"])
    return {f"{prefix}answer_ids": answers["input_ids"], f"{prefix}question_states": out.question_states,
            f"{prefix}loss": out.loss}
"""
_namespace: dict = {}
exec(OUTPUTS, _namespace)
TEXTS, ANSWERS = _namespace["TEXTS"], _namespace["ANSWERS"]
itc_outputs, retrieval_outputs, vqa_outputs = (
    _namespace[name] for name in ("itc_outputs", "retrieval_outputs", "vqa_outputs")
)


def write_vocab(path: Path) -> Path:
    """A 512-entry WordPiece vocabulary with BERT's special-token ids, for the tiny models' 512-token embeddings."""
    words = sorted({w for text in TEXTS + ANSWERS for w in text.split()})
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokens += [f"[unused{i}]" for i in range(99, 99 + 512 - len(tokens))]
    path.write_text("\n".join(tokens) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The converted tiny retrieval fixture checkpoint, a tiny random VQA model, their processors, and images."""
    folder = tmp_path_factory.mktemp("assets")
    vocab = write_vocab(folder / "vocab.txt")
    _, _, _, meta = load_fixture("retrieval")
    retrieval = ta.AlbefForRetrieval.from_original(
        load_fixture("retrieval")[0] / "checkpoint.pth", config=fixture_config(meta, "retrieval")
    ).eval()
    torch.manual_seed(0)
    vqa = ta.AlbefForQuestionAnswering(tiny_config()).eval()
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = folder / f"image{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return {
        "retrieval": retrieval,
        "retrieval_processor": ta.AlbefProcessor.from_bert_vocab(retrieval.config.vision_config.image_size, vocab),
        "vqa": vqa,
        "vqa_processor": ta.AlbefProcessor.from_bert_vocab(vqa.config.vision_config.image_size, vocab),
        "images": images,
    }


def assert_same(got: dict, want: dict):
    """Bit-identical: the same weights and inputs on the same machine (measured: every difference is 0)."""
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_push_then_from_pretrained_gives_identical_outputs(hub, assets):
    model, processor = assets["retrieval"], assets["retrieval_processor"]
    commit = push_to_hub(model, processor, "user/albef-tiny", card=ModelCard(CARD), commit_message="Tiny ALBEF")

    files = hub.files("user/albef-tiny")
    assert commit.oid == hub.commits("user/albef-tiny")[-1] == HfApi().model_info("user/albef-tiny").sha
    assert files["README.md"].decode() == CARD
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files.keys()
    assert {"configuration_albef.py", "modeling_albef.py", "processing_albef.py", "image_processing_albef.py"} <= (
        files.keys()
    )
    assert json.loads(files["config.json"])["auto_map"] == {
        "AutoConfig": "configuration_albef.AlbefConfig",
        "AutoModel": "modeling_albef.AlbefForRetrieval",  # no task Auto class fits: AutoModel loads the head
        "AutoModelForZeroShotImageClassification": "modeling_albef.AlbefModel",
    }
    processor_config = json.loads(files["processor_config.json"])
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_albef.AlbefProcessor"}
    assert processor_config["image_processor"]["auto_map"] == {
        "AutoImageProcessor": "image_processing_albef.AlbefImageProcessor"
    }

    # With the package installed its registrations win, also when remote code is allowed.
    reloaded = ta.AlbefForRetrieval.from_pretrained("user/albef-tiny").eval()
    reprocessor = AutoProcessor.from_pretrained("user/albef-tiny")
    assert type(reprocessor) is ta.AlbefProcessor
    want = retrieval_outputs(model, processor, assets["images"])
    assert_same(retrieval_outputs(reloaded, reprocessor, assets["images"]), want)
    ids = want["input_ids"]
    assert (ids[:, 0] == CLS).all() and not (ids == SEP).any()  # ALBEF's captions: [CLS] tokens, no [SEP]

    for auto_class in (AutoModel, AutoModelForZeroShotImageClassification):
        for trust_remote_code in (False, True):
            auto = auto_class.from_pretrained("user/albef-tiny", trust_remote_code=trust_remote_code).eval()
            assert type(auto) is ta.AlbefModel
            got = itc_outputs(auto, reprocessor, assets["images"])
            assert_same(got, {"logits_per_image": want["logits_per_image"]})
    assert type(AutoConfig.from_pretrained("user/albef-tiny", trust_remote_code=True)) is ta.AlbefConfig


CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""
import transformers
from safetensors.torch import save_file
from transformers.dynamic_module_utils import get_class_from_dynamic_module
"""
    + OUTPUTS
    + r"""
args = json.loads(sys.argv[1])
outputs, classes = {}, {}


def load(name, repo):
    loaded = getattr(transformers, name).from_pretrained(repo, trust_remote_code=True)
    classes[f"{repo} {name}"] = f"{type(loaded).__module__}.{type(loaded).__name__}"
    return loaded.eval() if hasattr(loaded, "eval") else loaded


repo = args["retrieval"]
config = load("AutoConfig", repo)
processor = load("AutoProcessor", repo)
load("AutoImageProcessor", repo)
head = get_class_from_dynamic_module(f"modeling_albef.{config.architectures[0]}", repo).from_pretrained(repo).eval()
classes[f"{repo} head"] = f"{type(head).__module__}.{type(head).__name__}"
outputs.update(retrieval_outputs(head, processor, args["images"], "head."))
for name in ("AutoModel", "AutoModelForZeroShotImageClassification"):
    outputs.update(itc_outputs(load(name, repo), processor, args["images"], name + "."))

repo = args["vqa"]
load("AutoConfig", repo)
model, processor = load("AutoModelForVisualQuestionAnswering", repo), load("AutoProcessor", repo)
outputs.update(vqa_outputs(model, processor, args["images"], "vqa."))

save_file({k: v.contiguous() for k, v in outputs.items()}, args["out"] + ".safetensors")
modules = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
json.dump({"classes": classes, "modules": modules}, open(args["out"] + ".json", "w"))
"""
)


def test_remote_code_loads_where_the_package_is_not_importable(hub, assets, tmp_path):
    push_to_hub(assets["retrieval"], assets["retrieval_processor"], "user/albef-retrieval", card=CARD)
    push_to_hub(assets["vqa"], assets["vqa_processor"], "user/albef-vqa")

    env = {**hub.env, "HF_HOME": str(tmp_path / "fresh_home"), "HF_HUB_CACHE": str(tmp_path / "fresh_home" / "hub")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "fresh_home" / "modules")
    env.pop("PYTHONPATH", None)
    args = {
        "retrieval": "user/albef-retrieval",
        "vqa": "user/albef-vqa",
        "images": [str(p) for p in assets["images"]],
        "out": str(tmp_path / "child"),
    }
    # -I: no PYTHONPATH, user site or current directory on sys.path; the child hides an installed package itself.
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(args)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]

    report = json.loads((tmp_path / "child.json").read_text())
    package_dir = Path(ta.__file__).parent.resolve()
    assert not [name for name in report["modules"] if name.partition(".")[0] == "transformers_albef"]
    assert not [f for f in report["modules"].values() if f and Path(f).resolve().is_relative_to(package_dir)]
    assert report["classes"] and all(c.startswith("transformers_modules.") for c in report["classes"].values())
    assert report["classes"]["user/albef-retrieval head"].endswith("modeling_albef.AlbefForRetrieval")
    assert report["classes"]["user/albef-retrieval AutoModel"].endswith("modeling_albef.AlbefForRetrieval")
    assert report["classes"]["user/albef-retrieval AutoProcessor"].endswith("processing_albef.AlbefProcessor")
    assert report["classes"]["user/albef-retrieval AutoImageProcessor"].endswith(
        "image_processing_albef.AlbefImageProcessor"
    )
    vqa_class = report["classes"]["user/albef-vqa AutoModelForVisualQuestionAnswering"]
    assert vqa_class.endswith("modeling_albef.AlbefForQuestionAnswering")
    # The child fetched the model folder's code from the server.
    fetched = {path.rsplit("/", 1)[-1] for method, path, status in hub.requests("GET", "/resolve/") if status == 200}
    code = {p.name for p in (Path(ta.__file__).parent / "models" / "albef").glob("*_albef.py")}
    assert code <= fetched and not {name for name in fetched if name.endswith(".py")} - code

    got = load_file(tmp_path / "child.safetensors")
    want = retrieval_outputs(assets["retrieval"], assets["retrieval_processor"], assets["images"], "head.")
    want.update(vqa_outputs(assets["vqa"], assets["vqa_processor"], assets["images"], "vqa."))
    for name in ("AutoModel", "AutoModelForZeroShotImageClassification"):
        want[f"{name}.logits_per_image"] = want["head.logits_per_image"]
    assert_same(got, want)
    assert not (got["head.input_ids"] == SEP).any() and (got["vqa.answer_ids"] == SEP).sum() == len(ANSWERS)


def test_pushing_again_updates_the_repo(hub, assets):
    model, processor = assets["retrieval"], assets["retrieval_processor"]
    first = push_to_hub(model, processor, "user/albef-update")
    changed = ta.AlbefForRetrieval.from_pretrained("user/albef-update")
    with torch.no_grad():
        changed.itm_head.bias.add_(1.0)
    second = push_to_hub(changed, processor, "user/albef-update", card=CARD, commit_message="Better ITM bias")

    assert second.oid != first.oid and hub.commits("user/albef-update")[-2:] == [first.oid, second.oid]
    assert HfApi().model_info("user/albef-update").sha == second.oid
    latest = ta.AlbefForRetrieval.from_pretrained("user/albef-update")
    torch.testing.assert_close(latest.itm_head.bias, model.itm_head.bias + 1.0, rtol=0, atol=0)
    old = ta.AlbefForRetrieval.from_pretrained("user/albef-update", revision=first.oid)
    torch.testing.assert_close(old.itm_head.bias, model.itm_head.bias, rtol=0, atol=0)
    now, then = hub.files("user/albef-update"), hub.files("user/albef-update", revision=first.oid)
    assert now["README.md"].decode() == CARD and "README.md" not in then
    assert now["model.safetensors"] != then["model.safetensors"]


def test_a_server_error_mid_push_is_reported_and_changes_nothing(hub, assets, tmp_path):
    model, processor = assets["retrieval"], assets["retrieval_processor"]
    folder = save_for_hub(model, processor, tmp_path / "albef", card=CARD)
    before = {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")}
    push_folder(folder, "user/albef-fail")
    commits = hub.commits("user/albef-fail")

    hub.fail_next("commit", status=500)
    with pytest.raises(HubPushError, match=r"'user/albef-fail'.*HTTP 500") as error:
        push_folder(folder, "user/albef-fail", commit_message="second")
    assert error.value.status == 500 and error.value.repo_id == "user/albef-fail"
    assert ("POST", "/api/models/user/albef-fail/commit/main", 500) in hub.log  # it failed mid-push, at the commit
    assert {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")} == before
    assert hub.commits("user/albef-fail") == commits

    hub.fail_next("create", status=403, message="You don't have the rights to create a model under this namespace")
    with pytest.raises(HubPushError, match=r"'other/albef'.*HTTP 403.*rights"):
        push_to_hub(model, processor, "other/albef")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("other/albef")


def test_every_shipped_module_is_reachable_by_the_remote_code_loader(tmp_path):
    # transformers' loader fetches a repo's modules by following `from .module import ...` lines only; a module it
    # does not reach (e.g. one imported as `from . import module`) is missing where the package is not installed.
    for model in (ta.AlbefForPreTraining(tiny_config()), ta.AlbefForQuestionAnswering(tiny_config())):
        folder = save_for_hub(model, ta.AlbefProcessor.from_bert_vocab(32), tmp_path / type(model).__name__)
        assert unreachable_code_files(folder) == []
        shipped = {p.name for p in folder.glob("*.py")}
        model_folder = {p.name for p in (Path(ta.__file__).parent / "models" / "albef").glob("*.py")}
        assert shipped == model_folder - {"__init__.py"}  # the model folder, nothing of the tools
        assert len(shipped) <= 5


def test_the_hub_fixture_keeps_tests_off_the_network(hub):
    import socket

    with pytest.raises(ConnectionRefusedError, match="may not reach the network"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1: never routed
    assert HfApi().endpoint == hub.url.rstrip("/")
