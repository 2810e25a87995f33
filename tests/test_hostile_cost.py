"""Class 4 of the hostile corpus: files of a few bytes to a few MB that claimed seconds to hours,
or gigabytes, end within seconds and bounded memory, with exit 2 and a message.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from bnaudit.core.limits import (
    DEFAULT_MAX_BATCHES,
    MAX_BN_ELEMENTS,
    MAX_KEY_NODES,
    MAX_SAFETENSORS_HEADER,
    MAX_SAFETENSORS_KEYS,
)
from tests.hostile import (
    Case,
    assert_bounded,
    assert_refused,
    deflated_npy,
    hashes,
    healthy_state,
    model_file,
    run_cases,
    save,
)


class _Allocates:
    """Pickles as `bytearray(2_000_000_000)`: a global the weights-only loader allows."""

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return bytearray, (2_000_000_000,)


def _dag(depth: int) -> tuple:
    """Tuples sharing references: 2^depth leaves in a pickle of a few hundred bytes."""
    t: tuple = ()
    for _ in range(depth):
        t = (t, t)
    return t


def _tuple_key_pickle(depth: int) -> bytes:
    """{"levels": [...], key: 1} whose key is `_dag(depth)`, written opcode by opcode: each
    level is BINGET i, BINGET i, TUPLE2, BINPUT i+1 (so 2^depth leaves in a few hundred
    bytes), parked in a list since the weights-only loader has no POP. Never expanded here."""
    text = b"levels"
    ops = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT]
    ops += [pickle.BINUNICODE + struct.pack("<I", len(text)) + text, pickle.EMPTY_LIST]
    ops += [pickle.EMPTY_TUPLE, pickle.BINPUT + b"\x00", pickle.APPEND]
    for i in range(depth):
        get = pickle.BINGET + bytes([i])
        ops += [get, get, pickle.TUPLE2, pickle.BINPUT + bytes([i + 1]), pickle.APPEND]
    ops += [pickle.SETITEM, pickle.BINGET + bytes([depth]), pickle.BININT1 + b"\x01"]
    return b"".join([*ops, pickle.SETITEM, pickle.STOP])


def _with_pickle(template: Path, data: bytes, dst: Path) -> Path:
    """`template`'s torch.save archive with its data.pkl replaced by `data`."""
    with zipfile.ZipFile(template) as zf, zipfile.ZipFile(dst, "w") as out:
        for info in zf.infolist():
            body = data if info.filename.endswith("/data.pkl") else zf.read(info)
            out.writestr(info.filename, body)
    return dst


def test_the_tuple_key_pickle_is_what_it_claims() -> None:
    small = pickle.loads(_tuple_key_pickle(3))
    assert small == {"levels": [_dag(d) for d in range(4)], _dag(3): 1}
    assert len(_tuple_key_pickle(40)) < 700


def test_dict_keys_of_nested_shared_tuples_are_refused_from_the_opcodes(tmp_path: Path) -> None:
    ckpt = save(healthy_state(), tmp_path / "ck.pt")
    bomb = _with_pickle(ckpt, _tuple_key_pickle(40), tmp_path / "keys.pt")
    data = _with_pickle(ckpt, _tuple_key_pickle(40), tmp_path / "keys-data.pt")
    # Under the limit the same construction is an ordinary (odd) pickle: not refused for it.
    small = _with_pickle(ckpt, _tuple_key_pickle(8), tmp_path / "small.pt")
    assert bomb.stat().st_size < 10_000 and MAX_KEY_NODES > (1 << 9) - 1
    before = hashes([bomb, data, ckpt])
    model = model_file(tmp_path)
    cases = [
        Case(["check", bomb]),
        Case(["check", bomb, "--model", model]),
        Case(["check", ckpt, "--model", model, "--data", data]),
        Case(["check", small]),
    ]
    outcomes = run_cases(cases, tmp_path)
    for o in outcomes[:3]:
        err = assert_refused(o, "hashes a tuple of 2199023255551", "MAX_KEY_NODES")
        assert "crafted or damaged" in err
    assert "--data" in outcomes[2].error_lines[0]
    assert_refused(outcomes[3], "no state dict found")  # read in full: no state dict in it
    assert hashes([bomb, data, ckpt]) == before


