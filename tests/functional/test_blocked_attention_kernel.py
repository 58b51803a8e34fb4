"""Blocked eager attention (causal staircase skipped) against plain eager attention, values and gradients."""

import pytest
import torch

from vlpeft.functional.blocked_attention import attention_block_plan, blocked_eager_attention


def _inputs(n=23, heads=3, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    lowest = torch.finfo(torch.float64).min
    bias = torch.full((2, 1, n, n), lowest, dtype=torch.float64).triu(1)
    bias[1, :, :, :2] = lowest  # left padding of the second sequence: its first two rows are fully masked
    return q, k, v, bias


def _eager(q, k, v, bias, scale):
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale + bias, dim=-1)
    return torch.matmul(probs, v), probs


def test_plan_skips_the_staircase_and_keeps_fully_masked_rows_whole():
    q, k, v, bias = _inputs(n=23)
    plan = attention_block_plan(bias, 23, 23, block_rows=4)
    assert [rows.start for rows, _ in plan] == [0, 4, 8, 12, 16, 20]
    # Block 0 holds the fully masked rows 0-1 of sequence 2: softmax over all keys, nothing skipped.
    assert [keys for _, keys in plan] == [23, 8, 12, 16, 20, 23]
    assert attention_block_plan(torch.zeros(2, 1, 23, 23, dtype=torch.float64), 23, 23, block_rows=4) == [
        (slice(0, 23), 23)]  # nothing masked: one block


@pytest.mark.parametrize("use_probs", [False, True])
def test_blocked_equals_eager_values_and_gradients(use_probs):
    q, k, v, bias = _inputs()
    plan = attention_block_plan(bias, 23, 23, block_rows=5)
    assert len(plan) > 1
    weights = torch.randn(2, 3, 23, 5, dtype=torch.float64)
    prob_weights = torch.randn(2, 3, 23, 23, dtype=torch.float64)
    results = []
    for blocked in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, probs = (blocked_eager_attention(*leaves, bias, 0.7, plan) if blocked
                      else _eager(*leaves, bias, 0.7))
        loss = (out * weights).sum() + ((probs * prob_weights).sum() if use_probs else 0.0)
        loss.backward()
        results.append([out.detach(), probs.detach(), *(leaf.grad for leaf in leaves)])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


def test_blocked_rejects_bad_inputs():
    q, k, v, bias = _inputs()
    plan = attention_block_plan(bias, 23, 23, block_rows=5)
    with pytest.raises(TypeError, match="float32/float64 inputs of one dtype"):
        blocked_eager_attention(q.float(), k, v, bias, 1.0, plan)
    with pytest.raises(ValueError, match="heads or lengths disagree"):
        blocked_eager_attention(q, k[:, :1], v, bias, 1.0, plan)
