"""The cost of `bnaudit check ARTIFACT --against CKPT`: the whole check (artifact opened, the
checkpoint loaded into the model, BN layers found, both run on every batch) against the plain
passes it cannot do without, one eval pass of the model and one run of the artifact per batch.

`section(quick)` measures and returns a RESULTS.md section; `python benchmarks/artifact_cost.py
[--quick]` prints it. Repeats are interleaved (plain, check, plain, ...) and the median of each
is compared, as bench.py does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

MODEL_PY = """
from torch import nn


def block(c_in, c_out, stride):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def build():
    layers = block(3, 32, 2) + block(32, 32, 1) + block(32, 64, 2) + block(64, 64, 1)
    layers += block(64, 128, 2) + block(128, 128, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
"""
SHAPE = (16, 3, 64, 64)


def _setup(folder: Path, batches: int) -> tuple[nn.Module, Path, Path, Path, list[torch.Tensor]]:
    (folder / "models.py").write_text(MODEL_PY)
    scope: dict = {}
    exec(compile(MODEL_PY, str(folder / "models.py"), "exec"), scope)
    torch.manual_seed(0)
    model = scope["build"]()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*SHAPE))
    model.eval()
    ckpt = folder / "ck.pt"
    torch.save(model.state_dict(), ckpt)
    data = [torch.randn(*SHAPE) for _ in range(batches)]
    data_path = folder / "data.pt"
    torch.save(torch.cat(data), data_path)
    onnx_path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (data[0],), str(onnx_path), dynamo=False)
    return model, ckpt, data_path, onnx_path, data


def _plain(model: nn.Module, session, data: list[torch.Tensor]) -> float:
    name = session.get_inputs()[0].name
    started = time.perf_counter()
    with torch.no_grad():
        for x in data:
            model(x)
            session.run(None, {name: x.numpy()})
    return time.perf_counter() - started


def _check(folder: Path, ckpt: Path, data: Path, onnx_path: Path) -> float:
    from bnaudit.artifact import run_artifact_check
    from bnaudit.gate.config import resolve

    cli = {
        "checkpoint": onnx_path,
        "against": ckpt,
        "model": f"{folder / 'models.py'}:build",
        "data": str(data),
        "batch_size": SHAPE[0],
        "hash": False,
    }
    settings = resolve(cli, None, folder)
    started = time.perf_counter()
    report = run_artifact_check(settings)
    elapsed = time.perf_counter() - started
    assert report.passed, report.findings
    return elapsed


def section(quick: bool = False) -> str:
    """The RESULTS.md section: the check's time against its plain passes."""
    import onnxruntime as ort

    repeats, batches = (3, 4) if quick else (7, 16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, ckpt, data_path, onnx_path, data = _setup(folder, batches)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        plain, check = [], []
        for _ in range(repeats):
            plain.append(_plain(model, session, data))
            check.append(_check(folder, ckpt, data_path, onnx_path))
    p, c = statistics.median(plain), statistics.median(check)
    dims = "×".join(map(str, SHAPE))
    return "\n".join(
        [
            "## Artifact check against its checkpoint",
            "",
            f"`bnaudit check model.onnx --against ck.pt` on a 6-block conv-BN-ReLU CNN (legacy "
            f"ONNX export: 6 BN layers folded into their convs), {batches} batches of {dims}, "
            f"{torch.get_num_threads()} threads, median of {repeats} interleaved repeats. Plain "
            "passes: one eval forward of the model and one onnxruntime run of the artifact per "
            "batch. The check adds the artifact's parsing and session (with an extra output per "
            "layer), loading the checkpoint, one forward to pair convs with BN, and the "
            "comparisons.",
            "",
            "| plain passes (s) | artifact check (s) | check / plain |",
            "|---|---|---|",
            f"| {p:.3f} | {c:.3f} | {c / p:.2f} |",
            "",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    sys.stdout.write(section(parser.parse_args().quick))
