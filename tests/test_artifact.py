"""`bnaudit check ARTIFACT --against CKPT`: each export path of a small model, healthy and with
the defects exports really have, judged on the exact layer where each was planted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from bnaudit.cli import app
from tests.artifacts import BATCH, LAYERS, export, setup

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

runner = CliRunner()


def check(artifact: Path, ckpt: Path, data: Path, model: str, *extra: Any) -> tuple[int, dict]:
    """Exit code and JSON report of an artifact check."""
    report = artifact.parent / f"{artifact.name}.json"
    args = [artifact, "--against", ckpt, "--model", model, "--data", data]
    args += ["--batch-size", BATCH, "--trust", "--json", report, *extra]
    result = runner.invoke(app, ["check", *map(str, args)])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(report.read_text())


def places(report: dict) -> dict[str, str]:
    return {r["name"]: r["metrics"]["artifact_place"] for r in report["layers"]}


def codes(report: dict, layer: str) -> set[str]:
    return {f["code"] for r in report["layers"] if r["name"] == layer for f in r["findings"]}


# How each export path places the three BN layers (torch 2.13, onnxscript 0.7): the dynamo
# exporter folds conv → BN and linear → BN1d, the legacy one conv → BN only; programs keep all.
EXPECTED = {
    "dynamo": {"bn1": "folded", "bn2": "kept", "bn3": "folded"},
    "legacy": {"bn1": "folded", "bn2": "kept", "bn3": "kept"},
    "script": {"bn1": "kept", "bn2": "kept", "bn3": "kept"},
    "trace": {"bn1": "kept", "bn2": "kept", "bn3": "kept"},
    "export": {"bn1": "kept", "bn2": "kept", "bn3": "kept"},
}
SUFFIX = {"dynamo": ".onnx", "legacy": ".onnx", "script": ".pt", "trace": ".pt", "export": ".pt2"}


@pytest.mark.parametrize("how", list(EXPECTED))
def test_each_export_path_of_a_healthy_model_passes(tmp_path: Path, how: str) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / f"m{SUFFIX[how]}", how)
    code, report = check(artifact, ckpt, data, spec)
    assert code == 0, report["findings"]
    assert places(report) == EXPECTED[how]
    assert report["summary"]["model_findings"] == []
    if how in ("dynamo", "legacy"):  # the layer's own output, exposed as an extra graph output
        errs = [r["metrics"]["artifact_output_err"] for r in report["layers"]]
        assert all(e is not None and e < 1e-4 for e in errs), errs


def test_an_onnx_model_exported_in_train_mode_fails_on_every_layer(tmp_path: Path) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    training = torch.onnx.TrainingMode.TRAINING
    artifact = export(
        model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy", training=training
    )
    code, report = check(artifact, ckpt, data, spec)
    assert code == 1
    assert places(report) == dict.fromkeys(LAYERS, "training-mode")
    assert {f["code"] for f in report["summary"]["model_findings"]} == {"artifact-output"}
    # The static audit of the file alone says it too.
    result = runner.invoke(app, ["check", str(artifact), "-q"])
    assert result.exit_code == 1 and "training-mode x3" in result.output


@pytest.mark.parametrize("how", ["script", "trace", "export"])
def test_a_program_made_in_train_mode_fails_on_every_layer(tmp_path: Path, how: str) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model.train(), torch.randn(BATCH, 3, 8, 8), tmp_path / "m.pt", how)
    code, report = check(artifact, ckpt, data, spec)
    assert code == 1
    assert places(report) == dict.fromkeys(LAYERS, "training-mode")


@pytest.mark.parametrize("how", ["dynamo", "legacy"])
def test_a_fold_with_stale_statistics_is_found_on_exactly_that_layer(
    tmp_path: Path, how: str
) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", how)
    state = torch.load(ckpt)
    state["bn1.running_mean"] += 0.5  # recalibrated after the export
    state["bn1.running_var"] *= 1.5
    torch.save(state, ckpt)
    code, report = check(artifact, ckpt, data, spec)
    assert code == 1
    assert places(report) == {**EXPECTED[how], "bn1": "folded-stale"}
    assert codes(report, "bn1") >= {"folded-stale"}
    assert not codes(report, "bn2") and not codes(report, "bn3")


def test_a_kept_node_with_other_statistics_is_kept_stale(tmp_path: Path) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    state = torch.load(ckpt)
    state["bn3.running_var"] *= 2
    torch.save(state, ckpt)
    code, report = check(artifact, ckpt, data, spec)
    assert code == 1
    assert places(report) == {**EXPECTED["legacy"], "bn3": "kept-stale"}


def test_an_eps_changed_in_the_onnx_node_is_an_eps_mismatch(tmp_path: Path) -> None:
    import onnx

    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    proto = onnx.load(str(artifact))
    node = next(n for n in proto.graph.node if n.name == "/bn2/BatchNormalization")
    next(a for a in node.attribute if a.name == "epsilon").f = 1e-2
    onnx.save(proto, str(artifact))
    code, report = check(artifact, ckpt, data, spec)
    assert code == 1
    assert places(report) == {**EXPECTED["legacy"], "bn2": "eps-mismatch"}
    found = [
        (r["name"], f)
        for r in report["layers"]
        for f in r["findings"]
        if f["code"] == "eps-mismatch"
    ]
    assert [name for name, _ in found] == ["bn2"]
    assert found[0][1]["value"] == pytest.approx(1e-2, rel=1e-6)


def test_a_fold_made_with_another_eps_is_an_eps_mismatch(tmp_path: Path) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    deployed = type(model)(eps=1e-2)  # the same weights and statistics, exported with eps 1e-2
    deployed.load_state_dict(model.state_dict())
    artifact = export(deployed.eval(), torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    code, report = check(artifact, ckpt, data, spec)
    assert code == 1
    got = places(report)
    assert got["bn1"] == "eps-mismatch"  # folded, found from W'/W
    assert got["bn2"] == got["bn3"] == "eps-mismatch"  # kept: the node's attribute
    value = next(f["value"] for f in report["layers"][0]["findings"] if f["code"] == "eps-mismatch")
    assert value == pytest.approx(1e-2, rel=1e-2)


@pytest.mark.parametrize("how", ["dynamo", "legacy", "export"])
def test_batchnorm1d_on_n_c_l(tmp_path: Path, how: str) -> None:
    shape = (BATCH, 3, 10)
    model, ckpt, data, spec = setup(tmp_path, shape, factory="build_1d")
    suffix = ".pt2" if how == "export" else ".onnx"
    artifact = export(model, torch.randn(*shape), tmp_path / f"m{suffix}", how)
    code, report = check(artifact, ckpt, data, spec)
    assert code == 0, report["findings"]
    assert set(places(report).values()) <= {"kept", "folded"}
    assert len(report["layers"]) == 2


def _to_half(artifact: Path, node_name: str) -> None:
    """Convert one BatchNormalization node to float16, with casts around it, as a converter
    keeping the graph's float32 inputs does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(artifact))
    graph = proto.graph
    node = next(n for n in graph.node if n.name == node_name)
    inits = {t.name: t for t in graph.initializer}
    for name in node.input[1:]:
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float16"), name))
    x, y = node.input[0], node.output[0]
    cast_in = helper.make_node("Cast", [x], [x + "_half"], to=TensorProto.FLOAT16)
    cast_out = helper.make_node("Cast", [y + "_half"], [y], to=TensorProto.FLOAT)
    node.input[0], node.output[0] = x + "_half", y + "_half"
    at = list(graph.node).index(node)
    graph.node.insert(at + 1, cast_out)
    graph.node.insert(at, cast_in)
    onnx.save(proto, str(artifact))


