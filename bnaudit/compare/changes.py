"""`bnaudit diff`: what changed in the BatchNorm state between two checkpoints, without data.

Two accidents show from two checkpoints alone. Weights upstream of a BN layer changed while its
running statistics stayed bit-identical (fine-tuned with BN in eval mode, or frozen): the layer
normalises with statistics of a network that no longer exists, stale by construction. And a
"frozen" part whose statistics moved anyway: `requires_grad=False` freezes γ, β and the convs,
but a train-mode forward still updates the running statistics.

Per BN layer the comparison says which of γ, β, μ_r, σ²_r and T changed (bit-identical or not),
by how much, and whether the weights upstream of it changed (`bnaudit.measure.upstream`). The report
(`bnaudit.compare.results.DiffReport`) follows `AuditReport`'s conventions: findings with codes,
severities and hints, ignores and baselines, `passed` against `fail_on`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.checkpoint.bn_groups import BnGroup, find_bn_groups
from bnaudit.checkpoint.selection import unwrap
from bnaudit.compare.results import (
    AFFINE,
    BASE_ONLY,
    BOTH,
    COUNTER,
    IDENTICAL,
    NEW_ONLY,
    SHAPE,
    STATS,
    UNMATCHED,
    DiffMetrics,
    DiffReport,
    LayerDiff,
)
from bnaudit.core.errors import NothingToAudit
from bnaudit.core.layers import DEFAULT_EPS, find_bn_layers, read_counter
from bnaudit.core.untrusted import shorten
from bnaudit.measure.upstream import ORDER, Upstream, by_dataflow, by_order
from bnaudit.verdict.codes import diff_hint
from bnaudit.verdict.results import FailOn, Finding, Severity


def diff(
    base: Mapping[str, Any],
    new: Mapping[str, Any],
    model: nn.Module | None = None,
    *,
    fail_on: FailOn = FailOn.FAIL,
) -> DiffReport:
    """Compare the BN state of two state dicts; `model`, when given, supplies the dataflow.

    Layers are matched by name, after each side's wrapper prefixes (DDP's `module.`,
    torch.compile's `_orig_mod.`, ...) are left out. Only reads: neither the state dicts nor
    `model` change. Raises NothingToAudit when neither state dict holds a BN layer.
    """
    base_sd, base_notes = _unwrapped(base, "BASE")
    new_sd, new_notes = _unwrapped(new, "NEW")
    groups_base = {g.prefix: g for g in find_bn_groups(base_sd)}
    groups_new = {g.prefix: g for g in find_bn_groups(new_sd)}
    if not groups_base and not groups_new:
        raise NothingToAudit(
            "no BatchNorm layer in either state dict: no key group <prefix>.running_mean + "
            "<prefix>.running_var"
        )
    upstream, eps, types_ = _upstream(base_sd, model)
    weights = _WeightChanges(base_sd, new_sd)
    names = list(groups_base) + [n for n in groups_new if n not in groups_base]
    layers = []
    for name in names:
        b, n = groups_base.get(name), groups_new.get(name)
        type_name = types_.get(name) or _type_of(b or n)
        metrics = _compare(name, b, n, base_sd, new_sd, upstream, weights, eps.get(name))
        layers.append(LayerDiff(name, type_name, metrics, _judge(name, type_name, metrics)))
    notes = [*base_notes, *new_notes, *_notes(upstream, layers, bool(eps))]
    return DiffReport(tuple(layers), upstream.method, fail_on, tuple(notes))


def _unwrapped(state_dict: Mapping[str, Any], label: str) -> tuple[dict[str, Any], list[str]]:
    """The state dict without the wrapper prefixes every key shares, and a note saying so."""
    w = unwrap(state_dict)
    if not w.prefix:
        return dict(state_dict), []
    out = {k[len(w.prefix) :]: v for k, v in state_dict.items() if k.startswith(w.prefix)}
    what = "; ".join(w.wrappers)
    return out, [f"{label}: wrapper prefix {w.prefix!r} left out of the layer names ({what})"]


def _upstream(
    base: Mapping[str, Any], model: nn.Module | None
) -> tuple[Upstream, dict[str, float], dict[str, str]]:
    """The upstream weights, and with a model each BN layer's eps and class."""
    if model is None:
        return by_order(base), {}, {}
    layers = dict(find_bn_layers(model))
    eps = {n: float(getattr(m, "eps", DEFAULT_EPS)) for n, m in layers.items()}
    types_ = {n: type(m).__name__ for n, m in layers.items()}
    traced = by_dataflow(model)
    if isinstance(traced, str):
        fallback = by_order(base)
        return dataclasses.replace(fallback, note=traced), eps, types_
    order = by_order(base)
    unknown = [n for n in order.weights if n not in traced.weights]
    if unknown:  # BN key groups the model does not run as BN layers (other names, say)
        note = (
            f"{len(unknown)} BN layers of BASE are not BN layers of --model "
            f"({shorten(unknown)}): their upstream weights are from the state-dict order"
        )
        weights = {**traced.weights, **{n: order.weights[n] for n in unknown}}
        traced = dataclasses.replace(traced, weights=weights, note=note)
    return traced, eps, types_


