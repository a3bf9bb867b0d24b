"""Property-based tests over batch shapes, ways and shots: malformed batches are refused, well-formed ones train.

Every malformed batch must raise a ``ValueError`` whose message names the problem before any inner loop runs;
every well-formed one, whatever its number of tasks, ways, shots, query shots and features, must train one
meta-step in a real Trainer, and that step must be SGD's on the written-out contrastive estimate
(``tests/references.py``). ``max_examples`` is kept small so that the module runs in seconds.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_contrastive import ComplexSynapse, Contrastive
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.networks import MLP

_spec = importlib.util.spec_from_file_location("references", Path(__file__).resolve().parent / "references.py")
references = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(references)  # type: ignore[union-attr]

Batch = Mapping[str, Any]
Problem = Literal["classification", "regression"]


@dataclass(frozen=True)
class Shape:
    """An episodic batch's sizes; a regression task's targets have ``outputs`` dimensions, a classifier ``ways``."""

    tasks: int
    ways: int
    shots: int
    test_shots: int
    features: int
    outputs: int


SHAPES = st.builds(
    Shape,
    tasks=st.integers(1, 3),
    ways=st.integers(1, 4),
    shots=st.integers(1, 3),
    test_shots=st.integers(1, 3),
    features=st.integers(1, 3),
    outputs=st.integers(1, 2),
)
PROBLEMS = st.sampled_from(["classification", "regression"])


def episodic_batch(problem: Problem, shape: Shape, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """A well-formed torchmeta batch: ``ways`` classes with ``shots`` (``test_shots``) examples each, labels
    shuffled within every task; regression tasks have as many examples and ``outputs``-dimensional targets."""
    generator = torch.Generator().manual_seed(seed)

    def split(per_class: int) -> tuple[Tensor, Tensor]:
        examples = shape.ways * per_class
        x = torch.randn(shape.tasks, examples, shape.features, generator=generator)
        if problem == "regression":
            return x, torch.randn(shape.tasks, examples, shape.outputs, generator=generator)
        labels = torch.arange(shape.ways).repeat_interleave(per_class)
        return x, torch.stack([labels[torch.randperm(examples, generator=generator)] for _ in range(shape.tasks)])

    return {"train": split(shape.shots), "test": split(shape.test_shots)}


def module_for(problem: Problem, shape: Shape) -> MetaLearningModule:
    outputs = shape.ways if problem == "classification" else shape.outputs
    backbone = MLP(in_features=shape.features, hidden=(4,), out_features=outputs)
    loss = "cross_entropy" if problem == "classification" else "mse"
    return MetaLearningModule(
        ComplexSynapse(backbone, loss=loss),
        Contrastive(beta=0.1, inner_steps=2, nudged_steps=1, inner_lr=0.05),
        optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1),
    )


# ------------------------------------------------------------------ well-formed batches train
@settings(max_examples=10, deadline=None, database=None)
@given(problem=PROBLEMS, shape=SHAPES, seed=st.integers(0, 2**16))
@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on workers and logging intervals
def test_every_well_formed_batch_trains_a_meta_step(problem: Problem, shape: Shape, seed: int) -> None:
    torch.manual_seed(seed)
    meta_learner = module_for(problem, shape)
    before = {name: p.detach().clone() for name, p in meta_learner.learner.named_meta_parameters()}
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    batch = episodic_batch(problem, shape, seed)
    trainer.fit(meta_learner, DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
    after = dict(meta_learner.learner.named_meta_parameters())
    # The step is SGD's (lr 0.1) on the mean over tasks of the written-out contrastive estimate, in float64.
    theta = {name: p.double() for name, p in before.items()}
    per_task = [
        references.contrastive(
            written_out(problem, batch, task), theta,
            beta=0.1, symmetric=True, nudge="linear", steps=2, nudged_steps=1, lr=0.05, momentum=0.9,
        )
        for task in range(shape.tasks)
    ]  # fmt: skip
    expected = {name: theta[name] - 0.1 * sum(g[name] for g in per_task) / shape.tasks for name in theta}
    difference = references.flat({name: after[name].detach().double() - expected[name] for name in theta})
    # The float32 step is the float64 one rounded: over 100 random examples the largest difference was 0.99 float32
    # ulp of the largest meta-parameter (2^-24 |theta|_max); asserted 4.
    assert difference.abs().max() <= 4 * 2**-24 * references.flat(theta).abs().max()


def written_out(problem: Problem, batch: Batch, task: int) -> references.Problem:
    """``module_for``'s complex synapse (MLP with one hidden ReLU layer of 4) on one task, in float64."""
    split = (batch["train"][0][task], batch["train"][1][task], batch["test"][0][task], batch["test"][1][task])
    split = tuple(t.double() if t.is_floating_point() else t for t in split)
    names = [f"layers.{layer}.{kind}" for layer in (0, 2) for kind in ("weight", "bias")]
    network = lambda weights, x: references.mlp(weights, x, ["layers.0", "layers.2"], torch.relu)  # noqa: E731
    loss = "cross_entropy" if problem == "classification" else "mse"
    return references.complex_synapse(network, names, split, loss)  # type: ignore[arg-type]


