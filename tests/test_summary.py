"""`report.summary()` and `report.render("table")` are the text `bnaudit check` prints: the same
renderer, the same width and --verbose choices, the verdict last."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnaudit.check.run import run_check
from bnaudit.cli import app
from bnaudit.gate.config import resolve
from bnaudit.report import table
from bnaudit.report.audit_report import AuditReport
from bnaudit.report.render import summary_line
from tests import nets
from tests.test_python_api import PLANTED_LAYER, plant_stale

MLP_SPEC = f"{Path(nets.__file__).resolve()}:build_mlp"


@pytest.fixture
def planted(tmp_path: Path, healthy_mlp: nn.Module, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint with one stale layer and its data, in a folder with no pyproject.toml."""
    plant_stale(healthy_mlp)
    torch.save(healthy_mlp.state_dict(), tmp_path / "m.pt")
    torch.save(nets.mlp_data(4 * nets.TRAIN_BATCH, seed=5), tmp_path / "d.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def library_report(folder: Path) -> AuditReport:
    """The audit `check` runs, called from Python with the same settings."""
    cli = {"checkpoint": folder / "m.pt", "model": MLP_SPEC, "data": str(folder / "d.pt")}
    return run_check(resolve(cli, None, folder))


@pytest.mark.parametrize(
    ("options", "columns", "width", "verbose"),
    [
        ([], 80, 80, False),
        ([], 120, 120, False),
        (["--wide"], 80, None, False),
        (["--verbose"], 100, 100, True),
    ],
)
def test_summary_is_what_check_prints(
    planted: Path, options: list[str], columns: int, width: int | None, verbose: bool
) -> None:
    args = ["check", str(planted / "m.pt"), "--model", MLP_SPEC, "--data", str(planted / "d.pt")]
    result = CliRunner().invoke(app, [*args, *options], env={"COLUMNS": str(columns)})
    assert result.exit_code == 1, result.output  # the planted layer fails the gate
    assert result.stderr.startswith("bnaudit: auditing ")  # progress stays on stderr
    report = library_report(planted)
    summary = report.summary(width=width, verbose=verbose)
    assert summary == result.stdout
    assert report.render("table", width=width, verbose=verbose) == summary
    lines = summary.splitlines()
    assert lines[-1] == summary_line(report) and lines[-1].startswith("FAIL: ")  # verdict last
    if verbose:  # one line per finding, with its message
        assert any(line.startswith(f"FAIL  {PLANTED_LAYER}  stale-stats: ") for line in lines)
    else:  # grouped: code, count, layers
        assert any(
            line.split()[:4] == ["FAIL", "stale-stats", "1", PLANTED_LAYER] for line in lines
        )
    if width is not None and not verbose:  # the verdict stays one line, to be grepped
        assert max(len(line) for line in lines[:-1]) <= width


def test_summary_defaults_to_the_cli_width_when_unknown() -> None:
    for method in (AuditReport.summary, AuditReport.render):
        assert inspect.signature(method).parameters["width"].default == table.DEFAULT_WIDTH
