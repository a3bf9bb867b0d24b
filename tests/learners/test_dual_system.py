"""DualSystem: layer discovery, the modulated forward pass, meta-gradients against references, training."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_contrastive import MAML, Contrastive, FirstOrderMAML, Implicit, Reptile, meta_gradient, split_batch
from lightning_contrastive.estimators import Estimator
from lightning_contrastive.learners.dual_system import DualSystem, ModulatedLayer
from lightning_contrastive.tasks import Params

_spec = importlib.util.spec_from_file_location("references", Path(__file__).resolve().parents[1] / "references.py")
references = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(references)  # type: ignore[union-attr]


def sinusoid_batch(generator: torch.Generator, tasks: int, shots: int, queries: int, dtype=torch.float32) -> dict:
    """Sinusoid regression tasks ``y = A sin(x - phase)``, ``A ~ U(0.1, 5)``, ``phase ~ U(0, pi)``, ``x ~ U(-5, 5)``."""
    amplitude = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(tasks, shots + queries, 1, dtype=dtype).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x - phase)
    return {"train": (x[:, :shots], y[:, :shots]), "test": (x[:, shots:], y[:, shots:])}


def image_batch(generator: torch.Generator, tasks: int = 2, ways: int = 3) -> dict:
    """Random 1x4x4 'images' with labels 0..ways-1 (two per class in the support set, one in the query set)."""
    labels = torch.arange(ways)
    return {
        "train": (torch.randn(tasks, 2 * ways, 1, 4, 4, generator=generator), labels.repeat(tasks, 2)),
        "test": (torch.randn(tasks, ways, 1, 4, 4, generator=generator), labels.repeat(tasks, 1)),
    }


def mlp(width: int = 8, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, 1))


def conv_bn(ways: int = 3) -> nn.Sequential:
    """Conv2d + BatchNorm2d block and a linear readout, for 1x4x4 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, ways)
    )


def randomised(fast: Params, generator: torch.Generator) -> Params:
    """``fast`` moved away from its start, so that every gain, shift and readout entry matters."""
    return {name: p + 0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in fast.items()}


def cosine(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    flat_a, flat_b = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    return float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))


def module_state(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_unchanged(module: nn.Module, state: dict[str, Tensor], training: bool) -> None:
    assert module.training is training
    assert all(p.grad is None and p.requires_grad for p in module.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, state[name]), f"{name} of the user's module changed"


ESTIMATORS = {
    "contrastive_symmetric": lambda: Contrastive(beta=0.1, inner_steps=4, nudged_steps=3),
    "contrastive_one_sided": lambda: Contrastive(beta=0.1, symmetric=False, inner_steps=4, nudged_steps=3),
    "maml": lambda: MAML(inner_steps=3),
    "first_order_maml": lambda: FirstOrderMAML(inner_steps=3),
    "implicit": lambda: Implicit(inner_steps=4, cg_steps=3),
}


# --- layer discovery and naming -------------------------------------------------------------------


def test_finds_modulated_layers_after_normalisation_and_names_meta_parameters() -> None:
    primary = nn.Sequential(
        nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Dropout(0.0), nn.Linear(6, 1)
    )
    learner = DualSystem(primary, loss="mse")
    assert learner.modulated == (ModulatedLayer("0", "0", 8, 0), ModulatedLayer("2", "3", 6, 0))
    assert learner.readout_layer == "6"
    assert learner.fast_names == ("gain.0", "shift.0", "gain.2", "shift.2", "readout.weight", "readout.bias")
    assert [name for name, _ in learner.named_meta_parameters()] == [
        "primary.0.weight",
        "primary.0.bias",
        "primary.2.weight",
        "primary.2.bias",
        "primary.3.weight",
        "primary.3.bias",
        "init.gain.0",
        "init.gain.2",
        "init.shift.0",
        "init.shift.2",
        "init.readout.weight",
        "init.readout.bias",
    ]
    meta = learner.meta_parameters()
    assert torch.equal(meta["init.readout.weight"], primary[6].weight)
    assert torch.equal(meta["init.gain.2"], torch.ones(6)) and torch.equal(meta["init.shift.2"], torch.zeros(6))
    assert learner.initialisations() == {name: f"init.{name}" for name in learner.fast_names}


def test_finds_layers_in_nested_custom_modules_and_modulates_convolutions_per_channel() -> None:
    class Network(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU())
            self.head = nn.Linear(48, 2, bias=False)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.features(x).flatten(1))

    learner = DualSystem(Network())
    assert learner.modulated == (ModulatedLayer("features.0", "features.1", 3, 2),)
    assert learner.fast_names == ("gain.features.0", "shift.features.0", "readout.weight")
    assert "primary.head.weight" not in learner.meta_parameters()  # the fast readout replaces the last layer


