"""`bnaudit check` run the way a person runs it: exit codes, outputs, reports, configuration.

Most runs use the small MLP of tests/nets.py (milliseconds per audit); the demo CNN with its
planted stale layer is built once per module for the runs that need it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

import bnaudit.check.run
from bnaudit import __version__
from bnaudit.cli import app
from bnaudit.demo import PLANTED_LAYER, make_demo
from tests import nets

MLP_SPEC = f"{Path(nets.__file__).resolve()}:build_mlp"
MLP_LAYERS = ["1", "4", "7", "10"]  # BatchNorm1d positions in build_mlp's Sequential
DEMO_SPEC = "bnaudit.demo:build_model"
DEMO_LAYERS = [
    "stem.1",
    "layer1.bn1",
    "layer1.bn2",
    "layer2.bn1",
    "layer2.bn2",
    "layer2.shortcut.1",
    "layer3.bn1",
    "layer3.bn2",
    "layer3.shortcut.1",
]

runner = CliRunner()


def invoke(*args: Any) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def strict_json(text: str) -> dict[str, Any]:
    """json.loads that fails on NaN/Infinity tokens (not JSON, though Python writes them)."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON constant {token} in the output")

    return json.loads(text, parse_constant=refuse)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def codes(layer: dict[str, Any]) -> set[str]:
    return {f["code"] for f in layer["findings"]}


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {layer["name"]: layer for layer in doc["layers"]}


def plant_stale_mlp(model: nn.Module) -> nn.Module:
    """Scale the second Linear's outputs, as fine-tuning with frozen BN would: BN "4" goes
    stale, while BN "1" before it and BN "7" after it fit the data (the evidence that it is
    stale, not the data different: `bnaudit.verdict.staleness`)."""
    model = copy.deepcopy(model)
    linear = model[3]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        linear.weight.mul_((1.5 + 1.5 * torch.rand(linear.out_features, generator=gen))[:, None])
    return model


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo checkpoint (stale layer planted at PLANTED_LAYER) and 2 batches of images."""
    return make_demo(tmp_path_factory.mktemp("demo"), calib_batches=2)


@pytest.fixture
def mlp_data(tmp_path: Path) -> Path:
    path = tmp_path / "data.pt"
    torch.save(nets.mlp_data(4 * nets.TRAIN_BATCH, seed=5), path)
    return path


@pytest.fixture
def healthy_ckpt(tmp_path: Path, healthy_mlp: nn.Module) -> Path:
    path = tmp_path / "healthy.pt"
    torch.save(healthy_mlp.state_dict(), path)
    return path


@pytest.fixture
def stale_ckpt(tmp_path: Path, healthy_mlp: nn.Module) -> Path:
    path = tmp_path / "stale.pt"
    torch.save(plant_stale_mlp(healthy_mlp).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def demo_run(demo: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One demo run writing every report, with JSON on stdout (shared by the format tests)."""
    ckpt, data = demo
    out = tmp_path_factory.mktemp("reports")
    paths = {"md": out / "r.md", "csv": out / "r.csv", "json": out / "r.json"}
    result = invoke(
        "check", ckpt, "--model", DEMO_SPEC, "--data", data, "--format", "json",
        "--markdown", paths["md"], "--csv", paths["csv"], "--json", paths["json"],
    )  # fmt: skip
    return {"result": result, "paths": paths, "ckpt": ckpt, "folder": out}


# --------------------------------------------------------------------------------------------
# Exit codes


def test_healthy_checkpoint_exits_0(healthy_ckpt: Path, mlp_data: Path) -> None:
    result = invoke("check", healthy_ckpt, "--model", MLP_SPEC, "--data", mlp_data)
    assert result.exit_code == 0, result.stderr
    assert "PASS" in result.stdout
    for name in MLP_LAYERS:  # the table names every layer
        assert any(line.split()[:1] == [name] for line in result.stdout.splitlines())


def test_planted_stale_layer_exits_1(demo_run: dict[str, Any]) -> None:
    result = demo_run["result"]
    assert result.exit_code == 1, result.stderr
    doc = strict_json(result.stdout)
    assert doc["summary"]["verdict"] == "fail"
    layers = by_name(doc)
    assert layers[PLANTED_LAYER]["verdict"] == "fail"
    assert "stale-stats" in codes(layers[PLANTED_LAYER])
    # The planted layer is the only stale one: nothing upstream of it is flagged.
    stale = [n for n, layer in layers.items() if "stale-stats" in codes(layer)]
    assert stale == [PLANTED_LAYER]


