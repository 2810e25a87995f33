"""The fused measurement's numba kernels (imported by `bnaudit.measure.fused` only, never directly).

One call per BN call: per channel, the float64 sum and M2 of x (two passes over the channel's
values while they are in cache), then the reconstruction error of y against the formula with
today's tolerance, its maximum, the maximum ratio to the tolerance and a sum of the errors that
keeps NaN and Inf visible. The inputs are float32 (narrower dtypes are converted first, which is
exact); every accumulation is float64.

Two choices keep it exact and fast:
- fast-math allows reassociation only (no `nnan`/`ninf`: a NaN or Inf must survive the sums);
  each block of values is summed in vector lanes, and the block sums are added with Neumaier
  compensation in `_add`, compiled without fast-math, so the moments are as exact as float64
  allows whatever the number of values (plain lane sums drift by ~√N roundings);
- the maxima use `llvm.maxnum` (`_maxnum`): numba's `max` is a NaN-aware select that blocks
  vectorisation (5-20× slower). maxnum drops NaN, which is safe because any NaN also makes the
  error sum NaN, and the caller then takes the general path.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, config, njit, prange, set_num_threads, types
from numba.core import cgutils
from numba.extending import intrinsic

# Reassociation (vector lanes) and contraction (FMA) only; see the module docstring.
FAST = {"reassoc", "nsz", "contract", "arcp"}
# error_model="numpy": a float division must not check for zero (that check blocks
# vectorisation; the tolerance is ≥ atol > 0 anyway).
OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}
BLOCK = 256  # values of one row summed in lanes before the compensated add
BLOCK_ROWS = 32  # rows of channels-last values likewise


@intrinsic
def _maxnum(typingctx, a, b):
    sig = types.float64(types.float64, types.float64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.DoubleType(), [ir.DoubleType(), ir.DoubleType()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.f64")
        # nnan on the call alone: the maxima may be garbage when a NaN is present, which the
        # error sum then reports.
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return sig, codegen


@intrinsic
def _address(typingctx, addr):
    """The integer `addr` (a tensor's `data_ptr()`) as a pointer, for `carray`."""
    sig = types.voidptr(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@njit(**OPTIONS)
def _add(total: float, comp: float, value: float) -> tuple[float, float]:
    """Neumaier's compensated sum, without fast-math so that the compensation survives."""
    t = total + value
    if abs(total) >= abs(value):
        comp += (total - t) + value
    else:
        comp += (value - t) + total
    return t, comp


@njit(fastmath=FAST, **OPTIONS)
def _row_sum(x):
    # Loops over range(len) of a slice: an index provably ≥ 0 spares numba's wraparound
    # check, which would keep the loop scalar.
    total = 0.0
    for i in range(x.size):
        total += x[i]
    return total


@njit(fastmath=FAST, **OPTIONS)
def _row_m2(x, mean):
    total = 0.0
    for i in range(x.size):
        d = x[i] - mean
        total += d * d
    return total


@njit(fastmath=FAST, **OPTIONS)
def _row_error(x, y, scale, shift, floor, rtol, emax, rmax):
    esum = 0.0
    for i in range(x.size):
        xs = x[i] * scale
        ref = xs + shift
        e = abs(y[i] - ref)
        tol = floor + rtol * (abs(ref) + abs(xs))
        emax = _maxnum(emax, e)
        rmax = _maxnum(rmax, e / tol)
        esum += e
    return emax, rmax, esum


@njit(fastmath=FAST, **OPTIONS)
def _params(mean, var, eps, weight, bias, rtol, atol):
    """s = γ/sqrt(σ² + ε), ref = x·s + (β − μ·s), floor = atol + rtol·|s|·|μ|."""
    scale = 1.0 / np.sqrt(var + eps) * weight
    return scale, bias - mean * scale, atol + rtol * abs(scale) * abs(mean)


@njit(**OPTIONS)
def _rows_channel(
    x, y, batch, channels, inner, c, weight, bias, eps, rmean, rvar, batch_stats, rtol, atol, out
):
    """Channel c of `measure_rows`: writes out[0:4, c]; returns its part of the error sum."""
    n = batch * inner
    total, comp = 0.0, 0.0
    for b in range(batch):
        base = (b * channels + c) * inner
        for s in range(0, inner, BLOCK):
            total, comp = _add(total, comp, _row_sum(x[base + s : base + min(s + BLOCK, inner)]))
    mean = (total + comp) / n
    total, comp = 0.0, 0.0
    for b in range(batch):
        base = (b * channels + c) * inner
        for s in range(0, inner, BLOCK):
            part = _row_m2(x[base + s : base + min(s + BLOCK, inner)], mean)
            total, comp = _add(total, comp, part)
    var = (total + comp) / n
    out[0, c] = mean
    out[1, c] = var
    if y.size == 0:  # the moments only
        return mean + var
    if batch_stats:
        mu, v = mean, var
    else:
        mu, v = rmean[c], rvar[c]
    scale, shift, floor = _params(mu, v, eps[c], weight[c], bias[c], rtol, atol)
    emax, rmax, esum = 0.0, 0.0, 0.0
    for b in range(batch):
        base = (b * channels + c) * inner
        row = slice(base, base + inner)
        emax, rmax, part = _row_error(x[row], y[row], scale, shift, floor, rtol, emax, rmax)
        esum += part
    out[2, c] = emax
    out[3, c] = rmax
    return mean + var + esum


@njit(**OPTIONS)
def _worst(out, channels, moments_only):
    worst = 0.0
    if not moments_only:
        for c in range(channels):
            worst = max(worst, out[3, c])
    return worst


@njit(**OPTIONS)
def measure_rows(
    xp, yp, n, ny, batch, channels, inner, weight, bias, eps, rmean, rvar, batch_stats, rtol,
    atol, op,
):  # fmt: skip
    """[B, C, S] contiguous (NCHW) float32 at address `xp` (n values), the output at `yp` (ny
    values, 0: the moments only): each (b, c) is a run of S values. Writes per channel mean,
    biased var, max err, max ratio into the float64 [4, C] at `op`; returns (error sum, worst
    ratio). Addresses, not arrays: a tensor's data_ptr() costs a fraction of the NumPy views
    and the result tensor a hook would otherwise make on every call.

    One thread; `measure_rows_parallel` shares the channels among threads (`fused._rows_kernel`
    says when).
    """
    x = carray(_address(xp), (n,), np.float32)
    y = carray(_address(yp), (ny,), np.float32)
    out = carray(_address(op), (4, channels), np.float64)
    esum = 0.0
    for c in range(channels):
        esum += _rows_channel(
            x, y, batch, channels, inner, c, weight, bias, eps, rmean, rvar, batch_stats,
            rtol, atol, out,
        )  # fmt: skip
    return esum, _worst(out, channels, y.size == 0)


@njit(parallel=True, **OPTIONS)
def measure_rows_parallel(
    xp, yp, n, ny, batch, channels, inner, weight, bias, eps, rmean, rvar, batch_stats, rtol,
    atol, op,
):  # fmt: skip
    """`measure_rows` with the channels shared among numba's threads: each channel is computed
    as there, by one thread, so every result is the same (the error sum, which only says
    whether everything is finite, is added in another order)."""
    x = carray(_address(xp), (n,), np.float32)
    y = carray(_address(yp), (ny,), np.float32)
    out = carray(_address(op), (4, channels), np.float64)
    parts = np.empty(channels)
    for c in prange(channels):
        parts[c] = _rows_channel(
            x, y, batch, channels, inner, c, weight, bias, eps, rmean, rvar, batch_stats,
            rtol, atol, out,
        )  # fmt: skip
    return np.sum(parts), _worst(out, channels, y.size == 0)


def set_threads(count: int) -> None:
    """Use up to `count` threads in `measure_rows_parallel` (numba's pool caps it)."""
    set_num_threads(max(1, min(count, config.NUMBA_NUM_THREADS)))


@njit(fastmath=FAST, **OPTIONS)
def _inner_sums(x, part):
    """part[c] = Σ x[p, c] over the rows of x ([P, C])."""
    part[:] = 0.0
    for p in range(x.shape[0]):
        row = x[p]
        for c in range(row.size):
            part[c] += row[c]


@njit(fastmath=FAST, **OPTIONS)
def _inner_squares(x, mean, part):
    """part[c] = Σ (x[p, c] − mean[c])² over the rows of x ([P, C])."""
    part[:] = 0.0
    for p in range(x.shape[0]):
        row = x[p]
        for c in range(row.size):
            d = row[c] - mean[c]
            part[c] += d * d


@njit(fastmath=FAST, **OPTIONS)
def _inner_error(x, y, scale, shift, floor, rtol, emax, rmax, esum, centre, slope):
    """The errors of [P, C] values; the tolerance includes slope·|ref − β| = slope·|x·s + centre|,
    the allowance for torch's rounded batch statistics (`formulas.stat_rounding`; the floor
    holds the mean's part), zero where there is none."""
    for p in range(x.shape[0]):
        xr, yr = x[p], y[p]
        for c in range(xr.size):
            xs = xr[c] * scale[c]
            ref = xs + shift[c]
            e = abs(yr[c] - ref)
            tol = floor[c] + rtol * (abs(ref) + abs(xs)) + slope[c] * abs(xs + centre[c])
            emax[c] = _maxnum(emax[c], e)
            rmax[c] = _maxnum(rmax[c], e / tol)
            esum[c] += e


@njit(**OPTIONS)
def measure_inner(
    xp, yp, rows, rows_y, channels, weight, bias, eps, rmean, rvar, batch_stats, rtol, atol, u,
    op, work,
):  # fmt: skip
    """[P, C] float32 with the channels contiguous (channels-last, or BatchNorm1d on [B, C]) at
    address `xp`, the output's `rows_y` rows (0: the moments only) at `yp`, the results at
    `op`, as `measure_rows`. `u` > 0: the unit roundoff of torch's batch statistics, which it
    sums row by row for this layout (`formulas.stat_rounding`), allowed for when
    `batch_stats`. `work` is float64 scratch of [9, C]."""
    x = carray(_address(xp), (rows, channels), np.float32)
    y = carray(_address(yp), (rows_y, channels), np.float32)
    out = carray(_address(op), (4, channels), np.float64)
    total, comp, part = work[0], work[1], work[2]
    scale, shift, floor, esum = work[3], work[4], work[5], work[6]
    centre, slope = work[7], work[8]
    mean, var, emax, rmax = out[0], out[1], out[2], out[3]
    for k in range(2):  # k = 0: the sums, then the mean; k = 1: M2, then the variance
        total[:] = 0.0
        comp[:] = 0.0
        for p in range(0, rows, BLOCK_ROWS):
            block = x[p : min(rows, p + BLOCK_ROWS)]
            if k == 0:
                _inner_sums(block, part)
            else:
                _inner_squares(block, mean, part)
            for c in range(channels):
                total[c], comp[c] = _add(total[c], comp[c], part[c])
        for c in range(channels):
            if k == 0:
                mean[c] = (total[c] + comp[c]) / rows
            else:
                var[c] = (total[c] + comp[c]) / rows
    if y.size == 0:  # the moments only
        return np.sum(mean) + np.sum(var), 0.0
    for c in range(channels):
        if batch_stats:
            mu, v = mean[c], var[c]
        else:
            mu, v = rmean[c], rvar[c]
        scale[c], shift[c], floor[c] = _params(mu, v, eps[c], weight[c], bias[c], rtol, atol)
        centre[c], slope[c] = 0.0, 0.0
        if batch_stats and u > 0:
            d_mean = rows * u * np.sqrt(v + mu * mu)
            floor[c] += abs(scale[c]) * d_mean
            slope[c] = ((rows + 3) * u * v + d_mean * d_mean) / (2 * (v + eps[c]))
            centre[c] = -mu * scale[c]
    emax[:] = 0.0
    rmax[:] = 0.0
    esum[:] = 0.0
    _inner_error(x, y, scale, shift, floor, rtol, emax, rmax, esum, centre, slope)
    esum_all = 0.0
    worst = 0.0
    for c in range(channels):
        esum_all += mean[c] + var[c] + esum[c]
        worst = max(worst, rmax[c])
    return esum_all, worst


@njit(**OPTIONS)
def fold_weight(wp, op, channels, per, scale):
    """W' = W·scale per output channel: float32 [channels, per] at `wp` into `op`, each product
    in float64 and rounded to float32 (as torch's float64 product, then `.to(float32)`). No
    fast-math: every product is rounded as written."""
    w = carray(_address(wp), (channels * per,), np.float32)
    out = carray(_address(op), (channels * per,), np.float32)
    for c in range(channels):
        s = scale[c]
        row = slice(c * per, (c + 1) * per)
        _scale_row(w[row], out[row], s)


@njit(**OPTIONS)
def _scale_row(w, out, s):
    for k in range(w.size):
        out[k] = np.float32(np.float64(w[k]) * s)
