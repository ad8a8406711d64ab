"""The repository's scripts (benchmarks/, scripts/, convert/) imported by path, as the tests exercise them."""

import functools
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def load_script(relative_path: str):
    """The module of `REPO/relative_path`, executed once per test session (registered in sys.modules: dataclasses
    look their module up there)."""
    path = REPO / relative_path
    name = "albef_script_" + "_".join(Path(relative_path).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
