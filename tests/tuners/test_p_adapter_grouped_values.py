"""``paper`` value nodes under grouped-query attention: coordinates in the span of the distinct value heads.

The layer passes V̂ = V W_O^T + b_O of repeated key/value heads as coordinates C times a basis B
(:func:`grouped_value_factors`) so that the p-Laplacian block's pairwise products run on r = kv_heads * head_dim
(+ 1) features instead of d. The model must compute the same loss and gradients as with the expanded nodes.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

from vlpeft.glue.attention import repeat_heads
from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterConfig
from vlpeft.tuners.p_adapter import variants as padapter_variants
from vlpeft.tuners.p_adapter.variants import grouped_value_factors


def _repeated_value_tokens(batch: int, kv_heads: int, heads: int, n: int, head_dim: int) -> torch.Tensor:
    """(batch, n, heads * head_dim): distinct kv heads repeated as transformers' repeat_kv does."""
    distinct = torch.randn(batch, kv_heads, n, head_dim, dtype=torch.float64)
    return repeat_heads(distinct, heads).transpose(1, 2).reshape(batch, n, heads * head_dim)


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_value_factors_reproduce_the_value_nodes(bias):
    heads, kv_heads, head_dim, d = 8, 2, 4, 40
    value = _repeated_value_tokens(3, kv_heads, heads, 5, head_dim)
    w_o = torch.randn(d, heads * head_dim, dtype=torch.float64)
    b_o = torch.randn(d, dtype=torch.float64) if bias else None
    coords, basis = grouped_value_factors(value, w_o, b_o, heads, kv_heads)
    assert coords.shape == (3, 5, kv_heads * head_dim + bias) and basis.shape == (kv_heads * head_dim + bias, d)
    torch.testing.assert_close(coords @ basis, F.linear(value, w_o, b_o), rtol=1e-12, atol=1e-12)


def test_grouped_value_factors_only_when_narrower():
    value = _repeated_value_tokens(1, 2, 4, 3, 8)
    assert grouped_value_factors(value, torch.randn(32, 32, dtype=torch.float64), None, 4, None) is None
    assert grouped_value_factors(value, torch.randn(32, 32, dtype=torch.float64), None, 4, 4) is None
    # r = 2 * 8 = 16 is not below d = 16
    assert grouped_value_factors(value, torch.randn(16, 32, dtype=torch.float64), None, 4, 2) is None
    assert grouped_value_factors(value, torch.randn(17, 32, dtype=torch.float64), None, 4, 2) is not None


def _loss_and_grads(family: str, monkeypatch, factored: bool):
    uses = []

    def spy(*args, **kwargs):
        result = grouped_value_factors(*args, **kwargs) if factored else None
        uses.append(result is not None)
        return result

    monkeypatch.setattr(padapter_variants, "grouped_value_factors", spy)
    torch.manual_seed(0)  # the adapters' initialisation
    tiny = build_tiny_model(family, seed=0)
    model = peft.get_peft_model(tiny.model.double(), PAdapterConfig(variant="paper")).train()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in tiny.inputs.items()}
    loss = model(**inputs).loss
    loss.backward()
    return uses, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_paper_adapter_is_the_same_with_grouped_value_factors(family, monkeypatch):
    uses, loss, grads = _loss_and_grads(family, monkeypatch, factored=True)
    assert uses and all(uses)  # every adapted attention block of these GQA models takes the factored path
    plain_uses, plain_loss, plain_grads = _loss_and_grads(family, monkeypatch, factored=False)
    assert plain_uses and not any(plain_uses)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    for name, expected in plain_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
