"""p-adapter's eager attention on interface models runs in causal row blocks (skipping the masked staircase) where
the backend choice finds it applies; the loss and every gradient must equal plain eager attention's."""

import peft
import pytest
import torch

import vlpeft.functional.blocked_attention as blocked_module
import vlpeft.glue.attention as attention_module
from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterConfig, padapter_backends


def _loss_and_grads(variant):
    torch.manual_seed(0)
    tiny = build_tiny_model("llava", seed=0)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(variant=variant, p_init=1.25, key_pool_size=3)).train()
    loss = model(**tiny.inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, padapter_backends(model)


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_blocked_attention_equals_eager(monkeypatch, variant):
    expected_loss, expected, eager = _loss_and_grads(variant)  # tiny sequences: one block, the model's eager function
    assert eager and all(choice.attention == "eager" and "one row block" in choice.reason for choice in eager.values())
    monkeypatch.setattr(blocked_module, "BLOCK_ROWS", 4)
    used = []
    original = attention_module.run_blocked

    def spying(*args):
        used.append(args[0])
        return original(*args)

    monkeypatch.setattr(attention_module, "run_blocked", spying)
    loss, grads, blocked = _loss_and_grads(variant)
    assert len(used) == len(blocked)  # every adapted LM layer took the blocked path, as its recorded choice says
    assert all(choice.attention == "blocked" and choice.name in ("cpu", "torch") for choice in blocked.values())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_mask_facts_are_cached_per_mask_and_recomputed_after_an_in_place_change():
    lowest = torch.finfo(torch.float32).min
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 0, :] = lowest  # row 0 attends nowhere
    first = attention_module.attended_query_rows(mask, 3, 3)
    assert first.flatten().tolist() == [False, True, True]
    assert attention_module.attended_query_rows(mask, 3, 3) is first  # the same mask: computed once
    mask.zero_()
    assert attention_module.attended_query_rows(mask, 3, 3).flatten().tolist() == [True, True, True]
    assert attention_module.attended_query_rows(torch.zeros(1, 1, 3, 3), 3, 3).all()


def test_paper_layers_pass_the_blocked_attention_plan(monkeypatch):
    """The paper branch hands the blocked attention's row blocks to the p-Laplacian block (no extents pass)."""
    import vlpeft.tuners.p_adapter.variants as variants_module

    monkeypatch.setattr(blocked_module, "BLOCK_ROWS", 4)
    plans = []
    original = variants_module.p_laplacian_aggregate

    def spying(*args, **kwargs):
        plans.append(kwargs.get("attn_block_plan"))
        return original(*args, **kwargs)

    monkeypatch.setattr(variants_module, "p_laplacian_aggregate", spying)
    _loss_and_grads("paper")
    assert plans and all(plan is not None and len(plan) > 1 for plan in plans)
