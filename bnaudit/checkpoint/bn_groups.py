"""BatchNorm layers in a bare state dict: the key groups their buffers leave behind.

A state dict shows every BN layer as a key group `<prefix>.running_mean`, `.running_var`, plus
`.weight` and `.bias` when affine and `.num_batches_tracked` except in FrozenBatchNorm-style
layers. Found from key names, shapes and dtypes alone, never tensor data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class BnGroup:
    """One BN layer in a state dict: its key prefix and attribute → full key."""

    prefix: str
    keys: Mapping[str, str]
    problem: str = ""  # why it cannot be audited as BatchNorm; "" when it can


def find_bn_groups(state_dict: Mapping[str, object]) -> list[BnGroup]:
    """Key groups with running stats, in key order; `problem` names what is not BN-shaped.

    Both running stats, or one next to a counter, make a group: a BN layer, if perhaps a broken
    one. Reads shapes and dtypes only, never tensor data.
    """
    by_prefix: dict[str, dict[str, str]] = {}
    for key, value in state_dict.items():
        prefix, _, attr = key.rpartition(".")
        if attr in BN_KEYS and isinstance(value, Tensor):
            by_prefix.setdefault(prefix, {})[attr] = key
    groups = []
    for prefix, keys in by_prefix.items():
        stats = {"running_mean", "running_var"} & keys.keys()
        if len(stats) == 2 or (stats and "num_batches_tracked" in keys):
            tensors = {a: state_dict[k] for a, k in keys.items()}
            groups.append(BnGroup(prefix, keys, _shape_problem(tensors)))  # type: ignore[arg-type]
    return groups


def _shape_problem(t: Mapping[str, Tensor]) -> str:
    for attr in ("running_mean", "running_var"):
        if attr not in t:
            return f"no {attr}"
    mean, var = t["running_mean"], t["running_var"]
    if not (mean.is_floating_point() and var.is_floating_point()):
        return f"running stats of dtype {mean.dtype}, {var.dtype}"
    if mean.dim() != 1 or mean.shape != var.shape or mean.numel() == 0:
        return f"running_mean {tuple(mean.shape)}, running_var {tuple(var.shape)}"
    for attr in ("weight", "bias"):
        if attr in t and t[attr].shape != mean.shape:
            return f"{attr} {tuple(t[attr].shape)} vs running_mean {tuple(mean.shape)}"
    return ""  # a counter that is no count is a finding on an audited layer (bad-counter)
