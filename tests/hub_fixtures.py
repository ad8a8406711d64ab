"""The `hub` fixture: a loopback Hub (tests/hub_server.py) that huggingface_hub and transformers talk to in-process.

huggingface_hub reads its settings (`HF_ENDPOINT`, `HF_HOME`, offline mode, Xet) into module constants at import
time, and transformers keeps a shared `HfApi`; the fixture patches those for the test and restores them after.
`hub.env` holds the same settings as environment variables, for subprocesses. Every connection to anything but
127.0.0.1 fails during the test, so a setting that escaped the patching shows up as an error, not a network call.

Use it from another test module with `from .hub_fixtures import hub_fixture  # noqa: F401`.
"""

from __future__ import annotations

import os
import socket

import pytest

from .hub_server import HubServer

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(name="hub")
def hub_fixture(tmp_path_factory, monkeypatch):
    """A fresh, empty loopback Hub for one test (the `HubServer`, with `env` and `home` added)."""
    import huggingface_hub
    import transformers.dynamic_module_utils
    import transformers.utils.hub
    from huggingface_hub import constants

    server = HubServer().start()
    home = tmp_path_factory.mktemp("hf_home")
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_TOKEN": "hf_dummy_test_token",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)

    # What huggingface_hub computed from the environment at import time.
    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)  # the module-level HfApi()
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # transformers' shared HfApi, rebuilt lazily
    monkeypatch.setattr(transformers.utils.hub, "HF_MODULES_CACHE", env["HF_MODULES_CACHE"])
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", env["HF_MODULES_CACHE"])

    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
            raise ConnectionRefusedError(f"tests may not reach the network (tried {address[0]})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)

    server.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}, **env}
    server.home = home
    try:
        yield server
    finally:
        server.stop()


# The start of a child script (`python -I -c`) in which this package cannot be imported, even where it is installed
# (editable installs included): what a user without it has, for remote-code tests.
WITHOUT_THE_PACKAGE = r"""
import importlib.abc, json, sys


class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "transformers_albef":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)


sys.meta_path.insert(0, HidePackage())
try:
    import transformers_albef
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("transformers_albef is importable")
"""
