"""Mixed precision: the model's forward under `torch.autocast`, as it is deployed.

Under autocast the convolutions and matmuls before a BN layer run in bfloat16 or float16, and
the BN layer runs in the dtype of what it receives: the probes measure each call in the dtype
of its output, so every layer's tolerances follow the precision it actually ran in. Only the
model's forward is autocast; the audit's own arithmetic stays in float64.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bnaudit.core.errors import BnauditError

if TYPE_CHECKING:  # torch is imported when used: the CLI reads this module before torch loads
    import torch
    from torch import nn


class Autocast(str, enum.Enum):
    """The `--autocast` choice."""

    OFF = "off"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype | None:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.value)


@contextlib.contextmanager
def autocast_forward(model: nn.Module, choice: Autocast, device: torch.device) -> Iterator[None]:
    """Every forward of `model` runs under torch.autocast(device, choice) until exit; the model
    is put back as it was (its own `forward` attribute, if it had one, restored)."""
    import torch

    dtype = choice.dtype
    if dtype is None:
        yield
        return
    try:
        torch.autocast(device.type, dtype=dtype)  # refuses a device/dtype it does not support
    except (RuntimeError, ValueError) as exc:
        raise BnauditError(f"--autocast {choice.value} on {device}: {exc}") from None
    own = model.__dict__.get("forward")
    inner = model.forward

    @functools.wraps(inner)  # keeps the signature, which decides how batches are passed
    def forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            return inner(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own  # type: ignore[method-assign]


def note(choice: Autocast, device: torch.device) -> str:
    return (
        f"forward under torch.autocast({device.type!r}, {choice.dtype}): each BN layer is "
        "measured in the dtype it ran in, with that dtype's tolerances"
    )