def test_network_modulator_names_its_code_and_map() -> None:
    learner = DualSystem(mlp(width=5), loss="mse", modulator="network", code_size=3)
    meta = learner.meta_parameters()
    assert learner.fast_names == ("code", "readout.weight", "readout.bias")
    assert meta["modulator.weight"].shape == (20, 3)  # 2 x (5 + 5) gains and shifts from a code of 3
    assert torch.equal(meta["modulator.bias"], torch.cat([torch.ones(10), torch.zeros(10)]))
    assert torch.equal(meta["init.code"], torch.zeros(3))


class HeadFirst(nn.Module):
    """Registers its head before its body, and calls the body first, with a functional ReLU in between."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        self.middle = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.middle(F.relu(self.body(x)))))


class InputDependent(HeadFirst):
    """The same layers, with control flow on the input's values, which torch.fx cannot trace."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if bool(x.sum() < 1e9) else x


@pytest.mark.parametrize("example", [False, True], ids=["traced", "watched"])
def test_layer_order_is_the_forward_passs_not_the_registration_order(example: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    primary, x = HeadFirst(), torch.randn(6, 3, generator=generator)
    learner = DualSystem(primary, loss="mse", example_input=x if example else None)
    assert learner.modulated == (ModulatedLayer("body.0", "body.1", 4, 0), ModulatedLayer("middle", "middle", 5, 0))
    assert learner.readout_layer == "head"
    meta = learner.meta_parameters()
    fast = randomised(learner.init_fast(meta), generator)
    # The forward pass written out: gain and shift after the LayerNorm and after `middle`, the fast readout last.
    hidden = F.layer_norm(x @ primary.body[0].weight.T + primary.body[0].bias, (4,))
    hidden = F.relu(
        fast["gain.body.0"] * (hidden * primary.body[1].weight + primary.body[1].bias) + fast["shift.body.0"]
    )
    hidden = torch.tanh(
        fast["gain.middle"] * (hidden @ primary.middle.weight.T + primary.middle.bias) + fast["shift.middle"]
    )
    expected = hidden @ fast["readout.weight"].T + fast["readout.bias"]
    torch.testing.assert_close(learner.predict(fast, meta, x), expected)


def test_an_untraceable_forward_asks_for_an_example_input_and_works_with_one() -> None:
    with pytest.raises(ValueError, match=r"could not trace.*pass example_input"):
        DualSystem(InputDependent())
    primary = InputDependent()
    primary.body.append(nn.BatchNorm1d(4))
    state = module_state(primary)
    learner = DualSystem(primary, example_input=torch.randn(6, 3))
    assert learner.readout_layer == "head" and learner.modulated[0].site == "body.2"
    assert_unchanged(primary, state, training=True)  # the watched pass ran on a copy: running statistics intact


class Reused(nn.Module):
    def __init__(self, reuse_weight_layer: bool) -> None:
        super().__init__()
        self.reuse_weight_layer = reuse_weight_layer
        self.first, self.second, self.readout, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1), nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.first(x))
        x = self.act(self.first(x) if self.reuse_weight_layer else self.second(x))
        return self.readout(x)


def test_a_reused_activation_is_fine_but_a_reused_weight_layer_is_refused() -> None:
    learner = DualSystem(Reused(reuse_weight_layer=False), loss="mse")
    assert [block.layer for block in learner.modulated] == ["first", "second"]
    with pytest.raises(ValueError, match=r"calls layer 'first' \(Linear\) 2 times.*layer of its own"):
        DualSystem(Reused(reuse_weight_layer=True), loss="mse")


def test_a_layer_whose_weights_are_read_directly_is_refused() -> None:
    class ReadsWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden, self.readout = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.readout(F.linear(x, self.hidden.weight, self.hidden.bias).relu())

    with pytest.raises(ValueError, match=r"never calls layer 'hidden' \(Linear\).*F.linear"):
        DualSystem(ReadsWeights(), loss="mse")


# --- the modulated forward pass -----------------------------------------------------------------


