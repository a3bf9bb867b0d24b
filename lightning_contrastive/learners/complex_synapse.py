"""The complex synapse: every weight has a fast part and consolidated weight and strength."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_contrastive.learners.base import (
    Learner,
    ParameterTree,
    evaluation_mode,
    functional_copy,
    plain_network,
    use_batch_statistics,
    with_parameters,
)
from lightning_contrastive.losses import LossName
from lightning_contrastive.tasks import Params


class ComplexSynapse(Learner):
    """Each synapse ``i`` of ``backbone`` holds a fast weight ``phi_i`` and two consolidated
    meta-parameters: a weight ``omega_i`` and a strength ``lambda_i > 0``.

    The fast weights start at ``omega`` and learn a task under the inner loss

        ``L_in(phi, theta) = loss(f(x_s; phi), y_s) + sum_i lambda_i / 2 (phi_i - omega_i)^2``,

    and the query loss ``loss(f(x_q; phi), y_q)`` does not depend on ``theta`` directly. The
    contrastive update is then local to each synapse: ``delta omega_i ∝ lambda_i (phi_beta,i - phi_0,i) / beta``.

    Meta-parameters are named ``omega.<backbone parameter name>`` and, when ``learn_lambda``,
    ``lambda.<backbone parameter name>``. The ``lambda.*`` tensors hold **log**-strengths
    (``lambda = exp(.)``), which keeps strengths positive under any outer optimizer.

    Batch normalisation policy: every ``BatchNorm`` layer of the backbone normalises with the
    statistics of the batch it is given (the support set in the inner phases, the query set when
    evaluating the query loss), in training and evaluation alike, and keeps no running statistics,
    as the authors and MAML do. Dropout and any other train-mode randomness are off in every phase (the backbone
    runs in evaluation mode; see :class:`~lightning_contrastive.Learner`). The learner works on its own copy of
    ``backbone``; the user's module, its weights and its running statistics are never modified.

    Args:
        backbone: any ``nn.Module``; ``omega`` starts from its current weights.
        loss: ``"cross_entropy"`` (integer labels) or ``"mse"`` (regression targets).
        init_lambda: the starting strength of every synapse, > 0.
        learn_lambda: meta-learn per-synapse strengths; otherwise they stay at ``init_lambda``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: LossName = "cross_entropy",
        init_lambda: float = 0.5,
        learn_lambda: bool = True,
    ) -> None:
        super().__init__(loss)
        if not init_lambda > 0:
            raise ValueError(
                f"init_lambda must be > 0 (it is the strength pulling fast weights to omega); got {init_lambda}."
            )
        self.backbone, weights = functional_copy(backbone)
        self._tracked_batch_norms = use_batch_statistics(self.backbone)
        self.fast_names = tuple(weights)
        self.init_lambda = float(init_lambda)
        self.learn_lambda = learn_lambda
        self.omega = ParameterTree(weights)
        if learn_lambda:
            log_strengths = {name: torch.full_like(w, math.log(init_lambda)) for name, w in weights.items()}
            self.add_module("lambda", ParameterTree(log_strengths))

    def extra_repr(self) -> str:
        """Loss and strengths: ``loss='mse', init_lambda=0.5, learn_lambda=True``."""
        return f"{super().extra_repr()}, init_lambda={self.init_lambda}, learn_lambda={self.learn_lambda}"

    def init_fast(self, meta: Params) -> Params:
        """``phi = omega``."""
        return {name: meta[f"omega.{name}"] for name in self.fast_names}

    def predict(self, fast: Params, meta: Params, x: Tensor) -> Tensor:
        """``f(x; phi)``: the backbone under the fast weights (in evaluation mode: deterministic phases)."""
        with evaluation_mode(self.backbone):
            return functional_call(self.backbone, fast, (x,))

    def as_module(self, fast: Params) -> nn.Module:
        """A copy of the backbone carrying the task's fast weights, in evaluation mode as in the phases (its
        BatchNorm layers use batch statistics in either mode)."""
        return with_parameters(self.backbone, fast).eval()

    def meta_learned_network(self) -> nn.Module:
        """The backbone with its weights at ``omega``, as a plain copy of the user's module.

        Its ``state_dict()`` loads strictly into a fresh instance of the backbone's class, and it computes
        ``predict(init_fast(theta), theta, x)`` (see :func:`~lightning_contrastive.learners.base.plain_network`
        for BatchNorm and Dropout). The strengths ``lambda`` stay in the learner's ``state_dict()``.
        """
        meta = self.meta_parameters()
        return plain_network(
            self.backbone, {name: meta[f"omega.{name}"] for name in self.fast_names}, self._tracked_batch_norms
        )

    def strengths(self, meta: Params) -> dict[str, Tensor | float]:
        """``lambda`` per backbone parameter (the constant ``init_lambda`` when not learned)."""
        if self.learn_lambda:
            return {name: meta[f"lambda.{name}"].exp() for name in self.fast_names}
        return dict.fromkeys(self.fast_names, self.init_lambda)

    def regulariser(self, fast: Params, meta: Params) -> Tensor:
        """``R = sum_i lambda_i / 2 (phi_i - omega_i)^2``."""
        strengths = self.strengths(meta)
        return sum(
            (0.5 * strengths[name] * (fast[name] - meta[f"omega.{name}"]).square()).sum() for name in self.fast_names
        )  # type: ignore[return-value]

    def initialisations(self) -> dict[str, str]:
        """Every fast weight starts as a copy of its ``omega``."""
        return {name: f"omega.{name}" for name in self.fast_names}
