"""What a person reads: the table fits the terminal, findings grouped, the verdict last, the
help with every default, and the progress bar on a real pseudo-terminal."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

from bnaudit.check.static import MOMENTUM_CODES, STATIC_CODES
from bnaudit.cli import app
from bnaudit.report.render import render_table
from bnaudit.report.table import COLUMNS, shorten, shorten_all
from bnaudit.verdict.codes import CODES
from bnaudit.verdict.results import FailOn, LayerResult, Severity
from tests import nets
from tests.reports import finding, hostile_report, metrics
from tests.terminal import run_on_pty

MLP_SPEC = f"{Path(nets.__file__).resolve()}:build_mlp"


def invoke(*args: Any, columns: int | None = None) -> Result:
    env = {"COLUMNS": str(columns)} if columns else {}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def many_layers(count: int = 30) -> Any:
    """A report shaped like a ResNet-50: long names, one hint repeated on many layers."""
    layers = []
    for i in range(count):
        name = f"backbone.stages.{i // 4}.blocks.{i % 4}.conv_pw.bn{i % 3 + 1}"
        found = (
            finding(name, "momentum-warmup", Severity.WARN, "(1-m)^T = 0.2", 0.2, "unverified"),
        )
        if i == 7:
            found += (finding(name, "stale-stats", Severity.FAIL, "50% of channels", 0.5, "stale"),)
        layers.append(LayerResult(name, "BatchNorm2d", metrics(num_batches_tracked=12), found))
    return hostile_report(layers=tuple(layers))


def table_lines(text: str) -> list[str]:
    """The table and its legend: everything before the first blank line."""
    return text.split("\n\n")[0].splitlines()


# --------------------------------------------------------------------------------------------
# Width


@pytest.mark.parametrize("width", [80, 120])
def test_table_and_legend_fit_the_width(width: int) -> None:
    text = render_table(many_layers(), width=width)
    lines = table_lines(text)
    assert max(len(line) for line in lines) <= width
    header = lines[0].split()
    assert header[0] == "layer" and "verdict" in header and header[-1] == "findings"
    # the planted layer's row still says fail and names its codes
    row = next(line for line in lines if " fail " in line)
    assert "momentum-warmup" in row or "stale-stats" in row


def test_wider_terminals_show_more_columns_and_wide_shows_all() -> None:
    report = many_layers()
    headers = {
        w: table_lines(render_table(report, width=w))[0].split("  ") for w in (80, 120, None)
    }
    count = {w: len([h for h in hs if h.strip()]) for w, hs in headers.items()}
    assert count[80] < count[120] < count[None] == len(COLUMNS)
    wide = render_table(report, width=None)
    assert "backbone.stages.1.blocks.3.conv_pw.bn2" in wide  # names in full
    narrow = "\n".join(table_lines(render_table(report, width=80)))
    assert "backbone.stages.1.blocks.3.conv_pw.bn2" not in narrow
    rows = [ln.split()[0] for ln in table_lines(render_table(report, width=80))[2:32]]
    full = [r.name for r in report.layers]
    assert len(set(rows)) == len(rows) == 30  # no two rows read alike
    for row, name in zip(rows, full, strict=True):  # both ends kept, and what tells them apart
        assert row.startswith("backbone…") and row.endswith(name.rsplit(".", 1)[1]), row
        assert row.split("…")[1:3] == [name.split(".")[2], name.split(".")[4]], row


def test_mobilenet_rows_keep_their_block_index_at_80_columns() -> None:
    # torchvision's mobilenet_v2 names: shortened from the start they all read features…conv.N
    names = ["features.0.1", "features.1.conv.0.1", "features.1.conv.2"]
    names += [f"features.{i}.conv.{j}" for i in range(2, 18) for j in ("0.1", "1.1", "3")]
    names += ["features.18.1"]
    layers = tuple(LayerResult(n, "BatchNorm2d", metrics(), ()) for n in names)
    lines = table_lines(render_table(hostile_report(layers=layers), width=80))
    rows = [ln.split()[0] for ln in lines[2 : 2 + len(names)]]
    assert len(set(rows)) == len(rows)
    by_name = dict(zip(names, rows, strict=True))
    assert by_name["features.17.conv.3"].startswith("features.17")
    assert by_name["features.16.conv.3"].startswith("features.16")
    assert shorten_all(["features.16.conv.1.1", "features.17.conv.1.1"], 18) == [
        "features.16…1.1",
        "features.17…1.1",
    ]
    assert shorten_all(["features.16.conv.1.1", "features.17.conv.2"], 18) == [
        "features…conv.1.1",  # nothing alike: shortened as before
        "features.17.conv.2",
    ]


def test_every_column_shown_is_in_the_legend() -> None:
    for width in (80, 120, None):
        lines = table_lines(render_table(many_layers(), width=width))
        legend = " ".join(lines[2 + 30 :])
        shown = [h for h in re.split(r"\s{2,}", lines[0]) if h]
        explained = {c.header for c in COLUMNS if c.legend} | {"train×tol", "eval×tol"}
        for header in shown:
            if header in ("layer", "verdict", "findings", "type"):
                continue  # they say what they hold
            assert header in explained, header
            key = "×tol" if "×tol" in header else header
            assert key in legend, (header, legend)


def test_cli_width_comes_from_columns(tmp_path: Path, healthy_mlp: nn.Module) -> None:
    ckpt, data = tmp_path / "m.pt", tmp_path / "d.pt"
    torch.save(healthy_mlp.state_dict(), ckpt)
    torch.save(nets.mlp_data(2 * nets.TRAIN_BATCH, seed=5), data)
    widths = {}
    for columns in (80, 120):
        result = invoke("check", ckpt, "--model", MLP_SPEC, "--data", data, columns=columns)
        assert result.exit_code == 0, result.stderr
        widths[columns] = max(len(line) for line in table_lines(result.stdout))
        assert widths[columns] <= columns
    wide = invoke("check", ckpt, "--model", MLP_SPEC, "--data", data, "--wide", columns=80)
    assert table_lines(wide.stdout)[0].split()[:2] == ["layer", "type"]
    assert max(len(line) for line in table_lines(wide.stdout)[:3]) > 80


def test_names_are_shortened_keeping_both_ends() -> None:
    assert shorten("layer3.0.downsample.1", 19) == "layer3…downsample.1"
    assert shorten("layer3.0.downsample.1", 40) == "layer3.0.downsample.1"
    assert len(shorten("a" * 50, 10)) == 10
    for width in range(4, 30):
        assert len(shorten("backbone.stages.3.blocks.2.conv_pw.bn1", width)) <= width


# --------------------------------------------------------------------------------------------
# Findings and the verdict


def test_findings_are_grouped_one_line_per_code() -> None:
    text = render_table(many_layers(), width=80)
    lines = text.splitlines()
    warmup = [line for line in lines if "momentum-warmup" in line and line.startswith("WARN")]
    assert len(warmup) == 1
    assert re.match(r"WARN  momentum-warmup +30  backbone", warmup[0])
    assert warmup[0].endswith("more") and len(warmup[0]) <= 80
    assert text.count("fix:") == 2  # one per group, not one per layer
    assert re.search(r"^FAIL  stale-stats +1  backbone.stages.1.blocks.3", text, re.M)


def test_verbose_lists_every_finding_with_its_message() -> None:
    text = render_table(many_layers(), width=80, verbose=True)
    assert text.count("(1-m)^T = 0.2") == 30
    assert "backbone.stages.1.blocks.3.conv_pw.bn2" in text


def test_the_verdict_is_the_last_line_and_says_what_fails() -> None:
    last = render_table(many_layers()).splitlines()[-1]
    assert last == (
        "FAIL: 1 finding fails the gate (fail or worse: stale-stats); 30 BN layers: 29 warn, 1 fail"
    )
    warn = dataclasses.replace(many_layers(), fail_on=FailOn.WARN)
    assert (
        render_table(warn)
        .splitlines()[-1]
        .startswith(
            "FAIL: 31 findings fail the gate (warn or worse: momentum-warmup x30, stale-stats)"
        )
    )
    never = dataclasses.replace(warn, fail_on=FailOn.NEVER)
    assert (
        render_table(never)
        .splitlines()[-1]
        .startswith("PASS: the gate is off (--fail-on never); 30 BN layers")
    )


def test_cli_verdict_last_and_quiet_prints_it_alone(tmp_path: Path, healthy_mlp: nn.Module) -> None:
    ckpt, data = tmp_path / "m.pt", tmp_path / "d.pt"
    torch.save(healthy_mlp.state_dict(), ckpt)
    torch.save(nets.mlp_data(2 * nets.TRAIN_BATCH, seed=5), data)
    full = invoke("check", ckpt, "--model", MLP_SPEC, "--data", data)
    last = full.stdout.splitlines()[-1]
    assert last.startswith("PASS: no finding at fail or worse; 4 BN layers: ")
    quiet = invoke("check", ckpt, "--model", MLP_SPEC, "--data", data, "-q")
    assert quiet.stdout == last + "\n"


def test_static_audit_headline_says_which_checks_ran(
    tmp_path: Path, healthy_mlp: nn.Module
) -> None:
    ckpt = tmp_path / "m.pt"
    torch.save(healthy_mlp.state_dict(), ckpt)
    result = invoke("check", ckpt, "--wide")  # notes unwrapped
    assert result.exit_code == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    # a state dict stores no momentum: the momentum checks did not run
    ran = re.search(r"^note: checks run: (.*)$", result.stdout, re.M)
    assert ran is not None
    listed = ran.group(1).split(", ")
    assert set(listed) == set(STATIC_CODES) and not set(listed) & set(MOMENTUM_CODES)
    assert last.startswith(
        f"PASS: static checks only, {len(listed)} of {len(CODES)} checks; pass --model and "
        "--data for the rest"
    )
    no_data = invoke("check", ckpt, "--model", MLP_SPEC)
    assert no_data.exit_code == 0, no_data.stderr
    assert re.match(
        r"PASS: static checks only, (\d+) of \d+ checks; pass --data or --input-shape for the rest",
        no_data.stdout.splitlines()[-1],
    )


# --------------------------------------------------------------------------------------------
# Help and messages


def test_help_shows_every_default_at_80_columns() -> None:
    result = invoke("check", "--help", columns=80)
    assert result.exit_code == 0
    text = result.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    defaults = ["cpu", "0", "32", "fail", "0.3", "fit the terminal, COLUMNS or 80"]
    flat = " ".join(text.split())  # help wraps lines anywhere
    for shown in [f"[default: {d}" for d in defaults] + ["TOML file with a [tool.bnaudit] table"]:
        assert shown in flat, shown
    assert "Device ." not in text and "a  table" not in text
    assert invoke("-h").stdout == invoke("--help").stdout
    assert invoke("check", "-h", columns=80).stdout == text


def test_short_version_flag() -> None:
    result = invoke("-V")
    assert result.exit_code == 0 and result.stdout.startswith("bnaudit ")
    assert result.stdout == invoke("--version").stdout


def test_a_bad_choice_lists_the_allowed_values(tmp_path: Path, monkeypatch: Any) -> None:
    result = invoke("check", "m.pt", "--fail-on", "warning")
    assert result.exit_code == 2
    assert all(f"'{v}'" in result.stderr for v in ("fail", "warn", "never"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.bnaudit]\nfail-on = "warning"\n')
    result = invoke("config")
    assert result.exit_code == 2
    assert "choose one of fail, warn, never" in result.stderr


@pytest.mark.parametrize(
    ("key", "nearest"),
    [("stale-shfit", "stale-shift"), ("fail_on_", "fail-on"), ("batchsize", "batch-size")],
)
def test_an_unknown_config_key_suggests_the_nearest(
    tmp_path: Path, monkeypatch: Any, key: str, nearest: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(f"[tool.bnaudit]\n{key} = 1\n")
    result = invoke("config")
    assert result.exit_code == 2
    assert f"unknown key '{key}' in [tool.bnaudit] (did you mean '{nearest}'?)" in result.stderr


def test_no_suggestion_when_nothing_is_close(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.bnaudit]\nzzz = 1\n")
    result = invoke("config")
    assert result.exit_code == 2 and "did you mean" not in result.stderr


# --------------------------------------------------------------------------------------------
# Progress on a pseudo-terminal

SLOW = """
import time
from tests.nets import build_mlp


