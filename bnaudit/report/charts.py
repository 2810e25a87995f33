"""The HTML report's charts: one measurement across the layers as horizontal bars in inline
SVG, with its limits drawn as dashed lines; a bar links to its layer's row."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape

from bnaudit.report.numbers import num
from bnaudit.report.record import AuditRecord
from bnaudit.report.table import shorten
from bnaudit.verdict.findings import Thresholds
from bnaudit.verdict.results import Severity

_LABEL_CHARS = 24  # layer names longer than this are shortened in the charts (full in tooltips)
# Chart geometry, in SVG units: a chart is never drawn narrower than its own width (its 11-unit
# labels stay >= 11 px, at 800 px one chart a row) nor wider than 1.5x (no poster-size text).
_LABEL_W, _PLOT_W = 160, 250
CHART_W = _LABEL_W + _PLOT_W + 24
CHART_MAX = round(1.5 * CHART_W)


def _short(name: str) -> str:
    return shorten(name, _LABEL_CHARS)


@dataclass(frozen=True)
class Chart:
    """One measurement across the layers, drawn as horizontal bars with its limits."""

    title: str
    note: str
    values: list[float | None]  # None: not measured or not judged
    limits: list[tuple[float, str]]  # (value, label)
    log: bool  # log10 axis (values must be > 0)
    origin: float  # where bars start (1 for a ratio centred on 1, 0 otherwise)
    fmt: Callable[[float], str]
    # per layer, the worst counted finding of the codes this chart shows (OK: none)
    severities: list[Severity]


def chart_svg(chart: Chart, names: list[str]) -> str:
    label_w, plot_w, row_h, top = _LABEL_W, _PLOT_W, 18, 22
    width = CHART_W
    height = top + row_h * max(len(names), 1) + 8
    finite = [v for v in chart.values if v is not None and math.isfinite(v)]
    if chart.log:
        finite = [v for v in finite if v > 0]

    def t(v: float) -> float:
        return math.log10(v) if chart.log else v

    points = [t(v) for v in finite] + [t(limit) for limit, _ in chart.limits] + [t(chart.origin)]
    lo, hi = min(points), max(points)
    pad = 0.08 * (hi - lo or 1.0)
    lo, hi = (lo - pad, hi + pad) if chart.origin != 0 or chart.log else (0.0, hi + pad)

    def x(v: float) -> float:
        return label_w + plot_w * (t(v) - lo) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}">',
        f"<title>{escape(chart.title)}</title>",
    ]
    x0 = x(chart.origin)
    parts.append(
        f'<line class="axis" x1="{x0:.1f}" y1="{top - 4}" x2="{x0:.1f}" y2="{height - 4}"/>'
    )
    for i, (name, value) in enumerate(zip(names, chart.values, strict=True)):
        y = top + i * row_h
        label = f"{name}: {'not measured' if value is None else chart.fmt(value)}"
        parts.append(f'<a href="#layer-{i}"><title>{escape(label)}</title>')
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{escape(_short(name))}</text>'
        )
        if value is None or (chart.log and not (value > 0)) or math.isnan(value):
            parts.append(f'<text class="na" x="{x0 + 4:.1f}" y="{y + 12}">n/a</text>')
        else:
            v = min(max(t(value), lo), hi) if math.isfinite(value) else (hi if value > 0 else lo)
            end = label_w + plot_w * (v - lo) / (hi - lo)
            beyond = any(_beyond(value, limit, chart.origin) for limit, _ in chart.limits)
            # Colour says the gate: red or amber only where a finding that counts says so.
            counted = chart.severities[i]
            style = f" over {counted.label}" if beyond and counted >= Severity.WARN else ""
            style = style or (" beyond" if beyond else "")
            left, length = min(x0, end), max(abs(end - x0), 1.0)
            parts.append(
                f'<rect class="bar{style}" x="{left:.1f}" y="{y + 3}" '
                f'width="{length:.1f}" height="{row_h - 6}"/>'
            )
        parts.append("</a>")
    for limit, label in chart.limits:
        lx = x(limit)
        parts.append(
            f'<line class="limit" x1="{lx:.1f}" y1="{top - 6}" x2="{lx:.1f}" y2="{height - 4}"/>'
        )
        tx = min(max(lx, label_w + 16), width - 20)  # keep the label inside the picture
        parts.append(
            f'<text class="limit-label" x="{tx:.1f}" y="{top - 9}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _beyond(value: float, limit: float, origin: float) -> bool:
    """Whether a bar crosses a limit line drawn on its side of the origin."""
    return value > limit if limit >= origin else value < limit


def charts(report: AuditRecord) -> list[Chart]:
    t = Thresholds().replace(
        **{k: v for k, v in report.thresholds.items() if k in Thresholds.__dataclass_fields__}
    )
    recon, shift, var = [], [], []

    def worst(codes: tuple[str, ...]) -> list[Severity]:
        return [
            max(
                (f.severity for f in r.findings if f.counts and f.code in codes),
                default=Severity.OK,
            )
            for r in report.layers
        ]

    for r in report.layers:
        m = r.metrics
        pair = [v for v in (m.train.recon.ratio, m.eval.recon.ratio) if not math.isnan(v)]
        recon.append(max(pair) if pair else None)
        stale = m.train.drift
        judged = stale.judged == "yes"
        shift.append(stale.shift_max if judged and not math.isnan(stale.shift_max) else None)
        lv = stale.log_var_max
        var.append(math.exp(lv) if judged and not math.isnan(lv) else None)
    return [
        Chart(
            "Reconstruction error / tolerance",
            "worst of train and eval mode; log scale; above the limit the layer is not plain BN",
            recon,
            [(t.max_error_ratio, f"limit {num(t.max_error_ratio)}")],
            log=True,
            origin=min([1e-3, *[v for v in recon if v is not None and v > 0]]),
            fmt=lambda v: f"{num(v)}x the tolerance",
            severities=worst(("recon-train", "recon-eval")),
        ),
        Chart(
            "Stale mean shift",
            "|mean of batch means - running mean| in running sds, worst channel",
            shift,
            [(t.stale_shift, f"limit {num(t.stale_shift)}")],
            log=False,
            origin=0.0,
            fmt=lambda v: f"{num(v)} sd",
            severities=worst(("stale-stats",)),
        ),
        Chart(
            "Variance ratio",
            "mean batch variance / running variance, largest deviation; log scale",
            var,
            [
                (math.exp(-t.stale_log_var), f"x{num(math.exp(-t.stale_log_var))}"),
                (math.exp(t.stale_log_var), f"x{num(math.exp(t.stale_log_var))}"),
            ],
            log=True,
            origin=1.0,
            fmt=lambda v: f"x{num(v)}",
            severities=worst(("stale-stats",)),
        ),
    ]
