"""JUnit XML for GitLab, Jenkins and other CI systems: one test case per BatchNorm layer.

A layer's test case fails when it has a finding that fails the gate (one that counts and is at
or above `fail_on`), so the XML agrees with the exit code. Its other findings, waived ones
included with their reason, go to the case's `system-out`. Layer names and messages come from
the checkpoint: characters XML 1.0 cannot carry are written as `\\xNN` escapes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from bnaudit.core.version import __version__
from bnaudit.report.record import AuditRecord
from bnaudit.verdict.results import Finding

SUITE = "bnaudit"
# Everything outside XML 1.0's Char production (controls, lone surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """`text` with the characters XML cannot hold replaced by visible escapes."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _finding_text(f: Finding) -> str:
    text = f"{f.severity.label.upper()} {f.code}: {f.message}"
    if not f.counts or f.status.value in ("new", "worse"):
        text += f" [{f.status.value}: {f.status_reason}]"
    if f.hint:
        text += f"\n  fix: {f.hint}"
    return text


def render_junit(report: AuditRecord) -> str:
    cases = []
    failures = 0
    for r in report.layers:
        case = ET.Element("testcase", {"classname": SUITE, "name": xml_text(r.name)})
        fails = [f for f in r.findings if f.counts and report.fail_on.fails(f.severity)]
        rest = [f for f in r.findings if f not in fails]
        if fails:
            failures += 1
            failure = ET.SubElement(
                case,
                "failure",
                {
                    "type": xml_text(" ".join(dict.fromkeys(f.code for f in fails))),
                    "message": xml_text(f"{fails[0].code}: {fails[0].message}"),
                },
            )
            failure.text = xml_text("\n".join(_finding_text(f) for f in fails))
        if rest:
            out = ET.SubElement(case, "system-out")
            out.text = xml_text("\n".join(_finding_text(f) for f in rest))
        cases.append(case)
    counts = {
        "tests": str(len(report.layers)),
        "failures": str(failures),
        "errors": "0",
        "skipped": "0",
    }
    root = ET.Element("testsuites", {"name": SUITE, **counts})
    suite = ET.SubElement(
        root, "testsuite", {"name": xml_text(f"{SUITE}: {report.checkpoint or 'model'}"), **counts}
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("bnaudit_version", __version__),
        ("checkpoint", report.checkpoint),
        ("sha256", report.sha256),
        # why a checkpoint has no sha256; absent when it has one
        ("sha256_note", report.sha256_note if report.checkpoint else None),
        ("verdict", report.verdict),
        ("fail_on", report.fail_on.value),
        ("batches", str(report.batches)),
    ):
        if value is not None:
            ET.SubElement(props, "property", {"name": name, "value": xml_text(value)})
    suite.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"
