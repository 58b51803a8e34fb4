"""Fused attention + ``release`` p-Laplacian aggregation on GPUs (Triton), with O(n) memory.

One call computes, for every head of a self-attention block,

- the attention output  O_i = sum_j A_ij v_j,  A = softmax(q k^T * scale + bias, causal mask), and
- the ``release`` p-Laplacian aggregation of node features F on the graph of the same attention
  (p-adapter.md §2.4 C-D, §3.1, self graph): s_ij = max(sqrt(A_ij + eps) ||F_i - F_j||, eps sqrt(d_f)),
  log W_ij = log A_ij + (p - 2) log s_ij, L_i = logsumexp({log W_ij}_j U {log c}), c = 2 mu / p,
  U_i = sum_j exp(log W_ij - L_i) F_j + exp(log c - L_i) F_i,

without ever materialising an (n, n) tensor: the kernels stream over key blocks like flash attention. This is
exactly what :func:`vlpeft.functional.p_laplacian_aggregate` computes (``variant="release"``, ``graph="self"``)
on the softmax of the same scores; :func:`attention_p_laplacian_reference` is that torch composition and the
CPU path.

Why two passes over the keys in the forward pass (not one): with W_ij = A_ij^(p/2) d_ij^(p-2) the release
graph would be separable and streamable in the same pass as the softmax (the unknown row normaliser of A
factors out of the row as l_i^(-p/2)), but the released weights are not exactly separable: eps sits inside
the square root, sqrt(A_ij + eps), and the scaled norm has a floor s_min = eps sqrt(d_f) (which also defines
the released self loops, W_ii = A_ii s_min^(p-2)). Both depend on the normalised A_ij. So the first pass is the
flash-attention forward (online softmax: output and row log-sum-exp LSE_i), and the second recomputes the
scores, takes A_ij = exp(S_ij - LSE_i) exactly and accumulates the p-Laplacian row with an online log-sum-exp
that starts from log c. The result agrees with the torch composition to rounding. Both passes run in one kernel
program per query block.

Backward (hand-written, recomputation as in flash attention; nothing of size n^2 is stored):

- row pass (per query block): Delta_i = dO_i . O_i + sum_j A_ij dA^plap_ij (the p-Laplacian part of the
  softmax backward needs a pass of its own), dL/dp row terms and the row half of dL/dF;
- column pass (per key block): dK, dV, the column half of dL/dF, and dQ accumulated with atomic adds.

With omega_ij = exp(log W_ij - L_i), beta_i = exp(log c - L_i), g_ij = dU_i . F_j and T_i = dU_i . U_i:
d log W_ij = omega_ij (g_ij - T_i); dA^plap_ij = d log W_ij / A_ij + [above floor] d log W_ij (p-2)/2 D_ij / s^2_ij;
dD_ij = [above floor] d log W_ij (p-2)/2 (A_ij + eps) / s^2_ij (D = squared distance, s^2 the floored scaled
squared norm); dS_ij = A_ij (dO_i . v_j + dA^plap_ij - Delta_i); d log c_i = beta_i (dU_i . F_i - T_i);
dp = sum_ij d log W_ij log(s^2_ij) / 2 (+ the log c path, through autograd).

Masks: ``causal`` (key j > query i is masked) and an additive ``attn_bias`` broadcastable to
(batch, heads, n, n) (e.g. transformers' eager mask: 0 or the dtype's minimum). Entries with A_ij = 0 are not
edges. A query row whose scores are all <= -1e30 (every key masked, e.g. a left-padding position) has no edges,
so U_i = F_i, as the p-adapter glue does for such rows; its attention output is what softmax gives (uniform over
the keys under a finite mask, 0 when every score is -inf).

Precision: scores and the softmax in float32 (bfloat16/float16 q, k, v go through tensor cores with float32
accumulation, as flash attention does); every p-Laplacian quantity (features, distances, weights) in float32 with
IEEE float32 products (no TF32: the Gram form of the distances needs full precision). Features are centred on
their mean per head before the kernels (distances are translation invariant; the mean is added back to U, exact
because omega and beta sum to 1), as the torch path does for the Gram form.

This module holds the entry point, the torch composition and the autograd wrapper; the Triton kernels are in
:mod:`~vlpeft.functional.p_laplacian.triton_kernels` (imported through
:mod:`~vlpeft.functional.p_laplacian.triton_support`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vlpeft.functional.p_laplacian import triton_support
from vlpeft.functional.p_laplacian.backend import AttentionFacts, choose_backend
from vlpeft.functional.p_laplacian.release import ReleaseOptions, release_aggregate
from vlpeft.functional.p_laplacian.triton_support import (
    interpreting,
    triton,
    triton_available,
    triton_kernels,
)
from vlpeft.functional.p_laplacian.validation import RELEASE_EPS, SELF_LOOP_POLICIES, check_mu, check_p
from vlpeft.functional.parameters import DEFAULT_P_BOUNDS

__all__ = [
    "BACKENDS",
    "UNATTENDED_SCORE",
    "attention_p_laplacian",
    "attention_p_laplacian_reference",
    "fused_attention_p_laplacian",
    "fused_kernel_blocker",
    "fused_kernel_supported",
    "triton",
    "triton_available",
]

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
UNATTENDED_SCORE: float = -1e30
"""A query row whose scores are all at or below this has no graph edges (every key masked)."""

MAX_HEAD_DIM = 256
MAX_FEATURE_DIM = 128


def fused_kernel_blocker(q: Tensor, k: Tensor, v: Tensor, feature_dim: int,
                         attn_bias: Tensor | None = None) -> str | None:
    """Why :func:`attention_p_laplacian` cannot use the Triton kernels for these inputs, or None when it can.

    Needs Triton, CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``), the self graph (n_q = n_k), a head dim
    <= 256, node features of width ``feature_dim`` <= 128, query heads a multiple of the key/value heads, a float
    dtype the kernels take and an ``attn_bias`` without gradient. q (batch, heads, n_q, head_dim), k and v
    (batch, kv_heads, n_k, head_dim).
    """
    missing = triton_support.triton_unavailable_reason()
    if missing is not None:
        return missing
    device = "cpu" if interpreting() else "cuda"
    if q.device.type != device:
        return f"the tensors are on {q.device.type}, the kernels run on {device}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-D (batch, heads, n, head_dim)"
    if q.shape[-2] != k.shape[-2]:
        return f"KV-cached queries (n_q={q.shape[-2]}, n_k={k.shape[-2]}): the kernels take the self graph only"
    if q.shape[-1] > MAX_HEAD_DIM or feature_dim > MAX_FEATURE_DIM:
        return (f"head dim {q.shape[-1]} / feature dim {feature_dim} above the kernels' {MAX_HEAD_DIM} / "
                f"{MAX_FEATURE_DIM}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return f"query heads {q.shape[1]} are not a multiple of the key/value heads {k.shape[1]}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {str(q.dtype).replace('torch.', '')} (the kernels take float16, bfloat16 and float32)"
    if attn_bias is not None and attn_bias.requires_grad:
        return "the attention bias needs a gradient"
    return None


def fused_kernel_supported(q: Tensor, k: Tensor, v: Tensor, features: Tensor, attn_bias: Tensor | None = None) -> bool:
    """Whether :func:`attention_p_laplacian` can use the Triton kernels for these inputs (see
    :func:`fused_kernel_blocker`); features (batch, heads, n, d_f)."""
    return features.dim() == 4 and fused_kernel_blocker(q, k, v, features.shape[-1], attn_bias) is None


# ----------------------------------------------------------------------------------------------------------
# Public entry point and the torch composition
# ----------------------------------------------------------------------------------------------------------


def attention_p_laplacian(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    features: Tensor,
    p: float | Tensor,
    mu: float | Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_bias: Tensor | None = None,
    eps: float = RELEASE_EPS,
    self_loop: str = "release",
    p_bounds: tuple[float, float] | None = DEFAULT_P_BOUNDS,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention output and the ``release`` p-Laplacian aggregation on the same attention graph.

    Args:
        q: queries (batch, heads, n, head_dim).
        k, v: keys and values (batch, kv_heads, n, head_dim); heads must be a multiple of kv_heads (grouped-query
            attention: query head h reads key/value head h // (heads / kv_heads)).
        features: node features F (batch, heads, n, d_f), one row per token (the self graph of the release SA).
        p: float, 0-d tensor or per-head tensor (heads,); within ``p_bounds`` (``None``: only p > 0).
        mu: float, 0-d tensor or per-head tensor (heads,), > 0.
        scale: score scale (default head_dim ** -0.5).
        causal: mask keys after the query.
        attn_bias: additive mask/bias broadcastable to (batch, heads, n, n), without gradient.
        eps, self_loop: as in :func:`vlpeft.functional.p_laplacian_aggregate` (``release``, self graph).
        backend: "auto" (as :func:`~vlpeft.functional.p_laplacian.backend.choose_backend` decides: Triton when
            :func:`fused_kernel_supported` unless ``VLPEFT_BACKEND`` says otherwise, else torch), "triton" (an error
            where the kernels cannot run) or "torch".

    Returns:
        ``(out, aggregated)``: the attention output (batch, heads, n, head_dim) in q's dtype and U
        (batch, heads, n, d_f) in float32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    _check_inputs(q, k, v, features, attn_bias)
    if self_loop not in SELF_LOOP_POLICIES:
        raise ValueError(f"self_loop={self_loop!r} is not one of {SELF_LOOP_POLICIES}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got eps={eps}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    blocker = fused_kernel_blocker(q, k, v, features.shape[-1], attn_bias)
    if backend == "triton" and blocker is not None:
        raise RuntimeError(
            "backend='triton' needs Triton, CUDA tensors and supported shapes (see fused_kernel_supported); got "
            f"device {q.device}, dtype {q.dtype}, q {tuple(q.shape)}, k {tuple(k.shape)}, features "
            f"{tuple(features.shape)}, Triton installed: {triton is not None} ({blocker})"
        )
    facts = AttentionFacts(fused=blocker, blocked="attention_p_laplacian has no blocked path")
    if choose_backend(facts, backend).attention != "fused":
        return attention_p_laplacian_reference(q, k, v, features, p, mu, scale=scale, causal=causal,
                                               attn_bias=attn_bias, eps=eps, self_loop=self_loop, p_bounds=p_bounds)
    return fused_attention_p_laplacian(q, k, v, features, p, mu, scale=scale, causal=causal, attn_bias=attn_bias,
                                       eps=eps, self_loop=self_loop, p_bounds=p_bounds)


def fused_attention_p_laplacian(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    features: Tensor,
    p: float | Tensor,
    mu: float | Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_bias: Tensor | None = None,
    eps: float = RELEASE_EPS,
    self_loop: str = "release",
    p_bounds: tuple[float, float] | None = DEFAULT_P_BOUNDS,
) -> tuple[Tensor, Tensor]:
    """:func:`attention_p_laplacian` by the Triton kernels, with no backend choice: for callers that chose them
    (:func:`fused_kernel_blocker` is None for these inputs). Same arguments and returns."""
    heads = _check_inputs(q, k, v, features, attn_bias)
    if self_loop not in SELF_LOOP_POLICIES:
        raise ValueError(f"self_loop={self_loop!r} is not one of {SELF_LOOP_POLICIES}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got eps={eps}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Validate p and mu exactly as the torch path does (ranges, shapes), then expand them per head.
    _validate_coefficients(p, mu, p_bounds, heads)
    p_h = _per_head(p, heads, features.device, "p")
    mu_h = _per_head(mu, heads, features.device, "mu")
    log_c = torch.log(2.0 * mu_h / p_h)
    f32 = features.float()
    centre = f32.mean(dim=-2, keepdim=True)
    out, aggregated = _FusedAttentionPLaplacian.apply(
        q, k, v, f32 - centre, p_h, log_c, attn_bias, scale, bool(causal), float(eps), self_loop == "drop"
    )
    return out, aggregated + centre


def attention_p_laplacian_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    features: Tensor,
    p: float | Tensor,
    mu: float | Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_bias: Tensor | None = None,
    eps: float = RELEASE_EPS,
    self_loop: str = "release",
    p_bounds: tuple[float, float] | None = DEFAULT_P_BOUNDS,
) -> tuple[Tensor, Tensor]:
    """The torch composition the kernels reproduce: eager softmax attention, then the ``release`` aggregation
    (:func:`~vlpeft.functional.p_laplacian.release.release_aggregate`, self graph).

    Materialises the (batch, heads, n, n) attention. Scores and softmax in float32 (float64 for float64 inputs);
    rows whose scores are all <= :data:`UNATTENDED_SCORE` get no graph edges. Same arguments and returns as
    :func:`attention_p_laplacian`.
    """
    _check_inputs(q, k, v, features, attn_bias)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[1]
    group = heads // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    keys = k.to(work).repeat_interleave(group, dim=1)
    values = v.to(work).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(work), keys.transpose(-1, -2)) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.to(work)
    n = q.shape[-2]
    if causal:
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1).masked_fill(row_max == float("-inf"), 0.0)
    out = torch.matmul(probs, values).to(q.dtype)
    graph = probs.masked_fill(row_max <= UNATTENDED_SCORE, 0.0)
    feats = features.to(torch.float64 if features.dtype == torch.float64 else torch.float32)
    aggregated = release_aggregate(feats, feats, graph, p, mu, ReleaseOptions(graph="self", eps=eps, self_loop=self_loop),
                                   p_bounds=p_bounds)
    return out, aggregated


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, features: Tensor, attn_bias: Tensor | None) -> int:
    """Validate shapes and devices; return the number of query heads."""
    for name, tensor in (("q", q), ("k", k), ("v", v), ("features", features)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 4 or not tensor.is_floating_point():
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 4-D floating-point tensor (batch, heads, n, dim), got {shape}")
    batch, heads, n, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != n or k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must be (batch, kv_heads, n, head_dim) = ({batch}, kv_heads, {n}, {head_dim}) like q; got k "
            f"{tuple(k.shape)}, v {tuple(v.shape)} (only the self graph, n_q = n_k, is supported)"
        )
    if k.shape[1] < 1 or heads % k.shape[1] != 0:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if tuple(features.shape[:3]) != (batch, heads, n):
        raise ValueError(f"features must be (batch, heads, n, d_f) = ({batch}, {heads}, {n}, d_f), got "
                         f"{tuple(features.shape)}")
    if attn_bias is not None:
        try:
            torch.broadcast_shapes(tuple(attn_bias.shape), (batch, heads, n, n))
        except RuntimeError as err:
            raise ValueError(f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                             f"(batch, heads, n, n) = {(batch, heads, n, n)}") from err
        if attn_bias.dim() != 4:
            raise ValueError(f"attn_bias must be 4-D, got shape {tuple(attn_bias.shape)}")
    devices = {t.device for t in (q, k, v, features)} | ({attn_bias.device} if attn_bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"inputs on different devices: {sorted(str(d) for d in devices)}")
    return heads


def _validate_coefficients(p: Any, mu: Any, p_bounds: tuple[float, float] | None, heads: int) -> None:
    """The torch path's checks of p (range) and mu (> 0), plus the per-head shapes the kernels take."""
    check_p(p, p_bounds)
    check_mu(mu)
    for name, value in (("p", p), ("mu", mu)):
        if isinstance(value, Tensor) and not (value.dim() == 0 or (value.dim() == 1 and value.shape[0] == heads)):
            raise ValueError(f"{name} must be a float, a 0-d tensor or a per-head tensor ({heads},); got shape "
                             f"{tuple(value.shape)}")


