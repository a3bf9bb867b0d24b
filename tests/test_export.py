"""Exporting what was learned as plain PyTorch, reloaded in a fresh process that never imports lightning_contrastive."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_contrastive import ComplexSynapse, Contrastive, DualSystem, MetaLearningModule

# The user's network, as the user's own code would define it: the fresh process gets only this and torch.
NETWORK_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class UsersNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(1, 16)
            self.out = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.hidden(x)))
    """
)
namespace: dict[str, object] = {}
exec(NETWORK_SOURCE, namespace)
UsersNet: type[nn.Module] = namespace["UsersNet"]  # type: ignore[assignment]

RELOAD_SCRIPT = NETWORK_SOURCE + textwrap.dedent(
    """
    import sys

    folder, inputs, outputs = sys.argv[1:]
    network = UsersNet()
    network.load_state_dict(torch.load(f"{folder}/network.pt", weights_only=True))  # strict: every key, no extra
    meta = torch.load(f"{folder}/meta_parameters.pt", weights_only=True)
    x = torch.load(inputs, weights_only=True)
    with torch.no_grad():
        torch.save({"network": network(x), "meta": meta}, outputs)
    assert not any(name.startswith("lightning") for name in sys.modules), "the reload needs no Lightning package"
    """
)


def trained_looking(learner: object) -> MetaLearningModule:
    """A module whose meta-parameters are far from their initial values (gains != 1, shifts != 0, ...)."""
    torch.manual_seed(0)
    module = MetaLearningModule(learner, Contrastive(beta=0.1, inner_steps=3, nudged_steps=2))
    with torch.no_grad():
        for _, parameter in module.learner.named_meta_parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return module


def reload_elsewhere(folder: Path, x: torch.Tensor, tmp_path: Path) -> dict[str, object]:
    """Run :data:`RELOAD_SCRIPT` in a fresh interpreter on ``folder`` and ``x``; what it computed."""
    script, inputs, outputs = tmp_path / "reload.py", tmp_path / "x.pt", tmp_path / "out.pt"
    script.write_text(RELOAD_SCRIPT)
    torch.save(x, inputs)
    subprocess.run([sys.executable, str(script), str(folder), str(inputs), str(outputs)], check=True, cwd=tmp_path)
    return torch.load(outputs, weights_only=True)


@pytest.mark.parametrize("learner_kind", ["complex_synapse", "dual_system"])
def test_export_reloads_without_the_library_and_computes_the_start_of_every_task(
    learner_kind: str, tmp_path: Path
) -> None:
    x = torch.linspace(-5, 5, 7).unsqueeze(-1)
    if learner_kind == "complex_synapse":
        learner = ComplexSynapse(UsersNet(), loss="mse")
    else:
        learner = DualSystem(UsersNet(), loss="mse", example_input=x[:2])
    module = trained_looking(learner)

    paths = module.export(tmp_path / "export")
    assert sorted(path.name for path in paths.values()) == ["meta_parameters.pt", "network.pt"]
    reloaded = reload_elsewhere(tmp_path / "export", x, tmp_path)

    meta = module.learner.meta_parameters()
    with torch.no_grad():
        start = module.learner.predict(module.learner.init_fast(meta), meta, x)  # what every task starts from
    torch.testing.assert_close(reloaded["network"], start, rtol=1e-5, atol=1e-6)
    assert list(reloaded["meta"]) == [name for name, _ in module.learner.named_meta_parameters()]
    for name, parameter in module.learner.named_meta_parameters():
        torch.testing.assert_close(reloaded["meta"][name], parameter.detach(), rtol=0, atol=0, msg=name)


def test_an_adapted_network_saves_and_reloads_without_the_library(tmp_path: Path) -> None:
    module = trained_looking(ComplexSynapse(UsersNet(), loss="mse"))
    x_support, x_query = torch.linspace(-4, 4, 10).unsqueeze(-1), torch.linspace(-5, 5, 7).unsqueeze(-1)
    adapted = module.adapt(x_support, torch.sin(x_support))
    (tmp_path / "adapted").mkdir()
    torch.save(adapted.state_dict(), tmp_path / "adapted" / "network.pt")
    torch.save({}, tmp_path / "adapted" / "meta_parameters.pt")
    reloaded = reload_elsewhere(tmp_path / "adapted", x_query, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded["network"], adapted(x_query), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module(x_support, torch.sin(x_support), x_query), adapted(x_query))


def test_calling_the_module_on_inputs_alone_says_what_to_call() -> None:
    module = trained_looking(ComplexSynapse(UsersNet(), loss="mse"))
    with pytest.raises(TypeError, match="missing 2 required positional arguments: 'y_support' and 'x_query'"):
        module(torch.zeros(3, 1))
