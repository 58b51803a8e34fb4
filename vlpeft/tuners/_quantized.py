"""Frozen weights of quantized projections (bitsandbytes 4-bit / 8-bit ``nn.Linear`` subclasses) as float tensors.

p-adapter reads the attention output projection W_O itself (the ``release`` fold, the ``paper`` value nodes), so
over a QLoRA-style base it needs the weight dequantized: the packed ``Params4bit`` data is uint8 of shape
((out * in + 1) // 2, 1).

bitsandbytes (0.48+) repacks a 4-bit weight in place the first time its layer runs in eval mode without gradients
on a CPU with AVX512-BF16 (``quant_state.packing_format_for_cpu``): the codes are re-laid out for its CPU kernel and
the block scales become a transposed bfloat16 (in // blocksize, out) tensor. ``bitsandbytes.functional
.dequantize_4bit`` (and PEFT's ``dequantize_module_weight``) read that layout as if it were the original one and
return wrong values, so :func:`dequantized_weight` undoes the repacking itself.
"""

from __future__ import annotations

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn

__all__ = ["dequantized_weight", "is_quantized_weight"]

#: Rows of the CPU layout hold the codes of 32 output features x 2 input features (64 codes in 32 bytes).
_CPU_BLOCK_N = 32


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes quantized parameter (``Params4bit`` / ``Int8Params``)."""
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of the Linear-like ``module`` as a float tensor (out, in): the parameter itself when it is not
    quantized, else its dequantized values (no gradient flows into the frozen codes)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed_4bit(weight.data, state)
    return dequantize_module_weight(module)


def _dequantize_cpu_packed_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """(out, in) values of a 4-bit weight in bitsandbytes' CPU inference layout: ``packed`` (out, in / 2) uint8,
    each run of 32 bytes holding the low and high nibbles of a 32 x 2 (output x input) tile; ``state.absmax``
    (in / blocksize, out) scales; ``state.code`` the 16-entry NF4/FP4 table."""
    n, k = (int(size) for size in state.shape)
    tiles = packed.reshape(-1, _CPU_BLOCK_N)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # (tiles, 64): 32 low nibbles, then 32 high ones
    codes = codes.reshape(n // _CPU_BLOCK_N, k // 2, _CPU_BLOCK_N, 2).transpose(1, 2).reshape(n, k)
    table = state.code.to(device=packed.device, dtype=torch.float32)
    scales = state.absmax.to(torch.float32).t().repeat_interleave(state.blocksize, dim=1)  # (out, in)
    values = table[codes.long()] * scales
    return values.to(getattr(state, "original_dtype", None) or torch.float32)
