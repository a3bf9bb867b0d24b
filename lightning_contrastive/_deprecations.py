"""Old public names kept working for one release, each with a ``DeprecationWarning`` naming its replacement.

The policy (CHANGELOG.md): a public name that is renamed keeps working for one release and warns, so that an
upgrade never breaks a script, a config or a checkpoint without telling its owner what to change; it is removed in
the release after. Lightning-free.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any


class MovedModule(ModuleType):
    """A module's old import path, registered in ``sys.modules`` in place of a file: attribute access warns and
    forwards to the module's new path.

    No file is left under the old name: ``lightning_contrastive.meta_gradient`` is also the function the package
    exports, and a module file of that name would shadow it (or be shadowed by it) depending on import order. Dunder
    lookups (``__path__``, ``__file__``, what the import system and tools probe) raise ``AttributeError`` silently.
    """

    def __init__(self, old: str, new: ModuleType) -> None:
        super().__init__(old, f"Deprecated: the old path of :mod:`{new.__name__}`.")
        self._moved_to = new
        # ``from <old path> import *`` gives what the old module gave.
        self.__all__ = getattr(new, "__all__", [name for name in vars(new) if not name.startswith("_")])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = getattr(self._moved_to, name)  # a name the module never had is a plain AttributeError, no warning
        new = self._moved_to.__name__
        warnings.warn(
            f"The module {self.__name__} is deprecated and will be removed in the next release: it is now {new}. "
            f"Use `from {new} import {name}`.",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    def __dir__(self) -> list[str]:
        return dir(self._moved_to)


def renamed_argument(owner: str, old: str, old_value: Any, new: str, new_value: Any, new_default: Any) -> Any:
    """The value of argument ``new`` of ``owner`` when its old name ``old`` may have been passed instead.

    ``old_value`` is ``None`` when the old name was not passed. Passed, it warns and wins over ``new``'s default;
    a conflict (``new`` also set, to another value) is a ``ValueError``. ``new`` counts as set only when it differs
    from its default: configuration parsers (jsonargparse, ``LightningCLI``) pass every default explicitly.
    """
    if old_value is None:
        return new_value
    warnings.warn(
        f"{owner}({old}=...) is deprecated and will be removed in the next release: it was renamed {new}. "
        f"Pass {new}={old_value!r} instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    if new_value != new_default and new_value != old_value:
        raise ValueError(
            f"{owner} got both {new}={new_value!r} and its deprecated name {old}={old_value!r}; pass only {new}."
        )
    return old_value