def test_mlp_prediction_is_gain_and_shift_after_the_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    primary = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    learner = DualSystem(primary, loss="mse")
    meta = learner.meta_parameters()
    fast = randomised(learner.init_fast(meta), generator)
    x = torch.randn(5, 1, generator=generator)
    hidden = F.relu(fast["gain.0"] * primary[0](x) + fast["shift.0"])
    hidden = F.relu(fast["gain.2"] * primary[3](primary[2](hidden)) + fast["shift.2"])
    expected = F.linear(hidden, fast["readout.weight"], fast["readout.bias"])
    torch.testing.assert_close(learner.predict(fast, meta, x), expected)


def test_conv_batchnorm_prediction_has_per_channel_gains_after_the_norm() -> None:
    generator = torch.Generator().manual_seed(1)
    primary = conv_bn()
    learner = DualSystem(primary)
    meta = learner.meta_parameters()
    fast = randomised(learner.init_fast(meta), generator)
    assert fast["gain.0"].shape == fast["shift.0"].shape == (3,)
    x = torch.randn(6, 1, 4, 4, generator=generator)
    normalised = F.batch_norm(primary[0](x), None, None, primary[1].weight, primary[1].bias, training=True)
    hidden = F.relu(fast["gain.0"].view(3, 1, 1) * normalised + fast["shift.0"].view(3, 1, 1))
    expected = F.linear(F.max_pool2d(hidden, 2).flatten(1), fast["readout.weight"], fast["readout.bias"])
    torch.testing.assert_close(learner.predict(fast, meta, x), expected)


def test_network_modulator_equals_per_neuron_modulation_it_generates() -> None:
    generator = torch.Generator().manual_seed(2)
    primary = mlp(width=5)
    network = DualSystem(primary, loss="mse", modulator="network", code_size=3)
    per_neuron = DualSystem(primary, loss="mse")
    meta = network.meta_parameters()
    fast = randomised(network.init_fast(meta), generator)
    modulation = F.linear(fast["code"], meta["modulator.weight"], meta["modulator.bias"])
    gains, shifts = modulation[:10], modulation[10:]
    equivalent = {
        "gain.0": gains[:5],
        "gain.2": gains[5:],
        "shift.0": shifts[:5],
        "shift.2": shifts[5:],
        "readout.weight": fast["readout.weight"],
        "readout.bias": fast["readout.bias"],
    }
    x = torch.randn(7, 1, generator=generator)
    torch.testing.assert_close(
        network.predict(fast, meta, x), per_neuron.predict(equivalent, per_neuron.meta_parameters(), x)
    )


@pytest.mark.parametrize("modulator", ["per_neuron", "network"])
@pytest.mark.parametrize("make_primary", [mlp, conv_bn], ids=["mlp", "conv_bn"])
def test_a_task_starts_from_the_unmodulated_primary(make_primary, modulator: str) -> None:
    primary = make_primary()
    code_size = 4 if modulator == "network" else None
    learner = DualSystem(primary, loss="mse", modulator=modulator, code_size=code_size)
    x = torch.randn(6, 1) if make_primary is mlp else torch.randn(6, 1, 4, 4)
    meta = learner.meta_parameters()
    expected = copy.deepcopy(primary)(x)  # a train-mode BatchNorm normalises with batch statistics, as the learner does
    torch.testing.assert_close(learner.predict(learner.init_fast(meta), meta, x), expected)


@pytest.mark.parametrize("modulator", ["per_neuron", "network"])
@pytest.mark.parametrize("make_primary", [mlp, conv_bn], ids=["mlp", "conv_bn"])
def test_as_module_outputs_equal_predict(make_primary, modulator: str) -> None:
    generator = torch.Generator().manual_seed(3)
    learner = DualSystem(make_primary(), modulator=modulator, code_size=4 if modulator == "network" else None)
    meta = learner.meta_parameters()
    fast = randomised(learner.init_fast(meta), generator)
    x = torch.randn(6, 1, generator=generator) if make_primary is mlp else torch.randn(6, 1, 4, 4, generator=generator)
    module = learner.as_module(fast)
    assert isinstance(module, nn.Module)
    torch.testing.assert_close(module(x), learner.predict(fast, meta, x))


