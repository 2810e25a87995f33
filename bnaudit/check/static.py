"""The static audit: BatchNorm layers found in a bare state dict, judged without a forward pass.

With no --model there is no module to hook, but a state dict still shows every BN layer as a
key group `<prefix>.running_mean`, `.running_var`, plus `.weight` and `.bias` when affine and
`.num_batches_tracked` except in FrozenBatchNorm-style layers. Each group becomes a `LayerAttrs`
and goes through the same `measure` and `judge_layer` as in a full audit, with no batches, so
the checks that need no forward pass run exactly as they do there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping

from bnaudit.check.aliases import SharedGroups
from bnaudit.checkpoint.bn_groups import find_bn_groups
from bnaudit.checkpoint.selection import unwrap
from bnaudit.core.errors import NothingToAudit
from bnaudit.core.layers import DEFAULT_EPS, KnownAttrs, LayerAttrs, LayerKind, counter_notes
from bnaudit.measure.statistics import LayerStats
from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict.codes import CODES
from bnaudit.verdict.findings import Thresholds, judge_layer, not_audited
from bnaudit.verdict.metrics import measure
from bnaudit.verdict.placement import training_mode
from bnaudit.verdict.results import FailOn, Finding, LayerMetrics, LayerResult, Regime

# Which finding codes a static audit can raise, and what the others need.
STATIC_CODES = (
    "nonfinite",
    "bad-var",
    "tiny-var",
    "init-stats",
    "no-counter",
    "bad-counter",
    "half-buffers",
    "not-audited",
)
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
# Checks that run with a model but no batch: all but those that need a forward pass.
NO_BATCH_CODES = tuple(
    c
    for c in CODES
    if c not in DATA_CODES and c not in ("fold-mismatch", "fold-risk", "output-change")
)


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
    training: Collection[str] = (),
    counted: bool = True,
) -> AuditReport:
    """Audit every BN layer of a state dict without a model; the same report as `audit`.

    A key group with running stats that is not BN-shaped is a layer with a `not-audited`
    finding; only a state dict without any running stats has nothing to audit.

    Args:
        known: eps/momentum/class per BN key prefix where a compiled archive records them;
            otherwise eps is assumed to be 1e-5 and momentum is unknown.
        before_read: called with the keys about to be read, before any of their data is
            (the checkpoint's CRC check).
        after_read: called after each layer's tensors are copied out (to unmap what reading a
            memory-mapped checkpoint mapped in).
        notes: prepended to the report's notes (how the checkpoint was read).
        training: BN key prefixes that a compiled program or an ONNX graph runs in train mode
            (a training-mode finding each).
        counted: the format stores num_batches_tracked (an ONNX graph does not: no-counter
            is not judged).
    """
    t = thresholds or Thresholds()
    known = known or {}
    groups = find_bn_groups(state_dict)
    if not groups:
        raise NothingToAudit(
            (f"{checkpoint}: " if checkpoint else "")
            + "no BatchNorm layer in the state dict: no key group <prefix>.running_mean + "
            "<prefix>.running_var; BN layers with track_running_stats=False have no such keys: "
            "pass --model to audit them"
        )
    wrapping = unwrap(state_dict)
    if before_read is not None:
        read = [k for g in groups if not g.problem for k in g.keys.values()]
        before_read([*read, *wrapping.set_aside])  # n_averaged goes into a note
    results, attrs, shared = [], {}, SharedGroups()
    for g in groups:
        name = f"{g.prefix}."[len(wrapping.prefix) :].removesuffix(".")
        if g.problem:
            type_name = known[g.prefix].type_name if g.prefix in known else "unknown"
            m = LayerMetrics.unmeasured("not audited", kind=LayerKind.BATCH.value, channels=0)
            results.append(LayerResult(name, type_name, m, (not_audited(name, g.problem),)))
            continue
        a = LayerAttrs.from_state(
            {attr: state_dict[k] for attr, k in g.keys.items()},  # type: ignore[misc]
            known=known.get(g.prefix),
        )
        if after_read is not None:
            after_read()
        if shared.seen(g.prefix, name, {attr: state_dict[k] for attr, k in g.keys.items()}):
            continue  # the module already audited under its first name
        m, findings = _judged(name, a, t, training=g.prefix in training, counted=counted)
        results.append(LayerResult(name, a.type_name, m, findings))
        attrs[name] = a
    assumed = sum(g.prefix not in known for g in groups if not g.problem) - shared.assumed(known)
    static = _static_notes(attrs, len(groups) - shared.count, assumed, counted)
    momentum_known = any(a.momentum_known for a in attrs.values())
    return AuditReport(
        layers=tuple(results),
        fail_on=fail_on,
        notes=(*notes, *static, *shared.notes(), *wrapping.notes(state_dict)),
        checkpoint=checkpoint,
        sha256=sha256,
        thresholds=dataclasses.asdict(t),
        checks_run=STATIC_CODES
        + (MOMENTUM_CODES if momentum_known else ())
        + (("training-mode",) if training or not counted else ()),
        checks_need="--model and --data",
    )


def _judged(
    name: str, a: LayerAttrs, t: Thresholds, *, training: bool, counted: bool
) -> tuple[LayerMetrics, tuple[Finding, ...]]:
    """One layer's static metrics and findings; a layer that runs in train mode (a program's,
    an ONNX node's) fails, and a format without a counter is not asked for one."""
    m = measure(a, LayerStats(), t, nonfinite_inputs=0, nonfinite_outputs=0, synthetic=False)
    m = _not_judged(m)
    findings = judge_layer(name, m, t, type_name=a.type_name, overrides_forward=False, batches=0)
    if not counted:
        findings = tuple(f for f in findings if f.code != "no-counter")
    if training:
        findings = (training_mode(name, f"its {a.type_name}"), *findings)
    return m, findings


