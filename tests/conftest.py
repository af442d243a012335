"""Test setup. Without a GPU the Triton kernels run through the interpreter on CPU tensors, so
``TRITON_INTERPRET=1`` must be set before anything imports triton.

Tests marked ``gpu`` need a CUDA device and the compiled kernels: they are skipped, with the
reason, where there is no CUDA device or while the interpreter is on (the default here). Run
them with ``TRITON_INTERPRET=0 python -m pytest -m gpu`` (see tests/GPU.md).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import BACKENDS, SMALL_BLOCK_V, TRITON_PATHS  # noqa: E402

import triton_xent._config as config  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "") == "1"



def gpu_skip_reason() -> str | None:
    """Why the ``gpu`` tests cannot run in this process, or None when they can."""
    if not HAS_CUDA:
        return "needs a CUDA GPU; none on this machine"
    if INTERPRETER:
        return ("the GPU tests run the compiled kernels: TRITON_INTERPRET=1 is set (the default "
                "of conftest.py); run TRITON_INTERPRET=0 python -m pytest -m gpu")
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _set_small(num_splits):
    config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS = (
        SMALL_BLOCK_V, num_splits, 3)


@pytest.fixture
def small_blocks():
    """Forces a small kernel block (32 columns) and small torch chunks (3 rows) so multi-block
    and multi-chunk paths run on tiny shapes; the fused Triton path (1 split). Restores the
    heuristics afterwards. Tests that run the kernel through the public API take ``backend``
    (below) to run the split path as well."""
    saved = (config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS)
    _set_small(TRITON_PATHS["fused"])
    yield config
    config.TRITON_BLOCK_V, config.TRITON_NUM_SPLITS, config.TORCH_CHUNK_ROWS = saved


@pytest.fixture(params=BACKENDS)
def backend(request, small_blocks):
    """The backend to pass to the public API, run three ways: ``torch``, and the Triton kernel
    on its fused path and on its forced split-vocabulary path, each with ``small_blocks``.
    A test that parametrizes ``backend`` itself overrides this fixture."""
    name = request.param
    if name == "torch":
        return name
    from triton_xent.dispatch import kernel_gap

    gap = kernel_gap(torch.empty(1, 1), probs=False)
    if gap is not None:
        pytest.skip(f"Triton kernel unavailable: {gap}")
    small_blocks.TRITON_NUM_SPLITS = TRITON_PATHS[name.split("-", 1)[1]]
    return "triton"


@pytest.fixture
def no_vmap_fallback():
    """vmap without functorch's slow per-example fallback: an op without a vmap rule raises."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


@pytest.fixture(scope="session")
def gloo_world_results():
    """Runs the parts of test_parallel_more.py and test_dtensor.py on 4 gloo CPU processes, once
    for both files (gloo_world.py); ``{rank: {part: "ok" | traceback}}``."""
    import gloo
    import gloo_world

    return gloo.spawn(gloo_world.entry, gloo_world.WORLD_SIZE)


# The Hugging Face test files (hf_models.py) take these with
# ``pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")``.
@pytest.fixture(scope="module")
def one_thread():
    """The models are tiny: several CPU threads only add contention (10-50x slower on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("TRITON_XENT_BACKEND", "torch")


@pytest.fixture
def default_backend(torch_backend, monkeypatch):
    """Undoes ``torch_backend``: the default backend choice."""
    monkeypatch.delenv("TRITON_XENT_BACKEND")
