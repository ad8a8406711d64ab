"""Publishing ALBEF models on the Hugging Face Hub, loadable with or without this package installed.

`save_for_hub` writes a self-contained folder: the model and processor as `save_pretrained` writes them, this
package's code files the model needs (with their relative imports, as transformers' remote-code loader expects),
`auto_map` entries in `config.json` and `processor_config.json`, and the model card. `push_to_hub` publishes such a
folder in one commit. The repo then loads with `AutoModel.from_pretrained(repo)` where the package is installed
(its registrations win), and with `trust_remote_code=True` where it is not.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from transformers import (
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
)
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The Auto classes this package registers models with (__init__.py). `auto_map` gets AutoModel, and each task class
# whose registered model is the published head or one of its bases, so loading it drops nothing but extra heads.
TASK_AUTO_CLASSES = (
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
)
# Files of an earlier version that a new push replaces (weights may be sharded differently, modules renamed).
# README.md and anything else in the repo stay unless re-uploaded.
REPLACED_ON_PUSH = ["*.safetensors", "*.bin", "*.json", "*.py"]


class HubPushError(RuntimeError):
    """A push to the Hub failed. `repo_id` and `status` (the HTTP status, None without a response) are kept."""

    def __init__(self, message: str, repo_id: str, status: int | None):
        super().__init__(message)
        self.repo_id, self.status = repo_id, status


def auto_map(model) -> dict[str, str]:
    """The `auto_map` of `config.json` for `model`: AutoConfig, AutoModel and the task Auto classes that fit it."""
    return {name: _class_reference(cls) for name, cls in auto_map_classes(model).items()}


def code_files(*classes: type) -> list[Path]:
    """The source files `classes` need: their modules and everything those import relatively, recursively."""
    todo = [Path(sys.modules[cls.__module__].__file__) for cls in classes]
    found: dict[Path, None] = {}
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found[path] = None
        todo.extend(path.parent / f"{name}.py" for name in _relative_imports(path))
    return sorted(found)


def save_for_hub(model, processor, folder: str | Path, card: ModelCard | str | None = None) -> Path:
    """
    Write `model`, `processor` (may be None) and `card` (a `huggingface_hub.ModelCard`, markdown text or None) to
    `folder` as a repo that loads with or without this package: the code files and `auto_map` entries for
    `trust_remote_code=True` are added. Returns the folder.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    classes = [type(model), *auto_map_classes(model).values()]
    if processor is not None:
        processor.save_pretrained(folder)
        classes += [type(processor), type(processor.image_processor)]
    for path in code_files(*classes):
        shutil.copyfile(path, folder / path.name)

    _update_json(folder / "config.json", lambda config: config.update(auto_map=auto_map(model)))
    if processor is not None:
        processor_map = {"AutoProcessor": _class_reference(type(processor))}
        image_map = {"AutoImageProcessor": _class_reference(type(processor.image_processor))}

        def add_processor_maps(config: dict):
            config["auto_map"] = {**config.get("auto_map", {}), **processor_map}
            if isinstance(config.get("image_processor"), dict):  # transformers 5 nests it in processor_config.json
                config["image_processor"]["auto_map"] = image_map

        _update_json(folder / "processor_config.json", add_processor_maps)
        _update_json(folder / "preprocessor_config.json", lambda config: config.update(auto_map=image_map))
    if card is not None:
        (folder / "README.md").write_text(str(card), encoding="utf-8")

    missed = unreachable_code_files(folder)
    if missed:
        logger.warning(
            f"transformers' remote-code loader will not fetch {missed} from {folder}: a module imports them in a "
            "form it does not follow (use `from .module import name`); `trust_remote_code=True` loading will fail."
        )
    return folder


def push_to_hub(
    model,
    processor,
    repo_id: str,
    card: ModelCard | str | None = None,
    commit_message: str = "Upload ALBEF model",
    private: bool = False,
    token: str | None = None,
) -> CommitInfo:
    """
    Publish `model`, `processor` and `card` to the Hub repo `repo_id` in one commit (created if needed, `private`
    only applies then), as `save_for_hub` lays them out. Nothing local is written except a temporary folder.
    Raises `HubPushError` naming the repo and the HTTP status when the Hub refuses.
    """
    with tempfile.TemporaryDirectory(prefix="albef-hub-") as tmp:
        save_for_hub(model, processor, tmp, card)
        return push_folder(tmp, repo_id, commit_message=commit_message, private=private, token=token)


def push_folder(
    folder: str | Path,
    repo_id: str,
    commit_message: str = "Upload ALBEF model",
    private: bool = False,
    token: str | None = None,
) -> CommitInfo:
    """
    Publish a folder written by `save_for_hub` to `repo_id` in one commit; model, config and code files of an earlier
    version that the folder does not have are deleted in the same commit. The folder is only read. Raises
    `HubPushError` naming the repo and the HTTP status when the Hub refuses.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: write it with save_for_hub first.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            delete_patterns=REPLACED_ON_PUSH,
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        detail = getattr(error, "server_message", None) or str(error).splitlines()[0]
        raise HubPushError(
            f"Pushing to the Hub repo {repo_id!r} at {api.endpoint} failed with HTTP {status}: {detail}. "
            "Nothing local was changed; push again to retry.",
            repo_id=repo_id,
            status=status,
        ) from error


def unreachable_code_files(folder: str | Path) -> list[str]:
    """The code files in `folder` that transformers' remote-code loader does not reach from any `auto_map` entry
    (it follows `from .module import ...` lines only); empty when `trust_remote_code=True` loading can work."""
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = Path(folder)
    entries = set()
    for name in ("config.json", "processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            for mapping in (config.get("auto_map", {}), config.get("image_processor", {}).get("auto_map", {})):
                entries.update(folder / f"{ref.rsplit('.', 1)[0]}.py" for ref in mapping.values())
    reached = {path.name for path in entries}
    for path in entries:
        reached.update(Path(f).name for f in get_relative_import_files(path))
    return sorted(path.name for path in folder.glob("*.py") if path.name not in reached)


def auto_map_classes(model) -> dict[str, type]:
    """Auto class name -> the class it loads for `model`'s repo (see `auto_map`)."""
    config_class = type(model.config)
    classes = {"AutoConfig": config_class}
    for auto_class in (AutoModel, *TASK_AUTO_CLASSES):
        try:
            registered = auto_class._model_mapping[config_class]
        except KeyError:
            continue
        if auto_class is AutoModel or isinstance(model, registered):
            classes[auto_class.__name__] = registered
    return classes


def _class_reference(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _relative_imports(path: Path) -> list[str]:
    """Sibling modules that `path` imports (`from .x import y`, `from . import x`), anywhere in the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.append(node.module.split(".")[0])
            else:
                names += [alias.name for alias in node.names if (path.parent / f"{alias.name}.py").is_file()]
    return names


def _update_json(path: Path, update) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    update(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = [
    "HubPushError",
    "auto_map",
    "code_files",
    "push_folder",
    "push_to_hub",
    "save_for_hub",
    "unreachable_code_files",
]
