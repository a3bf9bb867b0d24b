"""The cost of one meta-step: time, peak memory and accuracy of every estimator, against a hand-written floor.

Problems: a complex synapse (``ComplexSynapse``, learned strengths) over ``networks.Conv4`` (64 channels)
on Omniglot 28x28 5-way and 20-way 1-shot tasks with 15 queries per class (``conv5``, ``conv20``), and
over the 1-40-40-1 ``networks.MLP`` on sinusoid regression, 10 support and 10 query points (``sinusoid``);
on request, ``conv20`` with smooth units (``Conv4(smooth=True)``: GELU and average pooling; ``conv20-smooth``).
Methods: ``Contrastive`` one-sided and symmetric with the paper's nudge (``contrastive``, ``contrastive-sym``:
``nudge="full"``) and with the linearised one (``contrastive-linear``, ``contrastive-sym-linear``), ``MAML``,
``FirstOrderMAML``, ``Implicit``, ``Reptile`` (on a learner with ``learn_lambda=False``, the only one it is
defined for) and ``floor``/``floor-sym``, the full-nudge arithmetic hand-written with no framework around it
(``benchmarks.contrastive_floor``). With ``T`` inner steps the contrastive methods take ``T`` free and ``T // 2`` nudged
steps per phase (the authors' 200/100 ratio), so both nudges run the same phases; the others take ``T`` steps.
SGD lr 0.01, momentum 0.9 everywhere.

Sections (``--sections``):

- ``main``: per problem, method and ``T``: time per meta-step (median over repeats and rounds), peak
  memory, and the cosine of the meta-gradient to MAML's at the same ``T``, the exact gradient of the objective
  that ``T``-step adaptation gives users (``Implicit`` run long is no reference on these ReLU networks: their
  inner Hessians are indefinite, which it now reports as a fault). Every measurement
  runs in a fresh process (peak RSS cannot be reset), and each round launches all of them in a
  shuffled order, so methods are interleaved and share the machine's load alike;
- ``profile``: where a contrastive meta-step's time goes: the cost of a free step (support set) and of
  a nudged step (support plus query set), and the share of the query evaluations;
- ``knobs``: the symmetric rule with fewer nudged steps and with query subsampling, each with its time,
  memory and cosine to MAML's meta-gradient;
- ``batched``: the meta-batch looped over tasks against ``torch.func.vmap`` over tasks, with the path
  ``batched=None`` picks and the largest difference between the two meta-gradients;
- ``agreement`` (on request): the symmetric linear and full nudges on the same phases at each ``--agreement-betas``
  (in ``--agreement-precision``), their cosine and each one's cosine to its own estimate at the smallest beta:
  whether the two have one small-beta limit, and whether either has one at all. ReLU and max-pooling make a
  nudged run jump wherever a unit switches, so there the finite difference carries ``jump / beta`` terms. A third
  estimate, the linear nudge forced with the query gradient along the free path
  (``benchmarks.diagnostics.path_nudge``), splits the two nudges' disagreement into the query gradient's movement
  along an unconverged path and the kinks.

Every process runs torch on one thread (shared cores make more threads slower and noisier). The modules: ``problems``
(the problems and methods), ``workers`` (what each fresh process measures), ``sections`` (the schedule and the
tables), ``__main__`` (the command line).

    python -m benchmarks.meta_step                          # the full run
    python -m benchmarks.meta_step --quick                  # a quick check (conv5 and sinusoid, T=10)
    python -m benchmarks.meta_step --problems conv20 --steps 10 100 --sections main knobs
    python -m benchmarks.meta_step --problems conv20 conv20-smooth --steps 50 --sections agreement
"""
