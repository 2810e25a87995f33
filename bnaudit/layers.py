"""Finding BatchNorm layers, snapshotting their attributes, and putting their state back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Every torch BN flavour (1d/2d/3d, Lazy*, SyncBatchNorm) subclasses _BatchNorm.
BN_MODULE_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)

# The forwards that compute plain BN; a subclass overriding forward may compute something else.
_STANDARD_FORWARDS = frozenset({_BatchNorm.forward, nn.SyncBatchNorm.forward})


def find_bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(qualified name, module) of every BN layer, in registration order, each module once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_MODULE_TYPES)]


@dataclass(frozen=True)
class LayerAttrs:
    """A BN layer's attributes, copied as float64 on the layer's device.

    These are the γ, β, μ_r, σ²_r, ε, m, T of BN-NOTES; a copy, so the audit's own train-mode
    forwards cannot change what it compares against.
    """

    type_name: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: int | None
    dtype: torch.dtype
    overrides_forward: bool

    @classmethod
    def of(cls, module: _BatchNorm) -> LayerAttrs:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(torch.float64, copy=True)

        nbt = getattr(module, "num_batches_tracked", None)
        weight = getattr(module, "weight", None)
        return cls(
            type_name=type(module).__name__,
            num_features=int(module.num_features),
            eps=float(module.eps),
            momentum=None if module.momentum is None else float(module.momentum),
            affine=bool(module.affine),
            track_running_stats=module.running_mean is not None,
            weight=copy(weight),
            bias=copy(getattr(module, "bias", None)),
            running_mean=copy(module.running_mean),
            running_var=copy(module.running_var),
            num_batches_tracked=None if nbt is None else int(nbt.item()),
            dtype=weight.dtype if weight is not None else _buffer_dtype(module),
            overrides_forward=type(module).forward not in _STANDARD_FORWARDS,
        )

    @property
    def has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None


def _buffer_dtype(module: nn.Module) -> torch.dtype:
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def preserved(model: nn.Module, layers: list[tuple[str, _BatchNorm]]) -> Iterator[None]:
    """Restore every module's mode and every BN layer's buffers and momentum on exit.

    Buffers are copied back in place, so tensors the caller holds stay the ones in the model.
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [
        (m, m.momentum, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)})
        for _, m in layers
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, buffers in saved:
                m.momentum = momentum
                for key, value in buffers.items():
                    getattr(m, key).copy_(value)
        for m, training in modes:
            m.training = training
