"""Publishing ALBEF models on the Hugging Face Hub, loadable with or without this package installed.

`save_for_hub` writes a self-contained folder: the model and processor as `save_pretrained` writes them (which
includes the model folder's code files and the `auto_map` entries, as transformers' remote-code loader expects)
and the model card. `push_to_hub` publishes such a
folder in one commit. The repo then loads with `AutoModel.from_pretrained(repo)` where the package is installed
(its registrations win), and with `trust_remote_code=True` where it is not.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Files of an earlier version that a new push replaces (weights may be sharded differently, modules renamed).
# README.md and anything else in the repo stay unless re-uploaded.
REPLACED_ON_PUSH = ["*.safetensors", "*.bin", "*.json", "*.py"]


class HubPushError(RuntimeError):
    """A push to the Hub failed. `repo_id` and `status` (the HTTP status, None without a response) are kept."""

    def __init__(self, message: str, repo_id: str, status: int | None):
        super().__init__(message)
        self.repo_id, self.status = repo_id, status


def auto_map(model) -> dict[str, str]:
    """The `auto_map` of `config.json` for `model` (what its `save_pretrained` writes)."""
    return model.remote_code_auto_map()


def save_for_hub(model, processor, folder: str | Path, card: ModelCard | str | None = None) -> Path:
    """
    Write `model`, `processor` (may be None) and `card` (a `huggingface_hub.ModelCard`, markdown text or None) to
    `folder` as a repo that loads with or without this package. `save_pretrained` already writes the model folder's
    code files and the `auto_map` entries `trust_remote_code=True` needs; the image processor's entry, nested in
    `processor_config.json`, is added here. Returns the folder.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
        image_map = {"AutoImageProcessor": _class_reference(type(processor.image_processor))}

        def add_image_processor_map(config: dict):
            if isinstance(config.get("image_processor"), dict):  # transformers 5 nests it in processor_config.json
                config["image_processor"]["auto_map"] = image_map

        _update_json(folder / "processor_config.json", add_image_processor_map)
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


def _class_reference(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _update_json(path: Path, update) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    update(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = [
    "HubPushError",
    "auto_map",
    "push_folder",
    "push_to_hub",
    "save_for_hub",
    "unreachable_code_files",
]
