"""bnaudit: audit the BatchNorm layers of PyTorch checkpoints.

    report = bnaudit.audit(model, batches)   # an AuditReport; bool(report) is report.passed
    print(report.summary())                   # or report.render("markdown" | "csv" | "json")
    bnaudit.assert_bn_healthy(model, batches)  # in a test: raises AssertionError naming layers
    bnaudit.audit_after_epoch(model, val_batches, log=print)  # in a training loop
    with bnaudit.watch(model, optimizer) as w: ...  # every BN update checked at every step

The names below are imported on first use, so `import bnaudit` (and the command line until it
needs them) does not pay for importing torch; `dir(bnaudit)` lists them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnaudit.core.version import __version__

_EXPORTS = {
    "AuditOptions": "bnaudit.check.audit",
    "audit": "bnaudit.check.audit",
    "diff": "bnaudit.compare.changes",
    "DiffReport": "bnaudit.compare.results",
    "Thresholds": "bnaudit.verdict.thresholds",
    "AuditReport": "bnaudit.report.audit_report",
    "FailOn": "bnaudit.verdict.results",
    "Finding": "bnaudit.verdict.results",
    "LayerResult": "bnaudit.verdict.results",
    "Severity": "bnaudit.verdict.results",
    "Format": "bnaudit.report.render",
    "assert_bn_healthy": "bnaudit.integrations.testing",
    "audit_after_epoch": "bnaudit.integrations.callbacks",
    "watch": "bnaudit.watching.watcher",
    "WatchReport": "bnaudit.watching.report",
}

if TYPE_CHECKING:
    from bnaudit.check.audit import AuditOptions, audit
    from bnaudit.compare.changes import diff
    from bnaudit.compare.results import DiffReport
    from bnaudit.integrations.callbacks import audit_after_epoch
    from bnaudit.integrations.testing import assert_bn_healthy
    from bnaudit.report.audit_report import AuditReport
    from bnaudit.report.render import Format
    from bnaudit.verdict.results import FailOn, Finding, LayerResult, Severity
    from bnaudit.verdict.thresholds import Thresholds
    from bnaudit.watching.report import WatchReport
    from bnaudit.watching.watcher import watch


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bnaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # The lazy names are not globals until first used: without this, dir() would hide them.
    return sorted(__all__)


__all__ = [
    "AuditOptions",
    "AuditReport",
    "DiffReport",
    "FailOn",
    "Finding",
    "Format",
    "LayerResult",
    "Severity",
    "Thresholds",
    "WatchReport",
    "__version__",
    "assert_bn_healthy",
    "audit",
    "audit_after_epoch",
    "diff",
    "watch",
]
