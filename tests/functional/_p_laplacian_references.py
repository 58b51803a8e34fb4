"""Equation-level references and inputs for the tests of vlpeft.functional.p_laplacian_aggregate (not a test module).

References (p-adapter.md):
- ``paper``: the full (N1 + N2) augmented graph [[0, M], [M^T, 0]] of Eq. 9, its degree matrix, explicit
  pairwise differences sqrt(M_ij / D_i) V_i - sqrt(M_ij / D_j) V_j (Eq. 14), alpha/beta (Eq. 15) and the
  dense update of Eq. 16 with diag matrices; the query rows are returned.
- ``release``: explicit pairwise G_ij = sqrt(A_ij + eps) (F_j - F_i) (§2.4 C) as (n, n, d) tensors, alpha,
  beta and diag_embed matmuls; with the documented floor s >= eps sqrt(d) ("floor" reference) or with the
  released eps * 1 shift ("literal" reference).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8

FLOOR = 1e-12

def _safe_inverse(values: torch.Tensor) -> torch.Tensor:
    """1/x where x > 0 and 0 elsewhere (the GCN convention 1/D := 0)."""
    return torch.where(values > 0, 1.0 / torch.where(values > 0, values, 1.0), 0.0)

def naive_paper(v_q, v_k, m, p, mu, floor=FLOOR):
    """Eqs. 9, 14-16 on the augmented graph; returns the query rows (B, H, N1, d)."""
    n1, n2 = m.shape[-2:]
    lead = m.shape[:-2]
    nodes = torch.cat([v_q.expand(*lead, n1, -1), v_k.expand(*lead, n2, -1)], dim=-2)
    adj = m.new_zeros(*lead, n1 + n2, n1 + n2)
    adj[..., :n1, n1:] = m
    adj[..., n1:, :n1] = m.transpose(-1, -2)
    inv_deg = _safe_inverse(adj.sum(dim=-1))
    left = torch.sqrt(adj * inv_deg.unsqueeze(-1)).unsqueeze(-1) * nodes.unsqueeze(-2)
    right = torch.sqrt(adj * inv_deg.unsqueeze(-2)).unsqueeze(-1) * nodes.unsqueeze(-3)
    norm_sq = ((left - right) ** 2).sum(dim=-1)
    norm_sq = torch.maximum(norm_sq, adj * floor)  # ||y_i - y_j||^2 >= floor
    safe = torch.where(adj > 0, norm_sq, 1.0)
    m_bar = torch.where(adj > 0, adj * safe ** ((p - 2) / 2), 0.0)
    c = 2 * mu / p
    alpha = 1.0 / (m_bar.sum(dim=-1) * inv_deg + c)
    beta = c * alpha
    d_half = torch.diag_embed(torch.sqrt(inv_deg))
    update = torch.diag_embed(alpha) @ d_half @ m_bar @ d_half @ nodes + torch.diag_embed(beta) @ nodes
    return update[..., :n1, :]

def naive_paper_causal(v_q, v_k, m, p, mu):
    """Causal degrees: row q is the cache-free result on the graph of queries 0..q (§2.5)."""
    rows = [naive_paper(v_q[..., : q + 1, :], v_k, m[..., : q + 1, :], p, mu)[..., q, :] for q in range(m.shape[-2])]
    return torch.stack(rows, dim=-2)

def _release_weights(nodes, adj, p, eps, literal):
    diff = nodes.unsqueeze(-3) - nodes.unsqueeze(-2)  # (.., n, n, d): F_j - F_i
    g = torch.sqrt(adj + eps).unsqueeze(-1) * diff
    if literal:
        g = g + eps
        s = g.norm(dim=-1)
    else:
        s = torch.clamp(g.norm(dim=-1), min=eps * math.sqrt(nodes.shape[-1]))
    return adj * s ** (p - 2)

def naive_release_self(f, a, p, mu, eps=EPS, self_loop="release", literal=False):
    """Self graph over n nodes f (B, H, n, d) with adjacency a (B, H, n, n), self loops included."""
    w = _release_weights(f, a, p, eps, literal)
    if self_loop == "drop":
        w = w * (1 - torch.eye(a.shape[-1], dtype=a.dtype))
    c = 2 * mu / p
    alpha = 1.0 / (w.sum(dim=-1) + c)
    beta = c * alpha
    return torch.diag_embed(alpha) @ w @ f + torch.diag_embed(beta) @ f

def naive_release_bipartite(f_q, f_k, a, p, mu, eps=EPS, literal=False):
    """Augmented [F_q; F_k] graph with [[0, P], [P^T, 0]]; the beta term is the zero off-diagonal block."""
    n1, n2 = a.shape[-2:]
    lead = a.shape[:-2]
    nodes = torch.cat([f_q.expand(*lead, n1, -1), f_k.expand(*lead, n2, -1)], dim=-2)
    adj = a.new_zeros(*lead, n1 + n2, n1 + n2)
    adj[..., :n1, n1:] = a
    adj[..., n1:, :n1] = a.transpose(-1, -2)
    w = _release_weights(nodes, adj, p, eps, literal)
    c = 2 * mu / p
    alpha = 1.0 / (w.sum(dim=-1) + c)
    beta_matrix = torch.diag_embed(c * alpha)
    update = torch.diag_embed(alpha) @ w @ nodes
    return update[..., :n1, :] + beta_matrix[..., :n1, n1:] @ nodes[..., n1:, :]

def make_attention(batch, heads, n_q, n_k, *, dtype=torch.float64, causal=False, zero_rows=(), holes=0.0,
                   offset=None, seed=0):
    """Row-normalised attention with exact zeros for masks; rows listed in ``zero_rows`` are all zero."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n_q, n_k, generator=gen, dtype=torch.float64)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if causal:
        shift = n_k - n_q if offset is None else offset
        keep &= torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=shift)
    if holes:
        keep &= torch.rand(batch, heads, n_q, n_k, generator=gen, dtype=torch.float64) > holes
    for row in zero_rows:
        keep[..., row, :] = False
    weights = torch.exp(logits) * keep
    attn = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return attn.to(dtype)

def make_features(batch, heads, n, d, *, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64).to(dtype)

def assert_close_rel(actual, expected, rel):
    """Elementwise tolerance ``rel`` relative to the largest magnitude of ``expected``."""
    scale = expected.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rel, atol=rel * scale)

CASES = {
    "dense": {},
    "holes": {"holes": 0.3},
    "zero_rows": {"zero_rows": (0, 3), "holes": 0.2},
}

def leaf(t):
    """A detached copy of ``t`` that requires grad (a fresh leaf)."""
    return t.detach().clone().requires_grad_(True)
