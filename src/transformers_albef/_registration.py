"""Registering ALBEF with transformers' Auto classes and pipelines, without making `import transformers_albef` pay
for it.

The contract: after `import transformers_albef`, `AutoConfig` / `AutoModel*` / `AutoProcessor` / `AutoTokenizer` /
`AutoImageProcessor` `.from_pretrained(folder)` of an ALBEF folder and `pipeline("albef-...")` work without
`trust_remote_code`. Registering means handing transformers the classes themselves (its public `register` methods
take classes), and importing them costs torch, transformers' modeling code and ALBEF's model package: 4-5 s of CPU,
which `import transformers_albef` (and with it `albef --help`) used to pay even when no Auto class was ever used.

So registration happens when transformers' Auto machinery is loaded, which every one of those calls needs first:

- when `import transformers_albef` runs after `transformers.models.auto.configuration_auto` (where `AutoConfig` and
  the config mapping live; every Auto class and `pipeline()` import it) was loaded, it registers at once, as before;
- otherwise it installs a post-import hook (a `sys.meta_path` finder, Python's public import-hook API, PEP 451) that
  watches the modules of `transformers` and of this package, and registers as soon as that module is loaded and the
  import that loaded it has finished (no watched module still initialising, so no import cycle: ALBEF's modeling code
  imports `transformers.modeling_layers`, which itself imports the Auto classes). The pipelines are registered the
  same way once `transformers.pipelines` is loaded. The hook takes itself out of `sys.meta_path` when both are done.
  The wrapper around a watched module's loader is put back to the real loader before the module's code runs, so no
  module keeps a trace of it. A registration that fails inside someone else's import becomes a RuntimeWarning (an
  exception there would leave transformers half-imported); importing `transformers_albef.models.albef` shows why.

`import transformers` alone does not load the Auto machinery, so it does not trigger anything. The classes
registered are the package's own ones (`transformers_albef.AlbefConfig` is the class `AutoConfig` returns).
"""

from __future__ import annotations

import sys
import threading
import warnings

AUTO_MODULE = "transformers.models.auto.configuration_auto"
PIPELINES_MODULE = "transformers.pipelines"
WATCHED_PACKAGES = ("transformers", "transformers_albef")

_lock = threading.RLock()
_local = threading.local()  # .depth: watched modules executing in this thread; .finding: in our find_spec
_done = {"auto": False, "pipelines": False}
_watcher: _ImportWatcher | None = None


def register_auto_classes() -> None:
    """Register the ALBEF configurations, models and processors with transformers' Auto classes (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForPreTraining,
        AutoModelForSequenceClassification,
        AutoModelForVisualQuestionAnswering,
        AutoModelForZeroShotImageClassification,
        AutoProcessor,
        AutoTokenizer,
    )

    from .models.albef import (
        AlbefConfig,
        AlbefForPreTraining,
        AlbefForQuestionAnswering,
        AlbefForVisualEntailment,
        AlbefImageProcessor,
        AlbefModel,
        AlbefProcessor,
        AlbefTextConfig,
        AlbefTextModel,
        AlbefTokenizer,
        AlbefVisionConfig,
        AlbefVisionModel,
    )

    for config in (AlbefConfig, AlbefTextConfig, AlbefVisionConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoModel.register(AlbefTextConfig, AlbefTextModel, exist_ok=True)
    AutoModel.register(AlbefVisionConfig, AlbefVisionModel, exist_ok=True)
    AutoModelForPreTraining.register(AlbefConfig, AlbefForPreTraining, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoModelForSequenceClassification.register(AlbefConfig, AlbefForVisualEntailment, exist_ok=True)
    AutoModelForVisualQuestionAnswering.register(AlbefConfig, AlbefForQuestionAnswering, exist_ok=True)
    # One exact (PIL) implementation serves both backends: torchvision resizing differs from the original's.
    AutoImageProcessor.register(
        AlbefConfig,
        image_processor_classes={"pil": AlbefImageProcessor, "torchvision": AlbefImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(AlbefConfig, AlbefProcessor, exist_ok=True)
    AutoTokenizer.register(AlbefConfig, fast_tokenizer_class=AlbefTokenizer, exist_ok=True)


def install() -> None:
    """Called by `import transformers_albef`: register what transformers has loaded already, watch for the rest."""
    _register_what_is_loaded()
    global _watcher
    with _lock:
        if _watcher is None and not all(_done.values()):
            _watcher = _ImportWatcher()
            sys.meta_path.insert(0, _watcher)


def _register_what_is_loaded() -> None:
    if getattr(_local, "registering", False):  # the registration's own imports
        return
    _local.registering = True
    try:
        if _claim("auto", AUTO_MODULE):
            _attempt(register_auto_classes, "Auto classes")
        if _claim("pipelines", PIPELINES_MODULE):
            from .pipelines import register_pipelines

            _attempt(register_pipelines, "pipelines")
    finally:
        _local.registering = False


def _claim(what: str, module: str) -> bool:
    """Whether this thread should run registration `what` now: its transformers module is loaded and nobody ran it.
    Claimed once: a failure is reported, not retried on every later import. The lock guards only this check (the
    registration imports modules, and holding a lock across imports could deadlock with another importing thread)."""
    with _lock:
        if _done[what] or module not in sys.modules or (what == "pipelines" and not _done["auto"]):
            return False
        _done[what] = True
        if all(_done.values()):
            _uninstall()
        return True


def _attempt(register, what: str) -> None:
    """Run a registration inside someone else's import: an error must not break that import (transformers' module
    would be left half-loaded), so it becomes a warning naming the cause."""
    try:
        register()
    except Exception as error:  # noqa: BLE001 - reported; `import transformers_albef.models.albef` shows the cause
        warnings.warn(
            f"transformers_albef could not register its {what} with transformers ({type(error).__name__}: {error}); "
            "ALBEF folders will not load through transformers' Auto classes / pipeline() in this process",
            RuntimeWarning,
            stacklevel=2,
        )


def _uninstall() -> None:
    global _watcher
    with _lock:
        if _watcher is None:
            return
        try:
            sys.meta_path.remove(_watcher)
        except ValueError:
            pass
        _watcher = None


def _is_watched(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in WATCHED_PACKAGES)


class _ImportWatcher:
    """Finds nothing itself: for a watched module, it asks the finders after it and wraps the loader of the spec
    they return, to know when the module's code has run."""

    def find_spec(self, fullname, path, target=None):
        if not _is_watched(fullname) or getattr(_local, "finding", False):
            return None
        _local.finding = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            _local.finding = False
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _WatchingLoader(spec.loader)
        return spec


class _WatchingLoader:
    """Delegates to the real loader (and puts it back on the module and its spec before the module's code runs, so
    nothing after sees this wrapper); after the code has run, registers if the import chain is complete."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            self.loader.exec_module(module)
        finally:
            _local.depth -= 1
        if _local.depth == 0 and not getattr(_local, "registering", False):
            _register_what_is_loaded()

    def __getattr__(self, name):
        return getattr(self.loader, name)
