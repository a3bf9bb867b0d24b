"""MetaLearningModule inside real Trainers: the surrogate drives Lightning's optimization, evaluation adapts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from lightning_contrastive import ComplexSynapse, Contrastive, Estimator, FirstOrderMAML, Learner
from lightning_contrastive.data.sinusoid import SinusoidDataModule, SinusoidTasks
from lightning_contrastive.evaluation import mean_and_ci95
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.networks import MLP
from lightning_contrastive.tasks import Split

Batch = Mapping[str, Any]


def sinusoid_batches(count: int, tasks: int = 3, seed: int = 0) -> list[Batch]:
    family = SinusoidTasks(num_tasks=count * tasks, shots=5, test_shots=5, seed=seed)
    return [default_collate([family[b * tasks + i] for i in range(tasks)]) for b in range(count)]


def classification_batch(tasks: int = 4, ways: int = 3, shots: int = 4, seed: int = 0) -> Batch:
    """Gaussian blobs in 2-d, one per class, relabelled 0..ways-1 in every task: labels (tasks, ways*shots) int64."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(tasks, ways, 1, 2, generator=generator)

    def split() -> tuple[Tensor, Tensor]:
        x = centres + torch.randn(tasks, ways, shots, 2, generator=generator)
        y = torch.arange(ways).view(1, ways, 1).expand(tasks, ways, shots)
        return x.reshape(tasks, ways * shots, 2), y.reshape(tasks, ways * shots)

    return {"train": split(), "test": split()}


def loader(batches: list[Batch]) -> DataLoader:
    """Yields exactly ``batches``, in order."""
    return DataLoader(batches, batch_size=None)


SGD = partial(torch.optim.SGD, lr=0.1)


def small_module(
    optimizer: Any = SGD,
    learner: Learner | None = None,
    estimator: Estimator | None = None,
    **kwargs: Any,
) -> MetaLearningModule:
    torch.manual_seed(0)
    return MetaLearningModule(
        learner=learner or ComplexSynapse(MLP(hidden=(16,)), loss="mse", init_lambda=1.0),
        estimator=estimator or Contrastive(beta=0.05, inner_steps=5, nudged_steps=3, inner_lr=0.01),
        optimizer=optimizer,
        **kwargs,
    )


def trainer(tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def meta_parameters(module: MetaLearningModule) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.learner.named_meta_parameters()}


