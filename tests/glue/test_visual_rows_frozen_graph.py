"""x_R is cut from a graph with nothing trainable behind it, and kept where a trainable parameter lies behind it."""

from __future__ import annotations

import torch
from torch import nn

from vlpeft.glue.visual_rows import cut_frozen_graph


def test_features_behind_frozen_layers_only_are_detached() -> None:
    frozen = nn.Linear(4, 4).requires_grad_(False)
    pixels = torch.randn(2, 4)
    marked = frozen(pixels).requires_grad_()  # what enable_input_require_grads does to an embedding output
    features = torch.tanh(frozen(marked))
    cut = cut_frozen_graph(features)
    assert features.requires_grad and not cut.requires_grad
    torch.testing.assert_close(cut, features.detach())


def test_features_behind_a_trainable_parameter_keep_their_graph() -> None:
    frozen, trainable = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 4)
    features = frozen(torch.tanh(trainable(torch.randn(2, 4))))
    kept = cut_frozen_graph(features)
    assert kept is features
    kept.sum().backward()
    assert trainable.weight.grad is not None and bool(trainable.weight.grad.abs().sum() > 0)


def test_tensors_without_a_graph_pass_through() -> None:
    plain = torch.randn(3)
    assert cut_frozen_graph(plain) is plain
    assert cut_frozen_graph(None) is None
    leaf = torch.randn(3, requires_grad=True)
    assert cut_frozen_graph(leaf) is leaf
