"""Fused CPU kernels of the p-Laplacian aggregation (float32): the loader and build of ``cpu_kernels.c``.

The torch path of :func:`vlpeft.functional.p_laplacian_aggregate` spends much of its CPU time in a dozen or two
elementwise passes over (rows, n_k) tensors (distances, scaled norms, their logs, the exponential weights, the
chain rule of the backward pass), each a round trip through memory plus a dispatch. The kernels of
``cpu_kernels.c`` (next to this file) do the same arithmetic row by row:

- ``release`` (per-head graphs with narrow features, e.g. 8): everything, one pass over the keys up to the row's
  last edge, with the distances taken directly as |F_i - F_j|^2 (no Gram form, so no centring is needed) and
  nothing of size (n_q, n_k) stored: O(n_k) scratch per row, and only the per-row log-normaliser and aggregate
  kept for backward (:func:`release_aggregate_cpu`).
- ``paper`` (one graph with hidden-size features, e.g. 768): the Gram product and the aggregation products stay
  BLAS matrix products (they are most of its cost); the elementwise work of each block of rows between them is one
  C call per direction (:func:`paper_forward_block`, :func:`paper_backward_block`), causal column degrees
  included (running sums over the rows, reverse running sums in the backward pass).

When used: decided by :func:`vlpeft.functional.p_laplacian.backend.choose_backend` (float32 CPU tensors, at most
:data:`THREADS_PER_GRAPH` torch threads per graph unless ``VLPEFT_BACKEND=cpu``; for ``release`` also not ``compiled``
and no ``recompute_attention``; the library could be built). It is built once per machine (source, flags and CPU
features are the cache key) with the C compiler ``$CC`` (default ``cc``) as ``-O3 -march=native -ffast-math`` into
``$VLPEFT_CACHE_DIR`` (default ``~/.cache/vlpeft``; a per-user temporary folder if that cannot be written), written
atomically; the object is linked without ``-ffast-math`` so that loading it does not switch the process to
flush-to-zero. glibc's vector math library (libmvec) gives vectorised ``expf``/``logf``; without it the loops call the
scalar functions. If no compiler is found or the build fails, a warning says so once and the torch path is used
(``VLPEFT_BACKEND=cpu`` makes that an error). ``VLPEFT_CPU_KERNEL`` (deprecated, :data:`ENV_SWITCH`): ``0`` keeps the
kernels off, ``1`` makes a failed build an error.

Threads: the (batch * heads) graphs are split over ``torch.get_num_threads()`` Python threads (ctypes releases
the GIL during each call); every slice is written by one thread, so results do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vlpeft.functional.p_laplacian.gradients import coefficient_grads, reduce_to
from vlpeft.functional.shapes import broadcast_shapes

SOURCE = Path(__file__).with_name("cpu_kernels.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c99")
#: Deprecated switch of the kernels (``VLPEFT_BACKEND`` supersedes it): auto (default), 0/off, 1/on.
ENV_SWITCH = "VLPEFT_CPU_KERNEL"


class CpuKernelBuildError(RuntimeError):
    """The fused CPU kernels could not be built (with ``VLPEFT_CPU_KERNEL=1``)."""


class _Settings(ctypes.Structure):
    _fields_ = [
        ("n_q", ctypes.c_int), ("n_k", ctypes.c_int), ("d", ctypes.c_int),
        ("attn_stride", ctypes.c_long), ("attn_slice_stride", ctypes.c_long),
        ("eps", ctypes.c_float), ("s_min_sq", ctypes.c_float),
        ("self_graph", ctypes.c_int), ("drop_self_loops", ctypes.c_int), ("query_offset", ctypes.c_int),
    ]


def switch() -> str:
    """The deprecated :data:`ENV_SWITCH` as "auto", "0" (kernels off) or "1" (a failed build is an error)."""
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if value not in ("auto", "0", "1", "off", "on"):
        raise ValueError(f"{ENV_SWITCH} must be one of auto, 0, 1 (off/on), got {value!r}")
    return {"off": "0", "on": "1"}.get(value, value)


def cache_dir() -> Path:
    """Where the built library is kept: ``$VLPEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlpeft`` or ``~/.cache/vlpeft``."""
    if os.environ.get("VLPEFT_CACHE_DIR"):
        return Path(os.environ["VLPEFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlpeft"


def _cpu_features() -> str:
    """The CPU's feature flags (``-march=native`` builds are only valid on CPUs that have them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(COMPILE_FLAGS).encode(), compiler.encode(), _cpu_features().encode(),
                 platform.machine().encode(), sys.platform.encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"p_laplacian_cpu-{key.hexdigest()[:16]}.so"


