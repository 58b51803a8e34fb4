"""Chunked p-adapter ``release``: attention rows recomputed in the backward pass where nothing else keeps them.

The first adapted layer of a frozen language model computes its attention from inputs that need no gradient, so
eager attention keeps nothing for the backward pass there; with ``chunk_size`` the p-Laplacian block then rebuilds
each block of attention rows from the model's eager attention instead of keeping the (batch, heads, n, n) tensor.
"""

import peft
import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama

import vlpeft.glue.attention as attention_module
from vlpeft.glue.attention import recompute_attention_rows
from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterConfig


def _loss_and_grads(chunk_size, monkeypatch=None):
    torch.manual_seed(0)
    tiny = build_tiny_model("llava", seed=0)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(variant="release", p_init=1.25, key_pool_size=3,
                                                           chunk_size=chunk_size))
    model.train()
    events = []
    if monkeypatch is not None:
        original = attention_module.recompute_attention_rows

        def spying(*args, **kwargs):
            rows_of = original(*args, **kwargs)
            events.append("built")

            def counted(rows):
                events.append("called")
                return rows_of(rows)

            return counted

        monkeypatch.setattr(attention_module, "recompute_attention_rows", spying)
    loss = model(**tiny.inputs).loss
    built_in_forward = events.count("built")
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, built_in_forward, events.count("called")


def test_chunked_release_recomputes_first_layer_attention_and_matches_unchunked(monkeypatch, torch_block_path):
    # Both runs on the torch path (the fused CPU kernels do not recompute attention; they keep nothing of size n^2).
    loss, grads, _, _ = _loss_and_grads(None)
    chunked_loss, chunked_grads, built, called = _loss_and_grads(2, monkeypatch)
    # Only the first LM layer's attention needs no gradient (later layers see the adapters' outputs).
    assert built == 1
    assert called >= 2  # its backward rebuilt the rows block by block
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == chunked_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class _Attention(nn.Module):
    num_key_value_groups = 2


@pytest.mark.parametrize("mask_kind", ["causal", "bias", "none"])
def test_recompute_attention_rows_equals_eager_rows(mask_kind):
    gen = torch.Generator().manual_seed(0)
    batch, heads, n, dim = 2, 4, 7, 5
    query = torch.randn(batch, heads, n, dim, generator=gen)
    key = torch.randn(batch, heads // 2, n, dim, generator=gen)
    value = torch.randn(batch, heads // 2, n, dim, generator=gen)
    lowest = torch.finfo(torch.float32).min
    if mask_kind == "causal":
        mask = torch.full((batch, 1, n, n), lowest).triu(1)
        mask[1, :, :, 0] = lowest  # a padded key
    elif mask_kind == "bias":  # not 0 / min only: kept as it is
        mask = torch.randn(batch, 1, n, n, generator=gen)
    else:
        mask = None
    module = _Attention().train()  # dropout must be forced to 0 by the recomputation
    eager = modeling_llama.eager_attention_forward
    _, probs = eager(module, query, key, value, mask, scaling=0.3, dropout=0.0)
    rows_of = recompute_attention_rows(eager, module, query, key, value, mask, {"scaling": 0.3, "dropout": 0.5})
    for rows in (slice(0, 3), slice(3, 7)):
        torch.testing.assert_close(rows_of(rows), probs[..., rows, :], rtol=1e-6, atol=1e-7)


def test_compile_block_config_is_validated():
    with pytest.raises(ValueError, match="compile_block=True applies to variant='release' only"):
        PAdapterConfig(variant="paper", compile_block=True)
    with pytest.raises(ValueError, match="compile_block must be a bool"):
        PAdapterConfig(variant="release", compile_block="yes")
    assert PAdapterConfig(variant="release").compile_block is False


def test_compile_block_runs_the_block_functions_and_equals_default(uncompiled_release_blocks, torch_block_path):
    """The compiled path's block functions (run uncompiled here: the math, not inductor) give the default path's
    loss and gradients on a LLaVA model; compiling them is checked by VLPEFT_TEST_COMPILE=1 in the functional tests."""
    calls = uncompiled_release_blocks
    results = []
    for compile_block in (False, True):
        torch.manual_seed(0)
        tiny = build_tiny_model("llava", seed=0)
        config = PAdapterConfig(variant="release", p_init=1.25, key_pool_size=3, compile_block=compile_block)
        model = peft.get_peft_model(tiny.model, config).train()
        loss = model(**tiny.inputs).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert {"release_forward_block", "release_backward_block"} <= set(calls)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
