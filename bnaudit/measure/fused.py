"""The measurement of one finite BN call: batch moments and reconstruction error together.

`measure` gives, per channel, the float64 batch mean and biased variance of x, and the maximum
reconstruction error of y with its ratio to the tolerance (`blocked.reconstruction_error`'s
formula), plus whether all of it is finite. On CPU, for float32/float16/bfloat16 activations laid
out NCHW (contiguous) or channels-last, a numba kernel (`bnaudit.measure.fused_kernels`) reads x and
y once per call, keeping the channel's values in cache between its passes; everywhere else (CUDA,
float64, odd strides, numba not installed or BNAUDIT_KERNEL=torch) the float64 blocks of
`bnaudit.core.blocked` compute the same numbers. Both are the fast path of the engine: a call that
is not finite, or that misses the formula, is measured again on the general float64 path, so
verdicts never depend on which of the two ran.

Compiled kernels are cached on disk: in `$NUMBA_CACHE_DIR` when it is set, else in
`~/.cache/bnaudit/numba` (`$XDG_CACHE_HOME/bnaudit/numba`). A cold cache costs a few seconds of
compilation once; keep that folder between CI runs. `BNAUDIT_KERNEL=torch` turns the kernel off.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bnaudit.core import blocked
from bnaudit.core import formulas as F
from bnaudit.core.runtime import machine_busy

KERNEL_ENV = "BNAUDIT_KERNEL"  # "torch": always the float64 blocks, never the numba kernel
# float16 and bfloat16 are converted to float32 (exact) before the kernel: numba has no
# arithmetic for them, and bfloat16 has no numpy dtype.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Measured(NamedTuple):
    """One call, per channel: `block` is float64 [4, C], the batch mean and biased variance of
    x, max |y − ref| and max |y − ref| / tolerance (kept as one tensor: the rows take it as
    it is, `bnaudit.measure.rows`); `finite` and `worst` decide the path taken."""

    block: Tensor
    finite: bool  # x, its moments and every error are finite
    worst: float  # the largest ratio

    @property
    def mean(self) -> Tensor:
        return self.block[0]

    @property
    def var(self) -> Tensor:
        return self.block[1]

    @property
    def err(self) -> Tensor:
        return self.block[2]

    @property
    def ratio(self) -> Tensor:
        return self.block[3]


def measure(
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | Tensor,
    running: tuple[Tensor, Tensor] | None,
    dtype: torch.dtype,
) -> Measured:
    """Moments of `x` and the error of `y` against the BN formula, normalised with the batch
    statistics (`running` None) or with `running` = (mean, var); `eps` may be per channel;
    `dtype` chooses the tolerance. Attributes are float64 [C] tensors."""
    fast = _kernel_measure(x, y, weight, bias, eps, running, dtype)
    if fast is not None:
        return fast
    mean, var = blocked.batch_moments(x)
    ref_mean, ref_var = (mean, var) if running is None else running
    u = F.sum_roundoff(x) if running is None else 0.0
    rounding = F.stat_rounding(F.values_per_channel(x), mean, var, u) if u else None
    err, ratio = blocked.reconstruction_error(
        x, y, ref_mean, ref_var, weight, bias, eps, dtype, rounding
    )
    # One synchronisation: is everything finite, and how far is the worst value?
    probe, worst = torch.stack((mean.sum() + var.sum() + err.sum(), ratio.amax())).tolist()
    block = torch.stack((mean, var, err, ratio)).double()
    return Measured(block, math.isfinite(probe), worst)


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel float64 batch mean and biased variance of `x` (`blocked.batch_moments`)."""
    got = _kernel_measure(x, None, None, None, 0.0, None, torch.float32)
    return (got.mean, got.var) if got is not None else blocked.batch_moments(x)


