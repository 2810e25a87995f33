"""The gate's decision for one run: the configured ignores, then the baseline, on the findings.

What fails is then `report.failing` (findings that count, at or above `--fail-on`); the command
line turns `report.passed` into exit code 0 or 1.
"""

from __future__ import annotations

from bnaudit.gate.baseline import Baseline, apply_baseline, from_report
from bnaudit.gate.config import CheckSettings
from bnaudit.gate.ignores import apply_ignores
from bnaudit.report.audit_report import AuditReport


def judge(report: AuditReport, s: CheckSettings, baseline: Baseline | None = None) -> AuditReport:
    """Apply the ignores, then the baseline: the one read, or with `write_baseline` the one
    this run records (`write_reports` writes it)."""
    report = apply_ignores(report, s.ignore)
    if s.write_baseline:
        path, baseline, is_new = s.write_baseline, from_report(report), True
    elif baseline is not None and s.baseline is not None:
        path, is_new = s.baseline, False
    else:
        return report
    return apply_baseline(
        report, baseline, path=str(path), margin=s.baseline_margin, written=is_new
    )
