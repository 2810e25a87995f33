"""The hostile corpus, built at test time, and a runner that measures each refusal.

Nothing binary is committed: every broken or crafted file is made here from a small healthy
checkpoint. `run_cases` runs the real `bnaudit` entry point (`bnaudit.cli.main`) on each case
in one child process (torch is imported once), with stdout and stderr on files, and records the
exit code, the output, the wall time and the child's peak RSS after the case (`resource`): the
high-water mark, so a case that allocated gigabytes shows in its own reading and every later
one.

Run as `python -m tests.hostile CASES.json RESULTS.json` by `run_cases` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 20.0  # per case; each takes well under a second alone, the machine is shared
MEMORY_LIMIT_MB = 1500.0  # the child's peak RSS: torch alone is ~400 MB; the holes took 2-9 GB
MODEL_PY = """
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
"""


@dataclass(frozen=True)
class Case:
    args: Sequence[object]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    code: int | str
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("bnaudit: error: ")]


def run_cases(cases: Sequence[Case], tmp: Path) -> list[Outcome]:
    """Run every case through `bnaudit.cli.main` in one child; see the module doc."""
    spec = tmp / "cases.json"
    results = tmp / "results.json"
    spec.write_text(
        json.dumps([{"args": [os.fsdecode(a) for a in c.args], "env": c.env} for c in cases])
    )
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_ACTIONS"}
    subprocess.run(
        [sys.executable, "-m", "tests.hostile", str(spec), str(results), str(tmp)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60 + TIME_LIMIT_S * len(cases),
    )
    return [Outcome(**r) for r in json.loads(results.read_text())]


def assert_refused(o: Outcome, *says: str) -> str:
    """Exit 2, one error line holding each of `says`, no traceback, within time and memory."""
    assert o.code == 2, o
    assert "Traceback" not in o.stderr + o.stdout, o.stderr
    assert len(o.error_lines) == 1, o.stderr
    assert all(ln.startswith("bnaudit: ") for ln in o.stderr.splitlines()), o.stderr
    assert_bounded(o)
    err = o.error_lines[0]
    for text in says:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def assert_bounded(o: Outcome) -> None:
    assert o.seconds < TIME_LIMIT_S, o
    assert o.peak_mb < MEMORY_LIMIT_MB, o


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(paths: Iterable[Path]) -> dict[Path, str | None]:
    """Each file's SHA-256 (None: absent); compare before and after a run."""
    return {p: sha(p) if os.path.lexists(p) and p.is_file() else None for p in paths}


# --------------------------------------------------------------------------------------------
# The healthy material everything is made from


def healthy_state() -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    return {
        "0.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "0.bias": torch.zeros(4),
        "1.weight": torch.ones(4),
        "1.bias": torch.zeros(4),
        "1.running_mean": torch.randn(4, generator=gen) * 0.1,
        "1.running_var": torch.rand(4, generator=gen) + 0.5,
        "1.num_batches_tracked": torch.tensor(500),
    }


def save(obj: object, path: Path) -> Path:
    import torch

    torch.save(obj, path)
    return path


def model_file(folder: Path) -> str:
    """--model for MODEL_PY (a conv and a BatchNorm2d of 4 channels)."""
    path = folder / "model.py"
    path.write_text(MODEL_PY)
    return f"{path}:build"


# --------------------------------------------------------------------------------------------
# Zip surgery on torch.save archives


def records(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def rezip(
    src: Path,
    dst: Path,
    *,
    method: int = zipfile.ZIP_STORED,
    only: str | None = None,
    extra: dict[str, int] | None = None,
) -> Path:
    """`src`'s records rewritten with zipfile: `method` for every record (or only for names
    ending in `only`); `extra` appends that many zero bytes to a record's data."""
    extra = extra or {}
    with zipfile.ZipFile(dst, "w") as out:
        for name, data in records(src):
            chosen = method if only is None or name.endswith(only) else zipfile.ZIP_STORED
            pad = next((n for suffix, n in extra.items() if name.endswith(suffix)), 0)
            info = zipfile.ZipInfo(name)
            info.compress_type = chosen
            with out.open(info, "w", force_zip64=pad > 1 << 30) as f:
                f.write(data)
                for _ in range(pad >> 20):
                    f.write(bytes(1 << 20))
                f.write(bytes(pad & ((1 << 20) - 1)))
    return dst


def patch_headers(path: Path, dst: Path, *, flags: int = 0, method: int | None = None) -> Path:
    """Every local and central header of `path` with `flags` or'ed in and `method` set."""
    data = bytearray(path.read_bytes())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(sig)
        while at >= 0:
            (old,) = struct.unpack_from("<H", data, at + flag_at)
            struct.pack_into("<H", data, at + flag_at, old | flags)
            if method is not None:
                struct.pack_into("<H", data, at + method_at, method)
            at = data.find(sig, at + 4)
    dst.write_bytes(bytes(data))
    return dst


def deflated_npy(dst: Path, shape: tuple[int, ...]) -> Path:
    """An .npz of one float32 array of zeros, deflated, written in pieces (never in memory)."""
    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    size = 4
    for d in shape:
        size *= d
    with (
        zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("x.npy", "w", force_zip64=True) as f,
    ):
        f.write(header.getvalue())
        chunk = bytes(1 << 22)
        for _ in range(size >> 22):
            f.write(chunk)
        f.write(bytes(size & ((1 << 22) - 1)))
    return dst


# --------------------------------------------------------------------------------------------
# The child


def _main(spec: Path, results: Path, tmp: Path) -> None:
    import resource
    import time
    import traceback

    from bnaudit import cli

    out = []
    base_env = dict(os.environ)
    for i, case in enumerate(json.loads(spec.read_text())):
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(case["env"])
        streams = tmp / f"case{i}.out", tmp / f"case{i}.err"
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with streams[0].open("wb") as o, streams[1].open("wb") as e:
            os.dup2(o.fileno(), 1)
            os.dup2(e.fileno(), 2)
            sys.argv = ["bnaudit", *case["args"]]
            start = time.monotonic()
            code: int | str = 0
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:  # what would be a crash of the real command
                traceback.print_exc()
                code = "crash"
            seconds = time.monotonic() - start
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.append(
            {
                "code": code,
                "stdout": streams[0].read_text(errors="backslashreplace"),
                "stderr": streams[1].read_text(errors="backslashreplace"),
                "seconds": seconds,
                "peak_mb": peak,
            }
        )
    results.write_text(json.dumps(out))


if __name__ == "__main__":
    _main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