def _per_head(value: float | Tensor, heads: int, device: torch.device, name: str) -> Tensor:
    """(heads,) float32 view of a scalar or per-head coefficient, differentiable in ``value``."""
    if not isinstance(value, Tensor):
        return torch.full((heads,), float(value), dtype=torch.float32, device=device)
    value = value.to(device=device, dtype=torch.float32)
    if value.dim() == 0:
        return value.expand(heads)
    if value.dim() == 1 and value.shape[0] == heads:
        return value
    raise ValueError(f"{name} must be a float, a 0-d tensor or a per-head tensor ({heads},); got {tuple(value.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Autograd wrapper
# ----------------------------------------------------------------------------------------------------------


def _next_pow2(value: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (max(1, value) - 1).bit_length())


class _FusedAttentionPLaplacian(torch.autograd.Function):
    """(q, k, v, F_centred, p (heads,), log c (heads,)) -> (O, U_centred) with the Triton kernels."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, feats: Tensor, p_h: Tensor, log_c: Tensor,
                bias: Tensor | None, scale: float, causal: bool, eps: float,
                drop_self_loops: bool) -> tuple[Tensor, Tensor]:
        q, k, v, feats = q.contiguous(), k.contiguous(), v.contiguous(), feats.contiguous()
        p_h, log_c = p_h.detach().contiguous(), log_c.detach().contiguous()
        batch, heads, n, head_dim = q.shape
        out = torch.empty_like(q)
        aggregated = torch.empty_like(feats)
        row_max = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device)
        log_sum = torch.empty_like(row_max)
        log_norm = torch.empty_like(row_max)
        config = _launch_config(head_dim, feats.shape[-1], q.dtype)
        triton_kernels.forward_kernel[(triton.cdiv(n, config["BLOCK_M"]), batch * heads)](
            q, k, v, feats, q if bias is None else bias, out, aggregated, row_max, log_sum, log_norm, p_h, log_c,
            *_strides(q, k, feats, bias), *_sizes(q, k, feats, scale, eps),
            **_flags(config, bias, causal, drop_self_loops, q.dtype),
        )
        ctx.save_for_backward(q, k, v, feats, bias, out, aggregated, row_max, log_sum, log_norm, p_h, log_c)
        ctx.settings = (scale, causal, eps, drop_self_loops)
        return out, aggregated

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor | None, grad_agg: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, feats, bias, out, aggregated, row_max, log_sum, log_norm, p_h, log_c = ctx.saved_tensors
        scale, causal, eps, drop_self_loops = ctx.settings
        batch, heads, n, head_dim = q.shape
        kv_heads = k.shape[1]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype).contiguous()
        grad_agg = torch.zeros_like(aggregated) if grad_agg is None else grad_agg.float().contiguous()
        # Row scalars that need no pass: dO.O and T = dU.U (U centred, as in the kernels).
        delta_out = (grad_out.float() * out.float()).sum(dim=-1).contiguous()
        total_u = (grad_agg * aggregated).sum(dim=-1).contiguous()
        delta = torch.empty_like(delta_out)
        grad_p_rows = torch.empty_like(delta_out)
        grad_feats_rows = torch.empty_like(feats)
        grad_feats_cols = torch.empty_like(feats)
        grad_q = torch.zeros(batch, heads, n, head_dim, dtype=torch.float32, device=q.device)
        grad_k = torch.empty(batch, heads, n, head_dim, dtype=q.dtype, device=q.device)
        grad_v = torch.empty_like(grad_k)
        bias_arg = q if bias is None else bias
        config = _launch_config(head_dim, feats.shape[-1], q.dtype, backward=True)
        geometry = (*_strides(q, k, feats, bias), *_sizes(q, k, feats, scale, eps))
        flags = _flags(config, bias, causal, drop_self_loops, q.dtype)
        triton_kernels.backward_rows_kernel[(triton.cdiv(n, config["BLOCK_M"]), batch * heads)](
            q, k, feats, bias_arg, row_max, log_sum, log_norm, p_h, grad_agg, delta_out, total_u, delta,
            grad_p_rows, grad_feats_rows, *geometry, **flags,
        )
        triton_kernels.backward_columns_kernel[(triton.cdiv(n, config["BLOCK_N"]), batch * heads)](
            q, k, v, feats, bias_arg, row_max, log_sum, log_norm, p_h, grad_out, grad_agg, total_u, delta,
            grad_q, grad_k, grad_v, grad_feats_cols, *geometry, **flags,
        )
        # The self term beta_i F_i of U, and d log c_i = beta_i (dU_i . F_i - T_i).
        beta = torch.exp(log_c.view(1, heads, 1) - log_norm)
        grad_feats = grad_feats_rows + grad_feats_cols + beta.unsqueeze(-1) * grad_agg
        grad_log_c_rows = beta * ((grad_agg * feats).sum(dim=-1) - total_u)
        grad_log_c = grad_log_c_rows.sum(dim=(0, 2))
        # The kernel sums d log W_ij (log s^2_ij - log s_min^2) / 2 (the released self loops, at the floor, add 0
        # instead of large terms that cancel); sum_j d log W_ij = -d log c_i restores the shift.
        grad_p = (grad_p_rows - 0.5 * math.log(eps * eps * feats.shape[-1]) * grad_log_c_rows).sum(dim=(0, 2))
        if kv_heads != heads:  # key/value head g serves query heads g * group ... (g + 1) * group - 1
            group = heads // kv_heads
            grad_k = grad_k.view(batch, kv_heads, group, n, head_dim).sum(dim=2)
            grad_v = grad_v.view(batch, kv_heads, group, n, head_dim).sum(dim=2)
        return (grad_q.to(q.dtype), grad_k, grad_v, grad_feats, grad_p, grad_log_c,
                None, None, None, None, None)


def _strides(q: Tensor, k: Tensor, feats: Tensor, bias: Tensor | None) -> tuple[int, ...]:
    batch, heads, n, _ = q.shape
    bias_strides = (0, 0, 0, 0) if bias is None else tuple(bias.expand(batch, heads, n, n).stride())
    return (*q.stride(), *k.stride(), *feats.stride(), *bias_strides)


def _sizes(q: Tensor, k: Tensor, feats: Tensor, scale: float, eps: float) -> tuple[Any, ...]:
    heads, n, head_dim = q.shape[1:]
    d_f = feats.shape[-1]
    return (heads, heads // k.shape[1], n, head_dim, d_f, scale, eps, eps * eps * d_f)


def _flags(config: dict[str, int], bias: Tensor | None, causal: bool, drop_self_loops: bool,
           dtype: torch.dtype) -> dict[str, Any]:
    return dict(HAS_BIAS=bias is not None, CAUSAL=causal, DROP_SELF_LOOPS=drop_self_loops,
                IEEE_SCORES=dtype == torch.float32, **config)


def _launch_config(head_dim: int, d_f: int, dtype: torch.dtype, backward: bool = False) -> dict[str, Any]:
    """Block sizes, warps and the p-Laplacian products' settings of a launch.

    ``EXACT_DISTANCES``: squared feature distances channel by channel (exact) instead of the Gram identity;
    ``PLAP_PRECISION``: precision of the float32 products of the p-Laplacian part ("ieee": CUDA-core FMA products,
    or "tf32x3": three TF32 tensor-core products, about float32 accuracy, in the tensor-core layout of the scores).
    The defaults are the fastest of the sweeps in ``benchmarks/bench_fused_p_laplacian.py`` on an H100 (head dim
    64, d_f 8, n 4096; ``docs/performance.md``): Gram distances, tf32x3, 64 x 64 forward tiles, 64 queries x 32
    keys backward tiles (64 x 64 backward tiles spill registers), 4 warps.
    """
    d_pad = _next_pow2(head_dim)
    block_m = 32 if d_pad > 128 else 64
    block_n = 32 if backward or d_pad > 128 else 64
    return {"D_PAD": d_pad, "F_PAD": _next_pow2(d_f), "BLOCK_M": block_m, "BLOCK_N": block_n,
            "num_warps": 4, "num_stages": 2 if backward else 3,
            "F_LOOP": d_f, "EXACT_DISTANCES": False, "PLAP_PRECISION": "tf32x3"}
