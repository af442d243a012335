"""Test setup. Without a GPU the Triton kernels run through the interpreter on CPU tensors, so
``TRITON_INTERPRET=1`` must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import triton_xent._config as config  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def small_blocks():
    """Forces small kernel blocks, splits and torch chunks so multi-block paths run on tiny
    shapes; restores the heuristics afterwards."""
    saved = (config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS)
    config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS = 32, None, 3
    yield config
    config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS = saved