def _writable_target(target: Path) -> Path:
    """``target``, or the same file name in a per-user temporary folder if its folder cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.access(target.parent, os.W_OK):
            return target
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"vlpeft-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback / target.name


def _build(compiler: str, target: Path) -> None:
    """Compile (with -ffast-math) and link (without it, and with libmvec if present) into ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        obj = os.path.join(work, "kernel.o")
        lib = os.path.join(work, "kernel.so")
        subprocess.run([compiler, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", obj], check=True, capture_output=True,
                       text=True)
        try:
            subprocess.run([compiler, "-shared", obj, "-o", lib, "-lmvec", "-lm"], check=True, capture_output=True,
                           text=True)
        except subprocess.CalledProcessError:  # no libmvec (not glibc): scalar expf/logf
            subprocess.run([compiler, "-shared", obj, "-o", lib, "-lm"], check=True, capture_output=True, text=True)
        os.replace(lib, target)


class _PaperSettings(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int), ("keys", ctypes.c_int), ("floor", ctypes.c_float), ("causal", ctypes.c_int)]


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, integer, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    settings = ctypes.POINTER(_Settings)
    library.vlpeft_release_forward.argtypes = [integer, integer, settings] + [pointer] * 9
    library.vlpeft_release_backward.argtypes = ([integer, integer, settings] + [pointer] * 12 + [long, long]
                                                + [pointer] * 2)
    paper = ctypes.POINTER(_PaperSettings)
    library.vlpeft_paper_forward.argtypes = [integer, integer, paper] + [pointer] * 9
    library.vlpeft_paper_backward.argtypes = [integer, integer, paper] + [pointer] * 21
    for name in ("vlpeft_release_forward", "vlpeft_release_backward", "vlpeft_paper_forward",
                 "vlpeft_paper_backward"):
        getattr(library, name).restype = integer
    return library


def _library() -> ctypes.CDLL:
    """The built kernels, for a call the backend choice gave them (which built them)."""
    library = built_library(False)
    if library is None:
        raise CpuKernelBuildError("vlpeft: the fused CPU kernels were chosen but are not built")
    return library


@functools.cache
def built_library(forced: bool) -> ctypes.CDLL | None:
    """Build (once per process) and load the kernels; a failed build warns, or raises if ``forced``."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or ""
    try:
        if not compiler:
            raise FileNotFoundError("no C compiler found (set CC, or install cc/gcc)")
        target = _library_path(compiler)
        if not target.exists():
            target = _writable_target(target)
            if not target.exists():
                _build(compiler, target)
        return _bind(ctypes.CDLL(str(target)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        message = (f"vlpeft: the fused CPU kernels of the p-Laplacian block could not be built ({detail.strip()}); "
                   "using the slower torch path")
        if forced:
            raise CpuKernelBuildError(message) from error
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None


@contextlib.contextmanager
def cpu_kernels_disabled() -> Iterator[None]:
    """Within the block, the fused CPU kernels are switched off (``VLPEFT_CPU_KERNEL=0``): the torch path runs."""
    previous = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = previous


def kernel_available() -> bool:
    """Whether the fused CPU kernels are built and not switched off by :data:`ENV_SWITCH` (builds them on the first
    call; with ``VLPEFT_CPU_KERNEL=1`` a failed build raises :class:`CpuKernelBuildError`)."""
    state = switch()
    return state != "0" and built_library(state == "1") is not None


#: The kernels run one thread per graph (batch x head slice). With more than this many torch threads per graph
#: the torch path, whose every op uses all threads, is taken instead (e.g. ``paper``'s single head-mean graph at
#: batch 1 on a many-core machine). Measured here up to 2 threads (2 cores): 1 graph on 2 threads is on par.
THREADS_PER_GRAPH = 2


def kernel_blocker(*tensors: Tensor) -> str | None:
    """Why the kernels cannot compute a call on these tensors (they take float32 CPU tensors only), or None."""
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
            return f"they take float32 CPU tensors, got {str(tensor.dtype).replace('torch.', '')} on {tensor.device.type}"
    return None


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """A thread pool per process (``pid`` in the key: a forked child must not reuse its parent's, whose threads it
    does not have)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlpeft-plap")


