"""Refusals of what a checkpoint holds, decided before the audit reads it.

A pickle may build a huge `bytearray` through a global the weights-only loader allows; a BN
buffer may be a meta, sparse, quantized or complex tensor, or a stride-0 view claiming billions
of elements in a few bytes. Each is refused by name, at the limits of `bnaudit.core.limits`.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnaudit.checkpoint.bn_groups import find_bn_groups
from bnaudit.checkpoint.pickles import hashed_tuple_size, oversized_allocation
from bnaudit.core.errors import CheckpointError
from bnaudit.core.limits import MAX_BN_ELEMENTS, MAX_KEY_NODES, MAX_PICKLE_BYTES
from bnaudit.core.untrusted import quote


def refuse_allocations(path: Path, data_pkl: str | None) -> None:
    """Refuse a pickle that would build a huge bytearray, or hash a huge tuple, before torch
    unpickles it."""
    try:
        if data_pkl is not None:
            with zipfile.ZipFile(path) as zf, zf.open(data_pkl) as f:
                head = f.read(MAX_PICKLE_BYTES)
            pickles = 1
        else:  # legacy: magic number, protocol, system info, then the object
            with path.open("rb") as f:
                head = f.read(MAX_PICKLE_BYTES)
            pickles = 4
        nodes = hashed_tuple_size(io.BytesIO(head), pickles, MAX_KEY_NODES)
        size = None
        if b"bytearray" in head:  # the common case costs one substring search
            size = oversized_allocation(io.BytesIO(head), pickles, MAX_PICKLE_BYTES)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError):
        return  # unreadable: torch.load says why
    if nodes is not None:
        raise CheckpointError(
            f"{path}: refused to load: its pickle hashes a tuple of {nodes} nested elements "
            f"(nested tuples reused through the memo), over bnaudit's limit of {MAX_KEY_NODES} "
            "(MAX_KEY_NODES); hashing it would take hours, and a state dict's keys are strings: "
            "the file is crafted or damaged"
        )
    if size is not None:
        raise CheckpointError(
            f"{path}: refused to load: its pickle builds a bytearray of {size} bytes, over "
            f"bnaudit's limit of {MAX_PICKLE_BYTES} (MAX_PICKLE_BYTES); torch.save never writes "
            "that for a state dict: the file is crafted or damaged"
        )


def check_bn_tensors(state_dict: Mapping[str, Any], path: Path) -> None:
    """Refuse, before any is read, BN tensors that the audit cannot read as plain numbers:
    meta (no data), sparse, quantized, complex, or claiming more elements than any BN layer has
    (a stride-0 tensor of 2^34 elements is 4 bytes in the file)."""
    for group in find_bn_groups(state_dict):
        for key in group.keys.values():
            t = state_dict[key]
            why = tensor_problem(t)
            if why is None and t.numel() > MAX_BN_ELEMENTS:
                why = (
                    f"it claims {t.numel()} elements (shape {tuple(t.shape)}), over bnaudit's "
                    f"limit of {MAX_BN_ELEMENTS} per BN buffer (MAX_BN_ELEMENTS)"
                )
            if why is not None:
                raise CheckpointError(
                    f"{path}: BatchNorm tensor {quote(key)} cannot be audited: {why}; save the "
                    "state dict of a model on the CPU with dense float buffers"
                )


def tensor_problem(t: Tensor) -> str | None:
    """Why `t` is not a dense CPU tensor of real numbers, or None."""
    if t.is_meta:
        return "it is a meta tensor, which holds no data (saved from a model on device 'meta')"
    if t.layout != torch.strided:
        return f"it is a {str(t.layout).removeprefix('torch.')} tensor, not a dense one"
    if t.is_quantized:
        return f"it is quantized ({str(t.dtype).removeprefix('torch.')})"
    if t.is_complex():
        return f"it holds complex numbers ({str(t.dtype).removeprefix('torch.')})"
    if t.dtype in _UNSIGNED_WIDE:
        return f"its dtype {str(t.dtype).removeprefix('torch.')} is not one torch computes with"
    return None


# torch has these dtypes for storage only: most operations (and conversion checks) refuse them.
_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)
