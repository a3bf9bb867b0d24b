"""The ``repr`` of the library's configurable objects: their class and settings, as a constructor call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def settings_repr(instance: object, settings: Mapping[str, Any]) -> str:
    """``ClassName(name=value, ...)`` of an object's ``settings``, in their order, with data shown by its size
    rather than its contents: a tensor by shape and dtype, a dataset by its length, a list or tuple of more than
    :data:`SHOWN_ITEMS` by its first ones and its length."""
    return f"{type(instance).__name__}({', '.join(f'{name}={_short_repr(value)}' for name, value in settings.items())})"


SHOWN_ITEMS = 4
"""How many items of a long list :func:`settings_repr` shows."""


def _short_repr(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key!r}: {_short_repr(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = [_short_repr(item) for item in value[:SHOWN_ITEMS]]
        if len(value) > SHOWN_ITEMS:
            items.append(f"... {len(value)} items")
        if isinstance(value, list):
            return f"[{', '.join(items)}]"
        return f"({', '.join(items)}{',' if len(value) == 1 else ''})"
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        try:
            return f"<{type(value).__name__} of {len(value)} items>"  # a dataset
        except (TypeError, OverflowError):  # a 0-d array, or a length beyond sys.maxsize: never fail a repr
            return f"<{type(value).__name__}>"
    return repr(value)
