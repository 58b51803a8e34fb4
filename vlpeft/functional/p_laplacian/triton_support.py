"""Whether the fused Triton kernels can run here: Triton (optional) and its kernels imported once, plus a CUDA device
or Triton's interpreter. A leaf module: the backend choice asks it without importing the kernels' wrapper."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: the torch path is the default everywhere and the only one on CPU.
    import triton

    from vlpeft.functional.p_laplacian import triton_kernels
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    triton_kernels = None

__all__ = ["interpreting", "triton", "triton_available", "triton_kernels", "triton_unavailable_reason"]


def interpreting() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors with numpy: slow, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run on this machine, or None when they can."""
    if triton is None:
        return "Triton is not installed"
    if not (torch.cuda.is_available() or interpreting()):
        return "there is no CUDA device (and TRITON_INTERPRET is not 1)"
    return None


def triton_available() -> bool:
    """Whether the Triton kernels can run here (Triton importable, and a CUDA device or the interpreter)."""
    return triton_unavailable_reason() is None