def test_a_float16_node_that_flushes_a_tiny_variance_is_a_precision_loss(tmp_path: Path) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    small = type(model)(eps=1e-7)
    small.load_state_dict(model.state_dict())
    with torch.no_grad():
        small.bn2.running_var[0] = 2e-8  # float16's smallest step is 6e-8: it becomes 0
    small.eval()
    torch.save(small.state_dict(), ckpt)
    artifact = export(small, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    _to_half(artifact, "/bn2/BatchNormalization")
    code, report = check(artifact, ckpt, data, spec, "--model-arg", "eps=1e-7")
    assert code == 1
    assert places(report) == {**EXPECTED["legacy"], "bn2": "precision-loss"}
    f = next(f for f in report["layers"][1]["findings"] if f["code"] == "precision-loss")
    assert "1 running variances flushed to 0" in f["message"]
    # The static audit of the file sees the float16 buffers (and the zero variance) as well.
    static = runner.invoke(app, ["check", str(artifact), "-v"])
    assert "half-buffers" in static.output and "bad-var" in static.output


def test_torchscript_and_programs_need_trust(tmp_path: Path) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.pt2", "export")
    args = [artifact, "--against", ckpt, "--model", spec, "--data", data]
    result = runner.invoke(app, ["check", *map(str, args)])
    assert result.exit_code == 2
    assert "--trust" in result.output and "runs that code" in result.output


def test_the_artifact_check_takes_the_gate_options(tmp_path: Path) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    state = torch.load(ckpt)
    state["bn1.running_var"] *= 1.5
    torch.save(state, ckpt)
    baseline = tmp_path / "baseline.json"
    code, _ = check(artifact, ckpt, data, spec, "--write-baseline", baseline)
    assert code == 0  # the findings it records are accepted
    code, report = check(artifact, ckpt, data, spec, "--baseline", baseline)
    assert code == 0
    found = [
        *report["summary"]["model_findings"],
        *(f for r in report["layers"] for f in r["findings"]),
    ]
    assert found and {f["status"] for f in found} == {"baselined"}
    code, _ = check(artifact, ckpt, data, spec, "--fail-on", "never")
    assert code == 0


def test_every_artifact_code_has_a_hint_and_a_row_in_the_findings_page() -> None:
    from bnaudit.verdict.codes import ALL_CODES, ARTIFACT_CODES, ARTIFACT_HINTS

    page = (Path(__file__).parent.parent / "docs" / "findings.md").read_text(encoding="utf-8")
    assert set(ARTIFACT_CODES) == set(ARTIFACT_HINTS)
    assert set(ARTIFACT_CODES) <= set(ALL_CODES)  # an ignore entry may name them
    for code in ARTIFACT_CODES:
        assert f"| `{code}` |" in page, code


def test_without_the_onnx_extra_the_message_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = setup(tmp_path)[0]
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # import onnx fails
    result = runner.invoke(app, ["check", str(artifact)])
    assert result.exit_code == 2
    assert "pip install 'bnaudit[onnx]'" in result.output


def test_a_bn_dropped_by_the_export_is_missing_and_the_output_fails(tmp_path: Path) -> None:
    model, ckpt, data, spec = setup(tmp_path)
    deployed = type(model)()
    deployed.load_state_dict(model.state_dict())
    deployed.bn1 = torch.nn.Identity()  # conv1 ships unscaled: an unscaled copy is no fold
    artifact = export(deployed.eval(), torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    code, report = check(artifact, ckpt, data, spec)
    assert code == 1
    assert places(report) == {**EXPECTED["legacy"], "bn1": "missing"}
    assert {f["code"] for f in report["summary"]["model_findings"]} == {"artifact-output"}


def test_the_verdict_line_does_not_speak_of_comparisons_an_artifact_check_never_makes(
    tmp_path: Path,
) -> None:
    # The artifact is compared with its checkpoint, not the running stats with the batches: the
    # PASS line must not say stale-stats was "judged on none" of the layers as if it were skipped.
    model, ckpt, data, spec = setup(tmp_path)
    artifact = export(model, torch.randn(BATCH, 3, 8, 8), tmp_path / "m.onnx", "legacy")
    args = [artifact, "--against", ckpt, "--model", spec, "--data", data, "--batch-size", BATCH]
    result = runner.invoke(app, ["check", *map(str, args)])
    assert result.exit_code == 0, result.output
    verdict = next(line for line in result.output.splitlines() if line.startswith("PASS"))
    assert "judged on" not in verdict, verdict
    # and its top-1 agreement says what it assumed of an unlabelled [B, K] output
    assert "top-1 agreement 100.0% (assumes the [B, " in " ".join(result.output.split())
