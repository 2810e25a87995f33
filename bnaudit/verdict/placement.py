"""A checkpoint's BN layer against its place in a deployed artifact: the verdict and findings.

Pure functions of tensors and numbers: the checkpoint's layer (`LayerAttrs`) and what the
artifact holds for it, either a BatchNormalization node (its parameters, eps, training flag) or
the conv/linear it was folded into (W', b', compared with the fold of the checkpoint's conv and
BN, `bnaudit.core.formulas.fold`). Tolerances are those of the artifact's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs
from bnaudit.verdict.codes import artifact_hint
from bnaudit.verdict.results import MODEL, Finding, Placement, Severity

PLACES = (
    "kept",
    "folded",
    "training-mode",
    "eps-mismatch",
    "kept-stale",
    "folded-stale",
    "precision-loss",
    "missing",
)
_EPS_RTOL = 1e-3  # eps is a float32 attribute in ONNX: 1e-5 is stored as 9.99999975e-06
_TINY = 1e-30
_FLOAT32_RTOL = F.TOLERANCES[torch.float32][0]  # keeps an exact zero from dividing by zero


def _finding(layer: str, code: str, severity: Severity, message: str, value=None, limit=None):
    return Finding(layer, code, severity, message, artifact_hint(code), value, limit)


def _ratio(got: Tensor, want: Tensor, spread: Tensor, rtol: float) -> float:
    """max |got − want| / (rtol·spread), float64; NaN where either holds a NaN."""
    err = F.mismatch(got.double(), want.double())
    return float((err / (rtol * spread.double() + _TINY)).max()) if err.numel() else 0.0


def _scale(gamma: Tensor | None, var: Tensor, eps: float) -> Tensor:
    s = torch.rsqrt(var.double() + eps)
    return s if gamma is None else s * gamma.double()


def training_mode(layer: str, where: str) -> Finding:
    message = (
        f"{where} normalises with batch statistics (ONNX training_mode=1, or training=True): "
        "the deployed output depends on the batch, and a batch of one sample fails"
    )
    return _finding(layer, "training-mode", Severity.FAIL, message)


def judge_node(
    layer: str,
    a: LayerAttrs,
    found: Mapping[str, Tensor],
    *,
    eps: float,
    training: bool,
    where: str,
) -> tuple[Placement, tuple[Finding, ...]]:
    """The layer kept as a BN node: training flag, then eps, then its parameters."""
    assert a.running_mean is not None and a.running_var is not None
    dtype = found["running_var"].dtype
    rtol = F.tolerance(dtype)[0]
    if training:
        return Placement("training-mode", where), (training_mode(layer, where),)
    if abs(eps - a.eps) > _EPS_RTOL * a.eps:
        return _eps_mismatch(layer, a, eps, where, rtol)
    mine = {
        "running_mean": a.running_mean,
        "running_var": a.running_var,
        "weight": a.weight,
        "bias": a.bias,
    }
    # Against the checkpoint rounded to the artifact's dtype: a converted artifact rounds.
    worst = 0.0
    for key, want in mine.items():
        if want is None or key not in found:
            continue
        held = a.buffer_dtype if key.startswith("running") else a.dtype
        rounded = want.to(held).to(found[key].dtype).double()
        worst = max(worst, _ratio(found[key], rounded, rounded.abs(), _FLOAT32_RTOL))
    if not worst <= 1:
        message = (
            f"{where} holds other statistics than the checkpoint: worst parameter differs by "
            f"{worst:.3g}x the float32 tolerance"
        )
        return Placement("kept-stale", where, worst), (
            _finding(layer, "kept-stale", Severity.FAIL, message, worst, 1.0),
        )
    return _rounding(layer, a, found, where, rtol)


def _rounding(
    layer: str, a: LayerAttrs, found: Mapping[str, Tensor], where: str, rtol: float
) -> tuple[Placement, tuple[Finding, ...]]:
    """Same parameters up to the artifact's rounding: does the rounding change the layer?"""
    assert a.running_var is not None
    want = _scale(a.weight, a.running_var, a.eps)
    gamma = found.get("weight")
    got = _scale(None if gamma is None else gamma.double(), found["running_var"].double(), a.eps)
    change = _ratio(got, want, want.abs(), 1.0)  # relative change of γ/sqrt(σ² + ε)
    ratio = change / rtol
    if not ratio <= 1:
        dtype = str(found["running_var"].dtype).removeprefix("torch.")
        flushed = int(((found["running_var"] == 0) & (a.running_var != 0)).sum())
        why = f"; {flushed} running variances flushed to 0" if flushed else ""
        message = (
            f"{where} holds the checkpoint's parameters rounded to {dtype}, which changes "
            f"gamma/sqrt(var + eps) by up to {change:.3g} relative (tolerance {rtol:g}){why}"
        )
        return Placement("precision-loss", where, ratio), (
            _finding(layer, "precision-loss", Severity.FAIL, message, change, rtol),
        )
    return Placement("kept", where, ratio), ()


def _eps_mismatch(
    layer: str, a: LayerAttrs, eps: float, where: str, rtol: float
) -> tuple[Placement, tuple[Finding, ...]]:
    assert a.running_var is not None
    want = _scale(a.weight, a.running_var, a.eps)
    got = _scale(a.weight, a.running_var, eps)
    change = _ratio(got, want, want.abs(), 1.0)
    severity = Severity.FAIL if change > rtol else Severity.WARN
    message = (
        f"{where} uses eps {eps:.3g}, the checkpoint's layer {a.eps:.3g}: gamma/sqrt(var + eps) "
        f"changes by up to {change:.3g} relative (tolerance {rtol:g})"
    )
    return Placement("eps-mismatch", where, change / rtol), (
        _finding(layer, "eps-mismatch", severity, message, eps, a.eps),
    )


