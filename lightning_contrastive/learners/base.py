"""The learner interface: what is meta-learned, where a task starts, and what it is judged on."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from lightning_contrastive.losses import LossName, check_targets, get_loss
from lightning_contrastive.tasks import Params, Split, Task


class Learner(nn.Module, ABC):
    """A meta-learnable model, written functionally so that any estimator can drive it.

    A learner owns the meta-parameters ``theta`` (its ``nn.Parameter``\\ s, which the outer optimizer
    updates) and defines, for one task,

    - where the fast parameters ``phi`` start: :meth:`init_fast` (``theta -> phi_init``),
    - the inner loss ``L_in(phi, theta; support) = loss(f(x_s; phi, theta), y_s) + R(phi, theta)``
      (:meth:`inner_loss`, with the regulariser :meth:`regulariser`),
    - the query loss ``L_query(phi, theta; query) = loss(f(x_q; phi, theta), y_q)`` (:meth:`query_loss`),
      which may depend on ``theta`` directly through :meth:`predict`.

    All of them take parameters as dicts of tensors and never read or write module state, so an
    estimator can evaluate them at detached, differentiable or nudged parameters alike.

    Phases are deterministic: :meth:`predict` runs the user's network in evaluation mode (:func:`evaluation_mode`)
    whatever mode the learner is in, so Dropout and any other train-mode randomness are off in every inner phase,
    query evaluation and surrogate. Otherwise the free and nudged phases of a task would see different networks,
    and the contrastive rule, which divides their difference by beta, would amplify that noise by ``1/beta``.
    (BatchNorm is unaffected: see :func:`use_batch_statistics`.)
    """

    def __init__(self, loss: LossName) -> None:
        super().__init__()
        self.loss_name = loss
        self._loss = get_loss(loss)

    def extra_repr(self) -> str:
        """The learner's settings, first line of its ``repr`` (subclasses add theirs after ``loss``)."""
        return f"loss={self.loss_name!r}"

    def __repr__(self) -> str:
        """``nn.Module``'s tree of the learner, with each parameter-free network copy (:func:`functional_copy`)
        shown as the user's layers with their shapes.

        The copies' layers read their weights in their own ``extra_repr`` (``Linear``'s ``bias=True``,
        ``BatchNorm2d``'s ``bias``), so for the duration of the call each removed weight is put back as a
        placeholder of the same shape and dtype on the ``meta`` device (no memory, no values).
        """
        with ExitStack() as stack:
            for module in self.modules():
                if _REMOVED_PARAMETERS in module.__dict__:
                    stack.enter_context(_placeholders_attached(module))
            return super().__repr__()

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The meta-parameters ``theta``, by name: those the estimators differentiate."""
        return self.named_parameters()

    def meta_parameters(self) -> Params:
        """:meth:`named_meta_parameters` as a dict, the form the functional methods take."""
        return dict(self.named_meta_parameters())

    @abstractmethod
    def init_fast(self, meta: Params) -> Params:
        """The task's starting fast parameters, as a (differentiable) function of ``meta``."""

    @abstractmethod
    def predict(self, fast: Params, meta: Params, x: Tensor) -> Tensor:
        """The network's output on inputs ``x`` of one task under parameters ``fast`` and ``meta``."""

    def regulariser(self, fast: Params, meta: Params) -> Tensor:
        """``R(phi, theta)``, added to the support loss in the inner problem; none by default."""
        return next(iter(fast.values())).new_zeros(())

    def initialisations(self) -> dict[str, str]:
        """Fast-parameter name -> name of the meta-parameter it starts as an exact copy of.

        Reptile moves exactly these meta-parameters toward the adapted fast weights; it is defined
        only when every meta-parameter appears here.
        """
        return {}

    def after_meta_step(self) -> None:
        """Restore any constraint on the meta-parameters after an outer optimizer step; none by default.

        (:class:`ComplexSynapse` needs none: its strengths are stored as logarithms.)
        """

    def as_module(self, fast: Params) -> nn.Module:
        """A task's adapted network as a standalone module: ``module(x) == predict(fast, theta, x)``.

        The default wraps a frozen copy of this learner with ``fast`` as parameters; learners whose
        adapted network is a plain copy of a user's module override it to return just that.
        """
        return AdaptedNetwork(self, fast)

    def meta_learned_network(self) -> nn.Module:
        """What was meta-learned, as a plain copy of the user's own network class at the current meta-parameters.

        Returns an instance of the user's module class holding ordinary ``nn.Parameter``\\ s and no library
        objects, whose ``state_dict()`` loads (strictly) into a fresh instance of that class, and whose output is
        ``predict(init_fast(theta), theta, x)``: the network every task starts from. Learners override this; the
        meta-parameters it cannot hold (strengths, pulls) stay in the learner's ``state_dict()``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define meta_learned_network(): override it to return the network a "
            "task starts from as a plain copy of the user's module (see ComplexSynapse or DualSystem), or save "
            "the learner's state_dict() instead."
        )

    def inner_loss(self, fast: Params, meta: Params, support: Split) -> Tensor:
        """``L_in = loss(f(x_s), y_s) + R(phi, theta)``."""
        return self._loss(self.predict(fast, meta, support.x), support.y) + self.regulariser(fast, meta)

    def query_loss(self, fast: Params, meta: Params, query: Split) -> Tensor:
        """``L_query = loss(f(x_q), y_q)``."""
        return self._loss(self.predict(fast, meta, query.x), query.y)

    def check_task(self, task: Task, meta: Params) -> None:
        """Raise ``ValueError`` if the network cannot take ``task``'s inputs or its targets do not suit the loss.

        Costs one forward pass per split, run once per task rather than once per inner step.
        """
        with torch.no_grad():
            fast = {name: p.detach() for name, p in self.init_fast(meta).items()}
            for where, split in (("support set", task.support), ("query set", task.query)):
                try:
                    prediction = self.predict(fast, meta, split.x)
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as error:  # e.g. an input width that the first layer does not take
                    raise ValueError(
                        f"{where}: the network cannot take inputs of shape {tuple(split.x.shape)} "
                        f"(examples, *features): {error}"
                    ) from error
                check_targets(self.loss_name, prediction, split.y, where)


_REMOVED_PARAMETERS = "_lightning_contrastive_removed_parameters"
"""Attribute of a :func:`functional_copy` holding, per removed parameter name, a ``meta``-device placeholder."""


def functional_copy(module: nn.Module) -> tuple[nn.Module, Params]:
    """A parameter-free deep copy of ``module`` for ``functional_call``, and its parameters.

    The copy keeps ``module``'s structure and buffers but no parameters (every call supplies
    them), so a learner holding it neither duplicates the weights nor exposes them to the outer
    optimizer; the user's module is never touched. Each module of the copy remembers the shape and dtype of
    what it lost, as placeholders on the ``meta`` device (no memory), so that :meth:`Learner.__repr__` can print it.
    """
    structure = copy.deepcopy(module)
    params = {name: p.detach().clone() for name, p in structure.named_parameters()}
    for submodule in structure.modules():
        removed = {name: p for name, p in submodule._parameters.items() if p is not None}
        for name in removed:
            del submodule._parameters[name]  # absent parameters (a Linear's bias=None) stay None
        if removed:
            submodule.__dict__[_REMOVED_PARAMETERS] = {
                name: torch.empty_like(p, device="meta").detach() for name, p in removed.items()
            }
    return structure, params


@contextmanager
def _placeholders_attached(module: nn.Module) -> Iterator[None]:
    """Inside the block, ``module`` (a part of a :func:`functional_copy`) holds its removed parameters'
    placeholders again, so that code reading them (its ``extra_repr``) runs."""
    removed = module.__dict__[_REMOVED_PARAMETERS]
    module._parameters.update(removed)
    try:
        yield
    finally:
        for name in removed:
            del module._parameters[name]


def with_parameters(structure: nn.Module, params: Params) -> nn.Module:
    """A deep copy of ``structure`` (from :func:`functional_copy`) holding detached copies of ``params`` as
    ``nn.Parameter``\\ s: an ordinary module again, with nothing of this library left in it."""
    network = copy.deepcopy(structure)
    for submodule in network.modules():
        submodule.__dict__.pop(_REMOVED_PARAMETERS, None)
    for name, value in params.items():
        *path, leaf = name.split(".")
        network.get_submodule(".".join(path)).register_parameter(leaf, nn.Parameter(value.detach().clone()))
    return network


@contextmanager
def evaluation_mode(network: nn.Module) -> Iterator[None]:
    """Run ``network`` in evaluation mode inside the block, then give each of its modules its mode back.

    Switched per call rather than kept, so that the learner's modules report the mode Lightning gives them (it
    warns about modules left in evaluation mode at the start of training). The flags are written straight into
    each module's ``__dict__``, bypassing ``nn.Module.__setattr__`` and any ``train()`` override: through
    ``network.train(False)`` the switch cost 43 us per call on the sinusoid MLP, a sixth of its 243 us forward
    pass; this way 6 us (23 us on Conv4, whose forward takes 8 ms).
    """
    states = [module.__dict__ for module in network.modules()]
    modes = [state["training"] for state in states]
    for state in states:
        state["training"] = False
    try:
        yield
    finally:
        for state, training in zip(states, modes, strict=True):
            state["training"] = training


def use_batch_statistics(module: nn.Module) -> tuple[str, ...]:
    """Make every BatchNorm layer of ``module`` normalise with the statistics of the batch at hand,
    in training and evaluation alike, and track no running statistics (transductive, as in MAML).

    Returns the names of the layers whose running statistics were dropped, for :func:`plain_network`.
    """
    dropped = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            if layer.track_running_stats:
                dropped.append(name)
            layer.track_running_stats = False
            layer.running_mean = None
            layer.running_var = None
            layer.num_batches_tracked = None
    return tuple(dropped)


def plain_network(structure: nn.Module, params: Params, running_statistics: tuple[str, ...]) -> nn.Module:
    """A standalone copy of ``structure`` (from :func:`functional_copy`) holding ``params`` as ``nn.Parameter``\\ s.

    The BatchNorm layers named in ``running_statistics`` get back the running statistics that
    :func:`use_batch_statistics` dropped, at their values in a new layer (mean 0, variance 1, count 0): the learner
    learns none, but without them the state dict would not load into a fresh instance of the user's module. The
    copy computes what the learner computes: its BatchNorm layers are in training mode (they normalise with the
    batch's statistics, and accumulate running ones as any training BatchNorm does) and every other module is in
    evaluation mode (no Dropout, as in the learner's phases).
    """
    network = with_parameters(structure, params)
    like = next(iter(params.values()))
    for name in running_statistics:
        layer = network.get_submodule(name)
        layer.register_buffer("running_mean", like.new_zeros(layer.num_features))
        layer.register_buffer("running_var", like.new_ones(layer.num_features))
        layer.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=like.device))
        layer.track_running_stats = True
    network.eval()
    for layer in network.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.train()
    return network


class ParameterTree(nn.Module):
    """``nn.Parameter``\\ s stored under dotted names, so that ``named_parameters()`` returns them unchanged.

    ``ParameterTree({"0.weight": w})`` holds ``w`` as parameter ``weight`` of child ``0``; it lets a
    learner name a meta-parameter after the backbone parameter it belongs to (``omega.0.weight``).
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            node: nn.Module = self
            for part in path:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]  # type: ignore[assignment]
            node.register_parameter(leaf, nn.Parameter(tensor.detach().clone()))

    def __repr__(self) -> str:
        """One line per tensor, by its dotted name, in the style of ``nn.ParameterDict``: ``(0.weight): Parameter
        containing: [torch.FloatTensor of size 8x1]``, rather than the empty modules that hold them."""
        lines = [f"({name}): {_describe_parameter(p)}" for name, p in self.named_parameters()]
        return f"{type(self).__name__}(" + "".join(f"\n  {line}" for line in lines) + ("\n)" if lines else ")")


def _describe_parameter(p: Tensor) -> str:
    """``nn.ParameterDict``'s wording for a parameter: its type, size and (off the CPU) device."""
    size = "x".join(str(n) for n in p.size())
    device = "" if p.device.type == "cpu" else f" ({p.device})"
    return f"Parameter containing: [{torch.typename(p)} of size {size}{device}]"


class AdaptedNetwork(nn.Module):
    """A learner frozen at its current meta-parameters, with one task's fast parameters, as a module."""

    def __init__(self, learner: Learner, fast: Params) -> None:
        super().__init__()
        self.learner = copy.deepcopy(learner).requires_grad_(False)
        self.fast = ParameterTree(fast)

    def forward(self, x: Tensor) -> Tensor:
        return self.learner.predict(dict(self.fast.named_parameters()), self.learner.meta_parameters(), x)
