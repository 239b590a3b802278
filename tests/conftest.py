"""Fixtures shared by several test modules."""

import json
import socket

import pytest

from tests.tiny_llama import TINY_JSON


@pytest.fixture(scope="module")
def offline_shared_cache(tmp_path_factory):
    """No network at all, and one token cache for the whole session (the corpus is tokenised
    once). Modules opt in with ``pytestmark = pytest.mark.usefixtures("offline_shared_cache")``."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GNLORP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gnlorp-cache"))
        mp.setattr(socket.socket, "connect", refuse)
        yield


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu``-marked tests where torch sees no CUDA device (torch imported only then)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """Path of the tiny LLaMA's config JSON (:mod:`tests.tiny_llama`)."""
    path = tmp_path_factory.mktemp("configs") / "tiny.json"
    path.write_text(json.dumps(TINY_JSON))
    return str(path)
