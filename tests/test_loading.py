"""Every checkpoint format, loaded safely; every bad checkpoint gets exit 2, a clear message, and
nothing is lost.

Each case is generated in tmp_path. A failing run must name the file and the cause, leave every
file in the folder byte-identical (SHA-256) and a report written before it intact, and never run
code from the file: malicious pickles would create a sentinel file, which must never appear.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import math
import os
import pathlib
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from bnaudit.checkpoint.loading import load_checkpoint
from bnaudit.cli import app

runner = CliRunner()

MODEL_PY = """\
import torch
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
    )


def build_float():
    return build().type(torch.FloatTensor)  # every tensor float32, num_batches_tracked too
"""
BN_LAYERS = ["1", "4"]  # the BN layers of MODEL_PY's model


def build() -> nn.Module:
    namespace: dict = {}
    exec(MODEL_PY, namespace)
    return namespace["build"]()


def calibrated() -> nn.Module:
    """MODEL_PY's model with running stats from 20 train-mode batches (T = 20)."""
    torch.manual_seed(0)
    model = build().train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(8, 3, 8, 8))
    return model.eval()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return calibrated().state_dict()


@pytest.fixture(scope="module")
def model_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """--model for MODEL_PY, kept out of each test's folder (importing it writes __pycache__)."""
    path = tmp_path_factory.mktemp("src") / "model_def.py"
    path.write_text(MODEL_PY)
    return f"{path}:build"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[Path, str]:
    return {p: sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def check(*args: object):
    return runner.invoke(app, ["check", *map(str, args)])


def report_json(result) -> dict:
    return json.loads(result.stdout)


def assert_refused(folder: Path, ckpt: Path, *extra: object, says: list[str]) -> str:
    """Run on `ckpt`: exit 2, one message naming the file and each of `says`, nothing changed."""
    report = folder / "old-report.json"
    report.write_text('{"earlier": "report"}\n')
    before = snapshot(folder)
    result = check(ckpt, *extra, "--json", report)
    assert result.exit_code == 2, result.output
    *progress, err = result.stderr.strip().splitlines()  # "auditing ..." may come first
    assert err.startswith("bnaudit: error: "), result.stderr
    assert not any("error" in line for line in progress), result.stderr
    assert "Traceback" not in result.output
    assert str(ckpt) in err
    for text in says:
        assert text in err, f"{text!r} not in {err!r}"
    assert result.stdout == ""
    assert snapshot(folder) == before  # inputs unchanged, old report intact, nothing new
    return err


def flip_byte(path: Path, record: str, at: int = 0) -> None:
    """Invert one byte of a zip record's data, as a bad disk or transfer would."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(record)
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + at] ^= 0xFF
    path.write_bytes(bytes(data))


def record_of(path: Path, key: str) -> str:
    """The zip record holding the storage of state-dict entry `key`."""
    ckpt = load_checkpoint(path)
    assert ckpt.records is not None and ckpt.archive is not None
    return ckpt.archive.full(ckpt.records[key])


# --- bad files: exit 2, the cause, nothing changed -------------------------------------------


def _missing(tmp: Path) -> Path:
    return tmp / "missing.pt"


def _directory(tmp: Path) -> Path:
    (tmp / "ckpt.pt").mkdir()
    return tmp / "ckpt.pt"


def _empty(tmp: Path) -> Path:
    (tmp / "empty.pt").write_bytes(b"")
    return tmp / "empty.pt"


def _text(tmp: Path) -> Path:
    (tmp / "notes.pt").write_text("epoch 3: loss 0.12\nepoch 4: loss 0.10\n")
    return tmp / "notes.pt"


def _json(tmp: Path) -> Path:
    (tmp / "config.pth").write_text(json.dumps({"lr": 0.1, "layers": [1, 2]}))
    return tmp / "config.pth"


def _png(tmp: Path) -> Path:
    (tmp / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return tmp / "image.pt"


def _foreign_zip(tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "bundle.pt", "w") as zf:
        zf.writestr("readme.txt", "not a checkpoint")
    return tmp / "bundle.pt"


def _lfs_pointer(tmp: Path) -> Path:
    (tmp / "model.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1024\n"
    )
    return tmp / "model.bin"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_missing, ["no such file"]),
        (_directory, ["is a directory"]),
        (_empty, ["empty (0 bytes)"]),
        (_text, ["text file", "epoch 3"]),
        (_json, ["JSON"]),
        (_png, ["PNG image"]),
        (_foreign_zip, ["zip archive that torch.save did not write", "readme.txt"]),
        (_lfs_pointer, ["Git LFS pointer", "git lfs pull"]),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_not_a_checkpoint(tmp_path: Path, make: Callable[[Path], Path], says: list[str]) -> None:
    assert_refused(tmp_path, make(tmp_path), says=says)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_truncated_zip(tmp_path: Path, state: dict, fraction: float) -> None:
    full = tmp_path / "full.bin"
    torch.save(state, full)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: max(4, int(len(data) * fraction))] if fraction else data[:-1])
    full.unlink()
    assert_refused(tmp_path, cut, says=["truncated", "fetch the file again"])


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.999])
def test_truncated_legacy(tmp_path: Path, state: dict, fraction: float) -> None:
    full = tmp_path / "full.bin"
    torch.save(state, full, _use_new_zipfile_serialization=False)
    data = full.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * fraction)])
    full.unlink()
    assert_refused(tmp_path, cut, says=["legacy torch.save file", "truncated"])


def test_flipped_byte_in_the_pickle(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    flip_byte(ckpt, "model/data.pkl", at=20)
    assert_refused(tmp_path, ckpt, says=["model/data.pkl", "CRC-32", "copy it again"])


def test_flipped_byte_in_a_bn_tensor(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    record = record_of(ckpt, "4.running_var")
    flip_byte(ckpt, record, at=5)
    assert_refused(tmp_path, ckpt, says=[record, "holds 4.running_var", "CRC-32"])


def test_flipped_byte_outside_bn_matters_only_when_read(
    tmp_path: Path, state: dict, model_spec: str
) -> None:
    """The static audit reads BN tensors only, so only their records are checked; --model
    reads every tensor, so a damaged conv weight is caught there."""
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    record = record_of(ckpt, "3.weight")
    flip_byte(ckpt, record)
    assert check(ckpt).exit_code == 0
    assert_refused(
        tmp_path,
        ckpt,
        "--model",
        model_spec,
        "--input-shape",
        "4x3x8x8",
        says=[record, "holds 3.weight", "CRC-32"],
    )


def test_truncated_safetensors(tmp_path: Path, state: dict) -> None:
    full = tmp_path / "full.bin"
    save_file(dict(state), full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-7])
    full.unlink()
    assert_refused(tmp_path, cut, says=["safetensors", "truncated", "ends at byte"])


def test_safetensors_with_a_damaged_header(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "model.safetensors"
    save_file(dict(state), ckpt)
    data = bytearray(ckpt.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["4.running_var"]["data_offsets"][1] += 4  # one element longer than its shape
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    ckpt.write_bytes(bytes(data[:8]) + raw + bytes(data[8 + n :]))
    assert_refused(tmp_path, ckpt, says=["'4.running_var'", "header is damaged"])


# --- code in the file: never run without --trust ---------------------------------------------


class _Touch:
    """Unpickling this creates the sentinel file: harmless proof that code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.sentinel),))


