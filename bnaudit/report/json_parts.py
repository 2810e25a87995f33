"""The pieces of the JSON reports that `check` and `diff` share: a layer, a finding, and the
rule that a non-finite number is null (JSON has no NaN)."""

from __future__ import annotations

import json
from typing import Any

from bnaudit.report.record import Gated, Layer
from bnaudit.verdict.results import Finding, finite_or_none


def gate_dict(report: Gated) -> dict[str, Any]:
    """The first keys of a report's summary, the same for `check` and `diff`."""
    return {
        "verdict": report.verdict,
        "fail_on": report.fail_on.value,
        "layers": len(report.layers),
    }


def finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "severity": f.severity.label,
        "message": f.message,
        "hint": f.hint,
        "value": f.value,
        "threshold": f.threshold,
        "status": f.status.value,
        "status_reason": f.status_reason,
    }


def layer_dict(r: Layer) -> dict[str, Any]:
    """A layer's entry: name, type, verdict, every metric, every finding (waived ones too)."""
    return {
        "name": r.name,
        "type": r.type,
        "verdict": r.verdict,
        "metrics": r.metrics.flat(),
        "findings": [finding_dict(f) for f in r.findings],
    }


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float, however deep in dicts and lists, as None."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float):
        return finite_or_none(obj)
    return obj


def dumps(data: dict[str, Any]) -> str:
    """`data`, made finite by `finite`, as the text of a report file."""
    # allow_nan=False: a NaN that slipped past finite is a bug, not invalid JSON in a report.
    return json.dumps(data, indent=2, allow_nan=False) + "\n"