def judge_fold(
    layer: str,
    a: LayerAttrs,
    conv: tuple[Tensor, Tensor | None],
    folded: tuple[Tensor, Tensor | None],
    where: str,
) -> tuple[Placement, tuple[Finding, ...]]:
    """The layer folded into a conv/linear: W', b' of the artifact against the fold of the
    checkpoint's conv (`conv`: W, b) and BN; else another eps, else other statistics."""
    w, b = conv
    got_w, got_b = folded
    rtol = 4 * F.tolerance(got_w.dtype)[0]  # the exporter rounds s, then W·s: a few ulps
    ratio = _fold_ratio(a, a.eps, w, b, got_w, got_b, rtol)
    if ratio <= 1:
        return Placement("folded", where, ratio), ()
    implied = _implied_eps(a, w, got_w)
    # Another eps explains the fold when refolding with it fits (a looser bound: the implied
    # eps is a median over channels, each known to float32 precision).
    other = implied is not None and abs(implied - a.eps) > _EPS_RTOL * a.eps
    if other and _fold_ratio(a, implied, w, b, got_w, got_b, rtol) <= 10:
        return _eps_mismatch(layer, a, implied, where, rtol)
    message = (
        f"{where} was folded with other BN statistics than the checkpoint's: its weights and "
        f"bias differ from the fold of the checkpoint's conv and BN by {ratio:.3g}x the "
        f"tolerance"
    )
    return Placement("folded-stale", where, ratio), (
        _finding(layer, "folded-stale", Severity.FAIL, message, ratio, 1.0),
    )


def _fold_ratio(
    a: LayerAttrs,
    eps: float,
    w: Tensor,
    b: Tensor | None,
    got_w: Tensor,
    got_b: Tensor | None,
    rtol: float,
) -> float:
    assert a.running_mean is not None and a.running_var is not None
    w64 = w.double()
    b64 = None if b is None else b.double()
    want_w, want_b = F.fold(w64, b64, a.running_mean, a.running_var, a.weight, a.bias, eps)
    s = _scale(a.weight, a.running_var, eps)
    # Each W'[c] is compared with its channel's largest |W'|: a near-zero weight has no digits.
    rows = want_w.abs().reshape(want_w.shape[0], -1).amax(1)
    spread_w = rows.reshape(-1, *([1] * (w.dim() - 1))).expand_as(want_w)
    ratio = _ratio(got_w, want_w, spread_w, rtol)
    b_got = got_b.double() if got_b is not None else torch.zeros_like(want_b)
    terms = (s * a.running_mean).abs() + (0 if a.bias is None else a.bias.double().abs())
    terms = terms + (0 if b64 is None else (b64 * s).abs())
    return max(ratio, _ratio(b_got, want_b, terms, rtol))


def _implied_eps(a: LayerAttrs, w: Tensor, got_w: Tensor) -> float | None:
    """The eps the artifact's per-channel scale W'/W implies, if the variances are the
    checkpoint's: the median over channels of (γ/s)² − σ²."""
    assert a.running_var is not None
    flat, got = w.double().reshape(w.shape[0], -1), got_w.double().reshape(w.shape[0], -1)
    norm = (flat * flat).sum(1)
    s = (got * flat).sum(1) / norm.clamp_min(_TINY)
    gamma = a.weight.double() if a.weight is not None else torch.ones_like(s)
    usable = (norm > 0) & (s != 0) & (gamma != 0)
    if not bool(usable.any()):
        return None
    eps = (gamma[usable] / s[usable]) ** 2 - a.running_var[usable]
    value = float(eps.median())
    return value if math.isfinite(value) and value > 0 else None


def missing(layer: str, why: str) -> tuple[Placement, tuple[Finding, ...]]:
    message = f"the artifact holds no counterpart of this layer: {why}"
    return Placement("missing"), (_finding(layer, "missing", Severity.WARN, message),)


def judge_output(
    layer: str, placement: Placement, err: float, tolerance: float
) -> tuple[Finding, ...]:
    """The layer's own output in the artifact, where it could be exposed: a layer whose place
    looks right but whose output differs is still a failure."""
    if math.isnan(err) or err <= tolerance:
        return ()
    message = (
        f"its output in the artifact ({placement.node}) differs from the model's by {err:.3g} "
        f"of its largest value (tolerance {tolerance:g})"
    )
    return (_finding(layer, "artifact-output", Severity.FAIL, message, err, tolerance),)


def judge_end_to_end(
    max_abs: float, rel: float, top1: float | None, tolerance: float
) -> tuple[Finding, ...]:
    """The artifact's outputs against the model's in eval mode, over every batch."""
    if rel <= tolerance:
        return ()
    agree = "" if top1 is None else f", top-1 agreement {100 * top1:.1f}%"
    message = (
        f"the artifact's output differs from the checkpoint's model in eval mode by {rel:.3g} "
        f"of its largest value (max abs {max_abs:.3g}, tolerance {tolerance:g}){agree}"
    )
    return (_finding(MODEL, "artifact-output", Severity.FAIL, message, rel, tolerance),)
