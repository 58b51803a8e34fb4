"""Deprecated name of :mod:`vlpeft.functional.p_laplacian.cpu_kernels` (the fused CPU kernels' loader and build),
kept so that ``from vlpeft.functional import p_laplacian_cpu`` keeps working.

Importing it gives that module itself (one module object: patching its attributes acts on the kernels).
"""

import sys

from vlpeft.functional.p_laplacian import cpu_kernels

sys.modules[__name__] = cpu_kernels
