"""Benchmarks and the paper reproduction, run from the repository root as ``python -m benchmarks.<name>``.

Top level: the benchmarks behind the README's tables (``meta_step``, ``gradient_quality``, ``data_loading``,
``contrastive_floor``, ``reproduce``, ``mutations``). ``benchmarks.diagnostics``: the estimator diagnostics.
"""