def test_works_under_torch_func_transforms() -> None:
    generator = torch.Generator().manual_seed(4)
    learner = DualSystem(mlp(), loss="mse")
    meta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    task = split_batch(sinusoid_batch(generator, 1, 10, 10))[0]
    fast = randomised(learner.init_fast(meta), generator)

    func_grads = torch.func.grad(lambda f: learner.inner_loss(f, meta, task.support))(fast)
    leaves = {name: p.clone().requires_grad_() for name, p in fast.items()}
    autograd_grads = torch.autograd.grad(learner.inner_loss(leaves, meta, task.support), list(leaves.values()))
    torch.testing.assert_close(func_grads, dict(zip(leaves, autograd_grads, strict=True)))

    per_task = [randomised(fast, generator) for _ in range(3)]
    stacked = {name: torch.stack([f[name] for f in per_task]) for name in fast}
    batched = torch.func.vmap(lambda f: learner.predict(f, meta, task.query.x))(stacked)
    torch.testing.assert_close(batched, torch.stack([learner.predict(f, meta, task.query.x) for f in per_task]))


# --- the user's module, estimators, dtypes --------------------------------------------------------


def written_out_conv_bn(batch: dict, modulator: str) -> references.Problem:
    """The dual system on :func:`conv_bn`, cross-entropy, for the batch's first task: per-channel gains and shifts
    after the batch-statistics BatchNorm, then ReLU, max-pool and the fast readout."""
    task = (batch["train"][0][0], batch["train"][1][0], batch["test"][0][0], batch["test"][1][0])

    def block(w: Params, x: Tensor) -> Tensor:
        return references.batch_norm(F.conv2d(x, w["0.weight"], w["0.bias"], padding=1), w["1.weight"], w["1.bias"])

    def after(h: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(h), 2).flatten(1)

    return references.dual_system([block], ["0"], [after], task, "cross_entropy", 0.5, code=modulator == "network")


CONV_REFERENCES = {  # the written-out counterpart of each of ESTIMATORS (implicit's 3 CG steps have none)
    "contrastive_symmetric": lambda p, t: references.contrastive(
        p, t, beta=0.1, symmetric=True, nudge="linear", steps=4, nudged_steps=3, lr=0.01, momentum=0.9
    ),
    "contrastive_one_sided": lambda p, t: references.contrastive(
        p, t, beta=0.1, symmetric=False, nudge="linear", steps=4, nudged_steps=3, lr=0.01, momentum=0.9
    ),
    "maml": lambda p, t: references.maml(p, t, steps=3, lr=0.01, momentum=0.9),
    "first_order_maml": lambda p, t: references.first_order_maml(p, t, steps=3, lr=0.01, momentum=0.9),
}


@pytest.mark.parametrize("estimator_name", list(ESTIMATORS))
@pytest.mark.parametrize("modulator", ["per_neuron", "network"])
def test_every_estimator_runs_and_leaves_the_users_module_unchanged(estimator_name: str, modulator: str) -> None:
    primary = conv_bn().double()
    state = module_state(primary)
    learner = DualSystem(primary, modulator=modulator, code_size=4 if modulator == "network" else None)
    assert_unchanged(primary, state, training=True)

    generator = torch.Generator().manual_seed(5)
    perturbed_meta(learner, generator)
    batch = {key: (x.double(), y) for key, (x, y) in image_batch(generator, tasks=1).items()}
    grads = meta_gradient(learner, ESTIMATORS[estimator_name](), batch)
    assert list(grads) == [name for name, _ in learner.named_meta_parameters()]
    if estimator_name in CONV_REFERENCES:  # float64: agreement to rounding
        expected = CONV_REFERENCES[estimator_name](written_out_conv_bn(batch, modulator), learner.meta_parameters())
        torch.testing.assert_close(grads, expected, rtol=1e-9, atol=1e-12)
    else:
        assert all(grads[name].abs().sum() > 0 for name in grads if name.startswith(("primary.", "modulator.")))
    assert_unchanged(primary, state, training=True)

    with torch.no_grad():  # the learner's weights are copies: updating them leaves the user's module alone
        for p in learner.parameters():
            p.add_(1.0)
    assert_unchanged(primary, state, training=True)


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [(torch.float32, 1e-5), (torch.float64, 1e-13)],  # measured 1.1e-6 - 1.3e-6 and 1.2e-15 - 1.6e-15 (3 seeds)
)
def test_float32_and_float64(dtype: torch.dtype, bound: float) -> None:
    """Each precision's meta-gradient against the float64 written-out reference: float32 loses about eps / beta."""
    learner = DualSystem(mlp().to(dtype), loss="mse")
    assert all(p.dtype == dtype for p in learner.parameters())
    batch = sinusoid_batch(torch.Generator().manual_seed(6), 1, 5, 5, dtype=dtype)
    meta = learner.meta_parameters()
    assert learner.predict(learner.init_fast(meta), meta, batch["train"][0][0]).dtype == dtype
    grads = meta_gradient(learner, Contrastive(inner_steps=5, nudged_steps=3), batch)
    assert all(g.dtype == dtype for g in grads.values())
    in_float64 = {key: (x.double(), y.double()) for key, (x, y) in batch.items()}
    expected = references.contrastive(
        written_out_mlp(in_float64, "per_neuron"),
        {name: p.detach().double() for name, p in meta.items()},
        beta=0.1, symmetric=True, nudge="linear", steps=5, nudged_steps=3, lr=0.01, momentum=0.9,
    )  # fmt: skip
    assert references.relative_error({name: g.double() for name, g in grads.items()}, expected) < bound