def test_stale_mlp_exits_1_on_the_planted_layer(stale_ckpt: Path, mlp_data: Path) -> None:
    result = invoke("check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "-f", "json")
    assert result.exit_code == 1, result.stderr
    layers = by_name(strict_json(result.stdout))
    assert "stale-stats" in codes(layers["4"])
    assert all("stale-stats" not in codes(layers[n]) for n in MLP_LAYERS if n != "4")


def test_model_without_batchnorm_exits_3(tmp_path: Path) -> None:
    factory = tmp_path / "nobn.py"
    factory.write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Linear(4, 3), "
        "nn.ReLU(), nn.Linear(3, 2))\n"
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.save(model.state_dict(), tmp_path / "nobn.pt")
    torch.save(torch.randn(16, 4), tmp_path / "x.pt")
    result = invoke(
        "check", tmp_path / "nobn.pt", "--model", f"{factory}:build", "--data", tmp_path / "x.pt"
    )
    assert result.exit_code == 3, result.stderr
    assert "nothing to audit" in result.stderr
    assert "BatchNorm" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["missing.pt", "--model", MLP_SPEC], "missing.pt", id="missing-checkpoint"),
        pytest.param(["{ckpt}", "--data", "{data}"], "--model", id="state-dict-without-model"),
        pytest.param(
            ["{ckpt}", "--model", MLP_SPEC, "--data", "{data}", "--input-shape", "4x20"],
            "--input-shape",
            id="data-and-input-shape",
        ),
        pytest.param(
            ["{ckpt}", "--model", MLP_SPEC, "--input-shape", "8xabc"],
            "8xabc",
            id="bad-input-shape",
        ),
        pytest.param(
            ["{ckpt}", "--model", MLP_SPEC, "--data", "{data}", "--batch-size", "0"],
            "--batch-size",
            id="batch-size-0",
        ),
        pytest.param(
            ["{ckpt}", "--model", MLP_SPEC, "--data", "{data}", "--device", "nonsense"],
            "nonsense",
            id="bad-device",
        ),
        pytest.param(
            ["{ckpt}", "--model", MLP_SPEC, "--data", "{data}", "--fail-on", "sometimes"],
            "sometimes",
            id="bad-fail-on-choice",
        ),
    ],
)
def test_input_errors_exit_2(
    args: list[str],
    expected: str,
    healthy_ckpt: Path,
    mlp_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [a.format(ckpt=healthy_ckpt, data=mlp_data) for a in args]
    result = invoke("check", *argv)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_fail_on_warn_turns_warnings_into_exit_1(healthy_ckpt: Path, mlp_data: Path) -> None:
    # Batches of 16 give 1 - sqrt(15/16) = 0.032 > 0.02: a var-bias warning on every layer.
    base = ["check", healthy_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "--batch-size", "16"]
    default = invoke(*base, "-f", "json")
    assert default.exit_code == 0, default.stderr
    doc = strict_json(default.stdout)
    assert doc["summary"]["counts"]["warn"] == len(MLP_LAYERS)
    assert doc["summary"]["counts"]["fail"] == 0

    strict = invoke(*base, "--fail-on", "warn", "-f", "json")
    assert strict.exit_code == 1, strict.stderr
    doc = strict_json(strict.stdout)
    assert doc["summary"]["verdict"] == "fail"
    assert doc["summary"]["fail_on"] == "warn"


def test_fail_on_never_passes_a_failing_checkpoint(stale_ckpt: Path, mlp_data: Path) -> None:
    result = invoke(
        "check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "--fail-on", "never",
        "-f", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc = strict_json(result.stdout)
    assert doc["summary"]["verdict"] == "pass"
    assert doc["summary"]["counts"]["fail"] >= 1  # the finding is still reported
    assert "stale-stats" in codes(by_name(doc)["4"])


# --------------------------------------------------------------------------------------------
# Output formats


def test_json_stdout_schema(demo_run: dict[str, Any]) -> None:
    doc = strict_json(demo_run["result"].stdout)
    assert doc["bnaudit_version"] == __version__
    assert doc["checkpoint"] == str(demo_run["ckpt"])
    assert doc["sha256"] == sha256(demo_run["ckpt"])
    summary = doc["summary"]
    assert summary["verdict"] in {"pass", "fail"}
    assert summary["layers"] == len(DEMO_LAYERS) == len(doc["layers"])
    assert set(summary["counts"]) == {"ok", "info", "warn", "fail"}
    assert sum(summary["counts"].values()) == len(DEMO_LAYERS)
    assert summary["batches"] == 2
    assert summary["synthetic_data"] is False
    assert [layer["name"] for layer in doc["layers"]] == DEMO_LAYERS
    for layer in doc["layers"]:
        assert layer["type"] == "BatchNorm2d"
        assert layer["verdict"] in summary["counts"]
        assert isinstance(layer["metrics"], dict)
        assert layer["metrics"]["channels"] > 0
        for finding in layer["findings"]:
            assert isinstance(finding["code"], str)
            assert finding["severity"] in {"info", "warn", "fail"}
            assert finding["message"]
    verdicts = [layer["verdict"] for layer in doc["layers"]]
    assert {v: verdicts.count(v) for v in summary["counts"]} == summary["counts"]


def test_csv_report_has_a_row_per_layer(demo_run: dict[str, Any]) -> None:
    doc = strict_json(demo_run["result"].stdout)
    frame = pd.read_csv(demo_run["paths"]["csv"], dtype={"layer": str})
    assert list(frame["layer"]) == DEMO_LAYERS
    assert "verdict" in frame.columns
    assert dict(zip(frame["layer"], frame["verdict"], strict=True)) == {
        layer["name"]: layer["verdict"] for layer in doc["layers"]
    }


def test_markdown_report_tables_every_layer(demo_run: dict[str, Any]) -> None:
    text = demo_run["paths"]["md"].read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0][:5] == ["layer", "type", "C", "N", "verdict"]
    assert set(cells[1][0]) <= set("-:")  # the header separator
    body = {row[0]: row for row in cells[2:]}
    assert list(body) == DEMO_LAYERS
    assert body[PLANTED_LAYER][4] == "fail"
    assert "stale-stats" in text


def test_json_report_equals_stdout(demo_run: dict[str, Any]) -> None:
    on_disk = demo_run["paths"]["json"].read_text(encoding="utf-8")
    assert on_disk == demo_run["result"].stdout
    strict_json(on_disk)


def test_same_seed_same_json(stale_ckpt: Path, mlp_data: Path, tmp_path: Path) -> None:
    args = ["check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "--seed", "3"]
    first = invoke(*args, "-f", "json")
    second = invoke(*args, "--json", tmp_path / "second.json")
    assert first.exit_code == second.exit_code == 1
    assert (tmp_path / "second.json").read_text(encoding="utf-8") == first.stdout


def test_unmeasured_metrics_are_null_not_nan(healthy_ckpt: Path) -> None:
    # Without --data only the static checks run: every data metric is NaN inside, null in JSON.
    result = invoke("check", healthy_ckpt, "--model", MLP_SPEC, "-f", "json")
    assert result.exit_code == 0, result.stderr
    doc = strict_json(result.stdout)
    assert doc["summary"]["batches"] == 0
    for layer in doc["layers"]:
        assert layer["metrics"]["recon_train_ratio"] is None
        assert layer["metrics"]["stale_shift_max"] is None
        assert layer["metrics"]["channels"] == 32


# --------------------------------------------------------------------------------------------
# Report files


@pytest.mark.parametrize("option", ["--json", "--csv", "--markdown"])
def test_report_over_the_checkpoint_is_refused(
    option: str, stale_ckpt: Path, mlp_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = stale_ckpt.read_bytes()
    # Spelled differently from the checkpoint argument: the same file all the same.
    target = Path(".") / "sub" / ".." / stale_ckpt.name
    (tmp_path / "sub").mkdir()
    result = invoke("check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, option, target)
    assert result.exit_code == 2
    assert "input file" in result.stderr
    assert stale_ckpt.read_bytes() == before


def test_report_over_the_data_is_refused(stale_ckpt: Path, mlp_data: Path) -> None:
    before = mlp_data.read_bytes()
    result = invoke("check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "--csv", mlp_data)
    assert result.exit_code == 2
    assert mlp_data.read_bytes() == before


@pytest.mark.parametrize("which", ["model-file", "config-file"])
def test_report_over_another_input_is_refused(
    which: str, healthy_ckpt: Path, mlp_data: Path, tmp_path: Path
) -> None:
    """The --model source file and the --config file are inputs too: a report must not replace
    them (it would destroy the user's code or configuration)."""
    model_file = tmp_path / "mymodels.py"
    shutil.copy(nets.__file__, model_file)
    config = tmp_path / "audit.toml"
    config.write_text("[tool.bnaudit]\nstale_shift = 0.3\n")
    target = model_file if which == "model-file" else config
    before = target.read_bytes()
    result = invoke(
        "check", healthy_ckpt, "--model", f"{model_file}:build_mlp", "--data", mlp_data,
        "--config", config, "--markdown", target,
    )  # fmt: skip
    assert target.read_bytes() == before, f"the report replaced the {which}"
    assert result.exit_code == 2


def test_report_in_a_missing_folder_fails_before_the_audit(
    stale_ckpt: Path, mlp_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real_audit = bnaudit.check.run.audit

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real_audit(*args, **kwargs)

    monkeypatch.setattr(bnaudit.check.run, "audit", spy)
    missing = tmp_path / "no" / "such" / "folder" / "report.json"
    result = invoke("check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "--json", missing)
    assert result.exit_code == 2
    assert str(missing.parent) in result.stderr
    assert calls == []
    assert "auditing" not in result.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("failure", ["missing-data", "bad-model", "internal-error"])
def test_existing_report_is_left_intact_when_the_run_fails(
    failure: str,
    stale_ckpt: Path,
    mlp_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reports = {name: tmp_path / name for name in ("old.json", "old.csv", "old.md")}
    for path in reports.values():
        path.write_text(f"previous {path.name}\n")
    model, data = MLP_SPEC, str(mlp_data)
    if failure == "missing-data":
        data = str(tmp_path / "missing.pt")
    elif failure == "bad-model":
        model = "bnaudit.demo:build_model"  # a CNN: the MLP state dict does not fit
    else:

        def boom(*args: Any, **kwargs: Any) -> Any:
            raise ZeroDivisionError("boom")

        monkeypatch.setattr(bnaudit.check.run, "audit", boom)
    result = invoke(
        "check", stale_ckpt, "--model", model, "--data", data,
        "--json", reports["old.json"], "--csv", reports["old.csv"],
        "--markdown", reports["old.md"],
    )  # fmt: skip
    assert result.exit_code == 2
    for path in reports.values():
        assert path.read_text() == f"previous {path.name}\n"


def test_successful_run_leaves_only_the_reports(demo_run: dict[str, Any]) -> None:
    assert demo_run["result"].exit_code == 1
    written = sorted(p.name for p in demo_run["folder"].iterdir())
    assert written == ["r.csv", "r.json", "r.md"]


def test_reports_are_replaced_atomically_without_leftovers(
    healthy_ckpt: Path, mlp_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").write_text("old")
    result = invoke(
        "check", healthy_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "--json", out / "r.json"
    )
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["r.json"]
    assert strict_json((out / "r.json").read_text())["summary"]["verdict"] == "pass"


# --------------------------------------------------------------------------------------------
# Configuration


def test_pyproject_thresholds_apply(
    stale_ckpt: Path, mlp_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # No layer can have more than 100% of its channels stale: the stale verdict is switched off.
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.bnaudit]\nstale-fraction = 1.01\nstale_shift = 0.6\n'
    )
    result = invoke("check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "-f", "json")
    assert result.exit_code == 0, result.stderr
    doc = strict_json(result.stdout)
    assert doc["thresholds"]["stale_fraction"] == 1.01
    assert doc["thresholds"]["stale_shift"] == 0.6
    assert doc["thresholds"]["stale_z"] == 4.0  # untouched default
    assert all("stale-stats" not in codes(layer) for layer in doc["layers"])


def test_pyproject_is_found_from_a_subfolder(
    stale_ckpt: Path, mlp_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.bnaudit]\nfail_on = 'never'\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    result = invoke("check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert strict_json(result.stdout)["summary"]["fail_on"] == "never"


def test_command_line_wins_over_pyproject(
    stale_ckpt: Path, mlp_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        "[tool.bnaudit]\nstale_fraction = 1.01\nfail_on = 'never'\n"
    )
    result = invoke(
        "check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "-f", "json",
        "--stale-fraction", "0.1", "--fail-on", "fail",
    )  # fmt: skip
    assert result.exit_code == 1, result.stderr
    doc = strict_json(result.stdout)
    assert doc["thresholds"]["stale_fraction"] == 0.1
    assert "stale-stats" in codes(by_name(doc)["4"])


@pytest.mark.parametrize("key", ["stale_shfit", "trust"])
def test_unknown_config_key_exits_2_naming_it(
    key: str, healthy_ckpt: Path, mlp_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `trust` is a command-line-only decision: a file in the repository must not make it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(f"[tool.bnaudit]\n{key} = true\n")
    result = invoke("check", healthy_ckpt, "--model", MLP_SPEC, "--data", mlp_data)
    assert result.exit_code == 2
    assert key in result.stderr
    assert "pyproject.toml" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("layout", ["top-level", "tool-table"])
def test_config_option_reads_another_file(
    layout: str,
    stale_ckpt: Path,
    mlp_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    # A broken pyproject.toml here proves --config replaces the search, not adds to it.
    (tmp_path / "pyproject.toml").write_text("[tool.bnaudit]\nno_such_key = 1\n")
    header = "" if layout == "top-level" else "[tool.bnaudit]\n"
    other = tmp_path / "other.toml"
    other.write_text(f"{header}stale_fraction = 1.01\nmin_batch = 4\n")
    result = invoke(
        "check", stale_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "-f", "json",
        "--config", "other.toml",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc = strict_json(result.stdout)
    assert doc["thresholds"]["stale_fraction"] == 1.01
    assert doc["thresholds"]["min_batch"] == 4


def test_config_option_with_a_missing_file_exits_2(
    healthy_ckpt: Path, mlp_data: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.toml"
    result = invoke(
        "check", healthy_ckpt, "--model", MLP_SPEC, "--data", mlp_data, "--config", missing
    )
    assert result.exit_code == 2
    assert "nope.toml" in result.stderr


# --------------------------------------------------------------------------------------------
# Synthetic data, internal errors, version


def test_input_shape_does_not_draw_stale_verdicts(demo: tuple[Path, Path]) -> None:
    ckpt, _ = demo
    result = invoke(
        "check", ckpt, "--model", DEMO_SPEC, "--input-shape", "8x3x32x32", "--batches", "2",
        "-f", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc = strict_json(result.stdout)
    assert doc["summary"]["synthetic_data"] is True
    assert doc["summary"]["batches"] == 2
    planted = by_name(doc)[PLANTED_LAYER]
    assert "stale-stats" not in codes(planted)
    assert planted["metrics"]["stale_judged"] != "yes"
    assert planted["metrics"]["calls"] > 0  # the layer did run on the synthetic batches


def test_internal_error_exits_2_without_traceback(
    healthy_ckpt: Path, mlp_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("planted for the test")

    monkeypatch.setattr(bnaudit.check.run, "audit", boom)
    args = ["check", healthy_ckpt, "--model", MLP_SPEC, "--data", mlp_data]

    quiet = invoke(*args)
    assert quiet.exit_code == 2
    assert "internal error" in quiet.stderr
    assert "ZeroDivisionError" in quiet.stderr
    assert "Traceback" not in quiet.stderr + quiet.stdout
    assert quiet.stdout == ""

    loud = invoke(*args, "--debug")
    assert loud.exit_code == 2
    assert "Traceback" in loud.stderr
    assert "planted for the test" in loud.stderr
    assert "internal error" in loud.stderr


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"bnaudit {__version__}\n"


# --------------------------------------------------------------------------------------------
# The installed console script, as a real process


def console_script() -> str:
    found = shutil.which("bnaudit")
    return found if found else str(Path(sys.executable).parent / "bnaudit")


@pytest.mark.slow
def test_console_script_flags_the_planted_layer(demo: tuple[Path, Path]) -> None:
    ckpt, data = demo
    proc = subprocess.run(
        [console_script(), "check", ckpt.name, "--model", DEMO_SPEC, "--data", data.name,
         "--format", "json"],
        cwd=ckpt.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    layers = by_name(strict_json(proc.stdout))
    assert "stale-stats" in codes(layers[PLANTED_LAYER])


@pytest.mark.slow
def test_python_dash_m_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bnaudit", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bnaudit {__version__}"
