"""The CI gate as a team adopts it: [tool.bnaudit], ignores, baselines, GitHub, JUnit, terminal.

The repository tests run the small MLP of tests/nets.py (milliseconds per audit). Byte-for-byte
checks of the GitHub output use `tests.reports.hostile_report`, whose layer names try to
inject workflow commands; golden files live in tests/golden (BNAUDIT_REGENERATE=1 rewrites
them).
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

import bnaudit.check.run
import bnaudit.report.github
from bnaudit.cli import app
from bnaudit.core.errors import BaselineError
from bnaudit.gate.baseline import (
    Baseline,
    apply_baseline,
    from_report,
    read_baseline,
    render_baseline,
)
from bnaudit.gate.ignores import Ignore, apply_ignores
from bnaudit.report.github import (
    SUMMARY_LIMIT,
    escape_data,
    escape_property,
    guard,
    render_annotations,
    render_step_summary,
)
from bnaudit.report.junit import render_junit
from bnaudit.report.record import BaselineEntry
from bnaudit.report.render import render_table, summary_line
from bnaudit.report.terminal import Progress, color_enabled
from bnaudit.verdict.results import Severity, Status
from tests import nets
from tests.reports import EVIL, golden, hostile_report, single_thread

runner = CliRunner()
TOKEN = "0123456789abcdef0123456789abcdef"


def invoke(*args: Any, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], env=env)


def doc(result: Result) -> dict[str, Any]:
    return json.loads(result.stdout)


def statuses(report_doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {
        (layer["name"], f["code"]): f["status"]
        for layer in report_doc["layers"]
        for f in layer["findings"]
    }


def reset(model: nn.Module, bn: int) -> nn.Module:
    """The BN's statistics reset after the updates its counter still counts."""
    with torch.no_grad():
        model[bn].reset_running_stats()
        model[bn].num_batches_tracked.fill_(5)
    return model


def plant_stale(model: nn.Module, linear: int) -> nn.Module:
    """Rescale one Linear's outputs (fine-tuning with frozen BN): the BN behind it goes stale."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer = model[linear]
        layer.weight.mul_((1.5 + 1.5 * torch.rand(layer.out_features, generator=gen))[:, None])
    return model


# --------------------------------------------------------------------------------------------
# A repository in tmp_path


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """State dicts as bytes: healthy; BN "4" stale (its neighbours fit the data, so the
    disagreement is local: evidence of staleness); that and BN "7" reset after its updates;
    and the data."""
    folder = tmp_path_factory.mktemp("ckpts")
    healthy = nets.healthy_mlp()
    out = {}
    for name, model in (
        ("healthy", healthy),
        ("stale", plant_stale(healthy, 3)),
        ("staler", reset(plant_stale(healthy, 3), 7)),
    ):
        torch.save(model.state_dict(), folder / name)
        out[name] = (folder / name).read_bytes()
    torch.save(nets.mlp_data(4 * nets.TRAIN_BATCH, seed=5), folder / "data")
    out["data"] = (folder / "data").read_bytes()
    return out


PYPROJECT = """\
[project]
name = "team-model"

[tool.bnaudit]
model = "nets.py:build_mlp"
data = "calib.pt"
json = "reports/bnaudit.json"
ignore = [
  {layer = "1?", code = "var-*", reason = "the 10-unit BN sees 16 values per channel by design"},
]
"""


@pytest.fixture
def repo(tmp_path: Path, checkpoints: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project: pyproject.toml with [tool.bnaudit], the model code, data, a stale checkpoint."""
    shutil.copy(nets.__file__, tmp_path / "nets.py")
    (tmp_path / "calib.pt").write_bytes(checkpoints["data"])
    (tmp_path / "model.pt").write_bytes(checkpoints["stale"])
    (tmp_path / "reports").mkdir()
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return tmp_path


def report_doc(repo: Path) -> dict[str, Any]:
    return json.loads((repo / "reports" / "bnaudit.json").read_text())


