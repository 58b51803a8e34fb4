"""Shared test settings.

The suite runs as two pytest-xdist workers on a 2-core machine; each worker uses one torch thread so the two never
oversubscribe the cores (tiny layers run tens of times slower when they do).
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