def _safetensors(path: Path, keys: int) -> Path:
    """A valid safetensors file of `keys` empty tensors (the header is all the size)."""
    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = ("{" + ",".join(f'"k{i}":{entry}' for i in range(keys)) + "}").encode()
    json.loads(header)  # valid JSON: the cost is in its size alone
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_hostile_sizes_are_refused_quickly_in_bounded_memory(tmp_path: Path) -> None:
    dag = save({"meta": _dag(40)}, tmp_path / "dag.pt")
    dag_top = save(_dag(40), tmp_path / "dag-top.pt")
    huge = 1 << 34
    expanded = healthy_state()
    expanded["1.running_mean"] = torch.zeros(1).expand(huge)
    expanded["1.running_var"] = torch.ones(1).expand(huge)
    stride0 = save(expanded, tmp_path / "stride0.pt")
    many = _safetensors(tmp_path / "many.safetensors", 400_000)
    some = _safetensors(tmp_path / "some.safetensors", MAX_SAFETENSORS_KEYS + 1)
    assert many.stat().st_size > MAX_SAFETENSORS_HEADER > some.stat().st_size
    allocates = save({"state_dict": healthy_state(), "x": _Allocates()}, tmp_path / "alloc.pt")
    ckpt = save(healthy_state(), tmp_path / "ck.pt")
    npz = deflated_npy(tmp_path / "zeros.npz", (1 << 16, 1, 32, 32))  # 256 MiB of zeros
    data0 = save(torch.zeros(1, 1, 1, 1).expand(1 << 22, 3, 32, 32), tmp_path / "stride0-data.pt")
    tiny = save(torch.randn(2 * DEFAULT_MAX_BATCHES + 2, 3, 4, 4), tmp_path / "tiny.pt")
    files = [dag, dag_top, stride0, many, some, allocates, ckpt, npz, data0, tiny]
    for f in files:
        assert f.stat().st_size < 60 << 20, f
    before = hashes(files)
    model = model_file(tmp_path)

    cases = [
        (Case(["check", dag]), "no state dict found"),
        (Case(["check", dag, "--key", "meta"]), "holds a tuple"),
        (Case(["check", dag_top]), "no state dict found"),
        (Case(["check", stride0]), f"limit of {MAX_BN_ELEMENTS}"),
        (Case(["check", stride0, "--model", model]), f"limit of {MAX_BN_ELEMENTS}"),
        (Case(["check", many]), "MAX_SAFETENSORS_HEADER"),
        (Case(["check", some]), "MAX_SAFETENSORS_KEYS"),
        (Case(["check", allocates]), "bytearray of 2000000000 bytes"),
        (Case(["check", ckpt, "--model", model, "--data", npz]), "MAX_INFLATION"),
        (Case(["check", ckpt, "--model", model, "--data", data0]), "MAX_DATA_BYTES"),
        (Case(["check", ckpt, "--model", model, "--data", tiny, "--batch-size", "2"]), "--batches"),
    ]
    # The same data within the limit is audited: the cap is a message, not a dead end.
    ok = Case(["check", ckpt, "--model", model, "--data", tiny, "--batch-size", "2"])
    ok = Case([*ok.args, "--batches", "3", "--no-impact"])
    outcomes = run_cases([c for c, _ in cases] + [ok], tmp_path)
    for (_, says), o in zip(cases, outcomes, strict=False):
        assert_refused(o, says)
    assert outcomes[-1].code in (0, 1), outcomes[-1]
    assert "3 batches" in outcomes[-1].stdout
    assert_bounded(outcomes[-1])
    assert hashes(files) == before