def test_gate_with_config_ignore_and_baseline(repo: Path, checkpoints: dict[str, bytes]) -> None:
    """The afternoon of adoption, step by step, with the exit code of each step."""
    # 1. The stale checkpoint fails the gate configured in pyproject.toml alone.
    first = invoke("check", "model.pt", "--batch-size", "16")
    assert first.exit_code == 1, first.stderr
    d = report_doc(repo)
    assert statuses(d)[("4", "stale-stats")] == "open"
    # The ignore (glob "1?" is layer "10"; "var-*" is var-bias) accepts only that finding.
    by_layer = {layer["name"]: layer for layer in d["layers"]}
    ignored = [f for f in by_layer["10"]["findings"] if f["code"] == "var-bias"]
    assert [f["status"] for f in ignored] == ["ignored"]
    assert ignored[0]["status_reason"].startswith("the 10-unit BN")
    assert statuses(d)[("1", "var-bias")] == "open"  # other layers keep theirs
    assert d["summary"]["findings"]["ignored"] == 1
    assert "var-bias(ignored)" in first.stdout

    # 2. Accept today's findings: the run that writes the baseline passes.
    written = invoke("check", "model.pt", "--batch-size", "16", "--write-baseline", "base.json")
    assert written.exit_code == 0, written.stderr
    entries = json.loads((repo / "base.json").read_text())["findings"]
    recorded = {(e["layer"], e["code"]) for e in entries}
    assert ("4", "stale-stats") in recorded
    assert ("10", "var-bias") not in recorded  # ignored findings are not baselined

    # 3. The baseline is configured once; the same checkpoint passes, nothing stale.
    with (repo / "pyproject.toml").open("a") as f:
        f.write('baseline = "base.json"\nbatch-size = 16\n')
    same = invoke("check", "model.pt")
    assert same.exit_code == 0, same.stderr
    d = report_doc(repo)
    assert statuses(d)[("4", "stale-stats")] == "baselined"
    assert d["baseline"]["stale"] == []
    assert d["summary"]["verdict"] == "pass"

    # 4. A second broken layer is new: the gate fails on it alone.
    (repo / "model.pt").write_bytes(checkpoints["staler"])
    new = invoke("check", "model.pt")
    assert new.exit_code == 1, new.stderr
    d = report_doc(repo)
    assert statuses(d)[("7", "init-stats")] == "new"
    assert statuses(d)[("4", "stale-stats")] == "baselined"
    assert "init-stats [new]" in new.stdout

    # 5. The healthy checkpoint passes, and the baseline entry it no longer needs is stale.
    (repo / "model.pt").write_bytes(checkpoints["healthy"])
    fixed = invoke("check", "model.pt")
    assert fixed.exit_code == 0, fixed.stderr
    stale = report_doc(repo)["baseline"]["stale"]
    assert {"layer": "4", "code": "stale-stats"}.items() <= stale[0].items()
    assert "stale baseline entry: 4 stale-stats" in fixed.stdout
    assert f"--write-baseline {repo / 'base.json'}" in fixed.stdout


def test_a_finding_worse_than_its_baseline_fails(repo: Path) -> None:
    invoke("check", "model.pt", "--batch-size", "16", "--write-baseline", "base.json")
    base = json.loads((repo / "base.json").read_text())
    entry = next(e for e in base["findings"] if e["code"] == "stale-stats")
    measured = entry["value"]
    entry["value"] = measured / 1.5  # as if it had been milder when the baseline was taken
    (repo / "base.json").write_text(json.dumps(base))
    args = ["check", "model.pt", "--batch-size", "16", "--baseline", "base.json"]

    worse = invoke(*args)
    assert worse.exit_code == 1, worse.stderr
    finding = next(
        f for layer in report_doc(repo)["layers"] for f in layer["findings"]
        if f["code"] == "stale-stats"
    )  # fmt: skip
    assert finding["status"] == "worse"
    assert "in the baseline + 10% margin" in finding["status_reason"]

    # A margin wide enough to cover the growth (1.5x) accepts it again.
    assert invoke(*args, "--baseline-margin", "0.6").exit_code == 0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param('{layer = "10", code = "var-bias"}', "missing 'reason'", id="no-reason"),
        pytest.param(
            '{layer = "10", code = "var-bias", reason = "  "}', "non-empty", id="blank-reason"
        ),
        pytest.param(
            '{layer = "10", code = "var-bias", reason = "x", severity = "warn"}',
            "unknown key 'severity'",
            id="unknown-key",
        ),
        pytest.param(
            '{layer = "10", code = "var_bias", reason = "x"}',
            "code = 'var_bias' matches no finding code",
            id="unknown-code",
        ),
        pytest.param('"10"', "expected a table", id="not-a-table"),
    ],
)
def test_bad_ignore_entries_exit_2_naming_the_problem(repo: Path, entry: str, message: str) -> None:
    text = re.sub(r"ignore = \[\n.*\n\]", f"ignore = [{entry}]", PYPROJECT)
    (repo / "pyproject.toml").write_text(text)
    result = invoke("check", "model.pt")
    assert result.exit_code == 2
    assert message in result.stderr
    assert "pyproject.toml: ignore[0]" in result.stderr
    assert result.stdout == ""


