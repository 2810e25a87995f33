"""Accepted findings: `ignore = [{layer = "head.bn", code = "var-bias", reason = "..."}]`.

An ignore entry names a layer (a glob over qualified names, `fnmatch` rules, case-sensitive),
a finding code (or a glob over the codes) and a reason, which is required: an accepted finding
must say why it is acceptable. Ignored findings stay in every report, marked `ignored` with the
reason, but count neither for the layer verdicts nor for the gate. Entries that match nothing
are reported as notes, so the list does not rot.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bnaudit.core.errors import ConfigError
from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict.codes import ALL_CODES
from bnaudit.verdict.results import Finding, Status

KEYS = ("layer", "code", "reason")
EXAMPLE = 'ignore = [{layer = "head.bn", code = "var-bias", reason = "why this is acceptable"}]'


@dataclass(frozen=True)
class Ignore:
    """One accepted (layer, code) pattern and why it is accepted."""

    layer: str  # glob over qualified layer names
    code: str  # a finding code, or a glob over the codes
    reason: str
    origin: str = ""  # where it was declared, for messages: "pyproject.toml: ignore[0]"

    def matches(self, finding: Finding) -> bool:
        return fnmatch.fnmatchcase(finding.layer, self.layer) and fnmatch.fnmatchcase(
            finding.code, self.code
        )

    def describe(self) -> str:
        return f"layer = {self.layer!r}, code = {self.code!r}"


def parse_ignores(raw: Any, origin: str) -> tuple[Ignore, ...]:
    """Validate the `ignore` array of a config file; `origin` names the file in messages."""
    if not isinstance(raw, list):
        raise ConfigError(f"{origin}: ignore must be an array of tables, e.g. {EXAMPLE}")
    return tuple(_parse_entry(entry, f"{origin}: ignore[{i}]") for i, entry in enumerate(raw))


def _parse_entry(entry: Any, where: str) -> Ignore:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} = {entry!r}: expected a table, e.g. {EXAMPLE}")
    unknown = [k for k in entry if k not in KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; an ignore entry takes {', '.join(KEYS)}"
        )
    for key in KEYS:
        if key not in entry:
            what = {
                "reason": "say why the finding is acceptable",
                "layer": 'the layer name or a glob such as "head.*"',
                "code": 'the finding code, such as "var-bias"',
            }[key]
            raise ConfigError(f"{where}: missing {key!r}: {what}")
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {key} = {value!r}: expected a non-empty string")
    code = entry["code"]
    if not any(fnmatch.fnmatchcase(known, code) for known in ALL_CODES):
        raise ConfigError(
            f"{where}: code = {code!r} matches no finding code; the codes are "
            f"{', '.join(ALL_CODES)}"
        )
    return Ignore(entry["layer"], code, entry["reason"].strip(), where)


def apply_ignores(report: AuditReport, ignores: Iterable[Ignore]) -> AuditReport:
    """The report with every finding matched by an entry marked ignored (first entry wins)."""
    ignores = tuple(ignores)
    if not ignores:
        return report
    used: set[Ignore] = set()

    def mark(f: Finding) -> Finding:
        for entry in ignores:
            if entry.matches(f):
                used.add(entry)
                return dataclasses.replace(f, status=Status.IGNORED, status_reason=entry.reason)
        return f

    layers = tuple(
        dataclasses.replace(r, findings=tuple(mark(f) for f in r.findings)) for r in report.layers
    )
    # The model's findings too (output-change, artifact-output): an entry for layer <model>.
    unused = [
        f"ignore entry {e.describe()} ({e.origin}) matched no finding: remove it or fix it"
        for e in ignores
        if e not in used
    ]
    model = tuple(mark(f) for f in report.model_findings)
    return dataclasses.replace(
        report, layers=layers, model_findings=model, notes=(*report.notes, *unused)
    )
