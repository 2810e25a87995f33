"""Hostile ONNX models: external data that points out of the model's folder (the traversal class
of onnx CVE-2022-25882, CVE-2024-27318, CVE-2026-27489), a truncated protobuf, a 2 GB
initializer claimed in a few bytes, a graph of 100,000 nodes. Each ends in one line and exit 2,
within the time and memory bounds of the hostile corpus, and no file is written or changed."""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bnaudit.core.limits import MAX_ONNX_NODES
from tests.hostile import Case, assert_bounded, assert_refused, hashes, run_cases

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
TensorProto, helper = onnx.TensorProto, onnx.helper


def _healthy(folder: Path) -> Path:
    """A conv → ReLU → BN model whose BN stays a node, its tensors in `weights.bin` beside it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.5, 2)
    model.eval()
    path = folder / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False)
    proto = onnx.load(str(path))
    external = folder / "model.onnx"
    onnx.save_model(
        proto,
        str(external),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return external


def _pointing(src: Path, dst: Path, location: str) -> Path:
    """`src` with every external tensor's location replaced by `location`."""
    proto = onnx.load(str(src), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(dst))
    return dst


def _claiming(src: Path, dst: Path) -> Path:
    """A BN variance initializer that claims 2^29 floats (2 GiB) and holds 16 bytes."""
    proto = onnx.load(str(src))
    var = next(t for t in proto.graph.initializer if t.name.endswith("running_var"))
    del var.dims[:]
    var.dims.append(1 << 29)
    onnx.save_model(proto, str(dst))
    return dst


def _claiming_external(src: Path, dst: Path) -> Path:
    """External data whose length claims 2 GiB of a 4-element tensor file."""
    proto = onnx.load(str(src), load_external_data=False)
    var = next(t for t in proto.graph.initializer if t.name.endswith("running_var"))
    del var.dims[:]
    var.dims.append(1 << 29)
    for entry in var.external_data:
        if entry.key == "length":
            entry.value = str(1 << 31)
    onnx.save_model(proto, str(dst))
    return dst


def _many_nodes(dst: Path, count: int) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    names = ["x", *(f"t{i}" for i in range(count))]
    nodes = [helper.make_node("Relu", [a], [b]) for a, b in itertools.pairwise(names)]
    y = helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    dst.write_bytes(model.SerializeToString())
    return dst


def test_hostile_onnx_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    healthy = _healthy(folder)
    outside = tmp_path / "secret.bin"
    outside.write_bytes((folder / "weights.bin").read_bytes())  # valid data, wrong place
    (folder / "sub").mkdir()
    up = _pointing(healthy, folder / "up.onnx", "../secret.bin")
    nested = _pointing(healthy, folder / "nested.onnx", "sub/../../secret.bin")
    absolute = _pointing(healthy, folder / "absolute.onnx", str(outside))
    os.symlink(outside, folder / "link.bin")
    link = _pointing(healthy, folder / "link.onnx", "link.bin")
    whole = (folder / "plain.onnx").read_bytes()
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(whole[: len(whole) // 2])
    claim = _claiming(folder / "plain.onnx", folder / "claim.onnx")
    claim_ext = _claiming_external(healthy, folder / "claim-ext.onnx")
    many = _many_nodes(folder / "many.onnx", 100_000)
    assert many.stat().st_size < 8 << 20
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = hashes(files)
    ckpt = tmp_path / "ck.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).state_dict(), ckpt)

    cases = [
        (Case(["check", up]), "climbs out with '..'"),
        (Case(["check", nested]), "climbs out with '..'"),
        (Case(["check", absolute]), "an absolute path"),
        (Case(["check", link]), "leads out of the model's folder"),
        (Case(["check", truncated]), "truncated or damaged"),
        (Case(["check", claim]), "claims 2147483648 bytes"),
        (Case(["check", claim_ext]), "claims 2147483648 bytes at offset"),
        (Case(["check", many]), f"more than {MAX_ONNX_NODES} nodes"),
        # The same refusals when the artifact is checked against its checkpoint.
        (Case(["check", up, "--against", ckpt, "--model", "x.py:f"]), "climbs out"),
        (Case(["check", many, "--against", ckpt, "--model", "x.py:f"]), "MAX_ONNX_NODES"),
    ]
    ok = Case(["check", healthy])  # external data inside the folder is read
    outcomes = run_cases([c for c, _ in cases] + [ok], tmp_path)
    for (_, says), o in zip(cases, outcomes, strict=False):
        err = assert_refused(o, says)
        assert "secret" not in err or "'..'" in err or "absolute" in err or "leads out" in err
    assert outcomes[-1].code == 0, outcomes[-1]
    assert "1 BN layer" in outcomes[-1].stdout
    assert_bounded(outcomes[-1])
    assert hashes(files) == before  # none changed
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == [
        f for f in files if f.is_relative_to(folder)
    ]  # nothing written beside the models