def test_unused_ignore_is_reported(repo: Path) -> None:
    text = PYPROJECT.replace('layer = "1?"', 'layer = "decoder.*"')
    (repo / "pyproject.toml").write_text(text)
    result = invoke("check", "model.pt", "--batch-size", "16")
    assert "ignore entry layer = 'decoder.*', code = 'var-*'" in result.stdout
    assert "matched no finding" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "baseline file not found", id="missing"),
        pytest.param("{not json", "not JSON", id="not-json"),
        pytest.param('{"findings": []}', "not a bnaudit baseline", id="not-a-baseline"),
        pytest.param('{"bnaudit_baseline": 99, "findings": []}', "format 99", id="format"),
        pytest.param(
            '{"bnaudit_baseline": 1, "findings": [{"layer": "1", "code": "x", "severity": "bad"}]}',
            "findings[0]: severity 'bad'",
            id="bad-entry",
        ),
    ],
)
def test_bad_baseline_exits_2_before_the_audit(
    repo: Path, content: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if content is not None:
        (repo / "base.json").write_text(content)
    calls: list[Any] = []
    monkeypatch.setattr(bnaudit.check.run, "audit", lambda *a, **k: calls.append(a))
    result = invoke("check", "model.pt", "--baseline", "base.json")
    assert result.exit_code == 2
    assert "base.json" in result.stderr
    assert message in result.stderr
    assert calls == []


def test_two_outputs_on_one_path_are_refused(repo: Path) -> None:
    result = invoke("check", "model.pt", "--html", "out.x", "--junit", "./out.x")
    assert result.exit_code == 2
    assert "--html and --junit" in result.stderr


def test_baseline_is_never_written_over_an_input(repo: Path) -> None:
    before = (repo / "model.pt").read_bytes()
    result = invoke("check", "model.pt", "--write-baseline", "model.pt")
    assert result.exit_code == 2
    assert "refusing to write a report over an input file" in result.stderr
    assert (repo / "model.pt").read_bytes() == before


def test_baseline_can_be_rewritten_in_place(repo: Path) -> None:
    invoke("check", "model.pt", "--batch-size", "16", "--write-baseline", "base.json")
    again = invoke(
        "check", "model.pt", "--batch-size", "16", "--baseline", "base.json",
        "--write-baseline", "base.json",
    )  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert read_baseline(repo / "base.json").entries


# --------------------------------------------------------------------------------------------
# Baselines, by rule


def _with(report: Any, layer: str, **changes: Any) -> Any:
    import dataclasses

    layers = tuple(
        dataclasses.replace(
            r, findings=tuple(dataclasses.replace(f, **changes) for f in r.findings)
        )
        if r.name == layer
        else r
        for r in report.layers
    )
    return dataclasses.replace(report, layers=layers)


def test_baseline_margin_rule() -> None:
    report = hostile_report()
    base = from_report(report)
    assert [(e.layer, e.code) for e in base.entries] == [
        ("blocks.0.bn", "stale-stats"),
        (EVIL, "var-bias"),
        ("head.bn", "var-bias"),
    ]

    def status(value: float, severity: Severity = Severity.FAIL) -> Status:
        changed = _with(report, "blocks.0.bn", value=value, severity=severity)
        judged = apply_baseline(changed, base, path="b.json", margin=0.1)
        return judged.layer("blocks.0.bn").findings[0].status

    assert status(0.5) is Status.BASELINED
    assert status(0.55) is Status.BASELINED  # exactly +10 %: not beyond the margin
    assert status(0.5501) is Status.WORSE
    assert status(0.1) is Status.BASELINED  # better is fine
    assert status(float("nan")) is Status.WORSE  # unmeasurable is never better
    warn_base = Baseline(
        tuple(BaselineEntry(e.layer, e.code, Severity.WARN, e.value) for e in base.entries)
    )
    judged = apply_baseline(report, warn_base, path="b.json")
    assert judged.layer("blocks.0.bn").findings[0].status is Status.WORSE  # warn -> fail
    assert (
        "severity fail, warn in the baseline"
        in judged.layer("blocks.0.bn").findings[0].status_reason
    )


def test_baseline_pairs_repeated_codes_and_reports_stale_entries() -> None:
    report = hostile_report()
    base = from_report(report)
    extra = BaselineEntry("gone.bn", "tiny-var", Severity.WARN, 2000.0)
    twice = Baseline((*base.entries, base.entries[0], extra))
    judged = apply_baseline(report, twice, path="b.json")
    assert judged.passed
    assert judged.baseline is not None
    assert judged.baseline.stale == (base.entries[0], extra)


def test_baseline_file_round_trips_without_nan_or_timestamps(tmp_path: Path) -> None:
    report = _with(hostile_report(), "head.bn", value=float("inf"))
    text = render_baseline(from_report(report))
    assert "Infinity" not in text and "NaN" not in text
    assert render_baseline(from_report(report)) == text  # deterministic
    path = tmp_path / "b.json"
    path.write_text(text, encoding="utf-8")
    back = read_baseline(path)
    assert back.entries == from_report(report).entries
    assert back.entries[2].value is None  # non-finite is recorded as "no value"


def test_ignores_keep_the_finding_and_its_reason() -> None:
    report = apply_ignores(
        hostile_report(), [Ignore("blocks.*", "stale-*", "known, tracked in #12")]
    )
    f = report.layer("blocks.0.bn").findings[0]
    assert (f.status, f.status_reason, f.severity) == (
        Status.IGNORED,
        "known, tracked in #12",
        Severity.FAIL,
    )
    assert report.passed  # the only fail finding is ignored
    assert report.layer("blocks.0.bn").verdict == "ok"
    assert len(report.findings) == 3  # still listed


def test_read_baseline_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match=r"nope\.json"):
        read_baseline(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------
# GitHub Actions


def test_workflow_command_escaping() -> None:
    assert escape_data("100% done\r\nnext") == "100%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    assert escape_data("%0A") == "%250A"  # an escape in the input stays text


def _runner_commands(output: str) -> list[tuple[str, str]]:
    """The workflow commands the Actions runner would execute in `output`.

    Mirrors ActionCommandManager: a line is a command when it starts (after spaces) with
    `::name` (v2) or contains `##[name` (v1); `::stop-commands::T` stops processing until `::T::`.
    """
    executed = []
    stop: str | None = None
    for line in output.splitlines():
        stripped = line.lstrip()
        m = re.match(r"::([^ :]+)[^:]*::(.*)", stripped) or re.search(r"##\[([^ \]]+)", line)
        if not m:
            continue
        name = m.group(1)
        if stop is not None:
            if name == stop:
                stop = None
            continue
        if name == "stop-commands":
            stop = m.group(2)
            continue
        executed.append((name, line))
    return executed


def _fake_audit(**changes: Any) -> Any:
    def audit(*args: Any, checkpoint: str | None = None, **kwargs: Any) -> Any:
        return hostile_report(checkpoint=checkpoint, **changes)

    return audit


@pytest.fixture
def github(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """GitHub Actions environment; the audit returns the hostile report."""
    summary = repo / "step-summary.md"
    summary.write_text("## Earlier step output\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("COLUMNS", "80")  # CI logs: the default width
    monkeypatch.setattr(bnaudit.report.github, "new_token", lambda: TOKEN)
    monkeypatch.setattr(bnaudit.check.run, "audit", _fake_audit())
    (repo / "pyproject.toml").write_text(
        PYPROJECT.replace('layer = "1?", code = "var-*"', 'layer = "head.*", code = "var-bias"')
    )
    return summary


def test_github_annotations_and_summary_byte_for_byte(github: Path) -> None:
    result = invoke("check", "model.pt")
    assert result.exit_code == 1, result.stderr
    assert result.stdout == golden("github-stdout.txt", result.stdout)
    appended = github.read_text(encoding="utf-8")
    assert appended.startswith("## Earlier step output\n\n### bnaudit: FAIL\n")
    assert appended == golden("github-step-summary.md", appended)


def test_github_output_executes_only_bnaudit_annotations(github: Path) -> None:
    result = invoke("check", "model.pt")
    executed = _runner_commands(result.stdout)
    assert [name for name, _ in executed] == ["error", "warning"]
    error, warning = (line for _, line in executed)
    assert error.startswith("::error file=model.pt,title=bnaudit stale-stats%3A blocks.0.bn::")
    # The hostile name is one line: its newline is visible text, ":" "," "%" escaped in the title.
    assert warning.startswith(
        "::warning file=model.pt,title=bnaudit var-bias%3A "
        "evil\\x0a%3A%3Aerror%3A%3Apwned%2C 100%25"
    )
    assert "\x1b" not in result.stdout.split(TOKEN + "::")[-1]  # no raw escape in annotations
    assert "::" + TOKEN + "::" in result.stdout  # processing resumed after the report
    # The ignored head.bn finding is not annotated; everything is in stdout, nothing in stderr.
    assert "head.bn" not in error + warning


def test_github_errors_are_guarded_annotations(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setattr(bnaudit.report.github, "new_token", lambda: TOKEN)
    result = invoke("check", "missing\n::warning::x.pt")
    assert result.exit_code == 2
    executed = _runner_commands(result.stderr)
    assert [name for name, _ in executed] == ["error"]
    assert "%0A::warning::x.pt" in executed[0][1]


def test_annotations_are_capped_with_a_count_of_the_rest() -> None:
    text = render_annotations(hostile_report(), file="m.pt", limit=1)
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("::error ")
    assert lines[1] == (
        "::notice title=bnaudit::2 more finding(s) not annotated (max-annotations = 1); see the "
        "step summary or the reports"
    )


def test_step_summary_stays_under_the_limit(github: Path) -> None:
    big = hostile_report()
    full = render_step_summary(big)
    assert len(full.encode()) < 4000
    cut = render_step_summary(big, max_bytes=len(full.encode()) - 10)
    assert len(cut.encode()) <= len(full.encode()) - 10
    assert cut.endswith(
        "(cut here: a step summary is limited to 1 MiB; the reports have the rest)\n"
    )
    assert render_step_summary(big, max_bytes=20) == ""

    # A summary file that is nearly full gets nothing, and the run says so.
    github.write_bytes(b"x" * (SUMMARY_LIMIT - 100))
    result = invoke("check", "model.pt")
    assert result.exit_code == 1
    assert github.stat().st_size == SUMMARY_LIMIT - 100
    assert "step summary is full" in result.stderr


def test_github_off_in_config_writes_plain_output(github: Path) -> None:
    with (github.parent / "pyproject.toml").open("a") as f:
        f.write('github = "off"\n')
    result = invoke("check", "model.pt")
    assert result.exit_code == 1
    assert "::stop-commands::" not in result.stdout
    assert "::error file=" not in result.stdout
    assert github.read_text() == "## Earlier step output\n"


def test_guard_wraps_text() -> None:
    assert guard("a\nb", TOKEN) == f"::stop-commands::{TOKEN}\na\nb\n::{TOKEN}::\n"
    assert guard("", TOKEN) == ""


# --------------------------------------------------------------------------------------------
# JUnit


def test_junit_has_a_case_per_layer_and_fails_as_the_gate(repo: Path) -> None:
    result = invoke("check", "model.pt", "--batch-size", "16", "--junit", "junit.xml")
    assert result.exit_code == 1
    root = ET.parse(repo / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["1", "4", "7", "10"]
    assert cases["4"].find("failure") is not None
    assert "stale-stats" in (cases["4"].find("failure").get("type") or "")  # type: ignore[union-attr]
    assert all(cases[n].find("failure") is None for n in ("1", "7", "10"))
    # var-bias warns do not fail with fail-on = fail; the ignored one says why.
    assert "var-bias" in (cases["1"].findtext("system-out") or "")
    assert "[ignored: the 10-unit BN" in (cases["10"].findtext("system-out") or "")
    assert root.get("tests") == suite.get("tests") == "4"
    assert root.get("failures") == suite.get("failures") == "1"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["verdict"] == "fail"


def test_junit_keeps_hostile_names_well_formed() -> None:
    text = render_junit(hostile_report())
    assert text == golden("junit.xml", text)
    root = ET.fromstring(text.encode("utf-8"))
    names = [c.get("name") for c in root.iter("testcase")]
    assert names[2] == EVIL.replace("\x1b", "\\x1b")  # the control character XML cannot hold
    assert root.get("failures") == "1"


# --------------------------------------------------------------------------------------------
# Terminal and `bnaudit config`


def test_quiet_prints_only_the_summary_line(repo: Path) -> None:
    result = invoke("check", "model.pt", "--quiet")
    assert result.exit_code == 1
    assert result.stdout.count("\n") == 1
    assert result.stdout.startswith("FAIL: 1 finding fails the gate (fail or worse: stale-stats)")
    assert "(fail on: fail)" not in result.stdout  # the old stutter
    assert result.stderr == ""


def test_no_colour_and_no_progress_when_not_a_terminal(repo: Path) -> None:
    result = invoke("check", "model.pt")
    assert "\033[" not in result.stdout + result.stderr
    assert "batch 1" not in result.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_rules() -> None:
    assert color_enabled(_Tty(), {})
    assert not color_enabled(_Tty(), {"NO_COLOR": "1"})
    assert color_enabled(_Tty(), {"NO_COLOR": ""})  # no-color.org: only a non-empty value
    assert not color_enabled(io.StringIO(), {})
    report = hostile_report()
    coloured = render_table(report, color=True)
    assert "\033[31;1mFAIL\033[0m" in coloured
    assert re.sub("\033\\[[0-9;]*m", "", coloured) == render_table(report)
    assert summary_line(report) in render_table(report)


def test_progress_line() -> None:
    stream = _Tty()
    now = iter([0.0, 2.0, 8.0, 9.0, 10.0])  # start, then one reading per call
    progress = Progress(stream, delay=0.0, clock=lambda: next(now), width=120)
    progress(1, 4)  # 2 s a batch so far: 3 more take 6 s
    progress(4, 4)
    progress(1, 4, "output impact, pass 1")  # its own pace: 1 s a batch since 8 s
    progress(2, 4, "output impact, pass 1")
    progress.close()
    assert stream.getvalue() == (
        "\rbnaudit: [#####...............] audit 1/4 batches, 0:02, ETA 0:06\033[K"
        "\rbnaudit: [####################] audit 4/4 batches, 0:08, ETA 0:00\033[K"
        "\rbnaudit: [#####...............] output impact, pass 1 1/4 batches, 0:09, ETA 0:03\033[K"
        "\rbnaudit: [##########..........] output impact, pass 1 2/4 batches, 0:10, ETA 0:02\033[K"
        "\r\033[K"
    )
    quiet = _Tty()
    Progress(quiet, delay=60.0)(1, None)  # a short audit shows nothing
    assert quiet.getvalue() == ""


def test_config_command_says_where_each_value_comes_from(repo: Path) -> None:
    result = invoke("config", "--stale-z", "3", "--fail-on", "warn")
    assert result.exit_code == 0, result.stderr
    lines = {line.split(" = ")[0].lstrip("# "): line for line in result.stdout.splitlines()}
    pyproject = str(repo / "pyproject.toml")
    assert re.fullmatch(rf'model = "{re.escape(str(repo))}/nets.py:build_mlp" +# {pyproject}',
                        lines["model"])  # fmt: skip
    assert lines["stale-z"].startswith("stale-z = 3.0 ")
    assert lines["stale-z"].endswith("# command line")
    assert lines["fail-on"].endswith("# command line")
    assert lines["stale-shift"].endswith("# default")
    assert lines["trust"].endswith("# default, command line only")
    assert '{layer = "1?", code = "var-*", reason = "the 10-unit BN' in result.stdout
    assert result.stdout.startswith(f"# effective bnaudit settings: defaults < {pyproject} <")


def test_config_command_reports_config_errors(repo: Path) -> None:
    (repo / "pyproject.toml").write_text("[tool.bnaudit]\nbaseline-margn = 0.2\n")
    result = invoke("config")
    assert result.exit_code == 2
    assert "baseline-margn" in result.stderr


def test_run_check_reports_progress_per_batch(repo: Path) -> None:
    from bnaudit.check.run import run_check
    from bnaudit.gate.config import resolve

    calls: list[tuple[int, int | None, str]] = []
    settings = resolve({"checkpoint": Path("model.pt"), "batches": 3}, None, repo)
    run_check(settings, progress=lambda done, total, stage: calls.append((done, total, stage)))
    assert calls[:3] == [(1, 3, "audit"), (2, 3, "audit"), (3, 3, "audit")]
    # then every output-impact pass over the same 3 batches, numbered
    impact = calls[3:]
    assert impact[:3] == [(i, 3, "output impact, pass 1") for i in (1, 2, 3)]
    assert len(impact) % 3 == 0 and impact[-1][:2] == (3, 3)
