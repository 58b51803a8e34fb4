"""Before/after check: the `release` p-adapter equals a direct transcription of p-adapter.md §2.4 on one layer.

The transcription below follows the released code's maths literally (in float64): node features
F = (Z W_O + b_O) W_down + b_down split into heads; G_ij = sqrt(A_ij + eps) (F_j - F_i) + eps·1;
M_ij = ||G_ij||^(p-2); W = A ⊙ M; alpha_i = 1 / (sum_j W_ij + 2mu/p), beta_i = (2mu/p) alpha_i; self graph
U_i = alpha_i sum_j W_ij F_j + beta_i F_i over value nodes, cross graph over [Q ; pooled V] with the beta term
dropped; y = o + (GELU(o W_gate + b_gate) ⊙ U) W_up + b_up; block output LayerNorm(y + x). It materialises the
(n, n, d_h) difference tensor and the full (N1 + k)² bipartite adjacency, unlike the library.
"""

import math

import peft
import pytest
import torch
from torch.nn import functional as F

from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterAttention, PAdapterConfig, PAdapterFFN


@pytest.fixture(autouse=True)
def _seed_torch():
    """Adapter initialisation draws from the global RNG: make every test independent of test order."""
    torch.manual_seed(0)

EPS = 1e-8


def _linear64(x, layer):
    return F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())


def _transcribe_attention_block(block, x, mask, encoder_states, name, p, mu, pool):
    """BLIP text attention block + release p-adapter, all float64."""
    base = block.base_layer
    attention, output = base.self, base.output
    x = x.double()
    heads = attention.num_attention_heads
    batch, n_1, width = x.shape
    source = encoder_states.double() if encoder_states is not None else x
    query = _linear64(x, attention.query)
    key = _linear64(source, attention.key)
    value = _linear64(source, attention.value)

    def split(t):
        return t.view(batch, t.shape[1], heads, -1).transpose(1, 2)

    scores = split(query) @ split(key).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask.double()
    probs = scores.softmax(dim=-1)  # (B, H, N1, N2), pre-dropout (dropout is 0 here)
    context = (probs @ split(value)).transpose(1, 2).reshape(batch, n_1, width)
    o = _linear64(context, output.dense)

    if encoder_states is not None:  # cross-attention: bipartite graph over [Q ; pooled V]
        pooled_value = F.adaptive_avg_pool1d(value.transpose(1, 2), pool).transpose(1, 2)
        pooled_probs = F.adaptive_avg_pool1d(probs.reshape(-1, 1, probs.shape[-1]), pool).view(
            batch, heads, n_1, pool
        )
        nodes = torch.cat([query, pooled_value], dim=1)
        n = n_1 + pool
        adjacency = torch.zeros(batch, heads, n, n, dtype=torch.float64)
        adjacency[:, :, :n_1, n_1:] = pooled_probs
        adjacency[:, :, n_1:, :n_1] = pooled_probs.transpose(-1, -2)
    else:  # self-attention: value nodes, raw causal attention with self loops
        nodes, adjacency, n = value, probs, n_1

    down = block.padapter_down[name]
    features = _linear64(_linear64(nodes, output.dense), down)  # (B, n, r)
    features = features.view(batch, n, heads, -1).transpose(1, 2)  # (B, H, n, d_h)
    differences = features.unsqueeze(2) - features.unsqueeze(3)  # [..., i, j, :] = F_j - F_i
    g = torch.sqrt(adjacency + EPS).unsqueeze(-1) * differences + EPS
    m = g.norm(dim=-1) ** (p - 2)
    w = adjacency * m
    c = 2 * mu / p
    alpha = 1.0 / (w.sum(dim=-1) + c)
    beta = c * alpha
    if encoder_states is not None:
        u = alpha[..., :n_1, None] * (w[..., :n_1, n_1:] @ features[..., n_1:, :])
    else:
        u = alpha[..., None] * (w @ features) + beta[..., None] * features
    u = u.transpose(1, 2).reshape(batch, n_1, -1)
    gate = F.gelu(_linear64(o, block.padapter_gate[name]))
    y = o + _linear64(gate * u, block.padapter_up[name])
    return F.layer_norm(y + x, (width,), output.LayerNorm.weight.double(), output.LayerNorm.bias.double(),
                        output.LayerNorm.eps)


