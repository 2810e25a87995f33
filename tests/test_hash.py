"""When `bnaudit check` computes the checkpoint's SHA-256, and what every report says when not.

The static audit reads only the BN tensors, so hashing the whole file is most of its cost: a
look at the table skips it, whatever is kept (a report file, a baseline, machine-readable stdout,
GitHub Actions) or any run with --model computes it, and --hash/--no-hash decide outright. Where
it is left out, each report says "not computed: …" in its place, never an empty value.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

from bnaudit.checkpoint import digest
from bnaudit.cli import app
from bnaudit.gate import config
from bnaudit.gate.baseline import read_baseline
from bnaudit.gate.config import CheckSettings
from tests import nets

MLP_SPEC = f"{Path(nets.__file__).resolve()}:build_mlp"
QUICK = "not computed: a static audit shown as a table only"
OFF = "not computed: --no-hash"

runner = CliRunner()


def invoke(*args: Any) -> Result:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under GitHub Actions the default hashes (a CI run is a gate); these runs are local.
    for name in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file bnaudit hashes in this test, in order (the thread's and the direct ones)."""
    seen: list[Path] = []
    real = digest._sha256

    def spy(path: Path) -> str:
        seen.append(Path(path).resolve())
        return real(path)

    monkeypatch.setattr(digest, "_sha256", spy)
    return seen


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A state dict of two BN layers, one of them never calibrated (init-stats: exit 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8))
    model.train()
    model(torch.randn(64, 4))
    with torch.no_grad():
        model[3].running_mean.zero_()
        model[3].running_var.fill_(1.0)
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    return path


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_static_look_at_the_table_does_not_hash(ckpt: Path, hashes: list[Path]) -> None:
    result = invoke("check", ckpt, "--wide")
    assert result.exit_code == 1, result.output
    assert hashes == []
    assert ckpt.resolve() not in digest._pending  # no thread started either (others may run)
    assert f"checkpoint: {ckpt} (sha256 {QUICK}; --hash computes it)" in result.stdout
    assert file_sha(ckpt)[:12] not in result.stdout


def test_hash_option_computes_it_for_the_table(ckpt: Path, hashes: list[Path]) -> None:
    result = invoke("check", ckpt, "--hash", "--wide")
    assert result.exit_code == 1, result.output
    assert hashes == [ckpt.resolve()]  # once, by the thread started before torch's import
    assert f"(sha256 {file_sha(ckpt)})" in result.stdout
    assert "not computed" not in result.stdout


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--json", "r.json"], id="json"),
        pytest.param(["--markdown", "r.md"], id="markdown"),
        pytest.param(["--csv", "r.csv"], id="csv"),
        pytest.param(["--html", "r.html"], id="html"),
        pytest.param(["--junit", "r.xml"], id="junit"),
        pytest.param(["--write-baseline", "b.json"], id="baseline"),
        pytest.param(["--format", "json"], id="stdout-json"),
        pytest.param(["--format", "csv"], id="stdout-csv"),
    ],
)
def test_what_is_kept_is_hashed(
    ckpt: Path, hashes: list[Path], tmp_path: Path, extra: list[str]
) -> None:
    args = [
        tmp_path / a if a.endswith((".json", ".md", ".csv", ".html", ".xml")) else a for a in extra
    ]
    result = invoke("check", ckpt, *args)
    assert result.exit_code in (0, 1), result.output
    assert hashes == [ckpt.resolve()]
    written = [tmp_path / a for a in extra if "." in a]
    text = written[0].read_text() if written else result.stdout
    assert file_sha(ckpt) in text
    assert "not computed" not in text


