"""bnaudit: audit the BatchNorm layers of PyTorch checkpoints.

    report = bnaudit.audit(model, batches)   # an AuditReport; bool(report) is report.passed
    print(report.summary())                   # or report.render("markdown" | "csv" | "json")
    bnaudit.assert_bn_healthy(model, batches)  # in a test: raises AssertionError naming layers
    bnaudit.audit_after_epoch(model, val_batches, log=print)  # in a training loop

The names below are imported on first use, so `import bnaudit` (and the command line until it
needs them) does not pay for importing torch; `dir(bnaudit)` lists them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AuditOptions": "bnaudit.engine",
    "audit": "bnaudit.engine",
    "diff": "bnaudit.diff",
    "DiffReport": "bnaudit.diff_results",
    "Thresholds": "bnaudit.findings",
    "AuditReport": "bnaudit.results",
    "FailOn": "bnaudit.results",
    "Finding": "bnaudit.results",
    "LayerResult": "bnaudit.results",
    "Severity": "bnaudit.results",
    "Format": "bnaudit.report",
    "assert_bn_healthy": "bnaudit.testing",
    "audit_after_epoch": "bnaudit.callbacks",
}

if TYPE_CHECKING:
    from bnaudit.callbacks import audit_after_epoch
    from bnaudit.diff import diff
    from bnaudit.diff_results import DiffReport
    from bnaudit.engine import AuditOptions, audit
    from bnaudit.findings import Thresholds
    from bnaudit.report import Format
    from bnaudit.results import AuditReport, FailOn, Finding, LayerResult, Severity
    from bnaudit.testing import assert_bn_healthy


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
    "__version__",
    "assert_bn_healthy",
    "audit",
    "audit_after_epoch",
    "diff",
]
