"""Class 3 of the hostile corpus: reports are one atomic set, and never replace what is not a
regular file; a closed or full stdout is one error line.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bnaudit.core.errors import ReportError
from bnaudit.report import writing
from tests.hostile import (
    MEMORY_LIMIT_MB,
    ROOT,
    Case,
    assert_refused,
    hashes,
    healthy_state,
    run_cases,
    save,
)


def test_report_paths_that_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    ckpt = save(healthy_state(), tmp_path / "ck.pt")
    target = tmp_path / "target.json"
    target.write_text("{}\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    old = tmp_path / "old.md"
    old.write_text("earlier\n")
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = tmp_path / ("r" * (name_max - 5) + ".json")  # no room left for a .tmp suffix
    too_long = tmp_path / ("r" * name_max + ".json")
    before = hashes([ckpt, target, old])
    null_mode = os.stat("/dev/null").st_mode

    cases = [
        Case(["check", ckpt, "--markdown", old, "--json", "/dev/null"]),
        Case(["check", ckpt, "--markdown", old, "--json", "/dev/full"]),
        Case(["check", ckpt, "--markdown", old, "--json", "/dev/stdout"]),
        Case(["check", ckpt, "--markdown", old, "--json", link]),
        Case(["check", ckpt, "--markdown", old, "--json", fifo]),
        Case(["check", ckpt, "--markdown", old, "--json", loop / "r.json"]),
        Case(["check", ckpt, "--markdown", old, "--json", too_long]),
        Case(["check", ckpt, "--json", longest]),
    ]
    outcomes = run_cases(cases, tmp_path)
    says = ["character device", "character device", "symbolic link", "symbolic link", "FIFO"]
    says += ["Too many levels of symbolic links", "File name too long"]
    for o, text in zip(outcomes, says, strict=False):
        assert_refused(o, text)
    assert outcomes[-1].code == 0, outcomes[-1]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_mode == null_mode
    assert link.is_symlink() and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert hashes([ckpt, target, old]) == before
    # A new report has the mode of any new file (umask), not mkstemp's 0600.
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(longest.stat().st_mode) == 0o666 & ~mask
    assert not list(tmp_path.glob(f"{writing.TEMP_PREFIX}*"))


@pytest.fixture
def reports(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "a.md", tmp_path / "b.json", tmp_path / "c.csv"]
    for p in paths[:2]:
        p.write_text(f"old {p.name}\n")
    return paths


def _left(folder: Path) -> list[Path]:
    return list(folder.glob(f"{writing.TEMP_PREFIX}*"))


def test_a_failing_report_leaves_every_report_of_the_run_unreplaced(
    reports: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = reports[0].parent
    before = hashes(reports)

    def full(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    files = [(reports[0], writing.text_writer("new\n")), (reports[1], full)]
    with pytest.raises(ReportError, match="No space left"):
        writing.write_set(files)
    assert hashes(reports) == before and not _left(folder)

    # A rename that fails after others succeeded: the earlier ones are put back.
    real = os.replace
    calls = []

    def replace(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(18, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(writing.os, "replace", replace)
    files = [(p, writing.text_writer(f"new {p.name}\n")) for p in reports]
    with pytest.raises(ReportError, match="cross-device"):
        writing.write_set(files)
    assert hashes(reports) == before and not _left(folder)
    assert not reports[2].exists()


def test_signals_never_leave_half_a_set_or_temporary_files(reports: list[Path]) -> None:
    folder = reports[0].parent
    before = hashes(reports)
    handler = signal.getsignal(signal.SIGTERM)

    def terminated(tmp: Path) -> None:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)

    files = [(reports[0], writing.text_writer("new\n")), (reports[1], terminated)]
    with pytest.raises(KeyboardInterrupt):
        writing.write_set(files)
    assert hashes(reports) == before and not _left(folder)
    assert signal.getsignal(signal.SIGTERM) is handler  # put back

    # SIGINT during the renames waits until the set is complete.
    def interrupt_then_write(tmp: Path) -> None:
        tmp.write_text("new b\n")

    real = os.replace

    def replace(src: object, dst: object) -> None:
        if dst == reports[0]:
            os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    files = [(reports[0], writing.text_writer("new a\n")), (reports[1], interrupt_then_write)]
    writing.os.replace = replace  # type: ignore[attr-defined]
    try:
        with pytest.raises(KeyboardInterrupt):
            writing.write_set(files)
    finally:
        writing.os.replace = real  # type: ignore[attr-defined]
    assert reports[0].read_text() == "new a\n" and reports[1].read_text() == "new b\n"
    assert not _left(folder)


def test_a_closed_or_full_stdout_is_one_error_line(tmp_path: Path) -> None:
    ckpt = save(healthy_state(), tmp_path / "ck.pt")
    script = (
        "import os, resource, subprocess, sys\n"
        "how = sys.argv[1]\n"
        "kw = {'stdout': open('/dev/full', 'w')}\n"
        "if how == 'closed':\n"
        "    kw = {'preexec_fn': lambda: os.close(1)}\n"
        "p = subprocess.run([sys.executable, '-m', 'bnaudit', *sys.argv[2:]],"
        " stderr=subprocess.PIPE, **kw)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "sys.stderr.write(p.stderr.decode(errors='replace'))\n"
        "print(p.returncode, peak, file=sys.stderr)\n"
    )
    for how in ("full", "closed"):
        proc = subprocess.run(
            [sys.executable, "-c", script, how, "check", str(ckpt)],
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        *lines, last = proc.stderr.decode(errors="replace").strip().splitlines()
        code, peak = last.split()
        assert int(code) == 2, (how, lines)
        assert len(lines) <= 2 and lines[-1].startswith("bnaudit: error: "), (how, lines)
        assert "stdout" in lines[-1] and "Traceback" not in "".join(lines)
        assert float(peak) < MEMORY_LIMIT_MB


_INTERRUPTED_RENAME = """
import os, signal, sys
from bnaudit.report import writing
if sys.argv[1] == "ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
real = os.replace
def replace(src, dst):
    print("held:", signal.getsignal(signal.SIGINT) != signal.SIG_IGN, file=sys.stderr)
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C in the middle of the renames
    real(src, dst)
writing.os.replace = replace
from bnaudit.cli.application import main
sys.argv = ["bnaudit", "check", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("disposition", ["default", "ignored"])
def test_a_sigint_held_during_the_renames_is_acted_on_after_them(
    tmp_path: Path, disposition: str
) -> None:
    ckpt = save(healthy_state(), tmp_path / "ck.pt")
    reports = [tmp_path / "r.json", tmp_path / "r.md"]
    args = [ckpt, "--json", reports[0], "--markdown", reports[1], "-q"]
    run = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_RENAME, disposition, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert "Traceback" not in run.stderr
    assert all(r.stat().st_size > 0 for r in reports)  # the set is complete either way
    assert not _left(tmp_path)
    if disposition == "default":  # held, then an interrupt: never exit 0 after a Ctrl-C
        assert run.returncode == 2, run
        assert "held: True" in run.stderr and "bnaudit: interrupted" in run.stderr
    else:  # a process that ignores SIGINT ignores it here as everywhere: nothing held
        assert run.returncode == 0, run
        assert "held: False" in run.stderr and "interrupted" not in run.stderr
