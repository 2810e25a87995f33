"""Class 1 of the hostile corpus: the integrity check checks exactly what torch reads.

Each file is a torch.save archive altered so that torch's memory-mapped reader and a zipfile
CRC check would read different bytes, or so that reading it costs gigabytes. Every one is
refused in one line, before a byte of it is unpickled or audited; the healthy original audits.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from bnaudit.core.limits import MAX_PICKLE_BYTES
from tests.hostile import (
    Case,
    assert_bounded,
    assert_refused,
    hashes,
    healthy_state,
    model_file,
    rezip,
    run_cases,
    save,
)


def test_archives_torch_and_the_crc_check_would_read_differently_are_refused(
    tmp_path: Path,
) -> None:
    healthy = save(healthy_state(), tmp_path / "healthy.pt")
    # Valid zips that torch.load reads correctly without mmap, but whose stored bytes are not
    # the tensors: the mmap path audited deflate output as numbers.
    deflated = rezip(healthy, tmp_path / "deflated.pt", method=zipfile.ZIP_DEFLATED)
    assert torch.equal(
        torch.load(deflated, weights_only=True)["1.running_var"],
        healthy_state()["1.running_var"],
    )
    data_deflated = rezip(
        healthy, tmp_path / "data-deflated.pt", method=zipfile.ZIP_DEFLATED, only="data/4"
    )
    altered = healthy_state()
    altered["1.running_var"] = torch.full((4,), -1.0)
    bad = save(altered, tmp_path / "altered.pt")
    joined = tmp_path / "joined.pt"  # the altered archive first, the intact one after it
    joined.write_bytes(bad.read_bytes() + healthy.read_bytes())
    prefixed = tmp_path / "prefixed.pt"
    prefixed.write_bytes(b"#!/bin/sh\n" + healthy.read_bytes())
    appended = tmp_path / "appended.pt"
    appended.write_bytes(healthy.read_bytes() + b"\0" * 100)
    # Bombs: data.pkl inflating past MAX_PICKLE_BYTES, a BN record of 256 MB from a few KB, and
    # a stored record larger than the storage it backs (the CRC check would read it all).
    pickle_bomb = rezip(
        healthy,
        tmp_path / "pickle-bomb.pt",
        method=zipfile.ZIP_DEFLATED,
        only="data.pkl",
        extra={"data.pkl": MAX_PICKLE_BYTES + 1},
    )
    record_bomb = rezip(
        healthy,
        tmp_path / "record-bomb.pt",
        method=zipfile.ZIP_DEFLATED,
        only="data/4",
        extra={"data/4": 256 << 20},
    )
    padded = rezip(healthy, tmp_path / "padded.pt", extra={"data/4": 4 << 20})
    relaid = rezip(healthy, tmp_path / "relaid.pt")  # stored, but not where torch.save puts it
    assert pickle_bomb.stat().st_size < 1 << 20 and record_bomb.stat().st_size < 1 << 20

    model = model_file(tmp_path)
    report = tmp_path / "report.json"
    report.write_text('{"earlier": "report"}\n')
    inputs = [healthy, deflated, data_deflated, joined, prefixed, appended, pickle_bomb]
    inputs += [record_bomb, padded, relaid, report]
    before = hashes(inputs)
    refused = {
        deflated: "is deflated",
        data_deflated: "is deflated",
        joined: "not a single torch.save archive",
        prefixed: "not a single torch.save archive",
        appended: "not a single torch.save archive",
        pickle_bomb: "is deflated",
        record_bomb: "is deflated",
        padded: "not laid out as torch.save writes it",
        relaid: "not laid out as torch.save writes it",
    }
    cases = [Case(["check", f, "--json", report]) for f in refused]
    cases += [Case(["check", f, "--model", model, "--json", report]) for f in refused]
    cases.append(Case(["check", healthy]))
    outcomes = run_cases(cases, tmp_path)

    n = len(refused)
    for (path, says), static, full in zip(refused.items(), outcomes, outcomes[n:], strict=False):
        for o in (static, full):
            err = assert_refused(o, str(path), says)
            assert "CRC-32 checked" not in o.stdout + err
    assert outcomes[-1].code == 0, outcomes[-1]
    assert "CRC-32 checked" in outcomes[-1].stdout
    assert_bounded(outcomes[-1])
    assert hashes(inputs) == before  # nothing read was changed, the old report kept