class _Open:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.open, (str(self.sentinel), "w"))


def _plain_pickle(path: Path, payload: object, state: dict) -> None:
    path.write_bytes(pickle.dumps({"state_dict": state, "x": payload}, protocol=2))


def _in_zip(path: Path, payload: object, state: dict) -> None:
    torch.save(payload, path)


def _in_lightning_dict(path: Path, payload: object, state: dict) -> None:
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "callbacks": {"ModelCheckpoint": payload},
    }
    torch.save(lightning, path)


def _in_legacy_file(path: Path, payload: object, state: dict) -> None:
    torch.save({"state_dict": state, "x": payload}, path, _use_new_zipfile_serialization=False)


def _protocol_4(path: Path, payload: object, state: dict) -> None:
    torch.save({"state_dict": state, "x": payload}, path, pickle_protocol=4)


@pytest.mark.parametrize("payload", [_Touch, _Open])
@pytest.mark.parametrize(
    "container", [_plain_pickle, _in_zip, _in_lightning_dict, _in_legacy_file, _protocol_4]
)
def test_malicious_pickle_never_runs(
    tmp_path: Path, state: dict, payload: type, container: Callable
) -> None:
    sentinel = tmp_path / "SENTINEL"
    ckpt = tmp_path / "model.ckpt"
    container(ckpt, payload(sentinel), state)
    modules = "pathlib" if payload is _Touch else "open"
    assert_refused(tmp_path, ckpt, says=["would import", modules])
    assert not sentinel.exists()