def assert_update(before: dict[str, Tensor], after: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    for name in before:
        torch.testing.assert_close(after[name] - before[name], expected[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ training: the surrogate in Lightning's loop
def test_one_step_applies_the_meta_gradient_and_meta_gradient_changes_no_state() -> None:
    module, (batch,) = small_module(), sinusoid_batches(1)
    before = meta_parameters(module)
    gradient = module.meta_gradient(batch)
    assert all(p.grad is None for p in module.learner.parameters())
    assert_update(before, meta_parameters(module), {name: torch.zeros_like(g) for name, g in gradient.items()})
    assert any(g.abs().max() > 0 for g in gradient.values())

    trainer(max_steps=1).fit(module, loader([batch]))
    assert_update(before, meta_parameters(module), {name: -0.1 * g for name, g in gradient.items()})


def test_gradient_clipping_clips_the_meta_gradient() -> None:
    module, (batch,) = small_module(), sinusoid_batches(1)
    before, gradient = meta_parameters(module), module.meta_gradient(batch)
    norm = math.sqrt(sum(float(g.square().sum()) for g in gradient.values()))
    clip = norm / 4
    trainer(max_steps=1, gradient_clip_val=clip).fit(module, loader([batch]))
    assert_update(before, meta_parameters(module), {name: -0.1 * g * clip / norm for name, g in gradient.items()})


def test_gradient_accumulation_averages_the_meta_gradients_of_the_batches() -> None:
    module, batches = small_module(), sinusoid_batches(2)
    before = meta_parameters(module)
    first, second = (module.meta_gradient(batch) for batch in batches)
    trainer(max_steps=1, accumulate_grad_batches=2).fit(module, loader(batches))
    assert_update(before, meta_parameters(module), {name: -0.1 * (first[name] + second[name]) / 2 for name in first})


def test_mixed_precision_leaves_the_meta_gradient_in_float32() -> None:
    module, (batch,) = small_module(), sinusoid_batches(1)
    before, gradient = meta_parameters(module), module.meta_gradient(batch)
    trainer(max_steps=1, precision="bf16-mixed").fit(module, loader([batch]))
    assert_update(before, meta_parameters(module), {name: -0.1 * g for name, g in gradient.items()})


class CappedStrengths(ComplexSynapse):
    """A complex synapse whose strengths may not exceed ``max_strength``: after_meta_step restores the cap."""

    def __init__(self, *args: Any, max_strength: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_log_strength = math.log(max_strength)
        self.meta_steps_seen = 0

    def after_meta_step(self) -> None:
        self.meta_steps_seen += 1
        with torch.no_grad():
            for name, parameter in self.named_meta_parameters():
                if name.startswith("lambda."):
                    parameter.clamp_(max=self.max_log_strength)


def test_after_meta_step_runs_once_per_optimizer_step() -> None:
    learner = CappedStrengths(MLP(hidden=(8,)), loss="mse", init_lambda=1.0, max_strength=1.0)
    module = small_module(learner=learner, optimizer=partial(torch.optim.SGD, lr=10.0))
    trainer(max_steps=2, accumulate_grad_batches=2).fit(module, loader(sinusoid_batches(4)))
    assert learner.meta_steps_seen == 2
    strengths = [p for name, p in meta_parameters(module).items() if name.startswith("lambda.")]
    assert max(float(p.max()) for p in strengths) <= 1e-6  # log(1) = 0: every strength the SGD step raised is capped
    assert min(float(p.min()) for p in strengths) < -1e-3  # ... and the step did move them


def test_training_logs_query_loss_and_the_loss_at_the_end_of_each_inner_phase() -> None:
    module, (batch,) = small_module(), sinusoid_batches(1)
    meta = meta_parameters(module)
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    expected = statistics.fmean(
        float(
            module.learner.query_loss(
                module.estimator.adapt(module.learner, meta, Split(xs[i], ys[i])).params, meta, Split(xq[i], yq[i])
            )
        )
        for i in range(len(xs))
    )
    run = trainer(max_steps=1, log_every_n_steps=1)
    run.fit(module, loader([batch]))
    phases = ("free", "nudged_pos", "nudged_neg")
    per_phase = {f"inner/{phase}{stat}" for phase in phases for stat in ("", "_steps", "_steps_max", "_residual")}
    per_phase |= {f"inner/{phase}_residual_max" for phase in phases}
    assert set(run.logged_metrics) == {"train/query_loss", *per_phase}  # no inner/unsolved without a tolerance
    assert (
        float(run.logged_metrics["inner/free_steps"]) == 5 and float(run.logged_metrics["inner/nudged_pos_steps"]) == 3
    )
    assert float(run.logged_metrics["train/query_loss"]) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ evaluation
def reference_metrics(module: MetaLearningModule, batches: list[Batch]) -> dict[str, float]:
    """Per-episode query loss and accuracy, by hand, with the mean and the 1.96 sigma / sqrt(n) interval."""
    losses, accuracies = [], []
    for batch in batches:
        for i in range(len(batch["train"][0])):
            network = module.adapt(batch["train"][0][i], batch["train"][1][i])
            with torch.no_grad():
                prediction = network(batch["test"][0][i])
            y = batch["test"][1][i]
            if module.classification:
                losses.append(float(F.cross_entropy(prediction, y)))
                accuracies.append(float((prediction.argmax(-1) == y).float().mean()))
            else:
                losses.append(float(F.mse_loss(prediction, y)))
    result = {}
    for name, values in (("query_loss", losses), ("accuracy", accuracies)):
        if values:
            result[name] = statistics.fmean(values)
            result[f"{name}_ci95"] = 1.959964 * statistics.stdev(values) / math.sqrt(len(values))
    return result


@pytest.mark.parametrize("inference_mode", [True, False], ids=["default_inference_mode", "inference_mode_off"])
def test_validate_and_test_report_mean_and_ci95_over_all_episodes(inference_mode: bool) -> None:
    module, batches = small_module(), sinusoid_batches(3)
    run = trainer(inference_mode=inference_mode)
    (validated,) = run.validate(module, loader(batches), verbose=False)
    (tested,) = run.test(module, loader(batches), verbose=False)
    expected = reference_metrics(module, batches)
    assert validated == pytest.approx({f"val/{name}": value for name, value in expected.items()}, rel=1e-4)
    assert tested == pytest.approx({f"test/{name}": value for name, value in expected.items()}, rel=1e-4)


def test_classification_reports_accuracy() -> None:
    learner = ComplexSynapse(MLP(in_features=2, hidden=(16,), out_features=3), loss="cross_entropy")
    module = small_module(learner=learner, estimator=FirstOrderMAML(inner_steps=10, inner_lr=0.1))
    batches = [classification_batch(seed=0), classification_batch(seed=1)]
    (validated,) = trainer().validate(module, loader(batches), verbose=False)
    expected = reference_metrics(module, batches)
    assert set(validated) == {"val/query_loss", "val/query_loss_ci95", "val/accuracy", "val/accuracy_ci95"}
    assert validated == pytest.approx({f"val/{name}": value for name, value in expected.items()}, rel=1e-4)
    assert validated["val/accuracy"] > 0.6  # well-separated blobs: adaptation really learns the task


@pytest.mark.parametrize("inference_mode", [True, False], ids=["default_inference_mode", "inference_mode_off"])
def test_predict_adapts_to_each_support_set_and_predicts_its_queries(inference_mode: bool) -> None:
    module, batches = small_module(), sinusoid_batches(2, tasks=2)
    predictions = trainer(inference_mode=inference_mode).predict(module, loader(batches))
    assert len(predictions) == 2
    for batch, predicted in zip(batches, predictions, strict=True):
        assert predicted.shape == batch["test"][1].shape
        for i in range(2):
            with torch.no_grad():
                expected = module.adapt(batch["train"][0][i], batch["train"][1][i])(batch["test"][0][i])
            torch.testing.assert_close(predicted[i], expected)


def test_adapt_returns_a_plain_module_with_the_adapted_weights() -> None:
    module, (batch,) = small_module(), sinusoid_batches(1)
    x, y = batch["train"][0][0], batch["train"][1][0]
    with torch.inference_mode():  # adapt works wherever a user may call it
        network = module.adapt(x, y)
    assert type(network) is MLP
    meta = {name: p.detach() for name, p in module.learner.named_meta_parameters()}
    fast = module.estimator.adapt(module.learner, meta, Split(x, y)).params
    query = batch["test"][0][0]
    with torch.no_grad():
        torch.testing.assert_close(network(query), module.learner.predict(fast, meta, query))
        assert F.mse_loss(network(x), y) < F.mse_loss(module.learner.as_module(module.learner.init_fast(meta))(x), y)
    with pytest.raises(ValueError, match="one task's support set"):
        module.adapt(x.squeeze(-1), y)


def test_inputs_of_any_float_dtype_are_cast_to_the_parameters_dtype() -> None:
    module, (batch,) = small_module(), sinusoid_batches(1)
    wide = {key: (x.double(), y.double()) for key, (x, y) in batch.items()}
    for name, gradient in module.meta_gradient(wide).items():
        assert gradient.dtype == torch.float32
        torch.testing.assert_close(gradient, module.meta_gradient(batch)[name])
    (validated,) = trainer().validate(module, loader([wide]), verbose=False)
    expected = {f"val/{name}": value for name, value in reference_metrics(module, [batch]).items()}
    assert validated == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b: {"train": b["train"]}, 'keys "train"'),
        (lambda b: {"train": b["train"], "test": (b["test"][0][:2], b["test"][1][:2])}, "holds 3 tasks"),
        (lambda b: {key: (x, y[..., 0]) for key, (x, y) in b.items()}, "mse needs targets"),
    ],
    ids=["missing_query_set", "mismatched_task_counts", "wrong_target_shape"],
)
def test_bad_batches_raise_value_error_in_every_stage(corrupt: Any, match: str) -> None:
    module = small_module()
    bad = [corrupt(sinusoid_batches(1)[0])]
    with pytest.raises(ValueError, match=match):
        module.meta_gradient(bad[0])
    with pytest.raises(ValueError, match=match):
        trainer(max_steps=1).fit(module, loader(bad))
    run = trainer()
    for stage in (run.validate, run.test, run.predict):
        with pytest.raises(ValueError, match=match):
            stage(module, loader(bad))


def test_arguments_of_the_wrong_kind_raise_value_error() -> None:
    with pytest.raises(ValueError, match="learner must be"):
        MetaLearningModule(MLP(), Contrastive())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator must be"):
        MetaLearningModule(ComplexSynapse(MLP(), loss="mse"), "contrastive")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        small_module(lr_scheduler_interval="batch")


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_of_a_module_built_in_python_loads_with_its_learner_and_estimator(tmp_path: Path) -> None:
    module = small_module()
    run = trainer(tmp_path, max_steps=2)
    run.fit(module, loader(sinusoid_batches(2)))
    path = tmp_path / "meta.ckpt"
    run.save_checkpoint(path)
    assert dict(torch.load(path, weights_only=True)["hyper_parameters"]) == {
        "lr_scheduler_interval": "step",
        "on_inner_fault": "stop",
        "batched": None,
        "cpu_threads": "auto",
    }
    restored = MetaLearningModule.load_from_checkpoint(
        path, learner=ComplexSynapse(MLP(hidden=(16,)), loss="mse"), estimator=module.estimator
    )
    for name, value in meta_parameters(module).items():
        torch.testing.assert_close(meta_parameters(restored)[name], value)


# ------------------------------------------------------------------ the proof: meta-training helps
def meta_test_mse(module: MetaLearningModule, data: SinusoidDataModule) -> tuple[float, float]:
    (result,) = trainer().test(module, data, verbose=False)
    return result["test/query_loss"], result["test/query_loss_ci95"]


def meta_train_sinusoid(meta_steps: int, eval_tasks: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Meta-test MSE (mean, ci95) of the untrained start and after ``meta_steps`` symmetric contrastive steps."""
    pl.seed_everything(0, verbose=False)
    data = SinusoidDataModule(shots=10, test_shots=10, batch_size=5, num_eval_tasks=eval_tasks, eval_batch_size=50)
    module = MetaLearningModule(
        ComplexSynapse(MLP(), loss="mse", init_lambda=1.0),
        Contrastive(beta=0.03, symmetric=True, inner_steps=20, nudged_steps=10, inner_lr=0.005, inner_momentum=0.9),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
    )
    untrained = meta_test_mse(module, data)
    trainer(max_steps=meta_steps, limit_val_batches=0).fit(module, data)
    return untrained, meta_test_mse(module, data)


def test_meta_training_halves_the_meta_test_mse() -> None:
    (before, before_ci), (after, after_ci) = meta_train_sinusoid(meta_steps=250, eval_tasks=100)
    assert after <= 0.5 * before, f"MSE {before:.3f} ± {before_ci:.3f} -> {after:.3f} ± {after_ci:.3f}"


@pytest.mark.slow
def test_longer_meta_training_cuts_the_meta_test_mse_to_a_third() -> None:
    (before, before_ci), (after, after_ci) = meta_train_sinusoid(meta_steps=800, eval_tasks=600)
    assert after + after_ci <= (before - before_ci) / 3, (
        f"MSE {before:.3f} ± {before_ci:.3f} -> {after:.3f} ± {after_ci:.3f}"
    )


def test_mean_and_ci95_match_the_textbook_formula() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, ci95 = mean_and_ci95(values)
    assert float(mean) == pytest.approx(3.5)
    assert float(ci95) == pytest.approx(1.959964 * statistics.stdev([1, 2, 4, 7]) / 2, rel=1e-6)
    assert math.isnan(float(mean_and_ci95(torch.tensor([1.0]))[1]))


@pytest.mark.slow
def test_distributed_evaluation_aggregates_the_episodes_of_every_rank() -> None:
    module = small_module()
    data = SinusoidDataModule(shots=5, test_shots=5, num_eval_tasks=8, eval_batch_size=2)
    (single,) = trainer().validate(module, data, verbose=False)
    (distributed,) = trainer(accelerator="cpu", devices=2, strategy="ddp_spawn").validate(module, data, verbose=False)
    assert distributed == pytest.approx(single, rel=1e-5)  # the interval too: one set of 8 episodes, not 2 of 4


class ThreadsSeen(pl.Callback):
    """Records torch's intra-op thread count at every training and test batch."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def on_train_batch_start(self, *args: Any) -> None:
        self.seen.add(torch.get_num_threads())

    def on_test_batch_start(self, *args: Any) -> None:
        self.seen.add(torch.get_num_threads())


@pytest.mark.parametrize(
    ("cpu_threads", "omp_num_threads", "expected"),
    [("auto", None, 1), ("auto", "3", 2), (None, None, 2), (3, None, 3), (3, "1", 3)],
)
def test_cpu_threads_apply_while_the_trainer_runs_and_are_restored_after(
    cpu_threads: Any, omp_num_threads: str | None, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``"auto"``: one thread unless OMP_NUM_THREADS is set (then torch's setting stands, here 2); an int wins."""
    if omp_num_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_num_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        module, seen = small_module(cpu_threads=cpu_threads), ThreadsSeen()
        run = trainer(max_steps=2, callbacks=[seen], limit_val_batches=0)
        run.fit(module, loader(sinusoid_batches(2)))
        run.test(module, loader(sinusoid_batches(1)), verbose=False)
        assert seen.seen == {expected}
        assert torch.get_num_threads() == 2  # the caller's setting, back
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cpu_threads", [0, -1, True, "all", 1.5])
def test_cpu_threads_that_mean_nothing_are_refused(cpu_threads: Any) -> None:
    with pytest.raises(ValueError, match='cpu_threads must be "auto", None or an integer >= 1'):
        small_module(cpu_threads=cpu_threads)
