"""Reproduce the paper's comparison: every learner with every estimator, under equal budgets, side by side.

For each suite (sinusoid regression with 5 and 10 shots, Omniglot 5-way and 20-way 1-shot on held-out
characters, and 20-way on held-out alphabets), each learner (``ComplexSynapse``, ``DualSystem``) and each estimator
(``Contrastive`` one-sided, symmetric, and symmetric with the linear nudge, ``MAML``, ``FirstOrderMAML``,
``Implicit``, ``Reptile``), one *cell* meta-trains with ``MetaLearningModule`` and a plain ``pl.Trainer`` built by
the CLI from ``configs/reproduce/<suite>/<cell>.yaml`` and tests on the suite's fixed meta-test episodes (the same
for every cell), recording the meta-test metric with its 95% confidence interval, its learning curve (the same
metric at the untrained start and at regular points of meta-training, against meta-steps and training time:
``LearningCurve``), the wall-clock per meta-step and the peak resident memory of its process. A cell
``untrained`` per learner tests the same network adapted from its untrained start. Pairs an estimator refuses
(``estimator.check_learner`` raises ``ValueError``) are recorded as n/a with that error's text; ``ComplexSynapse``
with fixed strengths (``reptile_lambda_fixed``) gives Reptile a row anyway.

Three groups of suites (``--only`` takes groups and suite names):

- ``steps``, equal budgets: within a suite every estimator takes the same inner steps (MAML's unroll, Implicit's,
  first-order MAML's and Reptile's inner steps, and the contrastive free phase), the same inner SGD (lr,
  momentum), meta-steps, meta-batch, outer optimizer (Adam, also for Reptile, whose meta-gradient ``theta - phi_T``
  is usually applied by SGD), seed and meta-test episodes; the contrastive rule takes its nudged steps on top (per
  phase: twice for the symmetric rule). Test-time adaptation runs every estimator's ``adapt``: the same inner
  steps for all.
- ``time``, equal training time (issue 14): the same suites, but every estimator meta-trains for the same CPU
  time (``EQUAL_TIME_SECONDS``; one thread, evaluations excluded), with the curve evaluated at every fifth of it.
- ``long``, issue 17: Omniglot 20-way on both splits for 600 meta-steps, a curve point every 50.

    python -m benchmarks.reproduce                          # steps and time groups
    python -m benchmarks.reproduce --only time              # the equal-time comparison alone
    python -m benchmarks.reproduce --only long --learners complex_synapse --out benchmarks/results/long
    python -m benchmarks.reproduce --only omniglot_20way_long --learners complex_synapse \
        --estimators contrastive_linear --set=--trainer.gradient_clip_val=1.0 --out benchmarks/results/clip1
    python -m benchmarks.reproduce --only omniglot_20way_long --estimators maml --keep-checkpoints
    python -m benchmarks.reproduce --report                 # docs/results/reproduction.md and figures
    python -m benchmarks.reproduce --smoke --out benchmarks/results/smoke  # everything tiny: the orchestration
    python -m benchmarks.reproduce --write-configs          # regenerate configs/reproduce/ from SUITES

Run them from the repository root. Before it starts, a run prints how long it will take, estimated from what earlier
runs measured (:mod:`benchmarks.reproduce.estimates`: the JSONs under ``--out`` and the last reported run's merged
JSON); cells that no run has measured yet are named as such, not guessed.

The fourth line is a *variant*: one cell again with one setting changed, in a folder of its own, which
``--report --variants FOLDER...`` tabulates with its best curve point. Any CLI key works
(``--model.optimizer.init_args.lr``, ``--model.learner.init_args.learn_lambda=false``,
``--model.estimator.init_args.beta``, ``...nudged_steps``, ``--trainer.gradient_clip_val``).
The fifth keeps each cell's checkpoint at every curve point (``<cell>.step=<N>.ckpt``), which
``python -m benchmarks.diagnostics.estimate_drift`` and ``.adaptation_horizon`` read.

One cell by hand (what a worker runs, minus timing):
``OMP_NUM_THREADS=1 lightning-contrastive fit --config configs/reproduce/omniglot_5way/complex_synapse__maml.yaml``
then ``test`` with ``--ckpt_path`` (the configs turn checkpointing off; add ``--trainer.enable_checkpointing=true``).

Every cell runs in a fresh subprocess (peak RSS cannot be reset) with one torch thread and writes one JSON file
under ``--out``; a rerun skips cells whose JSON exists, and a cell interrupted in meta-training resumes from the
checkpoint it saved at its last curve point, so an interrupted reproduction resumes: run the same command again.
A cell that crashes, diverges or skips too many tasks (:func:`benchmarks.reproduce.cell.judge`) records why and
shows as ``failed: <reason>`` without stopping the others. The gradient-quality stage
(``python -m benchmarks.gradient_quality``) runs as one more job of the pool.

The modules, one per concern: ``suites`` (suites, cells, their selection), ``configs`` (each cell's CLI
configuration, the smoke budget), ``cell`` (running, resuming and judging one cell), ``pool`` (the worker pool),
``estimates`` (time estimates from measured results), ``tables``, ``figures``, ``variants`` and ``report`` (the
report), ``__main__`` (the command line).
"""