def test_reptile_is_rejected_because_the_primary_weights_are_not_initialisations() -> None:
    learner = DualSystem(mlp(), loss="mse")
    with pytest.raises(
        ValueError, match=r"Reptile is defined only for .*initialisations.*DualSystem.*primary\.0\.weight"
    ):
        meta_gradient(learner, Reptile(inner_steps=2), sinusoid_batch(torch.Generator().manual_seed(7), 1, 5, 5))


# --- the pull and meta-gradients against references ----------------------------------------------------


def test_without_pull_the_starts_get_exactly_zero_contrastive_and_implicit_meta_gradient() -> None:
    torch.manual_seed(0)
    learner = DualSystem(mlp(), loss="mse", pull=0.0)
    batch = sinusoid_batch(torch.Generator().manual_seed(8), 2, 10, 10)
    starts = [name for name in learner.meta_parameters() if name.startswith("init.")]
    # Without the pull the inner Hessian after 20 steps is indefinite (gains and readout trade off), which conjugate
    # gradient reports as a fault (still at cg_damping=1 on one task); damping 10 keeps the solve defined, and the
    # starts' gradient is zero whatever the solve returns.
    implicit = Implicit(inner_steps=20, cg_damping=10.0)
    for estimator in (Contrastive(beta=0.01, inner_steps=20, nudged_steps=10), implicit):
        grads = meta_gradient(learner, estimator, batch)
        assert all(torch.equal(grads[name], torch.zeros_like(grads[name])) for name in starts)
        assert all(grads[name].abs().sum() > 0 for name in grads if name.startswith("primary."))
    grads = meta_gradient(learner, MAML(inner_steps=20), batch)  # MAML still learns where tasks start
    assert all(grads[name].abs().sum() > 0 for name in starts)


EXACT_AGREEMENT: dict[str, tuple[Estimator, float]] = {
    # estimator, largest relative error to the exact meta-gradient asserted (measured per_neuron / network)
    "contrastive_linear": (
        Contrastive(beta=1e-3, inner_steps=200, nudged_steps=100, inner_lr=0.02),
        1e-2,
    ),  # 4.7e-3 / 4.0e-3
    "contrastive_full": (
        Contrastive(beta=1e-3, inner_steps=200, nudged_steps=100, inner_lr=0.02, nudge="full"),
        1e-2,  # 4.7e-3 / 4.0e-3
    ),
    "implicit": (Implicit(inner_steps=200, inner_lr=0.02, cg_steps=50), 1e-4),  # 1.8e-5 / 3.4e-5
    "maml": (MAML(inner_steps=200, inner_lr=0.02), 5e-4),  # 1.6e-4 / 7.3e-5
}


