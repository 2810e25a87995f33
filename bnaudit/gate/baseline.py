"""Baselines: accept the findings a checkpoint has today, fail only on new or worse ones.

`--write-baseline FILE` records every finding at warn or above that is not ignored: its layer,
code, severity and measured value. `--baseline FILE` then pairs each finding of the run with the
entries of the same layer and code, in report order:

- no entry left for it: the finding is `new` and counts for the gate;
- an entry, and the finding is worse: it is `worse` and counts. Worse means a higher severity
  than recorded, or a value beyond the margin: value > recorded + margin * |recorded|
  (`baseline-margin`, default 0.1, i.e. 10 %). Every finding value grows with the problem
  (an error ratio, a fraction of channels, a count, a momentum), so larger is worse. A
  non-finite value is worse than a finite recorded one; an entry recorded without a value
  (none, or non-finite) compares severities only;
- an entry, and not worse: the finding is `baselined` and does not count;
- entries that no finding took are stale: that problem went away, and writing the baseline
  again tightens the file.

Info findings never fail the gate, so they are neither recorded nor judged. The file is JSON,
sorted as the report is and free of timestamps, so that it diffs cleanly in review.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnaudit.core.errors import BaselineError
from bnaudit.core.version import __version__
from bnaudit.report.audit_report import AuditReport
from bnaudit.report.record import BaselineCheck, BaselineEntry
from bnaudit.verdict.results import Finding, Severity, Status

FORMAT = 1  # the "bnaudit_baseline" key: bumped when the file layout changes
DEFAULT_MARGIN = 0.1
RECORDED = Severity.WARN  # the lowest severity a baseline records and judges
_SEVERITIES = {s.label: s for s in Severity if s > Severity.OK}


@dataclass(frozen=True)
class Baseline:
    entries: tuple[BaselineEntry, ...]
    checkpoint: str | None = None  # the checkpoint it was written from (information only)
    sha256: str | None = None  # that checkpoint's SHA-256 (information only)
    sha256_note: str | None = None  # why sha256 is None: "not computed: …"


def recorded(finding: Finding) -> bool:
    """Whether a baseline records (and judges) this finding."""
    return finding.severity >= RECORDED and finding.status is not Status.IGNORED


def from_report(report: AuditReport) -> Baseline:
    entries = tuple(
        BaselineEntry(f.layer, f.code, f.severity, _finite(f.value), f.message)
        for f in report.findings
        if recorded(f)
    )
    return Baseline(entries, report.checkpoint, report.sha256, report.sha256_note)


def render_baseline(baseline: Baseline) -> str:
    doc = {
        "bnaudit_baseline": FORMAT,
        "bnaudit_version": __version__,
        "checkpoint": baseline.checkpoint,
        "sha256": baseline.sha256,
        "sha256_note": baseline.sha256_note,
        "findings": [
            {
                "layer": e.layer,
                "code": e.code,
                "severity": e.severity.label,
                "value": e.value,
                "message": e.message,
            }
            for e in baseline.entries
        ],
    }
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def read_baseline(path: Path) -> Baseline:
    """Parse a baseline file; every problem names the file and the entry."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(
            f"{path}: baseline file not found; write one with --write-baseline {path}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot read the baseline ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}: not JSON ({exc}); is this a bnaudit baseline?") from exc
    if not isinstance(doc, dict) or "bnaudit_baseline" not in doc:
        raise BaselineError(
            f"{path}: not a bnaudit baseline (no 'bnaudit_baseline' key); write one with "
            "--write-baseline"
        )
    if doc["bnaudit_baseline"] != FORMAT:
        raise BaselineError(
            f"{path}: baseline format {doc['bnaudit_baseline']!r} is not supported (this "
            f"bnaudit {__version__} reads format {FORMAT}); write it again with --write-baseline"
        )
    findings = doc.get("findings")
    if not isinstance(findings, list):
        raise BaselineError(f"{path}: 'findings' must be a list")
    # Information only: a value that is no string (or a baseline older than the key) is None.
    info = {k: v if isinstance(v := doc.get(k), str) else None for k in _INFO}
    return Baseline(
        tuple(_entry(item, f"{path}: findings[{i}]") for i, item in enumerate(findings)),
        info["checkpoint"],
        info["sha256"],
        info["sha256_note"],
    )


_INFO = ("checkpoint", "sha256", "sha256_note")


def _entry(item: Any, where: str) -> BaselineEntry:
    if not isinstance(item, dict):
        raise BaselineError(f"{where}: expected an object, got {item!r}")
    for key in ("layer", "code", "severity"):
        if not isinstance(item.get(key), str):
            raise BaselineError(f"{where}: {key!r} must be a string, got {item.get(key)!r}")
    severity = _SEVERITIES.get(item["severity"])
    if severity is None:
        raise BaselineError(
            f"{where}: severity {item['severity']!r} is not one of {', '.join(_SEVERITIES)}"
        )
    value = item.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BaselineError(f"{where}: value must be a number or null, got {value!r}")
    message = item.get("message", "")
    return BaselineEntry(
        item["layer"],
        item["code"],
        severity,
        None if value is None else float(value),
        message if isinstance(message, str) else "",
    )


def worse(finding: Finding, entry: BaselineEntry, margin: float) -> str | None:
    """Why `finding` is worse than its baseline `entry`, or None when it is not."""
    if finding.severity > entry.severity:
        return f"severity {finding.severity.label}, {entry.severity.label} in the baseline"
    if entry.value is None or finding.value is None:
        return None
    if not math.isfinite(finding.value):
        return f"value {finding.value}, {_num(entry.value)} in the baseline"
    limit = entry.value + margin * abs(entry.value)
    if finding.value > limit:
        return (
            f"value {_num(finding.value)} > {_num(entry.value)} in the baseline + "
            f"{_num(100 * margin)}% margin"
        )
    return None


def apply_baseline(
    report: AuditReport,
    baseline: Baseline,
    *,
    path: str,
    margin: float = DEFAULT_MARGIN,
    written: bool = False,
) -> AuditReport:
    """The report with every recorded-severity finding marked new, worse or baselined."""
    pending: dict[tuple[str, str], list[int]] = defaultdict(list)  # entry indices, in order
    for i, entry in enumerate(baseline.entries):
        pending[(entry.layer, entry.code)].append(i)

    def judge(f: Finding) -> Finding:
        if not recorded(f):
            return f
        queue = pending.get((f.layer, f.code))
        if not queue:
            return dataclasses.replace(f, status=Status.NEW, status_reason="not in the baseline")
        entry = baseline.entries[queue.pop(0)]
        why = worse(f, entry, margin)
        if why is not None:
            return dataclasses.replace(f, status=Status.WORSE, status_reason=why)
        was = "" if entry.value is None else f" (value {_num(entry.value)} then)"
        return dataclasses.replace(f, status=Status.BASELINED, status_reason=f"in {path}{was}")

    model = tuple(judge(f) for f in report.model_findings)  # recorded like a layer's
    layers = tuple(
        dataclasses.replace(r, findings=tuple(judge(f) for f in r.findings)) for r in report.layers
    )
    left = sorted(i for queue in pending.values() for i in queue)
    check = BaselineCheck(path, margin, tuple(baseline.entries[i] for i in left), written)
    return dataclasses.replace(report, layers=layers, model_findings=model, baseline=check)


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _num(value: float) -> str:
    return f"{value:.3g}"
