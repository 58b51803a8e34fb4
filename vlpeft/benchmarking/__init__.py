"""Benchmarks of vlpeft (``vlpeft bench``): the p-Laplacian block, training steps per method, long sequences.

Modules: :mod:`~vlpeft.benchmarking.measure` (timing and peak memory), :mod:`~vlpeft.benchmarking.p_laplacian`,
:mod:`~vlpeft.benchmarking.training_step`, :mod:`~vlpeft.benchmarking.long_sequence`,
:mod:`~vlpeft.benchmarking.suite` (the command, markdown and JSON output). Nothing is imported eagerly: the
suites build models with transformers only when run.
"""
