"""The dual system: a slow primary network modulated by a fast system that learns each task."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_contrastive.learners.base import (
    Learner,
    ParameterTree,
    evaluation_mode,
    functional_copy,
    plain_network,
    use_batch_statistics,
)
from lightning_contrastive.losses import LossName
from lightning_contrastive.tasks import Params

ModulatorKind = Literal["per_neuron", "network"]

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose output units (features, or channels for convolutions) the fast system modulates."""

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # every BatchNorm and InstanceNorm, SyncBatchNorm included
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # torch >= 2.4
)
"""Normalisation layers: a weight layer's modulation moves after the last of these that follows it."""


@dataclass(frozen=True)
class ModulatedLayer:
    """A hidden weight layer of the primary network and where its modulation is applied.

    Attributes:
        layer: the weight layer's name in the primary network (also the key of its gain and shift).
        site: the module whose output is modulated: the last normalisation layer between ``layer`` and
            the next weight layer, or ``layer`` itself when there is none.
        units: output features (``Linear``) or channels (convolutions): one gain and one shift each.
        trailing_dims: dimensions after the unit dimension in the site's output (0 for ``Linear``,
            the spatial dimensions for convolutions), over which a unit's gain and shift are shared.
    """

    layer: str
    site: str
    units: int
    trailing_dims: int