# ------------------------------------------------------------------ malformed batches are refused
@dataclass(frozen=True)
class Corruption:
    """A way to break a well-formed batch, and the words the ``ValueError`` must contain."""

    name: str
    corrupt: Callable[[Batch], Batch]
    message: str
    problems: tuple[Problem, ...] = ("classification", "regression")


def _tasks(split: tuple[Tensor, Tensor], index: slice) -> tuple[Tensor, Tensor]:
    return split[0][index], split[1][index]


def _examples(split: tuple[Tensor, Tensor], index: slice) -> tuple[Tensor, Tensor]:
    return split[0][:, index], split[1][:, index]


def _wider(x: Tensor) -> Tensor:
    return torch.cat([x, x[..., :1]], dim=-1)


CORRUPTIONS = [
    Corruption("no query set", lambda b: {"train": b["train"]}, r'keys "train" \(support set\) and "test"'),
    Corruption("x without y", lambda b: {**b, "train": b["train"][0]}, r'batch\["train"\] must be an \(x, y\) pair'),
    Corruption(
        "lists, not tensors",
        lambda b: {**b, "test": tuple(t.tolist() for t in b["test"])},
        r'batch\["test"\] must hold tensors',
    ),
    Corruption(
        "no task dimension",
        lambda b: {key: (x[0], y[0]) for key, (x, y) in b.items()},
        "needs a leading task dimension",
    ),
    Corruption(
        "a target short",
        lambda b: {**b, "train": (b["train"][0], b["train"][1][:, :-1])},
        "every input needs exactly one target",
    ),
    Corruption(
        "a query set too many",
        lambda b: {**b, "test": tuple(torch.cat([t, t[:1]]) for t in b["test"])},
        r'batch\["train"\] holds \d+ tasks but batch\["test"\] holds \d+',
    ),
    Corruption(
        "query inputs of another width",
        lambda b: {**b, "test": (_wider(b["test"][0]), b["test"][1])},
        "Support and query sets disagree",
    ),
    Corruption(
        "no tasks", lambda b: {key: _tasks(split, slice(0, 0)) for key, split in b.items()}, "at least one task"
    ),
    Corruption(
        "empty support set", lambda b: {**b, "train": _examples(b["train"], slice(0, 0))}, "at least one support"
    ),
    Corruption("empty query set", lambda b: {**b, "test": _examples(b["test"], slice(0, 0))}, "at least one support"),
    Corruption(
        "inputs the network cannot take",
        lambda b: {key: (_wider(x), y) for key, (x, y) in b.items()},
        "support set: the network cannot take inputs",
    ),
    Corruption(
        "float labels",
        lambda b: {key: (x, y.float()) for key, (x, y) in b.items()},
        "cross_entropy needs integer class labels",
        ("classification",),
    ),
    Corruption(
        "a label beyond the outputs",
        lambda b: {**b, "test": (b["test"][0], b["test"][1] + 1)},
        r"query set: labels range over \[\d+, \d+\] but the network has \d+ outputs",
        ("classification",),
    ),
    Corruption(
        "a negative label",
        lambda b: {**b, "train": (b["train"][0], b["train"][1] - 1)},
        r"support set: labels range over \[-1, -?\d+\]",
        ("classification",),
    ),
    Corruption(
        "targets without an output dimension",
        lambda b: {key: (x, y[..., 0]) for key, (x, y) in b.items()},
        "mse needs targets shaped like the network's output",
        ("regression",),
    ),
]


@settings(max_examples=60, deadline=None, database=None)
@given(problem=PROBLEMS, shape=SHAPES, seed=st.integers(0, 2**16), data=st.data())
def test_every_malformed_batch_raises_a_value_error_naming_the_problem(
    problem: Problem, shape: Shape, seed: int, data: st.DataObject
) -> None:
    corruption = data.draw(st.sampled_from([c for c in CORRUPTIONS if problem in c.problems]), label="corruption")
    batch = corruption.corrupt(episodic_batch(problem, shape, seed))
    with pytest.raises(ValueError, match=corruption.message):
        module_for(problem, shape).meta_gradient(batch)
