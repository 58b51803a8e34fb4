"""Deprecated name of :mod:`vlpeft.functional.p_laplacian.triton_attention` (the fused attention + ``release``
p-Laplacian Triton kernels), kept so that ``from vlpeft.functional import p_laplacian_triton`` keeps working.

Importing it gives that module itself (one module object: setting its attributes, e.g. a benchmark's launch
settings, acts on the kernels' wrapper).
"""

import sys

from vlpeft.functional.p_laplacian import triton_attention

sys.modules[__name__] = triton_attention
