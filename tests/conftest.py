"""Shared test settings.

The suite runs as two pytest-xdist workers on a 2-core machine; each worker uses one torch thread so the two never
oversubscribe the cores (tiny layers run tens of times slower when they do).

The suite is offline: ``HF_HUB_OFFLINE=1`` (inherited by the CLI subprocesses) keeps the Hugging Face libraries from
calling the Hub, e.g. bitsandbytes' CPU kernel lookup (``kernels-community``) on CPUs with AVX512-BF16.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def uncompiled_release_blocks(monkeypatch):
    """Make ``compiled=True`` run the release block functions without torch.compile (the math, not inductor);
    returns the list of the block functions' names as they are called."""
    from vlpeft.functional.p_laplacian import release_blocks

    calls = []

    def uncompiled(function):
        def run(*args):
            calls.append(function.__name__)
            return function(*args)
        return run

    monkeypatch.setattr(release_blocks, "_COMPILER", uncompiled)
    monkeypatch.setattr(release_blocks, "_COMPILED_BLOCKS", {})
    return calls


@pytest.fixture
def torch_block_path(monkeypatch):
    """Run the p-Laplacian block on its torch path (no fused C or Triton kernels, both variants)."""
    monkeypatch.setenv("VLPEFT_BACKEND", "torch")