@pytest.mark.parametrize("modulator", ["per_neuron", "network"])
def test_meta_gradients_approach_the_exact_implicit_gradient(modulator: str) -> None:
    """The exact meta-gradient ``d/dtheta L_query(m*(theta), theta)`` from dense matrices at the inner minimum
    (Newton-solved, float64), checked by finite differences along a random direction (measured agreement 3e-9
    relative; asserted 1e-6). With ``pull=1`` 200 steps converge the free phase; the contrastive error is then the
    unconverged nudged phases' ``delta / beta``, implicit's and MAML's the free phase's residual."""
    torch.manual_seed(0)
    code_size = 4 if modulator == "network" else None
    learner = DualSystem(mlp().double(), loss="mse", pull=1.0, modulator=modulator, code_size=code_size)
    batch = sinusoid_batch(torch.Generator().manual_seed(1), 1, 10, 10, dtype=torch.float64)
    theta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    problem = written_out_mlp(batch, modulator, pull=1.0)
    exact = references.exact(problem, theta, references.solution(problem, theta))
    direction = {
        name: torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype)
        for name, p in theta.items()
    }
    along = float(references.flat(exact) @ references.flat(direction))
    assert references.finite_difference(problem, theta, direction) == pytest.approx(along, rel=1e-6)
    for name, (estimator, bound) in EXACT_AGREEMENT.items():
        assert references.relative_error(meta_gradient(learner, estimator, batch), exact) < bound, name


# --- training ----------------------------------------------------------------------------------------


def meta_test_mse(learner: DualSystem, estimator: Estimator, batch: dict) -> float:
    """Mean query MSE after each task's free-phase adaptation from the learner's current start."""
    meta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    losses = []
    for task in split_batch(batch):
        adapted = estimator.adapt(learner, meta, task.support).params
        with torch.no_grad():
            losses.append(float(learner.query_loss(adapted, meta, task.query)))
    return sum(losses) / len(losses)


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: for networks this small, a second thread only adds synchronisation, which costs
    over 10x wall time when the CI machine's cores are shared (measured: 13 s on one thread, 216 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_train_on_sinusoids(outer_steps: int) -> tuple[float, float]:
    """Meta-train a 1-32-32-1 ReLU DualSystem with the symmetric contrastive rule (beta 0.1, 20 free and 10 nudged
    steps, inner lr 0.02, pull 1, 5 tasks of 10 shots per step, Adam 5e-3); return the meta-test MSE on 50 held-out
    tasks (50 queries each) before and after."""
    torch.manual_seed(0)
    primary = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    learner = DualSystem(primary, loss="mse", pull=1.0)
    estimator = Contrastive(beta=0.1, inner_steps=20, nudged_steps=10, inner_lr=0.02)
    held_out = sinusoid_batch(torch.Generator().manual_seed(123), 50, 10, 50)
    before = meta_test_mse(learner, estimator, held_out)
    optimizer = torch.optim.Adam(learner.parameters(), lr=5e-3)
    tasks = torch.Generator().manual_seed(1)
    for _ in range(outer_steps):
        grads = meta_gradient(learner, estimator, sinusoid_batch(tasks, 5, 10, 10))
        for name, p in learner.named_meta_parameters():
            p.grad = grads[name]
        optimizer.step()
    return before, meta_test_mse(learner, estimator, held_out)


@pytest.mark.usefixtures("one_thread")
def test_contrastive_meta_training_lowers_sinusoid_mse() -> None:
    """40 outer steps (~6 s): measured meta-test MSE 4.46 -> 1.84 (-59%); asserts at least 30% lower."""
    before, after = meta_train_on_sinusoids(outer_steps=40)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_contrastive_meta_training_lowers_sinusoid_mse_long() -> None:
    """300 outer steps (~35 s): measured meta-test MSE 4.46 -> 0.93 (-79%); asserts at least 65% lower."""
    before, after = meta_train_on_sinusoids(outer_steps=300)
    assert after < 0.35 * before, (before, after)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary", "match"),
    [
        (nn.Linear(3, 1), r"at least one hidden layer.*only the readout \(the primary network itself, Linear\)"),
        (nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), r"at least one hidden layer.*only the readout '1' \(Linear\)"),
        (nn.Sequential(nn.ReLU()), r"at least one hidden layer.*no weight layer.*supported are Linear, Conv1d"),
        (
            nn.Sequential(nn.Linear(1, 4), nn.PReLU(), nn.Linear(4, 1)),
            r"cannot modulate layer '1' \(PReLU\).*supported are Linear, Conv1d, Conv2d, Conv3d",
        ),
        (
            nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 1)),
            r"cannot modulate layer '0' \(Embedding\)",
        ),
        (
            nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 1)),
            r"'0' \(LazyLinear\).*uninitialised.*forward pass",
        ),
    ],
    ids=["bare_linear", "readout_only", "no_weight_layer", "prelu", "embedding", "lazy"],
)
def test_rejects_primaries_it_cannot_modulate(primary: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DualSystem(primary)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pull": -1.0}, r"pull must be >= 0"),
        ({"pull": True}, r"pull must be >= 0"),
        ({"modulator": "film"}, r"modulator must be 'per_neuron' or 'network'; got 'film'"),
        ({"modulator": "network"}, r"needs code_size.*got None"),
        ({"modulator": "network", "code_size": 0}, r"needs code_size.*integer >= 1; got 0"),
        ({"code_size": 4}, r"code_size=4 applies only to modulator='network'"),
    ],
)
def test_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DualSystem(mlp(), loss="mse", **kwargs)


