"""The model's torch.fx graph, as the fold pairing and the upstream weights read it.

BN-like layers are kept leaves of the trace, and each conv/linear node's users are counted
without the queries that read only a tensor's metadata (folding cannot change their answer).
"""

from __future__ import annotations

import torch
from torch import nn

from bnaudit.core.layers import layer_kind

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # what an eval-mode BN folds into
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)  # convs not folded

# Queries that read a tensor's metadata, not its values: folding cannot change their answer.
METADATA = frozenset(
    {
        *("size", "dim", "ndim", "ndimension", "shape", "dtype", "device", "layout", "len"),
        *("is_floating_point", "is_complex", "is_contiguous", "is_cuda", "is_cpu", "is_meta"),
        *("is_sparse", "is_quantized", "is_leaf", "is_inference", "requires_grad", "grad_fn"),
        *("numel", "nelement", "stride", "storage_offset", "element_size", "itemsize", "nbytes"),
        *("data_ptr", "names", "get_device", "_version"),
    }
)


class Tracer(torch.fx.Tracer):
    """Keeps every BN-like module a leaf: FrozenBatchNorm and BN subclasses live outside
    torch.nn, and tracing into them would hide them from the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # torch.nn's own modules first: the cheaper test, true for most modules of a model
        return super().is_leaf_module(m, qualname) or layer_kind(m) is not None


def fx_users(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[dict | None, str]:
    """Per conv/linear, the users of its busiest node in the traced graph (metadata aside)."""
    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # data-dependent control flow, among others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"torch.fx could not trace the model: {first}"
    users: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), FOLDABLE):
            names = [u.name for u in node.users if not _is_metadata(u)]
            users[str(node.target)] = max(users.get(str(node.target), []), names, key=len)
    return users, ""


def _is_metadata(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in METADATA
    return node.op == "call_function" and node.target is getattr and node.args[1] in METADATA