def _record_block(module, store):
    def pre(_module, args, kwargs):
        store["args"], store["kwargs"] = args, kwargs

    def post(_module, _args, _kwargs, out):
        store["output"] = out

    return [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post, with_kwargs=True),
    ]


@pytest.mark.parametrize("position", ["self_attn", "cross_attn"])
def test_release_attention_block_matches_transcription(position):
    tiny = build_tiny_model("blip_caption", seed=3)
    config = PAdapterConfig(variant="release", p_init=1.25, mu0=0.1, key_pool_size=3, positions=[position])
    model = peft.get_peft_model(tiny.model, config)
    model.eval()
    layer = model.get_base_model().text_decoder.bert.encoder.layer[0]
    block = layer.crossattention if position == "cross_attn" else layer.attention
    assert isinstance(block, PAdapterAttention)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking state: p = 1.8, m = 0.3, an O(1) adapter branch
        block.padapter_p["default"].weight.fill_(math.log(0.8 / 0.2))
        block.padapter_mu["default"].weight.fill_(0.3)
        for linear in (block.padapter_down["default"], block.padapter_gate["default"], block.padapter_up["default"]):
            linear.weight.normal_(0.0, 1.0, generator=generator)
            linear.bias.normal_(0.0, 0.1, generator=generator)
    p = 1.8
    mu = 0.1 * (2 + math.tanh(0.3))
    assert float(block.p_value("default").detach()) == pytest.approx(p, rel=1e-6)

    store = {}
    handles = _record_block(block, store)
    with torch.no_grad():
        model(**tiny.inputs)
    for handle in handles:
        handle.remove()
    hidden = store["args"][0]
    kwargs = store["kwargs"]
    encoder_states = kwargs.get("encoder_hidden_states")
    assert (encoder_states is not None) == (position == "cross_attn")
    # BLIP's cross-attention ignores the (all-ones) image mask; its self-attention uses the causal/padding mask.
    mask = None if encoder_states is not None else kwargs["attention_mask"]
    with torch.no_grad():
        expected = _transcribe_attention_block(block, hidden, mask, encoder_states, "default", p, mu, pool=3)
    actual = store["output"][0]
    torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=2e-5)

    # after: the adapter changes the block; disabling it gives the plain block back
    with torch.no_grad(), model.disable_adapter():
        plain = block(hidden, **kwargs)[0]
    assert (plain - actual).abs().max() > 1e-4


def test_release_ffn_adapter_matches_transcription():
    tiny = build_tiny_model("blip_caption", seed=3)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(variant="release", positions=["ffn"]))
    model.eval()
    block = model.get_base_model().text_decoder.bert.encoder.layer[1].output
    assert isinstance(block, PAdapterFFN)
    store = {}
    handles = _record_block(block, store)
    with torch.no_grad():
        model(**tiny.inputs)
    for handle in handles:
        handle.remove()
    hidden, input_tensor = (t.double() for t in store["args"][:2])
    base = block.base_layer
    adapter = _linear64(F.relu(_linear64(input_tensor, block.padapter_down["default"])), block.padapter_up["default"])
    expected = F.layer_norm(
        _linear64(hidden, base.dense) + input_tensor + adapter,
        (input_tensor.shape[-1],),
        base.LayerNorm.weight.double(),
        base.LayerNorm.bias.double(),
        base.LayerNorm.eps,
    )
    torch.testing.assert_close(store["output"].double(), expected, rtol=1e-5, atol=1e-5)
