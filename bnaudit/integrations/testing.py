"""pytest support: `assert_bn_healthy(model, batches)` fails a test with a message that names
every failing layer, its finding code, the measured value and the limit.

    def test_batchnorm_is_calibrated():
        model = build(); model.load_state_dict(torch.load("model.pt", weights_only=True))
        assert_bn_healthy(model, val_batches(), stale_shift=0.5)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from bnaudit.check.audit import audit
from bnaudit.report.audit_report import AuditReport
from bnaudit.report.render import printable
from bnaudit.verdict.results import Finding

_SHOWN = 20  # failing findings listed in the message before "and N more"


def assert_bn_healthy(model: nn.Module, batches: Iterable[Any], **options: Any) -> AuditReport:
    """Audit `model` on `batches`; raise AssertionError when the gate fails.

    Args:
        model: the model, on the device the batches should run on; it is left as it was.
        batches: an iterable of batches, as for `bnaudit.audit`.
        **options: `Thresholds` fields (stale_shift=0.5, max_error_ratio=2, ...) and
            `AuditOptions` fields (fail_on="warn", max_batches=4, impact=False, ...).

    Returns:
        The report, when it passed, for further assertions.
    """
    report = audit(model, batches, **options)
    if not report.passed:
        raise AssertionError(failure_message(report))
    return report


def failure_message(report: AuditReport) -> str:
    """What failed: a line per failing finding with its layer, code, value and limit."""
    failing = report.failing
    layers = list(dict.fromkeys(f.layer for f in failing))
    lines = [
        f"BatchNorm audit failed (fail_on={report.fail_on.value}): {len(failing)} finding(s) "
        f"on {len(layers)} of {len(report.layers)} BN layers, {report.batches} batches:"
    ]
    lines += [f"  {_line(f)}" for f in failing[:_SHOWN]]
    if len(failing) > _SHOWN:
        lines.append(f"  ... and {len(failing) - _SHOWN} more (report.failing has them all)")
    return "\n".join(lines)


def _line(f: Finding) -> str:
    numbers = ""
    if f.value is not None:
        numbers = f" value {f.value:.4g}"
        if f.threshold is not None:
            numbers += f", limit {f.threshold:.4g}"
    return f"{printable(f.layer)}: {f.code} ({f.severity.label}){numbers}: {printable(f.message)}"