def _type_of(g: BnGroup | None) -> str:
    assert g is not None  # every name comes from one of the two checkpoints
    return "BatchNorm" if "num_batches_tracked" in g.keys else "FrozenBatchNorm-style"


class _WeightChanges:
    """Whether each weight tensor changed between the two state dicts, compared once."""

    def __init__(self, base: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        self.base, self.new = base, new
        self.known: dict[str, tuple[bool, float]] = {}

    def __call__(self, key: str) -> tuple[bool, float]:
        """(changed, relative change); a tensor missing from one side changed, by NaN."""
        if key not in self.known:
            a, b = self.base.get(key), self.new.get(key)
            if a is None and b is None:  # a weight of the model that neither checkpoint has
                self.known[key] = (False, math.nan)
            elif not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
                self.known[key] = (True, math.nan)
            elif identical(a, b):
                self.known[key] = (False, 0.0)
            else:
                self.known[key] = (True, relative_change(a, b))
        return self.known[key]


def identical(a: Tensor, b: Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN equals the same NaN, -0.0 ≠ 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().reshape(-1).contiguous(), b.detach().reshape(-1).contiguous()
    try:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    except RuntimeError:  # a dtype without a byte view (quantized, say): compare values
        return torch.equal(a, b)


def relative_change(a: Tensor, b: Tensor) -> float:
    """‖b − a‖ / max(‖a‖, ‖b‖): in [0, 2], 0 when both are zero; NaN when not finite."""
    x, y = _wide(a), _wide(b)
    scale = max(float(x.norm()), float(y.norm()))
    change = float((y - x).norm())
    if not (math.isfinite(scale) and math.isfinite(change)):
        return math.nan
    return 0.0 if scale == 0 else change / scale


def _wide(t: Tensor) -> Tensor:
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)


def _compare(
    name: str,
    b: BnGroup | None,
    n: BnGroup | None,
    base: Mapping[str, Any],
    new: Mapping[str, Any],
    upstream: Upstream,
    weights: _WeightChanges,
    eps: float | None,
) -> DiffMetrics:
    if b is None or n is None:
        g = b or n
        assert g is not None
        side = BASE_ONLY if n is None else NEW_ONLY
        src = base if n is None else new
        return DiffMetrics(side, _channels(g, src))
    tb = {a: base[k] for a, k in b.keys.items()}
    tn = {a: new[k] for a, k in n.keys.items()}
    shape = b.problem or n.problem or _shape_difference(tb, tn)
    if shape:
        return DiffMetrics(SHAPE, _channels(b, base), shape=shape)
    eps = DEFAULT_EPS if eps is None else eps
    changed = {
        attr: _changed(tb.get(attr), tn.get(attr))
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    mb, vb = tb["running_mean"].double(), tb["running_var"].double()
    mn, vn = tn["running_mean"].double(), tn["running_var"].double()
    shift = (mn - mb).abs() / (vb + eps).sqrt()
    log_var = ((vn + eps) / (vb + eps)).log()
    t_base, _ = read_counter(tb.get("num_batches_tracked"))
    t_new, _ = read_counter(tn.get("num_batches_tracked"))
    before = upstream.weights.get(name, ())
    changes = [(k, *weights(k)) for k in before]
    moved = [(k, rel) for k, c, rel in changes if c]
    stats = changed["running_mean"] or changed["running_var"]
    affine = changed["weight"] or changed["bias"]
    return DiffMetrics(
        _state(stats, affine, bool(changed["num_batches_tracked"])),
        int(mb.numel()),
        weight_changed=changed["weight"],
        bias_changed=changed["bias"],
        mean_changed=changed["running_mean"],
        var_changed=changed["running_var"],
        counter_changed=changed["num_batches_tracked"],
        mean_shift_max=_worst(shift),
        log_var_max=_worst(log_var),
        weight_rel_change=_rel(tb.get("weight"), tn.get("weight")),
        bias_rel_change=_rel(tb.get("bias"), tn.get("bias")),
        t_base=t_base,
        t_new=t_new,
        t_delta=None if t_base is None or t_new is None else t_new - t_base,
        upstream_weights=len(before),
        upstream_changed=len(moved),
        upstream_first_changed=moved[0][0] if moved else "",
        upstream_rel_change=max((r for _, r in moved if not math.isnan(r)), default=math.nan),
        fed_by=upstream.fed_by.get(name, ""),
        nonfinite=sum(_nonfinite(t) for t in (*tb.values(), *tn.values())),
    )


def _state(stats: bool, affine: bool, counter: bool) -> str:
    if stats:
        return BOTH if affine else STATS
    if affine:
        return AFFINE
    return COUNTER if counter else IDENTICAL


def _changed(a: Tensor | None, b: Tensor | None) -> bool | None:
    if a is None and b is None:
        return None
    return a is None or b is None or not identical(a, b)


def _rel(a: Tensor | None, b: Tensor | None) -> float:
    return math.nan if a is None or b is None else relative_change(a, b)


def _worst(t: Tensor) -> float:
    """The value of largest magnitude, signed; NaN unless every channel is finite."""
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        return math.nan
    return float(t.flatten()[t.abs().argmax()])


def _nonfinite(t: Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def _channels(g: BnGroup, state_dict: Mapping[str, Any]) -> int:
    mean = state_dict.get(g.keys.get("running_mean", ""))
    return int(mean.numel()) if isinstance(mean, Tensor) else 0


def _shape_difference(tb: Mapping[str, Tensor], tn: Mapping[str, Tensor]) -> str:
    """What makes two BN layers of one name incomparable; "" when they compare."""
    for attr in ("running_mean", "running_var", "weight", "bias"):
        a, b = tb.get(attr), tn.get(attr)
        if (a is None) != (b is None):
            return f"{attr} in {'BASE' if b is None else 'NEW'} only"
        if a is not None and b is not None and a.shape != b.shape:
            return f"{attr} {tuple(a.shape)} in BASE, {tuple(b.shape)} in NEW"
    return ""


# --- the findings ---------------------------------------------------------------------------


def _judge(name: str, type_name: str, m: DiffMetrics) -> tuple[Finding, ...]:
    if m.change in UNMATCHED:
        return (_unmatched(name, m),)
    out = []
    t = _t(m)
    if m.upstream_changed and not m.stats_changed:
        # A FrozenBatchNorm never updates its statistics: the weights after it were trained
        # with them, by design (its class, or no counter on either side, says which it is).
        frozen_bn = "Frozen" in type_name or (m.t_base is None and m.t_new is None)
        out.append(
            Finding(
                name,
                "stats-not-updated",
                Severity.INFO if frozen_bn else Severity.FAIL,
                f"{m.upstream_changed} of the {m.upstream_weights} weight tensors upstream "
                f"changed (first {m.upstream_first_changed}, largest relative change "
                f"{_num(m.upstream_rel_change)}), but the running statistics are bit-identical "
                f"({t}): "
                + (
                    f"a {type_name} layer, whose statistics never update"
                    if frozen_bn
                    else "they describe a network that no longer exists, stale by construction"
                ),
                diff_hint("stats-not-updated", "frozen" if frozen_bn else "stale"),
                value=None,
            )
        )
    reset = m.t_delta is not None and m.t_delta < 0
    frozen = not m.upstream_changed and not m.affine_changed
    if frozen and m.stats_changed and not reset:
        out.append(
            Finding(
                name,
                "frozen-stats-updated",
                Severity.WARN,
                f"gamma, beta and all {m.upstream_weights} weight tensors upstream are "
                f"bit-identical, but the running statistics moved (mean shift up to "
                f"{_num(m.mean_shift_max)} sd, ln var ratio {_num(m.log_var_max)}; {t}): a "
                "frozen part ran in train mode",
                diff_hint("frozen-stats-updated"),
                value=_finite_abs(m.mean_shift_max),
            )
        )
    if reset:
        assert m.t_delta is not None
        recalibrated = frozen and m.stats_changed
        why = (
            "with every weight upstream and gamma, beta bit-identical and new statistics: the "
            "signature of a recalibration"
            if recalibrated
            else "the counter restarted"
        )
        out.append(
            Finding(
                name,
                "counter-reset",
                Severity.INFO if recalibrated else Severity.WARN,
                f"num_batches_tracked went down from {m.t_base} to {m.t_new}, {why}",
                diff_hint("counter-reset", "recalibrated" if recalibrated else "reset"),
                value=float(-m.t_delta),
            )
        )
    return tuple(out)


def _unmatched(name: str, m: DiffMetrics) -> Finding:
    what = {
        BASE_ONLY: "in BASE only: NEW has no BN layer of that name",
        NEW_ONLY: "in NEW only: BASE has no BN layer of that name",
        SHAPE: f"in both, not comparable: {m.shape}",
    }[m.change]
    return Finding(name, "unmatched-layer", Severity.INFO, what, diff_hint("unmatched-layer"))


def _t(m: DiffMetrics) -> str:
    if m.t_base is None or m.t_new is None:
        return "T not stored as a count in both"
    if m.t_base == m.t_new:
        return f"T = {m.t_base} in both"
    return f"T {m.t_base} -> {m.t_new}"


def _finite_abs(value: float) -> float | None:
    return abs(value) if math.isfinite(value) else None


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _notes(upstream: Upstream, layers: list[LayerDiff], with_model: bool) -> list[str]:
    notes = []
    if upstream.method == ORDER:
        why = f"{upstream.note}; " if upstream.note else ""
        notes.append(
            f"{why}upstream weights from the state-dict order: torch saves modules in "
            "registration order, which is the forward order in most models but not all (a "
            "head registered before the body, parallel branches); pass --model for the dataflow"
        )
    else:
        notes.append(f"upstream weights from {upstream.method}")
        if upstream.note:
            notes.append(upstream.note)
    if not with_model:
        notes.append(f"eps is not stored in a state dict: mean shifts use {DEFAULT_EPS:g}")
    bad = [r.name for r in layers if r.metrics.nonfinite]
    if bad:
        notes.append(
            f"non-finite values in {len(bad)} layers ({shorten(bad)}): their sizes of change "
            "are n/a; `bnaudit check` on each checkpoint says which values"
        )
    return notes
