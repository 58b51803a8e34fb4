"""Optimizer parameter groups: which trainable parameters get weight decay.

Weight decay pulls parameters towards 0. That is wrong for p-adapter's p (theta) and mu offset m: decay drifts p
away from its learned value (p-adapter.md §8 H3, H12), so they are excluded by default, as are biases and
normalisation weights (the usual convention). The released p-adapter code decays everything; pass
``decay_adapter_scalars=True`` to reproduce that for p and m.

Works for any model: parameters of modules that declare ``no_weight_decay = True`` (vlpeft's scalar leaf
modules, e.g. :class:`vlpeft.tuners.p_adapter.AdapterScalar`) are the "adapter scalars".
"""

from __future__ import annotations

from typing import Any

from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _is_norm(module: nn.Module) -> bool:
    # Model-specific norms (LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm, ...) do not subclass torch's classes.
    name = type(module).__name__
    return isinstance(module, NORM_TYPES) or name.endswith(("Norm", "RMSNorm", "LayerNorm", "Norm2d"))


def split_decay_parameters(
    model: nn.Module, *, decay_adapter_scalars: bool = False
) -> tuple[list[str], list[str]]:
    """Names of trainable parameters with and without weight decay.

    No decay: biases, parameters of normalisation layers, and (unless ``decay_adapter_scalars``) parameters of
    modules with ``no_weight_decay = True``. Frozen parameters are in neither list.

    Returns:
        (decay names, no-decay names), each in ``model.named_parameters()`` order.
    """
    decay: list[str] = []
    no_decay: list[str] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_scalar = bool(getattr(module, "no_weight_decay", False))
        is_norm = _is_norm(module)
        for param_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if is_scalar:
                (decay if decay_adapter_scalars else no_decay).append(full_name)
            elif is_norm or param_name == "bias" or param_name.endswith("_bias"):
                no_decay.append(full_name)
            else:
                decay.append(full_name)
    return decay, no_decay


def build_param_groups(
    model: nn.Module, weight_decay: float, *, decay_adapter_scalars: bool = False
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for ``torch.optim.AdamW(groups, lr=...)`` or an HF Trainer optimizer.

    Args:
        model: any module (e.g. a ``PeftModel``); only parameters with ``requires_grad`` are included.
        weight_decay: decay of the decayed group (>= 0).
        decay_adapter_scalars: also decay p-adapter's p and m (the released code's behaviour).

    Returns:
        Up to two groups, ``{"params": [...], "weight_decay": weight_decay}`` and
        ``{"params": [...], "weight_decay": 0.0}``; empty groups are left out.

    Raises:
        ValueError: negative ``weight_decay`` or no trainable parameter at all.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay_names, no_decay_names = split_decay_parameters(model, decay_adapter_scalars=decay_adapter_scalars)
    if not decay_names and not no_decay_names:
        raise ValueError("build_param_groups: the model has no trainable parameters")
    parameters = {
        f"{module_name}.{param_name}" if module_name else param_name: parameter
        for module_name, module in model.named_modules()
        for param_name, parameter in module.named_parameters(recurse=False)
    }
    groups = []
    if decay_names:
        groups.append({"params": [parameters[n] for n in decay_names], "weight_decay": float(weight_decay)})
    if no_decay_names:
        groups.append({"params": [parameters[n] for n in no_decay_names], "weight_decay": 0.0})
    return groups


__all__ = ["NORM_TYPES", "build_param_groups", "split_decay_parameters"]
