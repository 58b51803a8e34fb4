"""p-adapter reads the attention probabilities each layer actually uses: grouped-query attention, Gemma 3's
alternating sliding-window and global layers, Qwen's M-RoPE, Mllama's cross-attention layers."""

from __future__ import annotations

import peft
import pytest
import torch

import vlpeft
from vlpeft.glue.families import detect_family
from vlpeft.testing.twins import TWINS, build_twin
from vlpeft.tuners.p_adapter.attention import PAdapterAttention


def _eager_attentions(twin_name: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    model = build_twin(twin_name).model.eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(**batch, output_attentions=True).attentions


@pytest.mark.parametrize("variant", ["release", "paper"])
@pytest.mark.parametrize("twin_name", sorted(TWINS))
def test_padapter_reads_the_probabilities_of_the_eager_model(twin_name: str, variant: str, monkeypatch) -> None:
    """Every adapted layer's probabilities equal the eager model's ``output_attentions``. ``release`` with a
    zero up-projection leaves the hidden states unchanged, so all layers compare; ``paper`` changes them from
    the first adapted layer on (its output is Ū' rather than o + delta), so its first layer compares."""
    twin = build_twin(twin_name)
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    expected = _eager_attentions(twin_name, batch)
    seen: dict[str, torch.Tensor] = {}
    original = PAdapterAttention._graph_inputs

    def spy(self, capture, record, cache, n_q):
        inputs = original(self, capture, record, cache, n_q)
        seen[self.module_name] = capture.probs
        return inputs

    monkeypatch.setattr(PAdapterAttention, "_graph_inputs", spy)
    family = detect_family(twin.model)
    cross = any(family.tower(name).layer.cross_attn for name in family.language_towers)
    positions = ["self_attn", "cross_attn"] if cross else ["self_attn"]
    config = vlpeft.PAdapterConfig(variant=variant, init_weights="zero_up", positions=positions)
    wrapped = peft.get_peft_model(twin.model.eval(), config)
    with torch.no_grad():
        wrapped(**batch)
    layers = {int(name.split(".layers.")[1].split(".")[0]): probs for name, probs in seen.items()}
    assert sorted(layers) == list(range(len(expected))), sorted(seen)
    for index, probs in layers.items():
        if variant == "paper" and index > 0:
            break
        assert probs.shape == expected[index].shape
        torch.testing.assert_close(probs, expected[index], rtol=1e-5, atol=1e-6, msg=f"layer {index}")


def test_gemma3_sliding_layers_are_read_with_their_window() -> None:
    """The probabilities read on Gemma 3's sliding layers are zero beyond the window, the global layers' not."""
    twin = build_twin("gemma3")
    config = twin.model.config.text_config
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    assert batch["input_ids"].shape[1] > config.sliding_window
    attentions = _eager_attentions("gemma3", batch)
    n = batch["input_ids"].shape[1]
    far = torch.ones(n, n, dtype=torch.bool).tril(-config.sliding_window)
    kinds = config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(kinds)
    for probs, kind in zip(attentions, kinds, strict=True):
        beyond = probs[..., far].abs().sum()
        assert (beyond == 0) if kind == "sliding_attention" else (beyond > 0), kind