def test_trust_runs_the_pickle_so_the_sentinel_test_can_fail(tmp_path: Path, state: dict) -> None:
    sentinel = tmp_path / "SENTINEL"
    ckpt = tmp_path / "model.ckpt"
    _in_lightning_dict(ckpt, _Touch(sentinel), state)
    result = check(ckpt, "--trust", "-f", "json")
    assert result.exit_code == 0, result.output
    assert sentinel.exists()
    notes = report_json(result)["summary"]["notes"]
    assert any("pickle ran as Python code" in n and "pathlib" in n for n in notes)


def test_plain_pickle_is_refused_even_with_trust(tmp_path: Path, state: dict) -> None:
    sentinel = tmp_path / "SENTINEL"
    ckpt = tmp_path / "model.pkl"
    _plain_pickle(ckpt, _Touch(sentinel), state)
    assert_refused(tmp_path, ckpt, "--trust", says=["plain Python pickle", "not loaded at all"])
    assert not sentinel.exists()


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    ckpt = tmp_path / "whole.pt"
    torch.save(calibrated(), ckpt)
    assert_refused(
        tmp_path, ckpt, says=["refused", "torch.nn.modules.batchnorm.BatchNorm2d", "--trust"]
    )
    result = check(ckpt, "--trust", "-f", "json")
    assert result.exit_code == 0, result.output
    layers = report_json(result)["layers"]
    assert [(r["name"], r["type"]) for r in layers] == [(n, "BatchNorm2d") for n in BN_LAYERS]


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TorchScript archive and a torch.export program of the calibrated model."""
    folder = tmp_path_factory.mktemp("programs")
    model = calibrated()
    model[1].eps = 1e-3  # recorded by both formats, unlike in a state dict
    with warnings.catch_warnings():  # torch's own deprecation notices while exporting
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(folder / "scripted.pt"))
        program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
        torch.export.save(program, folder / "exported.pt2")
    return {"torchscript": folder / "scripted.pt", "export": folder / "exported.pt2"}


@pytest.mark.parametrize(
    ("kind", "says"),
    [("torchscript", "TorchScript archive"), ("export", "torch.export program")],
)
def test_compiled_programs_need_trust(
    tmp_path: Path, programs: dict[str, Path], kind: str, says: str
) -> None:
    ckpt = tmp_path / programs[kind].name
    ckpt.write_bytes(programs[kind].read_bytes())
    assert_refused(tmp_path, ckpt, says=[says, "compiled code", "--trust"])
    result = check(ckpt, "--trust", "-f", "json")
    assert result.exit_code == 0, result.output
    report = report_json(result)
    layers = {r["name"]: r["metrics"] for r in report["layers"]}
    assert sorted(layers) == BN_LAYERS
    assert layers["1"]["eps"] == pytest.approx(1e-3)  # read from the program, not assumed
    assert layers["4"]["momentum"] == pytest.approx(0.1)
    assert layers["1"]["num_batches_tracked"] == 20
    assert any("cannot be hooked" in n for n in report["summary"]["notes"])


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_compiled_program_with_model_gets_the_full_audit(
    programs: dict[str, Path], kind: str, model_spec: str
) -> None:
    result = check(
        programs[kind], "--trust", "--model", model_spec, "--input-shape", "4x3x8x8", "-f", "json"
    )
    assert result.exit_code == 0, result.output
    assert report_json(result)["summary"]["forward_passes"] == 8  # the fold check rides along
    refused = check(programs[kind], "--trust", "--input-shape", "4x3x8x8")
    assert refused.exit_code == 2
    assert "cannot be hooked" in refused.stderr and "--model" in refused.stderr


# --- every format audits ---------------------------------------------------------------------


def _bare(path: Path, state: dict) -> None:
    torch.save(state, path)


def _legacy(path: Path, state: dict) -> None:
    torch.save(state, path, _use_new_zipfile_serialization=False)


def _ddp(path: Path, state: dict) -> None:
    torch.save({f"module.{k}": v for k, v in state.items()}, path)


def _lightning(path: Path, state: dict) -> None:
    _in_lightning_dict(path, {"best_model_score": torch.tensor(0.9)}, state)


def _timm(path: Path, state: dict) -> None:
    args = argparse.Namespace(model="resnet", lr=0.1, batch_size=8)
    ema = {k: v.clone() for k, v in state.items()}
    torch.save(
        {"epoch": 9, "arch": "resnet", "state_dict": state, "state_dict_ema": ema, "args": args},
        path,
    )


def _nested(path: Path, state: dict) -> None:
    torch.save({"model": {"model_state_dict": state}, "optimizer": {"lr": 0.1}}, path)


def _safetensors(path: Path, state: dict) -> None:
    save_file(dict(state), path)


def _compiled(path: Path, state: dict) -> None:
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, path)


@pytest.mark.parametrize(
    ("name", "save", "source"),
    [
        ("model.pt", _bare, "top level"),
        ("pytorch_model.bin", _bare, "top level"),
        ("old.pth", _legacy, "top level"),
        ("ddp.pth", _ddp, "top level"),
        ("epoch=3.ckpt", _lightning, "key 'state_dict'"),
        ("model_best.pth.tar", _timm, "key 'state_dict'"),
        ("nested.pt", _nested, "key 'model' → 'model_state_dict'"),
        ("model.safetensors", _safetensors, "top level"),
        ("weights.dat", _safetensors, "top level"),  # told from the bytes, not the name
        ("compiled.pt", _compiled, "top level"),
    ],
)
def test_every_format_audits(
    tmp_path: Path, state: dict, name: str, save: Callable, source: str
) -> None:
    ckpt = tmp_path / name
    save(ckpt, state)
    before = snapshot(tmp_path)
    result = check(ckpt, "-f", "json")
    assert result.exit_code == 0, result.output
    report = report_json(result)
    assert report["sha256"] == sha(ckpt)
    assert [r["name"] for r in report["layers"]] == BN_LAYERS  # wrapper prefixes dropped
    assert report["layers"][0]["metrics"]["num_batches_tracked"] == 20
    assert any(source in n for n in report["summary"]["notes"]), report["summary"]["notes"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("save", [_lightning, _ddp, _timm, _safetensors, _legacy])
def test_wrapped_checkpoints_load_into_the_model(
    tmp_path: Path, state: dict, save: Callable, model_spec: str
) -> None:
    ckpt = tmp_path / "model.ckpt"
    save(ckpt, state)
    result = check(ckpt, "--model", model_spec, "-f", "json")
    assert result.exit_code == 0, result.output
    metrics = report_json(result)["layers"][1]["metrics"]
    assert metrics["momentum"] == pytest.approx(0.1)  # a real module: momentum is known


def test_key_picks_the_ema_weights(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "model_best.pth.tar"
    ema = {k: v.clone() for k, v in state.items()}
    ema["4.running_var"][2] = -1.0  # planted in the EMA copy only
    torch.save({"epoch": 9, "state_dict": state, "state_dict_ema": ema}, ckpt)
    default = check(ckpt, "-f", "json")
    assert default.exit_code == 0
    notes = report_json(default)["summary"]["notes"]
    assert any("--key state_dict_ema" in n for n in notes)
    picked = check(ckpt, "--key", "state_dict_ema", "-f", "json")
    assert picked.exit_code == 1
    findings = {
        (r["name"], f["code"]) for r in report_json(picked)["layers"] for f in r["findings"]
    }
    assert findings == {("4", "bad-var")}
    assert_refused(tmp_path, ckpt, "--key", "ema", says=["--key ema", "state_dict_ema"])


def test_key_prefix_in_a_flat_state_dict(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "two.safetensors"
    both = {f"student.{k}": v for k, v in state.items()}
    both |= {f"teacher.{k}": v.clone() for k, v in state.items() if k.startswith("4.")}
    save_file(both, ckpt)
    result = check(ckpt, "--key", "teacher", "-f", "json")
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in report_json(result)["layers"]] == ["4"]
    assert_refused(tmp_path, ckpt, "--key", "pupil", says=["--key pupil", "student, teacher"])


def test_checkpoint_without_a_state_dict(tmp_path: Path) -> None:
    ckpt = tmp_path / "optim.pt"
    torch.save({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, ckpt)
    assert_refused(tmp_path, ckpt, says=["no state dict found", "'epoch'", "--key"])


def test_protocol_4_is_refused_with_the_reason(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "p4.pt"
    torch.save(state, ckpt, pickle_protocol=4)
    assert_refused(tmp_path, ckpt, says=["pickle protocol 4", "save it again"])


@pytest.mark.parametrize("save", [_bare, _legacy])
def test_checkpoint_saved_on_a_gpu_loads_on_the_cpu(
    tmp_path: Path, state: dict, save: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "gpu.pt"
    with monkeypatch.context() as m:  # torch.save records each storage's device through this
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save(ckpt, {"model": state})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt, weights_only=True)  # the file really asks for a GPU
    result = check(ckpt, "-f", "json")
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in report_json(result)["layers"]] == BN_LAYERS


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_large_zip_is_mapped_not_read(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "big.pt"
    torch.save({"head.weight": torch.ones(64, 1 << 20), **state}, ckpt)  # 256 MiB
    before = _rss()
    loaded = load_checkpoint(ckpt)
    assert loaded.state_dict is not None
    assert float(loaded.state_dict["4.running_var"].sum()) > 0
    assert _rss() - before < 64 << 20


# --- model fit -------------------------------------------------------------------------------


def test_state_dict_that_does_not_fit_the_model(
    tmp_path: Path, state: dict, model_spec: str
) -> None:
    bad = dict(state)
    del bad["3.bias"]
    bad["9.weight"] = torch.ones(2)
    bad["4.running_mean"] = torch.zeros(5)
    ckpt = tmp_path / "model.pt"
    torch.save(bad, ckpt)
    assert_refused(
        tmp_path,
        ckpt,
        "--model",
        model_spec,
        says=[
            "does not fit --model",
            "missing (3.bias)",
            "unexpected (9.weight)",
            "4.running_mean: checkpoint (5,) vs model (4,)",
        ],
    )


def _float_counters(state: dict, value: float | None = None) -> dict:
    return {
        k: (v.float() if value is None else torch.tensor(value))
        if k.endswith("num_batches_tracked")
        else v
        for k, v in state.items()
    }


def test_float_counters_load_into_the_model(tmp_path: Path, state: dict, model_spec: str) -> None:
    """load_state_dict copies a float32 counter into the model's int64 one: the report says so."""
    ckpt = tmp_path / "model.pt"
    torch.save(_float_counters(state), ckpt)
    result = check(ckpt, "--model", model_spec, "--input-shape", "8x3x8x8", "-f", "json")
    assert result.exit_code == 0, result.output
    doc = report_json(result)
    assert [r["name"] for r in doc["layers"]] == BN_LAYERS
    assert all(r["metrics"]["num_batches_tracked"] == 20 for r in doc["layers"])
    assert not any(f["code"] == "bad-counter" for r in doc["layers"] for f in r["findings"])
    notes = doc["summary"]["notes"]
    assert any(
        "num_batches_tracked stored as float32 in 2 layers: 1, 4; load_state_dict converted it "
        "to the model's int64" in n
        for n in notes
    ), notes


