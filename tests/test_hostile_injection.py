"""Class 2 of the hostile corpus: no workflow-command or terminal injection through names.

File names, key names, layer names and option values carry `::error::` and `##[error]` after a
line break. Under GitHub Actions every line bnaudit prints outside its stop-commands guard must
be bnaudit's own annotation; outside GitHub Actions every message stays one line, and a name of
a million characters is cut.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bnaudit.core.limits import MAX_MESSAGE_CHARS
from tests.hostile import (
    Case,
    Outcome,
    assert_bounded,
    assert_refused,
    hashes,
    healthy_state,
    run_cases,
    save,
)

EVIL = "\n::error::pwned\n##[error]pwned\r\x1b[2J"
GITHUB = {"GITHUB_ACTIONS": "true"}
# The only workflow commands bnaudit itself writes: its guard and annotations with properties.
OWN = re.compile(r"::(stop-commands::[0-9a-f]{32}|(error|warning|notice) (file|title)=)")


def assert_no_injection(text: str) -> None:
    """Outside the stop-commands guard, no line the runner would execute but bnaudit's own."""
    token = None
    for line in text.splitlines():
        if token is not None:
            if line == f"::{token}::":
                token = None
            continue
        started = re.match(r"::stop-commands::([0-9a-f]{32})$", line)
        if started:
            token = started.group(1)
            continue
        if line.lstrip().startswith("::"):  # the runner then reads no `##[` in the line
            assert OWN.match(line.lstrip()), line
        else:
            assert "##[" not in line, line
    assert token is None, "a guard left open"


def assert_one_line(o: Outcome) -> None:
    assert "Traceback" not in o.stderr
    assert all(ln.startswith("bnaudit: ") for ln in o.stderr.splitlines()), o.stderr
    assert "\x1b" not in o.stderr + o.stdout


def test_names_cannot_inject_commands_or_break_lines(tmp_path: Path) -> None:
    named = save(healthy_state(), tmp_path / f"ck{EVIL}.pt")
    plain = save(healthy_state(), tmp_path / "plain.pt")
    state = {
        (f"bn{EVIL}." + k.removeprefix("1.") if k.startswith("1.") else k): v
        for k, v in healthy_state().items()
    }
    state[f"{EVIL}.running_var"] = torch.full((4,), -1.0)  # a failing layer: annotated
    state[f"{EVIL}.running_mean"] = torch.zeros(4)
    layers = save(state, tmp_path / "layers.pt")
    no_bn = save({f"conv{EVIL}.weight": torch.ones(2)}, tmp_path / "no-bn.pt")
    huge = save({"x" * 1_000_000: torch.ones(1)}, tmp_path / "huge.pt")
    inputs = [named, plain, layers, no_bn, huge]
    before = hashes(inputs)

    github = [
        Case(["check", named], GITHUB),
        Case(["check", layers], GITHUB),
        Case(["check", no_bn], GITHUB),
        Case(["check", plain, "--key", f"nope{EVIL}"], GITHUB),
        Case(["check", named, "--key", f"nope{EVIL}"], GITHUB),
    ]
    local = [
        Case(["check", named]),
        Case(["check", plain, "--key", f"nope{EVIL}"]),
        Case(["check", huge, "--key", "nope"]),
        Case(["check", no_bn]),
    ]
    outcomes = run_cases([*github, *local], tmp_path)

    for o in outcomes[: len(github)]:
        assert o.code in (0, 1, 2, 3), o
        assert_bounded(o)
        assert_no_injection(o.stdout)
        assert_no_injection(o.stderr)
    assert outcomes[1].code == 1 and "title=bnaudit bad-var" in outcomes[1].stdout
    assert outcomes[2].code == 3

    audited, key, cut, nothing = outcomes[len(github) :]
    assert audited.code == 0, audited
    assert_one_line(audited)
    assert "\\x0a::error::pwned" in audited.stderr  # the name, escaped, on the auditing line
    assert_refused(key, "--key nope\\x0a::error::pwned")
    assert_one_line(key)
    err = assert_refused(cut, "more characters")
    assert len(err) < MAX_MESSAGE_CHARS + 200, len(err)
    assert nothing.code == 3 and len(nothing.stderr.splitlines()) == 2, nothing
    assert_one_line(nothing)
    assert hashes(inputs) == before
