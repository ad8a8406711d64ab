"""Publishing ALBEF models on the Hugging Face Hub, loadable with or without this package installed.

`save_for_hub` writes a self-contained folder: the model and processor as `save_pretrained` writes them (which
includes the model folder's code files and the `auto_map` entries, as transformers' remote-code loader expects)
and the model card. `push_to_hub` publishes such a
folder in one commit. The repo then loads with `AutoModel.from_pretrained(repo)` where the package is installed
(its registrations win), and with `trust_remote_code=True` where it is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
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


# ----- writing model folders safely ----------------------------------------------------------------------------------

# The files a model folder written by this project holds (`save_pretrained` of a model and its processor, the code
# files of the model folder, the model card). `--overwrite` replaces only a folder made of these.
OWN_FILE_PATTERNS = (
    r"config\.json",
    r"generation_config\.json",
    r"model\.safetensors",
    r"model-\d+-of-\d+\.safetensors",
    r"model\.safetensors\.index\.json",
    r"processor_config\.json",
    r"preprocessor_config\.json",
    r"tokenizer\.json",
    r"tokenizer_config\.json",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"vocab\.txt",
    r"README\.md",
    r"[a-z_]*_albef[a-z_]*\.py",
)
_OWN_FILE = re.compile("|".join(f"(?:{pattern})" for pattern in OWN_FILE_PATTERNS))
TEMP_MARK = ".tmp-"
OLD_MARK = ".old-"


class OutputFolderError(FileExistsError):
    """An output folder that must not be written: it holds other files, or a model folder without `overwrite`."""


def foreign_files(folder: str | Path) -> list[str]:
    """The entries of `folder` that are not part of an ALBEF model folder written by this project (sorted)."""
    return sorted(
        entry.name for entry in Path(folder).iterdir() if not (entry.is_file() and _OWN_FILE.fullmatch(entry.name))
    )


def is_albef_folder(folder: str | Path) -> bool:
    """A folder with a `config.json` of `model_type` "albef"."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "albef"


def check_output_folder(folder: str | Path, overwrite: bool = False, what: str = "output folder") -> None:
    """Refuse (`OutputFolderError`, one line) to write `folder` when that could lose anything: a file; a non-empty
    folder without `overwrite`; with `overwrite`, a folder that is not an ALBEF model folder written by this project
    (a `config.json` of model_type "albef" and nothing but the files such a folder holds)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise OutputFolderError(f"{what} {folder} exists and is not a folder; refusing to replace it")
    entries = sorted(entry.name for entry in folder.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not overwrite:
        raise OutputFolderError(
            f"{what} {folder} is not empty (it holds {shown}); choose a new folder, or pass --overwrite "
            "(overwrite=True) to replace an ALBEF model folder this tool wrote"
        )
    foreign = foreign_files(folder)
    if foreign or not is_albef_folder(folder):
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        reason = (
            f"it holds files an ALBEF model folder does not ({listed})"
            if foreign
            else "it has no config.json of model_type 'albef'"
        )
        raise OutputFolderError(
            f"{what} {folder} is not an ALBEF model folder written by this tool ({reason}); refusing to replace it "
            "even with --overwrite: choose a new folder or move those files away"
        )


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in (folder, folder.parent):
        with contextlib.suppress(OSError):
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def replace_folder(source: str | Path, target: str | Path) -> Path:
    """Move the finished folder `source` to `target` (a sibling), replacing what is there: the old folder is first
    renamed aside (`.<name>.old-*`), then `source` renamed in, then the old one removed; if the second rename
    fails, the old folder is put back."""
    source, target = Path(source), Path(target)
    _fsync_tree(source)
    if not target.exists():
        os.replace(source, target)
        return target
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{OLD_MARK}"))
    os.replace(target, aside / target.name)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside / target.name, target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Write a folder all at once: yields an empty temporary sibling (`.<name>.tmp-*`) to write into; when the block
    ends normally it replaces `folder` (`replace_folder`), and when it raises (an error, KeyboardInterrupt, a full
    disk) the temporary folder is deleted and `folder` is left as it was. `check_output_folder` decides first
    whether `folder` may be written at all."""
    folder = Path(folder)
    check_output_folder(folder, overwrite, what)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}{TEMP_MARK}"))
    try:
        yield temp
        check_output_folder(folder, overwrite, what)  # nothing appeared there meanwhile
        # mkdtemp and atomic file writes make owner-only entries; a model folder is read by everyone.
        mask = _umask()
        temp.chmod(0o777 & ~mask)
        for path in temp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        replace_folder(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_for_hub(
    model, processor, folder: str | Path, card: ModelCard | str | None = None, overwrite: bool = False
) -> Path:
    """
    Write `model`, `processor` (may be None) and `card` (a `huggingface_hub.ModelCard`, markdown text or None) to
    `folder` as a repo that loads with or without this package. `save_pretrained` already writes the model folder's
    code files and the `auto_map` entries `trust_remote_code=True` needs; the image processor's entry, nested in
    `processor_config.json`, is added here. Returns the folder.

    The folder is written whole or not at all (`atomic_folder`: a temporary sibling renamed into place; a failure
    leaves what was there). A non-empty `folder` is refused unless `overwrite`, and even then only an ALBEF model
    folder this project wrote is replaced (`check_output_folder`).
    """
    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as temp:
        write_hub_folder(model, processor, temp, card)
    return folder


def write_hub_folder(model, processor, folder: str | Path, card: ModelCard | str | None = None) -> Path:
    """What `save_for_hub` writes, written straight into `folder` (no temporary folder, no checks)."""
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
        write_hub_folder(model, processor, tmp, card)
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
    "OutputFolderError",
    "atomic_folder",
    "auto_map",
    "check_output_folder",
    "push_folder",
    "push_to_hub",
    "replace_folder",
    "save_for_hub",
    "unreachable_code_files",
    "write_hub_folder",
]