def _not_judged(m: LayerMetrics) -> LayerMetrics:
    """`m` with neither drift judged: a static audit has no batches to compare with."""

    def regime(r: Regime) -> Regime:
        return dataclasses.replace(r, drift=dataclasses.replace(r.drift, judged=NOT_JUDGED))

    return dataclasses.replace(m, train=regime(m.train), eval=regime(m.eval))


def _static_notes(
    attrs: Mapping[str, LayerAttrs], groups: int, assumed: int, counted: bool = True
) -> list[str]:
    """`attrs`: the audited layers by name, of `groups` found; `assumed`: how many of them have
    an assumed eps (no archive told it)."""
    momentum_known = sum(a.momentum_known for a in attrs.values())
    ran = STATIC_CODES + (MOMENTUM_CODES if momentum_known else ())
    need_model = MODULE_CODES + (() if momentum_known else MOMENTUM_CODES)
    notes = [
        f"static audit: no --model, so the BatchNorm layers ({groups}) were found from "
        "their state-dict keys and judged without a forward pass",
        f"checks run: {', '.join(ran)}",
        f"not run, they need --model: {', '.join(need_model)}",
        f"not run, they need --model and --data or --input-shape: {', '.join(DATA_CODES)}",
    ]
    if groups > len(attrs):
        notes.append(
            f"{groups - len(attrs)} of {groups} key groups with running stats are not "
            "BatchNorm-shaped and were not audited (not-audited findings)"
        )
    if assumed:
        notes.append(
            f"eps is not stored in a state dict: assumed {DEFAULT_EPS:g} (torch's default) for "
            f"{assumed} of {len(attrs)} layers; tiny-var depends on it"
        )
    if momentum_known < len(attrs):
        notes.append(
            f"momentum is not stored in a state dict: unknown for {len(attrs) - momentum_known} "
            f"of {len(attrs)} layers, so {' and '.join(MOMENTUM_CODES)} were not judged there"
        )
    if not counted:
        notes.append("no-counter not judged: the format stores no num_batches_tracked")
    notes += counter_notes(
        {n: a.counter_dtype for n, a in attrs.items()},
        "; audited as the count it holds (load_state_dict converts it to the model's int64)",
    )
    return notes
