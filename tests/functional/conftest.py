"""Fixtures of the tests of the numerical core (vlpeft.functional) and its backends."""

import pytest

from vlpeft.functional.p_laplacian import cpu_kernels


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A kernel build from scratch into an empty cache directory; the process's own build is restored after."""
    monkeypatch.setenv("VLPEFT_CACHE_DIR", str(tmp_path / "cache"))
    cpu_kernels.built_library.cache_clear()
    yield tmp_path / "cache"
    cpu_kernels.built_library.cache_clear()
