"""Every `bnaudit` command of the README's quickstart runs as written, on files of the names it
uses (timm and torchvision stubbed as in tests/test_models_data.py: they are not installed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnaudit.cli import app
from bnaudit.inputs.registry import build_model
from tests.test_models_data import FACTORY, _images, stub_timm, stub_torchvision

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["stub_timm", "stub_torchvision"]  # fixtures, used by name below

# models.py:build is called without arguments, as the README writes it.
MODELS = FACTORY.replace("def build(num_classes, width=8):", "def build(num_classes=5, width=8):")
assert MODELS != FACTORY


def quickstart() -> list[str]:
    """The `bnaudit` lines of the first code block under "## Quickstart"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "no code block under ## Quickstart"
    lines = [line for line in block.group(1).splitlines() if line.startswith("bnaudit ")]
    assert len(lines) >= 4, lines
    return lines


def option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


@pytest.mark.usefixtures("stub_timm", "stub_torchvision")
@pytest.mark.parametrize("line", quickstart())
def test_quickstart_command_runs_as_written(
    line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = shlex.split(line, comments=True)[1:]  # the words after "bnaudit"
    assert args[0] == "check", line
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    # The inputs the command names, made the way a user would have them.
    checkpoint = args[1]
    spec = (option(args, "--model") or ["models.py:build"])[0]
    model = build_model(spec, option(args, "--model-arg"))
    torch.save(model.state_dict(), tmp_path / checkpoint)
    for data in option(args, "--data"):
        if data.endswith("/"):
            _images(tmp_path / data, 12)
        else:
            torch.save(torch.randn(64, 3, 20, 20), tmp_path / data)

    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code in (0, 1), f"{line}\n{result.output}"  # 2 would be a broken command
    assert re.match(r"(PASS|FAIL|WARN)\b", result.stdout.splitlines()[-1]), result.stdout
    for report in option(args, "--html"):
        assert (tmp_path / report).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_factory_with_lazy_modules_loads_its_checkpoint(tmp_path: Path) -> None:
    """LazyLinear has no shape until the checkpoint gives it one: not a shape mismatch."""
    (tmp_path / "lazy.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                         nn.Flatten(), nn.LazyLinear(2))\n"
    )
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 2),
    )
    torch.save(net.state_dict(), tmp_path / "m.pt")
    torch.save(torch.randn(16, 3, 8, 8), tmp_path / "d.pt")
    args = ["check", str(tmp_path / "m.pt"), "--model", f"{tmp_path}/lazy.py:build"]
    result = CliRunner().invoke(app, [*args, "--data", str(tmp_path / "d.pt")])
    assert result.exit_code in (0, 1), result.output
    assert "internal error" not in result.output and "shape mismatch" not in result.output
    assert result.stdout.splitlines()[-1].endswith("1 BN layer: 1 fail")  # init stats: audited