def test_a_float_model_with_a_nan_counter_is_audited(
    tmp_path: Path, state: dict, model_spec: str
) -> None:
    """A model built with .type(torch.FloatTensor) keeps a float counter, NaN included."""
    ckpt = tmp_path / "model.pt"
    torch.save(_float_counters(state, math.nan), ckpt)
    spec = model_spec.replace(":build", ":build_float")
    result = check(ckpt, "--model", spec, "--input-shape", "8x3x8x8", "-f", "json")
    assert result.exit_code == 0, result.output  # bad-counter warns; train steps ran
    doc = report_json(result)
    for layer in doc["layers"]:
        bad = [f for f in layer["findings"] if f["code"] == "bad-counter"]
        assert len(bad) == 1 and "nan (torch.float32)" in bad[0]["message"], layer["findings"]
        assert layer["metrics"]["num_batches_tracked"] is None
    notes = doc["summary"]["notes"]
    assert any("stored as float32 in 2 layers" in n and "Module.type()" in n for n in notes)


def test_data_without_a_model(tmp_path: Path, state: dict) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    assert_refused(tmp_path, ckpt, "--input-shape", "4x3x8x8", says=["--input-shape needs --model"])


# --- reading cost: the hash in the background, mapped pages handed back ---------------------


def test_prefetched_digest_is_the_files_sha256(tmp_path: Path) -> None:
    from bnaudit.checkpoint import digest

    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 * digest.CHUNK // 2 + 17))  # more than one chunk, uneven
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    digest.prefetch(path)
    assert digest.sha256_file(path) == want  # collected from the thread
    assert digest.sha256_file(path) == want  # computed again: the prefetch is used once
    missing = tmp_path / "missing.pt"
    digest.prefetch(missing)  # not a file: nothing started, the loader says why
    with pytest.raises(OSError):
        digest.sha256_file(missing)


def test_static_audit_hands_back_the_mapped_pages_and_reads_the_same(tmp_path: Path) -> None:
    from bnaudit.checkpoint.pages import mapped_ranges

    state = {
        f"l{i}.{k}": v.clone() for i in range(3) for k, v in nn.BatchNorm1d(8).state_dict().items()
    }
    for i in range(3):
        state[f"l{i}.running_mean"].normal_()
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    ckpt = load_checkpoint(path)
    assert ckpt.state_dict is not None
    before = {k: v.clone() for k, v in ckpt.state_dict.items()}
    mapped = [
        line
        for line in Path("/proc/self/maps").read_text().splitlines()
        if str(path.resolve()) in line
    ]
    assert bool(mapped_ranges(path)) == bool(mapped)
    # The tensors stay valid: their pages fault in again from the file. The second release
    # reuses the mappings the first looked up.
    ckpt.release_pages()
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in before.items())
    ckpt.release_pages()
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in before.items())
    if mapped:  # Linux with torch's mmap: the static audit goes through the same release
        report = check(path, "-f", "json")
        assert report.exit_code in (0, 1), report.output