def _run_slices(function: Any, slices: int, *args: Any) -> None:
    """function(s0, s1, *args) over [0, slices), split over torch's intra-op thread count."""
    workers = max(1, min(torch.get_num_threads(), slices))
    if workers == 1:
        bounds = [(0, slices)]
    else:
        step = -(-slices // workers)
        bounds = [(start, min(start + step, slices)) for start in range(0, slices, step)]
    if len(bounds) == 1:
        codes = [function(0, slices, *args)]
    else:
        codes = list(_pool(workers, os.getpid()).map(lambda b: function(b[0], b[1], *args), bounds))
    if 2 in codes:
        raise ValueError("attn must be non-negative (post-softmax attention), got a negative entry")
    if any(codes):
        raise MemoryError("vlpeft: the fused CPU kernel could not allocate its scratch rows")


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _lead(*tensors: Tensor) -> tuple[int, ...]:
    """The broadcast leading shape of tensors laid out (.., rows, cols) (0-d coefficients broadcast)."""
    return tuple(broadcast_shapes(*(t.shape[:-2] for t in tensors)))


def _flat(tensor: Tensor, lead: tuple[int, ...], tail: tuple[int, ...]) -> Tensor:
    """``tensor`` broadcast to (*lead, *tail) as one contiguous (prod(lead), *tail) tensor: a slice per graph."""
    shape = (*lead, *tail)
    if tensor.shape == shape and tensor.is_contiguous():
        return tensor.view(math.prod(lead), *tail)  # the common case: one op instead of three
    return tensor.expand(shape).reshape(math.prod(lead), *tail).contiguous()


class _ReleaseCpuAggregate(torch.autograd.Function):
    """U = sum_j omega_qj x_kv,j (+ beta_q x_q for the self graph) with the ``release`` weights, by the C kernels.

    Inputs as for the torch path's ``ReleaseAggregate``: x_q (.., n_q, d), x_kv (.., n_k, d), attn (.., n_q, n_k),
    p and mu broadcastable to (.., n_q, 1), all float32 on the CPU and broadcastable to one leading shape.
    """

    @staticmethod
    def forward(ctx: Any, x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, eps: float,
                self_graph: bool, drop_self_loops: bool, query_offset: int) -> Tensor:
        library = _library()
        n_q, d = x_q.shape[-2:]
        n_k = x_kv.shape[-2]
        lead = _lead(x_q, x_kv, attn, p, mu)
        slices = math.prod(lead)
        xq = _flat(x_q, lead, (n_q, d))
        xkt = _flat(x_kv, lead, (n_k, d)).transpose(1, 2).contiguous()
        graph = attn.expand(*lead, n_q, n_k).reshape(slices, n_q, n_k)  # any row / slice strides
        if graph.stride(-1) != 1:
            graph = graph.contiguous()
        half = _flat(0.5 * (p - 2.0), lead, (n_q, 1))
        log_c = _flat(torch.log(2.0 * mu / p), lead, (n_q, 1))
        settings = _Settings(n_q, n_k, d, graph.stride(1), graph.stride(0), eps, eps * eps * d, int(self_graph),
                             int(drop_self_loops), int(query_offset))
        out = x_q.new_empty(slices, n_q, d)
        aggregated = x_q.new_empty(slices, n_q, d)
        log_norm = x_q.new_empty(slices * n_q)
        extents = torch.empty(slices * n_q, dtype=torch.int32)
        _run_slices(library.vlpeft_release_forward, slices, ctypes.byref(settings), _ptr(xq), _ptr(xkt),
                    _ptr(graph), _ptr(half), _ptr(log_c), _ptr(out), _ptr(aggregated), _ptr(log_norm), _ptr(extents))
        ctx.save_for_backward(x_q, x_kv, attn, p, mu, xq, xkt, graph, half, log_c, log_norm, aggregated, extents)
        ctx.settings = settings
        ctx.lead = lead
        return out.view(*lead, n_q, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_q, x_kv, attn, p, mu, xq, xkt, graph, half, log_c, log_norm, aggregated, extents = ctx.saved_tensors
        settings, lead = ctx.settings, ctx.lead
        needs = ctx.needs_input_grad
        slices, n_q, d = xq.shape
        n_k = xkt.shape[-1]
        grad = _flat(grad_out.to(torch.float32), lead, (n_q, d))
        grad_xq = xq.new_empty(slices, n_q, d)
        grad_xkt = xq.new_zeros(slices, d, n_k)
        grad_graph = xq.new_empty(slices, n_q, n_k) if needs[2] else None
        grad_p_rows = xq.new_empty(slices * n_q)
        grad_log_c_rows = xq.new_empty(slices * n_q)
        _run_slices(_library().vlpeft_release_backward, slices, ctypes.byref(settings), _ptr(xq), _ptr(xkt),
                    _ptr(graph), _ptr(half), _ptr(log_c), _ptr(log_norm), _ptr(aggregated), _ptr(extents), _ptr(grad),
                    _ptr(grad_xq), _ptr(grad_xkt), _ptr(grad_graph), n_k, n_q * n_k, _ptr(grad_p_rows),
                    _ptr(grad_log_c_rows))
        n_rows = (*lead, n_q, 1)
        grad_p, grad_mu = coefficient_grads(needs[3], needs[4], p, mu, [grad_p_rows.view(n_rows)],
                                             [grad_log_c_rows.view(n_rows)])
        grad_attn = None
        if grad_graph is not None:
            grad_attn = reduce_to(grad_graph.view(*lead, n_q, n_k), attn, True)
        return (
            reduce_to(grad_xq.view(*lead, n_q, d), x_q, needs[0]),
            reduce_to(grad_xkt.transpose(1, 2).reshape(*lead, n_k, d), x_kv, needs[1]),
            grad_attn,
            grad_p,
            grad_mu,
            None, None, None, None,
        )


def release_aggregate_cpu(x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, *, eps: float,
                          self_graph: bool, drop_self_loops: bool, query_offset: int) -> Tensor:
    """The ``release`` aggregation by the fused CPU kernels: x_q (.., n_q, d), x_kv (.., n_k, d), attn (.., n_q, n_k),
    p and mu as coefficient tensors (0-d or broadcastable to (.., n_q, 1)), all float32 on the CPU; returns
    (.., n_q, d). Called when the backend choice gave the kernels this call."""
    return _ReleaseCpuAggregate.apply(x_q, x_kv, attn, p, mu, eps, self_graph, drop_self_loops, query_offset)


# ------------------------------------------------------------------------------------------------ paper blocks


class PaperBlockGrads(NamedTuple):
    """Backward pass of one ``paper`` block (shapes (.., rows, keys) / (.., rows, 1) / (.., 1, keys))."""

    coefficients: Tensor  # the aggregation coefficients (recomputed)
    grad_gram: Tensor  # dL/dG, G = x_q x_k^T
    grad_attn: Tensor  # dL/dA of the block's graph rows, row- and (causal) column-degree terms included
    grad_p: Tensor  # per-row dL/dp through the weights
    grad_log_c: Tensor  # per-row dL/dlog c
    grad_sq_q: Tensor  # per-row dL/d|x_q|^2
    grad_row_deg: Tensor  # per-row dL/dD_q
    grad_sq_k: Tensor  # per-key dL/d|x_k|^2
    column_sum: Tensor  # per-key sum over the block's rows of dL/dD_j


def paper_forward_block(gram: Tensor, attn: Tensor, col_base: Tensor, sq_q: Tensor, sq_k: Tensor, p: Tensor,
                        log_c: Tensor, *, dist_floor: float, causal: bool) -> tuple[Tensor, Tensor]:
    """(coefficients (.., rows, keys), log-normaliser (.., rows, 1)) of one ``paper`` block by the C kernel.

    gram (.., rows, keys) = x_q x_k^T; attn the block's graph rows; col_base (.., 1, keys) or 0-d the column
    degrees before the block (causal) or of all queries; sq_q (.., rows, 1), sq_k (.., 1, keys); p and log_c
    broadcastable to (.., rows, 1).
    """
    rows, keys = attn.shape[-2:]
    lead = _lead(gram, attn, col_base, sq_q, sq_k, p, log_c)
    flat = [_flat(gram, lead, (rows, keys)), _flat(attn, lead, (rows, keys)), _flat(col_base, lead, (1, keys)),
            _flat(sq_q, lead, (rows, 1)), _flat(sq_k, lead, (1, keys)), _flat(0.5 * p, lead, (rows, 1)),
            _flat(log_c, lead, (rows, 1))]
    slices = flat[0].shape[0]
    coefficients = flat[0].new_empty(slices, rows, keys)
    log_norm = flat[0].new_empty(slices, rows)
    settings = _PaperSettings(rows, keys, dist_floor, int(causal))
    _run_slices(_library().vlpeft_paper_forward, slices, ctypes.byref(settings), *(_ptr(t) for t in flat),
                _ptr(coefficients), _ptr(log_norm))
    return coefficients.view(*lead, rows, keys), log_norm.view(*lead, rows, 1)


def paper_backward_block(gram: Tensor, attn: Tensor, col_base: Tensor, sq_q: Tensor, sq_k: Tensor, p: Tensor,
                         log_c: Tensor, log_norm: Tensor, grad_coef: Tensor, grad_beta: Tensor,
                         carry: Tensor | None, *, dist_floor: float, causal: bool) -> PaperBlockGrads:
    """Backward pass of :func:`paper_forward_block` by the C kernel; grad_coef = dL/dcoefficients
    (.., rows, keys), grad_beta (.., rows, 1) = dL/dbeta_q (the self term beta_q x_q), carry (.., 1, keys) the later
    blocks' column-degree gradient (causal) or None."""
    rows, keys = attn.shape[-2:]
    lead = _lead(gram, attn, col_base, sq_q, sq_k, p, log_c, log_norm, grad_coef)
    pairs, row, key = (rows, keys), (rows, 1), (1, keys)
    flat = [_flat(gram, lead, pairs), _flat(attn, lead, pairs), _flat(col_base, lead, key), _flat(sq_q, lead, row),
            _flat(sq_k, lead, key), _flat(0.5 * p, lead, row), _flat(log_c, lead, row), _flat(log_norm, lead, row),
            _flat(grad_coef, lead, pairs), _flat(grad_beta, lead, row),
            _flat(carry if carry is not None else attn.new_zeros(()), lead, key)]
    slices = flat[0].shape[0]
    new = flat[0].new_empty
    outputs = [new(slices, *pairs), new(slices, *pairs), new(slices, *pairs), new(slices, *pairs),
               new(slices, *row), new(slices, *row), new(slices, *row), new(slices, *row),
               flat[0].new_zeros(slices, *key), new(slices, *key)]
    settings = _PaperSettings(rows, keys, dist_floor, int(causal))
    _run_slices(_library().vlpeft_paper_backward, slices, ctypes.byref(settings), *(_ptr(t) for t in flat),
                *(_ptr(t) for t in outputs))
    coefficients, grad_gram, grad_attn, _, grad_p, grad_log_c, grad_sq_q, grad_row_deg, grad_sq_k, column_sum = outputs
    return PaperBlockGrads(coefficients.view(*lead, *pairs), grad_gram.view(*lead, *pairs),
                           grad_attn.view(*lead, *pairs), grad_p.view(*lead, rows, 1), grad_log_c.view(*lead, rows, 1),
                           grad_sq_q.view(*lead, rows, 1), grad_row_deg.view(*lead, rows, 1),
                           grad_sq_k.view(*lead, 1, keys), column_sum.view(*lead, 1, keys))