def test_github_actions_hashes(
    ckpt: Path, hashes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = invoke("check", ckpt)
    assert result.exit_code == 1, result.output
    assert hashes == [ckpt.resolve()]
    assert f"(sha256 {file_sha(ckpt)[:12]})" in summary.read_text()


def test_a_run_with_model_hashes(tmp_path: Path, hashes: list[Path]) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(nets.build_mlp().state_dict(), path)
    result = invoke("check", path, "--model", MLP_SPEC, "--input-shape", "8x20", "--wide")
    assert result.exit_code in (0, 1), result.output
    assert hashes == [path.resolve()]
    assert f"(sha256 {file_sha(path)})" in result.stdout


def test_no_hash_every_report_says_not_computed(
    ckpt: Path, hashes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = {k: tmp_path / f"r.{k}" for k in ("json", "md", "csv", "html", "xml")}
    baseline = tmp_path / "b.json"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")  # hashes by default: --no-hash wins
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = invoke(
        "check", ckpt, "--no-hash", "--wide",
        "--json", out["json"], "--markdown", out["md"], "--csv", out["csv"],
        "--html", out["html"], "--junit", out["xml"], "--write-baseline", baseline,
    )  # fmt: skip
    assert result.exit_code == 0, result.output  # judged against the baseline it wrote
    assert hashes == []

    doc = json.loads(out["json"].read_text())
    assert doc["sha256"] is None
    assert doc["sha256_note"].startswith(OFF)
    assert f"checkpoint: {ckpt} (sha256 {OFF}" in out["md"].read_text()
    assert f"(sha256 {OFF}" in result.stdout
    frame = pd.read_csv(out["csv"], dtype={"layer": str})
    assert len(frame) == 2 and set(frame["sha256"]) == {doc["sha256_note"]}
    assert f"<dt>sha256</dt><dd>{doc['sha256_note']}</dd>" in out["html"].read_text()
    props = {p.get("name"): p.get("value") for p in ET.parse(out["xml"]).getroot().iter("property")}
    assert "sha256" not in props and props["sha256_note"] == doc["sha256_note"]
    written = json.loads(baseline.read_text())
    assert written["sha256"] is None and written["sha256_note"] == doc["sha256_note"]
    assert read_baseline(baseline).sha256 is None
    assert "(sha256 not computed)" in summary.read_text()
    assert "sha256 \n" not in result.stdout and '"sha256": ""' not in out["json"].read_text()


def test_reports_with_the_hash_say_so(ckpt: Path, tmp_path: Path) -> None:
    out = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "xml")}
    baseline = tmp_path / "b.json"
    result = invoke(
        "check", ckpt, "--json", out["json"], "--csv", out["csv"], "--junit", out["xml"],
        "--write-baseline", baseline,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    want = file_sha(ckpt)
    doc = json.loads(out["json"].read_text())
    assert doc["sha256"] == want and doc["sha256_note"] is None
    assert set(pd.read_csv(out["csv"])["sha256"]) == {want}
    props = {p.get("name"): p.get("value") for p in ET.parse(out["xml"]).getroot().iter("property")}
    assert props["sha256"] == want and "sha256_note" not in props
    assert read_baseline(baseline).sha256 == want


@pytest.mark.parametrize(("value", "hashed"), [("false", False), ("true", True)])
def test_config_key(
    ckpt: Path, hashes: list[Path], tmp_path: Path, value: str, hashed: bool
) -> None:
    config = tmp_path / "bnaudit.toml"
    config.write_text(f"hash = {value}\n")
    report = tmp_path / "r.json"
    result = invoke("check", ckpt, "--config", config, "--json", report)
    assert result.exit_code == 1, result.output
    assert hashes == ([ckpt.resolve()] if hashed else [])
    assert json.loads(report.read_text())["sha256"] == (file_sha(ckpt) if hashed else None)


def test_config_key_of_the_wrong_type(ckpt: Path, tmp_path: Path) -> None:
    config = tmp_path / "bnaudit.toml"
    config.write_text('hash = "no"\n')
    result = invoke("check", ckpt, "--config", config)
    assert result.exit_code == 2
    assert "hash" in result.stderr and "Traceback" not in result.output


def test_an_older_baseline_without_the_keys_reads(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"bnaudit_baseline": 1, "checkpoint": "a.pt", "findings": []}))
    b = read_baseline(path)
    assert (b.checkpoint, b.sha256, b.sha256_note) == ("a.pt", None, None)


@pytest.mark.parametrize(
    ("settings", "environ", "why"),
    [
        ({}, {}, config.HASH_QUICK_LOOK),
        ({"model": "m.py:f"}, {}, None),
        ({"json": Path("r.json")}, {}, None),
        ({"write_baseline": Path("b.json")}, {}, None),
        ({}, {"GITHUB_ACTIONS": "true"}, None),
        ({"hash": True}, {}, None),
        ({"hash": False, "model": "m.py:f", "json": Path("r.json")}, {}, config.HASH_OFF),
    ],
)
def test_skipped(settings: dict[str, Any], environ: dict[str, str], why: str | None) -> None:
    assert config.hash_skipped(CheckSettings(Path("c.pt"), **settings), environ) == why


def test_a_diff_baseline_says_why_it_has_no_sha256(ckpt: Path, tmp_path: Path) -> None:
    new = tmp_path / "new.pt"
    state = torch.load(ckpt, weights_only=True)
    state["1.running_mean"] += 1.0
    torch.save(state, new)
    baseline = tmp_path / "b.json"
    result = invoke("diff", ckpt, new, "--write-baseline", baseline)
    assert result.exit_code == 0, result.output
    written = json.loads(baseline.read_text())
    assert written["sha256"] is None
    assert written["sha256_note"].startswith("not recorded: a diff covers two checkpoints")
