"""Class 5 of the hostile corpus: one clear line for every remaining bad input, and a valid
checkpoint under a file name that is not UTF-8 audits normally.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.hostile import (
    Case,
    assert_bounded,
    assert_refused,
    hashes,
    healthy_state,
    model_file,
    patch_headers,
    run_cases,
    save,
)


def _bn(**buffers: torch.Tensor) -> dict[str, torch.Tensor]:
    state = healthy_state()
    state.update({f"1.{k}": v for k, v in buffers.items()})
    return state


def _quantized(t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # deprecated in torch, still what old checkpoints hold
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(t, 0.1, 0, torch.quint8)


def test_every_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    healthy = save(healthy_state(), tmp_path / "healthy.pt")
    deep = tmp_path / "deep.safetensors"
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep.write_bytes(struct.pack("<Q", len(header)) + header)
    u64 = tmp_path / "u64.safetensors"
    state = {k: v for k, v in healthy_state().items() if k.startswith("1.")}
    state["1.num_batches_tracked"] = torch.tensor(-1).view(torch.uint64)  # 2^64 - 1
    save_file(state, str(u64))
    complex_var = save(_bn(running_var=torch.ones(4, dtype=torch.complex64)), tmp_path / "c.pt")
    sparse = save(_bn(running_var=torch.ones(4).to_sparse()), tmp_path / "sparse.pt")
    meta = save({k: v.to("meta") for k, v in healthy_state().items()}, tmp_path / "meta.pt")
    qfile = save(_bn(running_mean=_quantized(torch.ones(4))), tmp_path / "quantized.pt")
    encrypted = patch_headers(healthy, tmp_path / "encrypted.pt", flags=0x1)
    method = patch_headers(healthy, tmp_path / "method.pt", method=99)
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    long_name = tmp_path / ("n" * 300 + ".pt")
    long_path = tmp_path / ("d/" * 2100 + "x.pt")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    sparse_data = save(torch.randn(8, 3, 8, 8).to_sparse(), tmp_path / "sparse-data.pt")
    meta_data = save(torch.empty(8, 3, 8, 8, device="meta"), tmp_path / "meta-data.pt")
    q_data = save(_quantized(torch.randn(8, 3, 8, 8)), tmp_path / "q-data.pt")
    model = model_file(tmp_path)
    files = [healthy, deep, u64, complex_var, sparse, meta, qfile, encrypted, method]
    files += [sparse_data, meta_data, q_data]
    before = hashes(files)

    cases = [
        (["check", deep], "nested too deeply"),
        (["check", u64], "uint64"),
        (["check", u64, "--model", model], "uint64"),
        (["check", complex_var], "complex"),
        (["check", sparse], "sparse"),
        (["check", sparse, "--model", model], "sparse"),
        (["check", meta], "meta tensor"),
        (["check", meta, "--model", model], "meta tensor"),
        (["check", qfile], "quantized"),
        (["check", encrypted], "encrypted"),
        (["check", method], "compression method 99"),
        (["check", loop], "a loop of symbolic links"),
        (["check", long_name], "too long"),
        (["check", long_path], "too long"),
        (["check", fifo], "FIFO"),
        (["check", "/dev/zero"], "character device"),
        (["check", healthy, "--json", "/dev/stdout"], "symbolic link"),
        (["check", healthy, "--model", model, "--data", fifo], "FIFO"),
        (["check", healthy, "--model", model, "--data", sparse_data], "sparse"),
        (["check", healthy, "--model", model, "--data", meta_data], "meta"),
        (["check", healthy, "--model", model, "--data", q_data], "quantized"),
    ]
    outcomes = run_cases([Case(args) for args, _ in cases], tmp_path)
    for (args, says), o in zip(cases, outcomes, strict=True):
        err = assert_refused(o, says)
        assert "internal error" not in err, args
    assert hashes(files) == before


def test_a_file_name_that_is_not_utf8_audits_normally(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    pt = Path(os.fsdecode(folder + b"/ck-\xff\xfe.pt"))
    save(healthy_state(), pt)
    st = Path(os.fsdecode(folder + b"/ck-\xff.safetensors"))
    save_file(healthy_state(), str(st))
    report = tmp_path / "r.json"
    outcomes = run_cases(
        [Case(["check", pt, "--json", report]), Case(["check", st]), Case(["check", pt, "-m"])],
        tmp_path,
    )
    for o in outcomes[:2]:
        assert o.code == 0, o
        assert_bounded(o)
        assert "\\udcff" in o.stdout
    assert json.loads(report.read_text())["checkpoint"].endswith("ck-\\udcff\\udcfe.pt")
    assert outcomes[2].code == 2  # -m needs a value: typer's usage error, still exit 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_bnaudits_own_line(tmp_path: Path) -> None:
    ckpt = save(healthy_state(), tmp_path / "ck.pt")
    ckpt.chmod(0)
    (o,) = run_cases([Case(["check", ckpt])], tmp_path)
    assert_refused(o, "permission denied")