def build():
    net = build_mlp()
    # every forward takes a while: the bar shows after its 0.5 s delay
    net.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    return net
"""


def test_progress_bar_on_a_pty_covers_the_impact_passes(
    tmp_path: Path, healthy_mlp: nn.Module
) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    ckpt, data = tmp_path / "m.pt", tmp_path / "d.pt"
    torch.save(healthy_mlp.state_dict(), ckpt)
    torch.save(nets.mlp_data(6 * nets.TRAIN_BATCH, seed=5), data)
    root = Path(nets.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "80", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "bnaudit", "check", ckpt, "--model", f"{tmp_path}/slow.py:build",
           "--data", data, "--batch-size", "32"]  # fmt: skip
    frames, out = run_on_pty(cmd, env, tmp_path)
    audit = [f for f in frames if " audit " in f]
    impact = [f for f in frames if "output impact, pass 1" in f]
    assert audit and impact, frames
    assert re.fullmatch(r"bnaudit: \[#+\.*\] audit \d/6 batches, \d:\d\d, ETA \d:\d\d", audit[-1])
    assert re.fullmatch(
        r"bnaudit: \[#+\] output impact, pass 1 6/6 batches, \d:\d\d, ETA 0:00", impact[-1]
    )
    assert frames[-1] == ""  # the line is cleared before the table is printed
    assert b"\r" not in out and out.decode().splitlines()[-1].startswith("PASS")
