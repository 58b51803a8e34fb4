"""Script entry of the p-Laplacian block benchmark; the code lives in :mod:`vlpeft.benchmarking.p_laplacian`.

Usage: ``python benchmarks/bench_p_laplacian.py [--ns 64 256 1024] [--dims 8 64] [--device cuda]``, or the whole
suite with ``vlpeft bench``. Importing this file gives the module's API (``run``, ``format_table``,
``IMPLEMENTATIONS``, the reference formulations).
"""

from __future__ import annotations

from vlpeft.benchmarking.p_laplacian import (  # noqa: F401  (re-exported API)
    CHUNK_SIZE,
    DEFAULT_NS,
    IMPLEMENTATIONS,
    WORKLOADS,
    format_table,
    implementation,
    largest_pair_tensor_bytes,
    main,
    make_inputs,
    naive_paper_cross,
    naive_release_cross,
    naive_release_self,
    peak_memory_forward_backward,
    released_release_cross,
    released_release_self,
    run,
    time_forward_backward,
)

if __name__ == "__main__":
    main()
