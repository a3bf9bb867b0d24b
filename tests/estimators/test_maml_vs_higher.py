"""Second-order MAML against ``higher``, an independent implementation of differentiable inner loops.

The same float64 MLP is wrapped as a complex synapse with learned strengths and adapted with SGD
with momentum; ``higher`` unrolls ``torch.optim.SGD`` on the same inner loss, with
``copy_initial_weights=False`` so that the unrolled loop starts from (and differentiates into) omega.
"""

from __future__ import annotations

import copy

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_contrastive import MAML, ComplexSynapse, meta_gradient

STEPS, LR, MOMENTUM, TASKS, CLASSES = 4, 0.3, 0.9, 2, 3


def test_maml_meta_gradient_matches_higher() -> None:
    torch.manual_seed(3)
    network = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, CLASSES)).double()
    learner = ComplexSynapse(copy.deepcopy(network), loss="cross_entropy", init_lambda=0.5)
    with torch.no_grad():
        for log_strength in learner.get_submodule("lambda").parameters():
            log_strength.uniform_(-1.0, 1.0)
    xs, xq = torch.randn(TASKS, 9, 4, dtype=torch.float64), torch.randn(TASKS, 12, 4, dtype=torch.float64)
    ys, yq = torch.randint(0, CLASSES, (TASKS, 9)), torch.randint(0, CLASSES, (TASKS, 12))

    ours = meta_gradient(
        learner, MAML(inner_steps=STEPS, inner_lr=LR, inner_momentum=MOMENTUM), {"train": (xs, ys), "test": (xq, yq)}
    )

    omega = dict(network.named_parameters())
    log_strengths = {name: learner.get_parameter(f"lambda.{name}").detach().clone().requires_grad_() for name in omega}
    inner_optimizer = torch.optim.SGD(network.parameters(), lr=LR, momentum=MOMENTUM)
    query_losses: list[Tensor] = []
    for task in range(TASKS):
        with higher.innerloop_ctx(network, inner_optimizer, copy_initial_weights=False) as (fast_net, diff_opt):
            for _ in range(STEPS):
                fast = dict(zip(omega, fast_net.parameters(), strict=True))
                pull = sum(
                    (0.5 * log_strengths[name].exp() * (fast[name] - omega[name]).square()).sum() for name in omega
                )
                diff_opt.step(F.cross_entropy(fast_net(xs[task]), ys[task]) + pull)
            query_losses.append(F.cross_entropy(fast_net(xq[task]), yq[task]))
    reference = torch.autograd.grad(torch.stack(query_losses).mean(), [*omega.values(), *log_strengths.values()])
    names = [f"omega.{name}" for name in omega] + [f"lambda.{name}" for name in omega]
    torch.testing.assert_close(ours, dict(zip(names, reference, strict=True)), rtol=1e-10, atol=1e-12)
