"""bnaudit: audit the BatchNorm layers of PyTorch checkpoints.

The names below are imported on first use, so `import bnaudit` (and the command line until it
needs them) does not pay for importing torch.
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
}

if TYPE_CHECKING:
    from bnaudit.diff import diff
    from bnaudit.diff_results import DiffReport
    from bnaudit.engine import AuditOptions, audit
    from bnaudit.findings import Thresholds
    from bnaudit.results import AuditReport, FailOn, Finding, LayerResult, Severity


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bnaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "AuditOptions",
    "AuditReport",
    "DiffReport",
    "FailOn",
    "Finding",
    "LayerResult",
    "Severity",
    "Thresholds",
    "__version__",
    "audit",
    "diff",
]
