"""Shared fixtures: tiny models are built once per session (offline, a few seconds each)."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory factory: tiny_model_dir(family) -> path of a saved tiny model of that family (built once)."""
    from vlmalign.models.tiny import make_tiny_model

    cache = {}

    def get(family: str = "qwen2_vl", seed: int = 0):
        key = (family, seed)
        if key not in cache:
            cache[key] = make_tiny_model(family, "tiny", tmp_path_factory.mktemp(f"{family}_{seed}"), seed=seed)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the tiny models run ~10x faster on one thread than on two when the 2-core
    box is shared (OpenMP spinning), and results do not depend on the thread count. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
