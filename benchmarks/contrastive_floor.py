"""The cost floor of a contrastive meta-step: ``Contrastive`` on a ``ComplexSynapse``, written out by hand.

The same arithmetic as the engine (the same free steps on the support set, the same nudged steps on
support plus query, both nudged phases for the symmetric rule, SGD with heavy-ball momentum restarted
at every phase) with no framework around it: the network's forward pass is spelled out with
``torch.nn.functional`` on a list of tensors, the inner updates run in place with torch's foreach
kernels, and the meta-gradient is the complex synapse's closed form instead of a surrogate's backward:

    ``g_omega = lambda (phi_m - phi_p) / s``,  ``g_log_lambda = lambda / 2 [(phi_p - omega)^2 - (phi_m - omega)^2] / s``

with ``phi_p = phi_beta`` and ``phi_m = phi_-beta, s = 2 beta`` (symmetric) or ``phi_m = phi_0, s = beta`` (one-sided).
The benchmark times the engine against this and checks that both give the same meta-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Forward = Callable[[Sequence[Tensor], Tensor], Tensor]
Loss = Callable[[Tensor, Tensor], Tensor]


def conv4_forward(weights: Sequence[Tensor], x: Tensor, smooth: bool = False) -> Tensor:
    """``networks.Conv4`` with its parameters in ``named_parameters()`` order (bias-free convolutions); BatchNorm
    on batch statistics; ``smooth`` as ``Conv4(smooth=True)`` (GELU and average pooling)."""
    for block in range(4):
        conv_weight, norm_weight, norm_bias = weights[3 * block : 3 * block + 3]
        x = F.conv2d(x, conv_weight, padding=1)
        x = F.batch_norm(x, None, None, norm_weight, norm_bias, training=True)
        x = F.avg_pool2d(F.gelu(x), 2) if smooth else F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), weights[12], weights[13])


def mlp_forward(weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """``networks.MLP`` with its parameters in ``named_parameters()`` order."""
    *hidden, readout = zip(weights[::2], weights[1::2], strict=True)
    for weight, bias in hidden:
        x = F.relu(F.linear(x, weight, bias))
    return F.linear(x, *readout)


def contrastive_floor(
    forward: Forward,
    loss: Loss,
    omega: Sequence[Tensor],
    log_strength: Sequence[Tensor],
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    beta: float,
    inner_steps: int,
    nudged_steps: int,
    lr: float,
    momentum: float,
    symmetric: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """One task's contrastive meta-gradient ``(g_omega, g_log_lambda)``, per backbone parameter."""
    strength = [s.exp() for s in log_strength]

    def descend(start: Sequence[Tensor], steps: int, nudge: float) -> list[Tensor]:
        phi = [p.detach().clone().requires_grad_() for p in start]
        velocity = [torch.zeros_like(p) for p in phi]
        for _ in range(steps):
            objective = loss(forward(phi, support[0]), support[1]) + sum(
                (0.5 * s * (p - w).square()).sum() for p, w, s in zip(phi, omega, strength, strict=True)
            )
            if nudge:
                objective = objective + nudge * loss(forward(phi, query[0]), query[1])
            grads = torch.autograd.grad(objective, phi)
            with torch.no_grad():
                torch._foreach_mul_(velocity, momentum)
                torch._foreach_add_(velocity, grads)
                torch._foreach_add_(phi, velocity, alpha=-lr)
        return [p.detach() for p in phi]

    free = descend(omega, inner_steps, 0.0)
    plus = descend(free, nudged_steps, beta)
    minus, scale = (descend(free, nudged_steps, -beta), 2 * beta) if symmetric else (free, beta)
    omega_grad = [s * (m - p) / scale for s, p, m in zip(strength, plus, minus, strict=True)]
    strength_grad = [
        0.5 * s * ((p - w).square() - (m - w).square()) / scale
        for s, w, p, m in zip(strength, omega, plus, minus, strict=True)
    ]
    return omega_grad, strength_grad