def cache_dir() -> Path:
    """Where the compiled kernels persist when NUMBA_CACHE_DIR is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnaudit" / "numba"


_UNLOADED = object()
# The kernels module once loaded, or why it could not be (a sentence); _UNLOADED before.
_kernels: ModuleType | str | object = _UNLOADED


def kernels() -> ModuleType | None:
    """The numba kernels, compiled or loaded from the cache on first use; None without numba
    (or with BNAUDIT_KERNEL=torch)."""
    global _kernels
    if os.environ.get(KERNEL_ENV, "").lower() == "torch":
        return None
    if _kernels is _UNLOADED:
        _kernels = _load()
    return _kernels if isinstance(_kernels, ModuleType) else None


def unavailable() -> str | None:
    """Why CPU calls take the torch path instead of the numba kernel, as the report's note
    says it (what ran, and how to get the fast path); None when the kernel is in use."""
    if os.environ.get(KERNEL_ENV, "").lower() == "torch":
        why, fix = f"{KERNEL_ENV}=torch is set", f"unset {KERNEL_ENV} for the numba kernel"
    elif kernels() is not None:
        return None
    else:
        why, fix = str(_kernels), "`pip install numba` (or `pip install 'bnaudit[fast]'`) gives it"
    return (
        f"CPU layers were measured on the torch path, not the numba kernel ({why}): the same "
        f"numbers, at a higher cost per value (docs/cost.md); {fix}"
    )


def _load() -> ModuleType | str:
    try:
        from numba.core import config
    except ImportError:
        return "numba is not installed"
    before = config.CACHE_DIR
    # The cache folder is bound when the kernels are decorated; numba's own setting for
    # everything else in the process is put back.
    if not before:
        config.CACHE_DIR = str(cache_dir())
    try:
        from bnaudit.measure import fused_kernels
    except Exception as error:  # no usable cache folder, an LLVM problem: the torch path works
        return f"numba's kernels did not load: {type(error).__name__}: {error}"
    finally:
        config.CACHE_DIR = before
    return fused_kernels


def _kernel_measure(
    x: Tensor,
    y: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | Tensor,
    running: tuple[Tensor, Tensor] | None,
    dtype: torch.dtype,
) -> Measured | None:
    """The numba kernel's measurement, or None where it does not apply; `y` None: the
    moments only."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or x.dim() < 2 or not x.numel():
        return None
    if y is not None and (
        y.device != x.device
        or y.dtype not in KERNEL_DTYPES
        or y.shape != x.shape
        or x.stride() != y.stride()
    ):
        return None
    layout = _layout(x)
    if layout is None:
        return None
    k = kernels()
    if k is None:
        return None
    c = x.shape[1]
    w = _per_channel(weight, c, 1.0)
    args = (w, _per_channel(bias, c, 0.0), _per_channel(eps, c, 0.0))
    rmean, rvar = (w, w) if running is None else (running[0].numpy(), running[1].numpy())
    return _run(k, layout, x, y, args, rmean, rvar, running is None, dtype)


def _run(
    k: ModuleType,
    layout: str,
    x: Tensor,
    y: Tensor | None,
    args: tuple[np.ndarray, np.ndarray, np.ndarray],
    rmean: np.ndarray,
    rvar: np.ndarray,
    batch: bool,
    dtype: torch.dtype,
) -> Measured:
    """One kernel call on x and y (None: the moments only), their layout checked; the
    kernels read them in memory order through their addresses, float32 (float16 and
    bfloat16 are converted first, exactly, keeping the memory format)."""
    b, c = x.shape[0], x.shape[1]
    x32 = x if x.dtype is torch.float32 else x.float()
    y32 = x32 if y is None else y if y.dtype is torch.float32 else y.float()
    n, ny = x32.numel(), 0 if y is None else y32.numel()
    rtol, atol = F.tolerance(dtype)
    out = torch.empty((4, c), dtype=torch.float64)
    if layout == "rows":
        probe, worst = _rows_kernel(k, x)(
            x32.data_ptr(), y32.data_ptr(), n, ny, b, c, n // (b * c), *args, rmean, rvar,
            batch, rtol, atol, out.data_ptr(),
        )  # fmt: skip
    else:
        # The unit roundoff of torch's row-by-row batch sums, allowed for with batch statistics.
        u = F.sum_roundoff(x) if y is not None else 0.0
        probe, worst = k.measure_inner(
            x32.data_ptr(), y32.data_ptr(), n // c, ny // c, c, *args, rmean, rvar, batch,
            rtol, atol, u, out.data_ptr(), np.empty((9, c)),
        )  # fmt: skip
    return Measured(out, math.isfinite(probe), worst)


# Values from which an NCHW call shares its channels among threads: below, starting them costs
# more than it saves.
PARALLEL_VALUES = 1 << 18


def _rows_kernel(k: ModuleType, x: Tensor):
    """The NCHW kernel for this call: its channels shared among as many threads as torch uses
    (the forward around it runs on all of them), or one thread for a small call, and on a
    machine with more runnable tasks than cores. There numba's parallel region, which returns
    only when every thread of its team has run, waited for descheduled threads: the U-Net's
    audit took 2.28× its plain passes with two busy processes on 2 cores, 1.42× on one thread,
    while sharing saves 0.1–0.2 of a ratio quiet on MobileNetV2 (docs/performance.md)."""
    threads = torch.get_num_threads()
    if threads > 1 and x.numel() >= PARALLEL_VALUES and x.shape[1] > 1 and not machine_busy():
        k.set_threads(threads)
        return k.measure_rows_parallel
    return k.measure_rows


