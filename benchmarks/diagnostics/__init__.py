"""Estimator diagnostics, run from the repository root as ``python -m benchmarks.diagnostics.<name>``.

Each module answers one question about how an estimator behaves on a real problem (how far the contrastive
estimate drifts from the implicit gradient along training, how the adaptation horizon sets the error, what a
nudged path looks like, which nudge settings pay off, whether the inner problem is solvable) and says in its
docstring what it costs to run.
"""
