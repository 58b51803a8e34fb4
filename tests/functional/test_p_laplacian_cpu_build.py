"""Build and switches of the fused CPU kernels (vlpeft/functional/p_laplacian/cpu_kernels.py): built once per machine
with the C compiler, a failed build warns and falls back to torch (or raises when forced on), the deprecated
``VLPEFT_CPU_KERNEL`` switch, no flush-to-zero after loading."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from _p_laplacian_references import make_attention, make_features

from vlpeft.functional import p_laplacian_aggregate
from vlpeft.functional.p_laplacian import cpu_kernels as cpu


def _inputs():
    x_kv = make_features(2, 2, 23, 8, seed=1)
    attn = make_attention(2, 2, 23, 23, causal=True)
    p = torch.tensor([1.3, 1.7], dtype=torch.float64)
    return x_kv, x_kv, attn, p, torch.tensor(0.3, dtype=torch.float64)


def test_kernels_build_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert cpu.kernel_available()


def test_bad_switch_value_is_an_error(monkeypatch):
    monkeypatch.setenv(cpu.ENV_SWITCH, "sometimes")
    with pytest.raises(ValueError, match="VLPEFT_CPU_KERNEL must be one of"):
        cpu.kernel_available()


def test_failed_build_warns_and_falls_back(monkeypatch, fresh_build):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv(cpu.ENV_SWITCH, "auto")
    x_q, x_kv, attn, p, mu = (t.float() for t in _inputs())
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out = p_laplacian_aggregate(x_kv, x_kv, attn, p, mu, variant="release", graph="self")
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    expected = p_laplacian_aggregate(x_kv, x_kv, attn, p, mu, variant="release", graph="self")
    torch.testing.assert_close(out, expected)


def test_failed_build_raises_when_forced_on(monkeypatch, fresh_build):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    with pytest.raises(cpu.CpuKernelBuildError, match="/nonexistent/cc"):
        cpu.kernel_available()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_build_writes_one_library_atomically_and_keeps_subnormals(monkeypatch, fresh_build):
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    assert cpu.kernel_available()
    built = sorted(path.name for path in fresh_build.iterdir())
    assert len(built) == 1 and built[0].startswith("p_laplacian_cpu-") and built[0].endswith(".so")
    # Linked without -ffast-math: loading it must not switch the process to flush-to-zero.
    assert np.float32(1e-39) / np.float32(2.0) > 0
    assert (torch.tensor([1e-39]) / 2).item() > 0


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_unwritable_cache_folder_builds_in_a_temporary_folder(monkeypatch, fresh_build, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("VLPEFT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    assert cpu.kernel_available()
