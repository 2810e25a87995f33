"""bnaudit: audit the BatchNorm layers of PyTorch checkpoints."""

__version__ = "0.1.0"

from bnaudit.audit import AuditOptions, audit
from bnaudit.findings import Thresholds
from bnaudit.results import AuditReport, FailOn, Finding, LayerResult, Severity

__all__ = [
    "AuditOptions",
    "AuditReport",
    "FailOn",
    "Finding",
    "LayerResult",
    "Severity",
    "Thresholds",
    "__version__",
    "audit",
    "errors",
]
