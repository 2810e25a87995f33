"""Walking the nested containers that batches and model outputs come in.

Models return tensors inside tuples, NamedTuples (torchvision's GoogLeNet and Inception in
train mode), dataclasses (Hugging Face-style outputs), dicts and lists, nested; loaders yield
batches shaped the same way. Rebuilding a NamedTuple needs `_make` (its constructor takes the
fields as arguments, not one iterable), and a dataclass needs its fields by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """`obj` with every tensor replaced by `fn(tensor)`, each container rebuilt as its type."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if is_namedtuple(obj):
        return type(obj)._make(map_tensors(fn, o) for o in obj)
    if isinstance(obj, (list, tuple)):
        items = [map_tensors(fn, o) for o in obj]
        return items if type(obj) is list else _rebuilt(obj, items)
    if isinstance(obj, dict):
        items = {k: map_tensors(fn, v) for k, v in obj.items()}
        return _rebuilt(obj, items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: map_tensors(fn, getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.init and hasattr(obj, f.name)
        }
        return dataclasses.replace(obj, **changes)
    return obj


def tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in `obj`, in order (dict values in insertion order)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors(getattr(obj, f.name, None))


def is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields") and hasattr(obj, "_make")


def _rebuilt(obj: Any, items: Any) -> Any:
    """The same container type around new items; a plain one when the type cannot be rebuilt
    from them (a subclass whose constructor takes other arguments)."""
    try:
        return type(obj)(items)
    except Exception:
        return type(items)(items) if isinstance(items, dict) else tuple(items)
