"""The static audit: BatchNorm layers found in a bare state dict, judged without a forward pass.

With no --model there is no module to hook, but a state dict still shows every BN layer as a
key group `<prefix>.running_mean`, `.running_var`, plus `.weight` and `.bias` when affine and
`.num_batches_tracked` except in FrozenBatchNorm-style layers. Each group becomes a `LayerAttrs`
and goes through the same `measure` and `judge_layer` as in a full audit, with no batches, so
the checks that need no forward pass run exactly as they do there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from bnaudit.errors import NothingToAudit
from bnaudit.findings import Thresholds, judge_layer
from bnaudit.layers import DEFAULT_EPS, KnownAttrs, LayerAttrs
from bnaudit.metrics import measure
from bnaudit.results import AuditReport, FailOn, LayerResult
from bnaudit.selection import wrapper_prefix
from bnaudit.statistics import LayerStats

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Which finding codes a static audit can raise, and what the others need.
STATIC_CODES = ("nonfinite", "bad-var", "tiny-var", "init-stats", "no-counter", "half-buffers")
MOMENTUM_CODES = ("momentum-warmup", "momentum-convention")  # need the layer's momentum
MODULE_CODES = ("no-running-stats",)  # such a layer has no running stats to be found by
DATA_CODES = (
    "recon-train",
    "recon-eval",
    "running-update",
    "stale-stats",
    "train-eval-gap",
    "var-bias",
    "nonstandard-forward",
    "not-reached",
)
NOT_JUDGED = "no: static audit"
_SHOWN = 5


@dataclass(frozen=True)
class BnGroup:
    """One BN layer in a state dict: its key prefix and attribute → full key."""

    prefix: str
    keys: Mapping[str, str]


def find_bn_groups(state_dict: Mapping[str, object]) -> tuple[list[BnGroup], list[str]]:
    """BN key groups in key order, and the groups skipped (with why) for not being BN-shaped.

    Reads shapes and dtypes only, never tensor data.
    """
    by_prefix: dict[str, dict[str, str]] = {}
    for key, value in state_dict.items():
        prefix, _, attr = key.rpartition(".")
        if attr in BN_KEYS and isinstance(value, Tensor):
            by_prefix.setdefault(prefix, {})[attr] = key
    groups, skipped = [], []
    for prefix, keys in by_prefix.items():
        if "running_mean" not in keys or "running_var" not in keys:
            continue
        problem = _shape_problem({a: state_dict[k] for a, k in keys.items()})  # type: ignore[misc]
        if problem:
            skipped.append(f"{prefix or '(top level)'} ({problem})")
        else:
            groups.append(BnGroup(prefix, keys))
    return groups, skipped


def _shape_problem(t: Mapping[str, Tensor]) -> str:
    mean, var = t["running_mean"], t["running_var"]
    if not (mean.is_floating_point() and var.is_floating_point()):
        return f"running stats of dtype {mean.dtype}"
    if mean.dim() != 1 or mean.shape != var.shape or mean.numel() == 0:
        return f"running_mean {tuple(mean.shape)}, running_var {tuple(var.shape)}"
    for attr in ("weight", "bias"):
        if attr in t and t[attr].shape != mean.shape:
            return f"{attr} {tuple(t[attr].shape)} vs running_mean {tuple(mean.shape)}"
    nbt = t.get("num_batches_tracked")
    if nbt is not None and (nbt.numel() != 1 or nbt.is_floating_point()):
        return f"num_batches_tracked {tuple(nbt.shape)} {nbt.dtype}"
    return ""


def audit_state_dict(
    state_dict: Mapping[str, object],
    *,
    thresholds: Thresholds | None = None,
    fail_on: FailOn = FailOn.FAIL,
    known: Mapping[str, KnownAttrs] | None = None,
    before_read: Callable[[Iterable[str]], None] | None = None,
    after_read: Callable[[], None] | None = None,
    checkpoint: str | None = None,
    sha256: str | None = None,
    notes: tuple[str, ...] = (),
) -> AuditReport:
    """Audit every BN layer of a state dict without a model; the same report as `audit`.

    Args:
        known: eps/momentum/class per BN key prefix where a compiled archive records them;
            otherwise eps is assumed to be 1e-5 and momentum is unknown.
        before_read: called with the keys about to be read, before any of their data is
            (the checkpoint's CRC check).
        after_read: called after each layer's tensors are copied out (to unmap what reading a
            memory-mapped checkpoint mapped in).
        notes: prepended to the report's notes (how the checkpoint was read).
    """
    t = thresholds or Thresholds()
    known = known or {}
    groups, skipped = find_bn_groups(state_dict)
    if not groups:
        raise NothingToAudit(
            (f"{checkpoint}: " if checkpoint else "")
            + "no BatchNorm layer in the state dict: no key group <prefix>.running_mean + "
            "<prefix>.running_var"
            + (f" of BN shape (skipped: {_names(skipped)})" if skipped else "")
            + "; BN layers with track_running_stats=False have no such keys: pass --model to "
            "audit them"
        )
    if before_read is not None:
        before_read([k for g in groups for k in g.keys.values()])
    strip = wrapper_prefix(state_dict)
    results = []
    attrs = []
    for g in groups:
        a = LayerAttrs.from_state(
            {attr: state_dict[k] for attr, k in g.keys.items()},  # type: ignore[misc]
            known=known.get(g.prefix),
        )
        if after_read is not None:
            after_read()
        m = measure(a, LayerStats(), t, nonfinite_inputs=0, nonfinite_outputs=0, synthetic=False)
        m = dataclasses.replace(m, stale_judged=NOT_JUDGED, gap_judged=NOT_JUDGED)
        name = f"{g.prefix}."[len(strip) :].removesuffix(".")
        findings = judge_layer(
            name, m, t, type_name=a.type_name, overrides_forward=False, batches=0
        )
        results.append(LayerResult(name, a.type_name, m, findings))
        attrs.append(a)
    return AuditReport(
        layers=tuple(results),
        fail_on=fail_on,
        notes=(*notes, *_static_notes(groups, attrs, known, skipped, strip)),
        checkpoint=checkpoint,
        sha256=sha256,
        thresholds=dataclasses.asdict(t),
    )


def _static_notes(
    groups: list[BnGroup],
    attrs: list[LayerAttrs],
    known: Mapping[str, KnownAttrs],
    skipped: list[str],
    strip: str,
) -> list[str]:
    momentum_known = sum(a.momentum_known for a in attrs)
    ran = STATIC_CODES + (MOMENTUM_CODES if momentum_known else ())
    need_model = MODULE_CODES + (() if momentum_known else MOMENTUM_CODES)
    notes = [
        f"static audit: no --model, so the BatchNorm layers ({len(groups)}) were found from "
        "their state-dict keys and judged without a forward pass",
        f"checks run: {', '.join(ran)}",
        f"not run, they need --model: {', '.join(need_model)}",
        f"not run, they need --model and --data or --input-shape: {', '.join(DATA_CODES)}",
    ]
    assumed = sum(g.prefix not in known for g in groups)
    if assumed:
        notes.append(
            f"eps is not stored in a state dict: assumed {DEFAULT_EPS:g} (torch's default) for "
            f"{assumed} of {len(groups)} layers; tiny-var depends on it"
        )
    if momentum_known < len(attrs):
        notes.append(
            f"momentum is not stored in a state dict: unknown for {len(attrs) - momentum_known} "
            f"of {len(attrs)} layers, so {' and '.join(MOMENTUM_CODES)} were not judged there"
        )
    if strip:
        notes.append(f"wrapper prefix {strip!r} left out of the layer names")
    if skipped:
        notes.append(f"key groups with running stats but not BatchNorm-shaped: {_names(skipped)}")
    return notes


def _names(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more
