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


def shorten(name: str, width: int, keep: Sequence[int] = ()) -> str:
    """`name` in at most `width` characters: the first and last dotted parts kept, the middle
    elided (`layer3.0.downsample.1` -> `layer3…downsample.1`), as torchinfo shortens names;
    the parts at the indices in `keep` too where they fit (`features.17…conv.2`)."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    last = len(parts) - 1
    shown = {0, last, *keep}
    if last == 0 or len(_elided(parts, shown)) > width:
        if keep:
            return shorten(name, width)
        return name[: max(width - 1, 0)] + ELLIPSIS if width > 1 else name[:width]
    for i in range(last - 1, 0, -1):  # then as much of the tail as fits
        if i not in shown:
            if len(_elided(parts, shown | {i})) > width:
                break
            shown.add(i)
    return _elided(parts, shown)


def _elided(parts: list[str], shown: set[int]) -> str:
    """The parts at the indices `shown`, each run of the others replaced by one ellipsis."""
    out, prev = "", None
    for i in sorted(shown):
        if prev is not None:
            out += "." if i == prev + 1 else ELLIPSIS
        out, prev = out + parts[i], i
    return out


def shorten_all(names: Sequence[str], width: int) -> list[str]:
    """Each name shortened as `shorten` does, and where two would then read alike, with the
    parts that tell them apart kept: MobileNetV2's `features.16.conv.2` and `features.17.conv.2`
    keep their block index (`features.17…conv.2`) instead of both reading `features…conv.2`."""
    short = [shorten(n, width) for n in names]
    alike: dict[str, list[int]] = {}
    for i, text in enumerate(short):
        alike.setdefault(text, []).append(i)
    for group in alike.values():
        if len({names[i] for i in group}) < 2:
            continue
        split = [names[i].split(".") for i in group]
        for i, parts in zip(group, split, strict=True):
            differ = [
                k
                for k in range(1, len(parts) - 1)
                if any(len(o) <= k or o[k] != parts[k] for o in split)
            ]
            short[i] = shorten(names[i], width, differ)
            if short[i] == shorten(names[i], width) and differ:  # all of them do not fit
                short[i] = shorten(names[i], width, differ[:1])
    return short


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


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


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
    names = shorten_all([row[0] for row in cells], widths["layer"])
    for r, row, name in zip(layers, cells, names, strict=True):
        texts = [
            name if c.header == "layer" else _clip(row[i], widths[c.header])
            for i, c in zip(index, shown, strict=True)
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
