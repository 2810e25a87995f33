"""Key groups of a state dict that are one BN module saved under several names.

A module registered twice (`self.b = self.a`) is listed by `state_dict()` under each name, with
the same tensors: torch.save writes one storage for both, so after loading the two key groups
share it. The static audit audits such a module once, under its first name, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from bnaudit.core.layers import KnownAttrs


class SharedGroups:
    """Key groups that are one module saved under several names (a module registered twice:
    `self.b = self.a`), which `state_dict()` lists under each name with the same tensors."""

    def __init__(self) -> None:
        self._first: dict[tuple, str] = {}
        self.aliases: dict[str, list[tuple[str, str]]] = {}
        self._prefixes: list[str] = []

    def seen(self, prefix: str, name: str, tensors: Mapping[str, object]) -> bool:
        """Whether the group `name` with these tensors is one seen before under another name."""
        for key in identities(tensors):
            first = self._first.setdefault(key, name)
            if first != name:
                self.aliases.setdefault(first, []).append((name, key[0]))
                self._prefixes.append(prefix)
                return True
        return False

    @property
    def count(self) -> int:
        """Key groups that were another name of a module already audited."""
        return len(self._prefixes)

    def assumed(self, known: Mapping[str, KnownAttrs]) -> int:
        """Of those, the ones whose eps no archive told."""
        return sum(p not in known for p in self._prefixes)

    def notes(self) -> list[str]:
        out = []
        for first, others in self.aliases.items():
            names = ", ".join(n for n, _ in others)
            how = (
                "share their storage"
                if all(k == "storage" for _, k in others)
                else ("hold byte-identical tensors")
            )
            out.append(
                f"{first} and {names} {how}: one module registered under {len(others) + 1} "
                f"names (a module reused by name), audited once, as {first}"
            )
        return out


def identities(tensors: Mapping[str, object]) -> list[tuple]:
    """What makes two key groups one module: the same storage, or (for statistics that are not
    the initial values, which every fresh layer shares) the same bytes."""
    items = sorted((k, t) for k, t in tensors.items() if isinstance(t, Tensor))
    if not items:
        return []
    where = tuple(
        (k, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        for k, t in items
    )
    found = [("storage", *where)]
    mean, var = tensors.get("running_mean"), tensors.get("running_var")
    initial = (
        isinstance(mean, Tensor)
        and isinstance(var, Tensor)
        and bool((mean == 0).all() and (var == 1).all())
    )
    if not initial:
        raw = ((k, t.dtype, t.reshape(-1).contiguous().view(torch.uint8)) for k, t in items)
        found.append(("bytes", *((k, dtype, b.numpy().tobytes()) for k, dtype, b in raw)))
    return found
