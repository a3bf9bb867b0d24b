"""Mutation check: does the fast test suite notice a wrong meta-gradient?

Each mutation below is a small semantic change to the library (a sign, a factor 1/2, a dropped term, a cold start),
the kind of bug that leaves every shape and every finite check intact. For each, the script copies the package and
the tests to a temporary directory, applies the mutation there (the working tree is never touched), and runs the
fast tests that cover that code (``pytest -x``, no ``slow`` tests); the mutation is *killed* when a test fails.
A baseline run of the same tests on the unmutated copy comes first: they must pass, or "killed" would mean nothing;
a mutation that stops pytest itself (an import error) is reported as an error, not as killed.

    python -m benchmarks.mutations            # every mutation, a table of killed/survived (about 5 minutes)
    python -m benchmarks.mutations -k pull    # only mutations whose name contains "pull"

Exits with status 1 if any mutation survives, and 2 if a mutation no longer applies (its text is not in the source
exactly once: the list has gone stale and must follow the code).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SURROGATES = "tests/estimators/test_surrogates.py"
META_GRADIENT = "tests/test_meta_gradient.py"
DUAL_SYSTEM = "tests/learners/test_dual_system.py"
DUAL_REFERENCES = f"{DUAL_SYSTEM}::test_meta_gradient_equals_the_written_out_reference"
DUAL_EXACT = f"{DUAL_SYSTEM}::test_meta_gradients_approach_the_exact_implicit_gradient"
CONTRASTIVE = "lightning_contrastive/estimators/contrastive.py"


@dataclass(frozen=True)
class Mutation:
    """Replace ``original`` (which must occur exactly once in ``path``) by ``mutated``; run ``tests``."""

    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTATIONS = [
    # The contrastive rule (both nudges).
    Mutation(
        "symmetric 1/(2 beta) -> 1/beta",
        CONTRASTIVE,
        "difference_term(minus, -self.beta)) / (2 * self.beta)",
        "difference_term(minus, -self.beta)) / self.beta",
        (SURROGATES,),
    ),
    Mutation(
        "one-sided 1/beta -> 1/(2 beta)",
        CONTRASTIVE,
        "difference_term(free, 0.0)) / self.beta",
        "difference_term(free, 0.0)) / (2 * self.beta)",
        (SURROGATES,),
    ),
    Mutation(
        "sign of the contrastive difference",
        CONTRASTIVE,
        "(difference_term(plus, self.beta) - difference_term(minus, -self.beta))",
        "(difference_term(minus, -self.beta) - difference_term(plus, self.beta))",
        (SURROGATES,),
    ),
    Mutation(
        "sign of the -beta phase's query term in the estimate (full nudge)",
        CONTRASTIVE,
        "difference_term(minus, -self.beta)) / (2",
        "difference_term(minus, self.beta)) / (2",
        (DUAL_REFERENCES,),
    ),
    Mutation(
        "direct term beta dL_query/dtheta dropped (full nudge)",
        CONTRASTIVE,
        "return inner + beta * learner.query_loss(phase.params, meta, task.query) if beta else inner",
        "return inner",
        (DUAL_REFERENCES,),
    ),
    Mutation(
        "direct term dL_query/dtheta(phi_0) dropped (linear nudge)",
        CONTRASTIVE,
        "surrogate = surrogate + direct",
        "surrogate = surrogate",
        (DUAL_REFERENCES,),
    ),
    Mutation(
        "sign of the direct term (linear nudge)",
        CONTRASTIVE,
        "surrogate = surrogate + direct",
        "surrogate = surrogate - direct",
        (DUAL_REFERENCES,),
    ),
    Mutation(
        "sign of the nudge in the phases (full nudge)",
        CONTRASTIVE,
        "+ beta * learner.query_loss(fast, meta, next(queries))",
        "- beta * learner.query_loss(fast, meta, next(queries))",
        (SURROGATES,),
    ),
    Mutation(
        "sign of the nudge in the phases (linear nudge)",
        CONTRASTIVE,
        "return learner.inner_loss(fast, meta, support) + beta * pull",
        "return learner.inner_loss(fast, meta, support) - beta * pull",
        (SURROGATES,),
    ),
    Mutation(
        "nudged phases start at zero, not warm at phi_0 (either nudge)",
        CONTRASTIVE,
        "return minimise(objective(beta), free.params, self.nudged_steps, self.nudged_optimizer)",
        "return minimise(objective(beta), {n: 0 * p for n, p in free.params.items()}, self.nudged_steps, "
        "self.nudged_optimizer)",
        (SURROGATES,),
    ),
    Mutation(
        "linear nudge linearised at the start, not at phi_0",
        CONTRASTIVE,
        "query_grad, direct = _query_gradient(learner, meta, free.params, task.query)",
        "query_grad, direct = _query_gradient(learner, meta, learner.init_fast(detached(meta)), task.query)",
        (SURROGATES,),
    ),
    Mutation(
        "phases start with a nonzero velocity",
        "lightning_contrastive/inner.py",
        "    velocity = [torch.zeros_like(p) for p in leaves]\n",
        "    velocity = [torch.full_like(p, 0.01) for p in leaves]\n",
        (SURROGATES,),
    ),
    # The learners' regularisers.
    Mutation(
        "dual system's pull/2 ||m - m0||^2 -> pull ||m - m0||^2",
        "lightning_contrastive/learners/dual_system.py",
        "return 0.5 * self.pull * sum(",
        "return self.pull * sum(",
        (DUAL_REFERENCES,),
    ),
    Mutation(
        "dual system's pull leaves out the readout",
        "lightning_contrastive/learners/dual_system.py",
        "square().sum() for name in self.fast_names)  # type: ignore[return-value]",
        'square().sum() for name in self.fast_names if not name.startswith("readout."))  # type: ignore[return-value]',
        (DUAL_REFERENCES,),
    ),
    Mutation(
        "gain and shift in the wrong order (g (h + s))",
        "lightning_contrastive/learners/dual_system.py",
        "return gain * output + shift",
        "return gain * (output + shift)",
        (DUAL_REFERENCES,),
    ),
    Mutation(
        "complex synapse's lambda/2 -> lambda",
        "lightning_contrastive/learners/complex_synapse.py",
        "(0.5 * strengths[name] * (fast[name]",
        "(strengths[name] * (fast[name]",
        (SURROGATES,),
    ),
    Mutation(
        "complex synapse's strengths used as lambda, not exp(log lambda)",
        "lightning_contrastive/learners/complex_synapse.py",
        'return {name: meta[f"lambda.{name}"].exp() for name in self.fast_names}',
        'return {name: meta[f"lambda.{name}"] for name in self.fast_names}',
        (SURROGATES,),
    ),
    # The other estimators.
    Mutation(
        "implicit: sign of the mixed term",
        "lightning_contrastive/estimators/implicit.py",
        "surrogate = learner.query_loss(solution, meta, task.query) - sum(",
        "surrogate = learner.query_loss(solution, meta, task.query) + sum(",
        (SURROGATES,),
    ),
    Mutation(
        "first-order MAML passes no gradient to the start",
        "lightning_contrastive/estimators/maml.py",
        "straight_through = {name: p + (phase.params[name] - p).detach() for name, p in start.items()}",
        "straight_through = {name: phase.params[name] for name, p in start.items()}",
        (SURROGATES,),
    ),
    # Issue 16's learner fixes.
    Mutation(
        "dual system's layer order from registration, not the forward pass",
        "lightning_contrastive/learners/dual_system.py",
        "    calls = call_order(primary, example_input)\n",
        "    calls = [n for n, m in primary.named_modules() if isinstance(m, WEIGHT_LAYERS + NORM_LAYERS)]\n",
        (f"{DUAL_SYSTEM}::test_layer_order_is_the_forward_passs_not_the_registration_order",),
    ),
    Mutation(
        "phases stochastic: the network runs in the learner's mode",
        "lightning_contrastive/learners/base.py",
        'state["training"] = False',
        'state["training"] = state["training"]',
        ("tests/learners/test_deterministic_phases.py",),
    ),
    Mutation(
        "export folds the shift but not the gain into the bias",
        "lightning_contrastive/learners/dual_system.py",
        "along_units(gain, bias) * bias + along_units(shift, bias)",
        "bias + along_units(shift, bias)",
        ("tests/learners/test_export.py",),
    ),
    Mutation(
        "implicit: negative curvature not flagged",
        "lightning_contrastive/estimators/implicit.py",
        "failed = failed | (active & ~(curvature >= -tolerance))",
        "failed = failed",
        ("tests/estimators/test_implicit.py",),
    ),
    Mutation(
        "implicit: conjugate gradient's fault checks without a rounding margin",
        "lightning_contrastive/estimators/implicit.py",
        "margin = ROUNDING_MARGIN * torch.finfo(dtype).eps",
        "margin = 0.0",
        ("tests/estimators/test_implicit.py",),
    ),
    Mutation(
        "divergence scale |L_in + beta L_query|, which losses of both signs cancel",
        CONTRASTIVE,
        "scale = free.loss.abs() + query_term",
        "scale = plus.start_loss.abs()",
        ("tests/test_faults.py::test_the_divergence_scale_holds_for_losses_that_cancel_or_go_negative",),
    ),
    Mutation(
        "TF32 matrix products left as the caller set them",
        "lightning_contrastive/estimation.py",
        '("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")',
        '("cudnn.conv", "cudnn.rnn", "mkldnn.conv", "mkldnn.rnn")',
        ("tests/test_precision.py",),
    ),
]


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """Run ``tests`` in ``root`` against ``root``'s copy of the package; (passed, the first failure's line)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "--tb=no", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=600)
    if result.returncode not in (0, 1):  # 2: interrupted (e.g. an import error), 5: no tests collected
        raise RuntimeError(f"pytest could not run {tests} (status {result.returncode}):\n{result.stdout[-2000:]}")
    failed = [line.removeprefix("FAILED ") for line in result.stdout.splitlines() if line.startswith("FAILED")]
    return result.returncode == 0, failed[0] if failed else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="keyword", default="", help="only mutations whose name contains this")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.keyword in m.name]
    with tempfile.TemporaryDirectory(prefix="mutations-") as directory:
        root = Path(directory)
        for part in ("lightning_contrastive", "tests"):
            shutil.copytree(REPOSITORY / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPOSITORY / "pyproject.toml", root / "pyproject.toml")
        check = subprocess.run(
            [sys.executable, "-c", "import lightning_contrastive; print(lightning_contrastive.__file__)"],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        if not check.stdout.startswith(str(root)):
            raise SystemExit(f"the copy is not the package the tests import ({check.stdout.strip()}); cannot mutate it")

        for mutation in chosen:
            if (root / mutation.path).read_text().count(mutation.original) != 1:
                print(f"stale mutation {mutation.name!r}: its text is not in {mutation.path} exactly once")
                return 2
        baseline = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
        passed, detail = run_tests(root, baseline)
        if not passed:
            print(f"baseline: the unmutated tests fail ({detail}); fix them first")
            return 2

        print(f"{'mutation':<68} {'result':<9} {'seconds':>7}  first failing test")
        survivors = 0
        for mutation in chosen:
            path = root / mutation.path
            source = path.read_text()
            path.write_text(source.replace(mutation.original, mutation.mutated))
            start = time.perf_counter()
            try:
                passed, detail = run_tests(root, mutation.tests)
            finally:
                path.write_text(source)
            survivors += passed
            verdict = "SURVIVED" if passed else "killed"
            print(f"{mutation.name:<68} {verdict:<9} {time.perf_counter() - start:7.1f}  {'' if passed else detail}")
    print(f"{len(chosen) - survivors} of {len(chosen)} mutations killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
