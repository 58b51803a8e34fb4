"""Tests of vlpeft.functional.route against explicit per-token formulas (routing.md §2)."""

from __future__ import annotations

import pytest
import torch

from vlpeft.functional import ROUTING_KINDS, route


def _inputs(batch=2, n=5, m=1, r=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, n, r, generator=gen, dtype=torch.float64)
    x_v = torch.randn(batch, m, r, generator=gen, dtype=torch.float64)
    return x_t, x_v


def explicit_matmul(x_t, x_v):
    """Row i is sum_m <t_i, v_m> v_m, written as loops."""
    out = torch.zeros_like(x_t)
    for b in range(x_t.shape[0]):
        for i in range(x_t.shape[1]):
            for j in range(x_v.shape[1]):
                out[b, i] += torch.dot(x_t[b, i], x_v[b, j]) * x_v[b, j]
    return out


def test_kinds_exported():
    assert ROUTING_KINDS == ("mul", "add", "matmul", "matmul_expand")


def test_single_vector_closed_forms():
    x_t, x_v = _inputs(m=1)
    v = x_v[:, 0]
    for b in range(2):
        for i in range(5):
            t = x_t[b, i]
            torch.testing.assert_close(route(x_t, x_v, "mul")[b, i], torch.diag(v[b]) @ t)
            torch.testing.assert_close(route(x_t, x_v, "add")[b, i], t + v[b])
            torch.testing.assert_close(route(x_t, x_v, "matmul")[b, i], torch.dot(t, v[b]) * v[b])
            torch.testing.assert_close(route(x_t, x_v, "matmul_expand")[b, i], t.sum() * v[b])


def test_matmul_expand_equals_expanded_r_by_r_product():
    x_t, x_v = _inputs(m=1, r=7)
    expanded = x_v.expand(-1, 7, -1)  # x''_v = 1_r v (r x r), the released form
    torch.testing.assert_close(route(x_t, x_v, "matmul_expand"), x_t @ expanded)


@pytest.mark.parametrize("n,m,r", [(20, 197, 128), (200, 300, 4), (3, 4, 5)])
def test_matmul_true_transpose_both_evaluation_orders(n, m, r):
    x_t, x_v = _inputs(batch=1, n=n, m=m, r=r)
    expected = torch.einsum("bik,bjk,bjl->bil", x_t, x_v, x_v)
    torch.testing.assert_close(route(x_t, x_v, "matmul"), expected)


def test_matmul_matches_loops_for_many_visual_tokens():
    x_t, x_v = _inputs(m=4)
    torch.testing.assert_close(route(x_t, x_v, "matmul"), explicit_matmul(x_t, x_v))


def test_reshape_quirk():
    x_t, x_v = _inputs(m=3)
    quirk = route(x_t, x_v, "matmul", reshape_quirk=True)
    torch.testing.assert_close(quirk, (x_t @ x_v.reshape(2, 6, 3)) @ x_v)
    assert not torch.allclose(quirk, route(x_t, x_v, "matmul"))
    single_t, single_v = _inputs(m=1)
    torch.testing.assert_close(route(single_t, single_v, "matmul", reshape_quirk=True),
                               route(single_t, single_v, "matmul"))
    with pytest.raises(ValueError, match="reshape_quirk"):
        route(x_t, x_v, "mul", reshape_quirk=True, pooling="mean")


@pytest.mark.parametrize("kind", ROUTING_KINDS)
def test_mean_pooling(kind):
    x_t, x_v = _inputs(m=4)
    pooled = x_v.mean(dim=1, keepdim=True)
    torch.testing.assert_close(route(x_t, x_v, kind, pooling="mean"), route(x_t, pooled, kind))


@pytest.mark.parametrize("kind", ["mul", "add", "matmul_expand"])
def test_single_vector_kinds_reject_many_tokens(kind):
    x_t, x_v = _inputs(m=3)
    with pytest.raises(ValueError, match=rf"routing kind '{kind}' needs one visual vector, got m=3"):
        route(x_t, x_v, kind)
    with pytest.raises(ValueError, match="m=3"):
        route(x_t, x_v, kind, pooling="none")


def test_errors():
    x_t, x_v = _inputs()
    with pytest.raises(ValueError, match=r"allowed kinds: \('mul', 'add', 'matmul', 'matmul_expand'\)"):
        route(x_t, x_v, "concat")
    with pytest.raises(ValueError, match="pooling 'max'"):
        route(x_t, x_v, "mul", pooling="max")
    with pytest.raises(ValueError, match="ranks differ"):
        route(x_t, x_v[..., :3], "mul")
    with pytest.raises(ValueError, match="m=0"):
        route(x_t, x_v[:, :0], "matmul")
    with pytest.raises(ValueError, match=r"\(batch, n, r\)"):
        route(x_t[0], x_v, "mul")
    with pytest.raises(ValueError, match="batch sizes"):
        route(x_t, torch.cat([x_v, x_v, x_v]), "mul")


def test_visual_batch_broadcasts_across_beams():
    x_t, x_v = _inputs(batch=4, m=1)
    shared = x_v[:1]
    for kind in ROUTING_KINDS:
        torch.testing.assert_close(route(x_t, shared, kind), route(x_t, shared.expand(4, -1, -1), kind))


def test_gradients_flow_to_both_sides():
    x_t, x_v = _inputs(m=2)
    x_t.requires_grad_(True)
    x_v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, v: route(t, v, "matmul"), (x_t, x_v))