class DualSystem(Learner):
    """A primary network whose weights are slow meta-parameters, modulated per task by a fast system.

    Each hidden unit ``i`` of the primary network (each channel of a convolution) gets a fast gain
    ``g_i`` and shift ``s_i``, applied after any normalisation layer (which would otherwise cancel them),

        ``h = act(g * norm(W x + b) + s)``,

    and the primary's last weight layer is replaced by a fast readout ``(V, c)``. The fast system
    ``m = (g, s, V, c)`` learns each task in the inner loop under

        ``L_in(m, theta) = loss(f(x_s; m, W), y_s) + pull / 2 ||m - m0||^2``,

    while the primary weights ``W`` (every parameter of the primary except its last layer, normalisation
    affines included) are changed only by the meta-update. The query loss ``loss(f(x_q; m, W), y_q)``
    depends on ``W`` directly, which the contrastive rule's ``beta dL_query/dtheta`` term carries.

    Where the fast parts start (``m0``, meta-parameters ``init.<fast name>``):

    - gains ``gain.<layer>`` at 1 and shifts ``shift.<layer>`` at 0, so a task starts from the
      unmodulated primary network;
    - the readout ``readout.weight`` / ``readout.bias`` at the primary's last layer's weights;

    all of them then meta-learned. With ``modulator="network"`` the fast variable is instead a task code
    ``code`` (starting at ``init.code = 0``) that a linear map, the modulator (meta-parameters
    ``modulator.weight``, ``modulator.bias``), turns into every gain and shift:
    ``(g, s) = A code + a``, with ``a`` starting at (1, 0) so a zero code leaves the primary unchanged.
    A linear map (as CAVIA maps its context parameters to FiLM gains and shifts) makes the modulations a
    learned ``code_size``-dimensional affine subspace of the per-neuron ones: fewer fast variables per
    task, and no nonlinearity added to the inner problem.

    The pull: without it (``pull=0``) the inner loss does not depend on ``m0``, so the contrastive rule
    (like implicit differentiation) gives ``m0`` no meta-gradient: ``meta_gradient`` reports it as
    exactly zero, and only estimators that differentiate through the start (``MAML``,
    ``FirstOrderMAML``) learn it. Without the pull the inner problem is also badly conditioned (the
    readout and the gains trade off freely) and the symmetric rule's ``-beta`` phase, which
    pushes the query loss up, can diverge: keep ``pull > 0`` for the contrastive rule, large enough to
    outweigh ``beta`` times the query loss's curvature (on sinusoid regression with ``beta = 0.1``,
    ``pull = 0.1`` let the ``-beta`` phase diverge within 400 meta-steps; 0.5 and 1 did not).

    How layers are found: in the order the primary's forward pass calls them (:func:`call_order`: traced
    with ``torch.fx``, or watched on ``example_input``), not the order they were registered in. ``Linear`` and
    ``Conv1d/2d/3d`` layers are weight layers: the last one called is the readout and every other one is
    modulated. A normalisation layer (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm, LocalResponseNorm)
    moves the modulation of the weight layer called before it to its own output. Parameter-free layers and
    functions (activations, pooling, ``Flatten``, dropout, ``F.relu``) are passed through; any other layer with
    parameters, and a weight or normalisation layer called twice (a shared layer) or never, raise ``ValueError``.
    Normalisation written as a function inside a custom ``forward`` is invisible to this search.

    Implementation: a parameter-free copy of the primary is run with ``torch.func.functional_call``,
    the modulation added by forward hooks registered for that call only (hooks, rather than re-running
    a layer list, so that any module whose layers can be found works, not only ``nn.Sequential``). It
    works under double backward (MAML) and ``torch.func`` transforms and never touches the user's
    module, whose weights are copied at construction (take the trained network, with its starting modulation
    folded in, from :meth:`meta_learned_network`, or a task's adapted one from :meth:`as_module`).
    BatchNorm layers always normalise with the statistics of the batch they are given, and Dropout is off in every
    phase (the primary runs in evaluation mode), as in :class:`~lightning_contrastive.learners.ComplexSynapse`.

    Cost: one forward pass of the primary per prediction plus an elementwise gain and shift per
    modulated layer (and a ``code_size x 2U`` matrix-vector product for the network modulator, ``U``
    the number of modulated units); the fast system has ``2U`` (or ``code_size``) variables plus the
    readout's.

    Args:
        primary: the primary network, built from the layers above; its last weight layer is the readout.
        loss: ``"cross_entropy"`` (integer labels) or ``"mse"`` (regression targets).
        pull: strength of the pull of every fast parameter toward its learned start, >= 0.
        modulator: ``"per_neuron"`` (a fast gain and shift per unit) or ``"network"`` (a fast task
            code mapped to every gain and shift by a learned linear modulator).
        code_size: length of the task code; required for ``modulator="network"``, not accepted otherwise.
        example_input: a batch of inputs for the primary, needed only when its forward pass cannot be traced
            without data (``torch.fx`` fails on control flow that depends on the input); its values do not matter.
    """

    def __init__(
        self,
        primary: nn.Module,
        loss: LossName = "cross_entropy",
        pull: float = 0.5,
        modulator: ModulatorKind = "per_neuron",
        code_size: int | None = None,
        example_input: Tensor | None = None,
    ) -> None:
        super().__init__(loss)
        if isinstance(pull, bool) or not pull >= 0:
            raise ValueError(
                f"pull must be >= 0 (the strength pulling fast parameters toward their learned start); got {pull!r}."
            )
        _check_modulator(modulator, code_size)
        self.pull = float(pull)
        self.modulator_kind = modulator
        self.code_size = code_size
        self.modulated, self.readout_layer = find_layers(primary, example_input)
        self.network, weights = functional_copy(primary)
        self._tracked_batch_norms = use_batch_statistics(self.network)
        readout_prefix = f"{self.readout_layer}."
        self.readout_names = {
            f"readout.{name.removeprefix(readout_prefix)}": name for name in weights if name.startswith(readout_prefix)
        }
        self.primary = ParameterTree({name: w for name, w in weights.items() if not name.startswith(readout_prefix)})
        like = weights[next(iter(self.readout_names.values()))]
        units = sum(block.units for block in self.modulated)
        starts: Params = {}
        if modulator == "network":
            starts["code"] = like.new_zeros(code_size)  # type: ignore[arg-type]
            self.modulator = nn.Linear(code_size, 2 * units, device=like.device, dtype=like.dtype)  # type: ignore[arg-type]
            with torch.no_grad():
                self.modulator.bias.copy_(torch.cat([like.new_ones(units), like.new_zeros(units)]))
        else:
            for block in self.modulated:
                starts[f"gain.{block.layer}"] = like.new_ones(block.units)
                starts[f"shift.{block.layer}"] = like.new_zeros(block.units)
        starts |= {fast: weights[name] for fast, name in self.readout_names.items()}
        self.fast_names = tuple(starts)
        self.init = ParameterTree(starts)

    def extra_repr(self) -> str:
        """Settings, then where the fast system acts: each modulated layer (its units, and the normalisation layer
        its gains and shifts follow, if any) and the readout, by their names in the primary network."""
        code = f", code_size={self.code_size}" if self.modulator_kind == "network" else ""
        sites = "".join(
            f"\n{block.layer}: {block.units} units" + (f", after {block.site}" if block.site != block.layer else "")
            for block in self.modulated
        )
        return (
            f"{super().extra_repr()}, pull={self.pull}, modulator={self.modulator_kind!r}{code}"
            f"\nmodulated layers:{_indented(sites)}\nreadout: {self.readout_layer}"
        )

    def init_fast(self, meta: Params) -> Params:
        """``m = m0``: every fast parameter starts at its ``init.*`` meta-parameter."""
        return {name: meta[f"init.{name}"] for name in self.fast_names}

    def modulations(self, fast: Params, meta: Params) -> dict[str, tuple[Tensor, Tensor]]:
        """The gain and shift of every modulated layer, by layer name, each of shape ``(units,)``."""
        if self.modulator_kind == "per_neuron":
            return {
                block.layer: (fast[f"gain.{block.layer}"], fast[f"shift.{block.layer}"]) for block in self.modulated
            }
        sizes = [block.units for block in self.modulated]
        modulation = F.linear(fast["code"], meta["modulator.weight"], meta["modulator.bias"])
        gains, shifts = (half.split(sizes) for half in modulation.chunk(2))
        return {block.layer: (g, s) for block, g, s in zip(self.modulated, gains, shifts, strict=True)}

    def predict(self, fast: Params, meta: Params, x: Tensor) -> Tensor:
        """The primary network under slow weights ``primary.*``, modulated by ``fast``, with the fast readout."""
        with self._modulated(self.modulations(fast, meta)), evaluation_mode(self.network):
            return functional_call(self.network, self._network_weights(fast, meta), (x,))

    def meta_learned_network(self) -> nn.Module:
        """The network a task starts from, as a plain copy of the user's primary network.

        It holds the slow weights ``primary.*``, the readout at its start ``init.readout.*``, and the starting
        modulation (``init.gain.*``/``init.shift.*``, or the modulator at ``init.code``) folded into the layer at
        each modulation's site: a gain ``g`` and shift ``s`` on the output ``h = w * z + b`` of a ``Linear`` or
        convolution (``w`` its rows) or of a normalisation layer (``w``, ``b`` its affine) fold exactly, as
        ``g h + s = (g w) * z + (g b + s)``. Its ``state_dict()`` loads strictly into a fresh instance of the
        primary's class, and it computes ``predict(init_fast(theta), theta, x)`` (see
        :func:`~lightning_contrastive.learners.base.plain_network` for BatchNorm and Dropout). The pull and the
        modulator stay in the learner's ``state_dict()``.

        Raises:
            ValueError: naming the layer, when a modulation site has no bias (or no affine weight) to fold into.
                Adding one would break the promise that the state dict loads into the user's class, so the fix is
                the user's: give that layer a bias (``bias=True``, ``affine=True``, ``elementwise_affine=True``).
        """
        meta = {name: p.detach() for name, p in self.meta_parameters().items()}
        fast = self.init_fast(meta)
        weights = self._network_weights(fast, meta)
        for block, (gain, shift) in zip(self.modulated, self.modulations(fast, meta).values(), strict=True):
            weights |= self._folded(block, gain, shift, weights)
        return plain_network(self.network, weights, self._tracked_batch_norms)

    def regulariser(self, fast: Params, meta: Params) -> Tensor:
        """``R = pull / 2 ||m - m0||^2`` over every fast parameter, readout included."""
        if not self.pull:
            return super().regulariser(fast, meta)
        return 0.5 * self.pull * sum((fast[name] - meta[f"init.{name}"]).square().sum() for name in self.fast_names)  # type: ignore[return-value]

    def initialisations(self) -> dict[str, str]:
        """Every fast parameter starts as a copy of its ``init.*``; the ``primary.*`` weights start nothing."""
        return {name: f"init.{name}" for name in self.fast_names}

    def _network_weights(self, fast: Params, meta: Params) -> Params:
        """The primary's parameters under their names in it: slow ones from ``meta``, the readout from ``fast``."""
        weights = {name.removeprefix("primary."): w for name, w in meta.items() if name.startswith("primary.")}
        return weights | {name: fast[readout] for readout, name in self.readout_names.items()}

    def _folded(self, block: ModulatedLayer, gain: Tensor, shift: Tensor, weights: Params) -> Params:
        """The weight and bias of ``block``'s site with ``h -> gain * h + shift`` folded into them."""
        site = self.network.get_submodule(block.site)
        weight, bias = weights.get(f"{block.site}.weight"), weights.get(f"{block.site}.bias")
        if weight is None or bias is None:
            missing = " and ".join(part for part, t in (("weight", weight), ("bias", bias)) if t is None)
            raise ValueError(
                f"meta_learned_network cannot fold the modulation of {block.layer!r} into "
                f"{_describe(block.site, site)}: it has no {missing}, so a fresh instance of the primary network "
                "has nowhere to hold the learned gains and shifts. Give that layer one (bias=True, affine=True or "
                "elementwise_affine=True), or keep the learner's state_dict() instead."
            )
        spans_trailing = isinstance(site, nn.LayerNorm)  # its affine covers every normalised dimension
        if weight.shape[0] != block.units or (spans_trailing and weight.dim() != 1 + block.trailing_dims):
            raise ValueError(
                f"meta_learned_network cannot fold per-unit gains and shifts of {block.layer!r} into "
                f"{_describe(block.site, site)}, whose affine weight has shape {tuple(weight.shape)}: it must have "
                f"{block.units} units on its first dimension"
                f"{f' and {block.trailing_dims} more after it' if spans_trailing else ''}."
            )

        def along_units(t: Tensor, like: Tensor) -> Tensor:
            return t.view(block.units, *[1] * (like.dim() - 1))

        return {
            f"{block.site}.weight": along_units(gain, weight) * weight,
            f"{block.site}.bias": along_units(gain, bias) * bias + along_units(shift, bias),
        }

    @contextmanager
    def _modulated(self, modulations: dict[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
        """Apply ``modulations`` at their sites for the duration of one call on the network copy."""
        handles = []
        try:
            for block in self.modulated:
                gain, shift = (t.view(block.units, *[1] * block.trailing_dims) for t in modulations[block.layer])
                handles.append(
                    self.network.get_submodule(block.site).register_forward_hook(_gain_and_shift(gain, shift))
                )
            yield
        finally:
            for handle in handles:
                handle.remove()


def find_layers(primary: nn.Module, example_input: Tensor | None = None) -> tuple[tuple[ModulatedLayer, ...], str]:
    """The primary network's modulated layers and the name of its readout, in the order its forward pass calls them.

    The order comes from :func:`call_order`, never from the order the layers were registered in: a network that
    registers its head before its body still gets its readout on the head.

    Raises:
        ValueError: naming the layer, for a layer with parameters that is neither a weight layer nor a
            normalisation layer, for uninitialised (lazy) parameters, for a weight or normalisation layer the
            forward pass calls more than once or never, when there is no hidden weight layer before the readout,
            and when the forward pass cannot be traced (see :func:`call_order`).
    """
    supported = (
        f"supported are {', '.join(t.__name__ for t in WEIGHT_LAYERS)} (modulated; the last one called is the "
        "readout), normalisation layers (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm, LocalResponseNorm; "
        "the modulation goes after them) and layers without parameters"
    )
    for name, module in primary.named_modules():
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
            raise ValueError(
                f"DualSystem: layer {_describe(name, module)} has uninitialised (lazy) parameters; run one forward "
                "pass through the primary network before wrapping it."
            )
        if (
            not isinstance(module, WEIGHT_LAYERS + NORM_LAYERS)
            and next(module.parameters(recurse=False), None) is not None
        ):
            raise ValueError(f"DualSystem cannot modulate layer {_describe(name, module)}: {supported}.")
    calls = call_order(primary, example_input)
    for name, module in primary.named_modules():
        if isinstance(module, WEIGHT_LAYERS + NORM_LAYERS) and calls.count(name) != 1:
            if calls.count(name) > 1:
                raise ValueError(
                    f"DualSystem: the forward pass calls layer {_describe(name, module)} {calls.count(name)} times; "
                    "its gains and shifts (or the fast readout) would then act on several layers of units at "
                    "once. Give each use a layer of its own (e.g. copy.deepcopy(layer))."
                )
            if next(module.parameters(recurse=False), None) is not None:
                raise ValueError(
                    f"DualSystem: the forward pass never calls layer {_describe(name, module)}, so where its "
                    "weights act cannot be told (a forward that reads them directly, as F.linear(x, layer.weight), "
                    "looks the same). Call the layer as a module, or remove it from the primary network."
                )
    layers: list[tuple[str, nn.Module]] = []
    sites: dict[str, str] = {}
    for name in calls:
        module = primary.get_submodule(name)
        if isinstance(module, WEIGHT_LAYERS):
            layers.append((name, module))
            sites[name] = name
        elif layers:  # a normalisation layer: the last weight layer's modulation moves after it
            sites[layers[-1][0]] = name
    if len(layers) < 2:
        found = f"only the readout {_describe(*layers[0])}" if layers else "no weight layer"
        raise ValueError(
            f"DualSystem needs a primary network with at least one hidden layer to modulate before its readout, "
            f"but found {found}; {supported}."
        )
    *hidden, (readout, _) = layers
    modulated = tuple(
        ModulatedLayer(
            layer=name,
            site=sites[name],
            units=module.out_features if isinstance(module, nn.Linear) else module.out_channels,
            trailing_dims=0 if isinstance(module, nn.Linear) else len(module.kernel_size),
        )
        for name, module in hidden
    )
    return modulated, readout


def call_order(primary: nn.Module, example_input: Tensor | None = None) -> list[str]:
    """The names of the primary's weight and normalisation layers in the order its forward pass calls them,
    once per call.

    Either way the forward pass is that of a copy in evaluation mode, as the learner runs it (the user's module
    and its running statistics are untouched). With ``example_input``, one forward pass on it is watched with hooks
    (without gradients): what the forward pass does on real data, whatever its code looks like. Without, the
    forward pass is traced symbolically with ``torch.fx`` (no data needed, so configs need not supply an input),
    which fails on control flow that depends on the input's values or shape; that failure raises ``ValueError``
    asking for ``example_input``. The layer structure must be known when the learner is built, since it decides
    the meta-parameters' names and shapes, which the outer optimizer needs before any data is seen.
    """
    layers = (*WEIGHT_LAYERS, *NORM_LAYERS)
    network = copy.deepcopy(primary).eval()
    if example_input is not None:
        names = {module: name for name, module in network.named_modules()}
        calls: list[str] = []
        handles = [
            module.register_forward_hook(lambda module, inputs, output: calls.append(names[module]))
            for module in names
            if isinstance(module, layers)
        ]
        try:
            with torch.no_grad():
                network(example_input)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    if isinstance(network, layers):  # fx traces into the root module, so a bare layer never shows as a call
        return [""]

    class LayerTracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return isinstance(module, layers) or super().is_leaf_module(module, qualified_name)

    try:
        graph = LayerTracer().trace(network)
    except Exception as error:  # torch.fx raises several types (TraceError, TypeError, ...) for untraceable code
        raise ValueError(
            f"DualSystem could not trace the primary network's forward pass without data ({type(error).__name__}: "
            f"{error}); pass example_input=<a batch of inputs> so that it can watch one forward pass instead."
        ) from error
    return [
        str(node.target)
        for node in graph.nodes
        if node.op == "call_module" and isinstance(network.get_submodule(str(node.target)), layers)
    ]


def _gain_and_shift(gain: Tensor, shift: Tensor) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
    """A forward hook replacing a module's output ``h`` by ``gain * h + shift``."""

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return gain * output + shift

    return hook


def _indented(lines: str) -> str:
    return lines.replace("\n", "\n  ")


def _describe(name: str, module: nn.Module) -> str:
    return f"{name!r} ({type(module).__name__})" if name else f"(the primary network itself, {type(module).__name__})"


def _check_modulator(modulator: str, code_size: int | None) -> None:
    if modulator not in ("per_neuron", "network"):
        raise ValueError(f"modulator must be 'per_neuron' or 'network'; got {modulator!r}.")
    if modulator == "per_neuron" and code_size is not None:
        raise ValueError(
            f"code_size={code_size!r} applies only to modulator='network'; leave it unset for 'per_neuron', "
            "whose fast variables are the gains and shifts themselves."
        )
    if modulator == "network" and (isinstance(code_size, bool) or not isinstance(code_size, int) or code_size < 1):
        raise ValueError(
            f"modulator='network' needs code_size, the length of the fast task code, as an integer >= 1; "
            f"got {code_size!r}."
        )
