"""The terminal table: columns chosen by priority to fit a width, long names shortened.

Each column carries its priority and a legend entry, so that the line under the table explains
exactly the columns shown. Reports (markdown, CSV, JSON, HTML) keep every column.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bnaudit.report.numbers import num
from bnaudit.report.terminal import paint, printable
from bnaudit.verdict.results import Judged, LayerResult

DEFAULT_WIDTH = 80  # when the terminal's width is unknown (a pipe, a file, CI logs)
GAP = 2  # spaces between columns
MIN_NAME = 16  # a layer name is not shortened below this while optional columns remain
ELLIPSIS = "…"


def codes(r: Judged) -> str:
    """The layer's codes: those that count, then waived ones marked with their status."""
    counted = sorted({f.code for f in r.findings if f.counts})
    waived = sorted({f"{f.code}({f.status.value})" for f in r.waived})
    return " ".join(counted + waived)


def _judged(r: LayerResult, value: float, digits: int = 2) -> str:
    return num(value, digits) if r.metrics.train.drift.judged == "yes" else "-"


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[LayerResult], str]
    priority: int  # 0: always shown; higher numbers give way first to a narrow terminal
    legend: str  # "" for the columns that explain themselves


COLUMNS: tuple[Column, ...] = (
    Column("layer", lambda r: printable(r.name), 0, ""),
    Column("type", lambda r: printable(r.type), 6, ""),
    Column("C", lambda r: str(r.metrics.attrs.channels), 5, "C channels"),
    Column("N", lambda r: num(r.metrics.seen.values_per_channel or None), 4, "N values/channel"),
    Column("verdict", lambda r: r.verdict, 0, ""),
    Column(
        "train×tol",
        lambda r: num(r.metrics.train.recon.ratio, 2),
        1,
        "×tol: worst output error / tolerance (>1 fails)",
    ),
    Column("eval×tol", lambda r: num(r.metrics.eval.recon.ratio, 2), 1, ""),
    Column(
        "shift",
        lambda r: _judged(r, r.metrics.train.drift.shift_max),
        2,
        "shift: mean shift in running sds",
    ),
    Column(
        "ln var",
        lambda r: _judged(r, r.metrics.train.drift.log_var_max),
        2,
        "ln var: ln(batch var / running var)",
    ),
    Column(
        "gap",
        lambda r: (
            num(r.metrics.eval.drift.fraction, 2) if r.metrics.eval.drift.judged == "yes" else "-"
        ),
        3,
        "gap: share of channels off in eval",
    ),
    Column(
        "momentum",
        lambda r: "cumul." if r.metrics.attrs.momentum is None else num(r.metrics.attrs.momentum),
        7,
        "momentum: cumul. = cumulative average",
    ),
    Column("T", lambda r: num(r.metrics.attrs.num_batches_tracked), 7, "T num_batches_tracked"),
    Column("findings", codes, 0, ""),
)


def shorten(name: str, width: int) -> str:
    """`name` in at most `width` characters: the first and last dotted parts kept, the middle
    elided (`layer3.0.downsample.1` -> `layer3…downsample.1`), as torchinfo shortens names."""
    if len(name) <= width:
        return name
    if width <= 1:
        return name[:width]
    parts = name.split(".")
    head, tail = parts[0], ""
    for part in reversed(parts[1:]):
        candidate = f"{part}.{tail}" if tail else part
        if len(head) + 1 + len(candidate) > width:
            break
        tail = candidate
    if tail and len(head) + 1 + len(tail) <= width:
        return f"{head}{ELLIPSIS}{tail}"
    return name[: width - 1] + ELLIPSIS


def _fit(natural: dict[str, int], width: int | None) -> tuple[list[Column], dict[str, int]]:
    """The columns shown and their widths: required ones always, then optional ones by
    priority while they fit; the layer name gets the room left, findings the rest."""
    if width is None:
        return list(COLUMNS), dict(natural)

    def total(cols: Sequence[Column], w: dict[str, int]) -> int:
        return sum(w[c.header] for c in cols) + GAP * (len(cols) - 1)

    widths = dict(natural)
    widths["layer"] = min(natural["layer"], MIN_NAME)
    shown = [c for c in COLUMNS if c.priority == 0]
    for priority in sorted({c.priority for c in COLUMNS} - {0}):
        group = [c for c in COLUMNS if c.priority == priority]
        if total(shown + group, widths) > width:
            break
        shown += group
    shown = [c for c in COLUMNS if c in shown]  # back in display order
    room = width - total(shown, widths)
    widths["layer"] = min(natural["layer"], widths["layer"] + max(room, 0))
    over = total(shown, widths) - width
    if over > 0:  # still too wide: findings, then the name, give way
        widths["findings"] = max(len("findings"), widths["findings"] - over)
        over = total(shown, widths) - width
        widths["layer"] = max(len("layer"), widths["layer"] - max(over, 0))
    return shown, widths


def _clip(text: str, width: int, header: str) -> str:
    if len(text) <= width:
        return text
    return shorten(text, width) if header == "layer" else text[: width - 1] + ELLIPSIS


def render(
    layers: Sequence[LayerResult], *, width: int | None = DEFAULT_WIDTH, color: bool = False
) -> tuple[str, str]:
    """The table, at most `width` columns wide (None: every column, nothing shortened), and
    the legend of the columns it shows, wrapped to the same width."""
    cells = [[c.cell(r) for c in COLUMNS] for r in layers]
    natural = {
        c.header: max([len(c.header), *(len(row[i]) for row in cells)])
        for i, c in enumerate(COLUMNS)
    }
    shown, widths = _fit(natural, width)
    index = [COLUMNS.index(c) for c in shown]
    lines = [
        _join([c.header for c in shown], shown, widths),
        _join(["-" * widths[c.header] for c in shown], shown, widths),
    ]
    for r, row in zip(layers, cells, strict=True):
        texts = [
            _clip(row[i], widths[c.header], c.header) for i, c in zip(index, shown, strict=True)
        ]
        lines.append(_join(texts, shown, widths, verdict=r.verdict if color else None))
    legend = "; ".join(c.legend for c in shown if c.legend)
    wrapped = textwrap.fill(
        legend, width or max(len(legend), 1), initial_indent="", break_on_hyphens=False
    )
    return "\n".join(lines), wrapped


def _join(
    texts: Sequence[str],
    shown: Sequence[Column],
    widths: dict[str, int],
    verdict: str | None = None,
) -> str:
    out = []
    for text, c in zip(texts, shown, strict=True):
        padded = text.ljust(widths[c.header])
        out.append(paint(padded, verdict) if verdict and c.header == "verdict" else padded)
    return (" " * GAP).join(out).rstrip()