def _layout(x: Tensor) -> str | None:
    """ "rows": NCHW, each (b, c) a contiguous run; "inner": the channels contiguous
    (channels-last, or one value per channel and sample: `formulas.sums_rows_in_order`);
    None: another layout."""
    if F.sums_rows_in_order(x):
        return "inner"
    return "rows" if x.is_contiguous() else None


def fold_weight(weight: Tensor, scale: Tensor) -> Tensor | None:
    """A float32 CPU weight times a float64 `scale` per output channel, each product rounded to
    float32 (`formulas.fold`'s W' in the weight's dtype, bit for bit) in one pass, without the
    float64 product tensor; None where the kernel does not apply (the caller folds in torch)."""
    if weight.dtype is not torch.float32 or weight.device.type != "cpu" or not weight.numel():
        return None
    if not weight.is_contiguous() or scale.dtype is not torch.float64 or not scale.is_cpu:
        return None
    k = kernels()
    if k is None:
        return None
    out = torch.empty_like(weight)
    channels = weight.shape[0]
    s = np.ascontiguousarray(scale.numpy())
    k.fold_weight(weight.data_ptr(), out.data_ptr(), channels, weight.numel() // channels, s)
    return out


def _per_channel(v: Tensor | float | None, channels: int, fill: float) -> np.ndarray:
    if isinstance(v, Tensor):
        return v.numpy()
    return np.full(channels, fill if v is None else v, dtype=np.float64)


class Prepared:
    """`measure` for one layer, its attributes converted for the kernel once, not per call.

    On tiny batches the conversions cost more than the kernel; the numbers are the same as
    `measure`'s (the same kernel and arguments; `tests/test_fused.py` compares them). A call
    the kernel does not take, or with other running stats than the prepared ones, goes to
    `measure`.
    """

    def __init__(
        self,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float | Tensor,
        running: tuple[Tensor, Tensor] | None,
        channels: int,
    ) -> None:
        self.weight, self.bias, self.eps, self.running = weight, bias, eps, running
        self.channels = channels
        cpu = all(t is None or t.device.type == "cpu" for t in (weight, bias, *(running or ())))
        self.ready = cpu and not (isinstance(eps, Tensor) and eps.device.type != "cpu")
        # Loaded at the first CPU call, then kept: BNAUDIT_KERNEL is looked up in os.environ.
        self._kernels: ModuleType | object | None = _UNLOADED
        if self.ready:
            w = _per_channel(weight, channels, 1.0)
            self.args = (w, _per_channel(bias, channels, 0.0), _per_channel(eps, channels, 0.0))
            self.stats = None if running is None else (running[0].numpy(), running[1].numpy())

    def measure(
        self, x: Tensor, y: Tensor, running: tuple[Tensor, Tensor] | None, dtype: torch.dtype
    ) -> Measured:
        """`measure(x, y, weight, bias, eps, running, dtype)` with the prepared attributes."""
        fast = self._kernel(x, y, running, dtype)
        if fast is not None:
            return fast
        return measure(x, y, self.weight, self.bias, self.eps, running, dtype)

    def _kernel(
        self, x: Tensor, y: Tensor, running: tuple[Tensor, Tensor] | None, dtype: torch.dtype
    ) -> Measured | None:
        # The conditions of _kernel_measure, and the prepared attributes must be these.
        if not self.ready:
            return None
        if running is None:
            w = self.args[0]
            rmean, rvar = w, w
        elif (
            self.running is None
            or self.stats is None
            or running[0] is not self.running[0]
            or running[1] is not self.running[1]
        ):
            return None
        else:
            rmean, rvar = self.stats
        if not (x.is_cpu and y.is_cpu) or x.dtype not in KERNEL_DTYPES or x.dim() < 2:
            return None
        shape = x.shape
        if shape[1] != self.channels or not x.numel() or y.dtype not in KERNEL_DTYPES:
            return None
        if y.shape != shape or x.stride() != y.stride():
            return None
        layout = _layout(x)
        k = self._loaded()
        if layout is None or k is None:
            return None
        return _run(k, layout, x, y, self.args, rmean, rvar, running is None, dtype)

    def _loaded(self) -> ModuleType | None:
        if self._kernels is _UNLOADED:
            self._kernels = kernels()
        return self._kernels  # type: ignore[return-value]

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`moments(x)`: the per-channel float64 batch mean and biased variance of `x`."""
        if not self.ready or not x.is_cpu or x.dtype not in KERNEL_DTYPES or x.dim() < 2:
            return moments(x)
        layout = _layout(x)
        k = self._loaded()
        if x.shape[1] != self.channels or not x.numel() or layout is None or k is None:
            return moments(x)
        w = self.args[0]
        got = _run(k, layout, x, None, self.args, w, w, True, torch.float32)
        return got.mean, got.var