# --- meta-gradients against the independent references --------------------------------------------------------


def written_out_mlp(batch: dict, modulator: str, pull: float = 0.5) -> references.Problem:
    """The dual system on :func:`mlp` (Linear-Tanh-Linear-Tanh-readout), MSE, for the batch's first task."""
    task = (batch["train"][0][0], batch["train"][1][0], batch["test"][0][0], batch["test"][1][0])
    hidden = [lambda w, h, layer=layer: h @ w[f"{layer}.weight"].T + w[f"{layer}.bias"] for layer in ("0", "2")]
    return references.dual_system(hidden, ["0", "2"], [torch.tanh] * 2, task, "mse", pull, code=modulator == "network")


def perturbed_meta(learner: DualSystem, generator: torch.Generator) -> None:
    """Move every meta-parameter (starts included) off its initial value, so that no term vanishes by symmetry."""
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


REFERENCE_ESTIMATORS = {
    "contrastive_full_symmetric": (
        Contrastive(beta=0.1, inner_steps=6, nudged_steps=4, nudge="full", inner_lr=0.05),
        lambda p, t: references.contrastive(
            p, t, beta=0.1, symmetric=True, nudge="full", steps=6, nudged_steps=4, lr=0.05, momentum=0.9
        ),
    ),
    "contrastive_full_one_sided": (
        Contrastive(beta=0.1, symmetric=False, inner_steps=6, nudged_steps=4, nudge="full", inner_lr=0.05),
        lambda p, t: references.contrastive(
            p, t, beta=0.1, symmetric=False, nudge="full", steps=6, nudged_steps=4, lr=0.05, momentum=0.9
        ),
    ),
    "contrastive_linear_symmetric": (
        Contrastive(beta=0.1, inner_steps=6, nudged_steps=4, nudge="linear", inner_lr=0.05),
        lambda p, t: references.contrastive(
            p, t, beta=0.1, symmetric=True, nudge="linear", steps=6, nudged_steps=4, lr=0.05, momentum=0.9
        ),
    ),
    "contrastive_linear_one_sided": (
        Contrastive(beta=0.1, symmetric=False, inner_steps=6, nudged_steps=4, nudge="linear", inner_lr=0.05),
        lambda p, t: references.contrastive(
            p, t, beta=0.1, symmetric=False, nudge="linear", steps=6, nudged_steps=4, lr=0.05, momentum=0.9
        ),
    ),
    "maml": (MAML(inner_steps=4, inner_lr=0.05), lambda p, t: references.maml(p, t, steps=4, lr=0.05, momentum=0.9)),
    "first_order_maml": (
        FirstOrderMAML(inner_steps=4, inner_lr=0.05),
        lambda p, t: references.first_order_maml(p, t, steps=4, lr=0.05, momentum=0.9),
    ),
}


@pytest.mark.parametrize("modulator", ["per_neuron", "network"])
@pytest.mark.parametrize("estimator_name", list(REFERENCE_ESTIMATORS))
def test_meta_gradient_equals_the_written_out_reference(estimator_name: str, modulator: str) -> None:
    """Unconverged phases, float64: every term of every estimate (the direct ``dL_query/dW``, the pull's 1/2 on
    every fast parameter readout included, signs, warm starts) must match the reference to rounding."""
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(0)
    code_size = 3 if modulator == "network" else None
    learner = DualSystem(mlp(width=5).double(), loss="mse", pull=0.5, modulator=modulator, code_size=code_size)
    perturbed_meta(learner, generator)
    batch = sinusoid_batch(generator, 1, 8, 9, dtype=torch.float64)
    estimator, reference = REFERENCE_ESTIMATORS[estimator_name]
    expected = reference(written_out_mlp(batch, modulator), learner.meta_parameters())
    torch.testing.assert_close(meta_gradient(learner, estimator, batch), expected, rtol=1e-9, atol=1e-12)
