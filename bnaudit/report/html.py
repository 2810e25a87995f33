"""A self-contained HTML report: summary, per-layer charts, a sortable table, the findings.

One file, no network: inline CSS, inline JavaScript (sorting only) and inline SVG charts; a
Content-Security-Policy forbids every external load. Layer names and messages come from the
checkpoint, so every piece of text goes through `html.escape`, and element ids are built from
layer indices, never from names. The output has no timestamp: the same report renders the
same bytes.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

from bnaudit.core.version import __version__
from bnaudit.report.record import AuditRecord
from bnaudit.report.table import shorten
from bnaudit.verdict.findings import Thresholds
from bnaudit.verdict.results import LayerResult, Severity

_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
_LABEL_CHARS = 24  # layer names longer than this are shortened in the charts (full in tooltips)
# Chart geometry, in SVG units: a chart is never drawn narrower than its own width (its 11-unit
# labels stay >= 11 px, at 800 px one chart a row) nor wider than 1.5x (no poster-size text).
_LABEL_W, _PLOT_W = 160, 250
CHART_W = _LABEL_W + _PLOT_W + 24
CHART_MAX = round(1.5 * CHART_W)

_CSS = """
:root { --ok: #2e7d32; --info: #0277bd; --warn: #b45309; --fail: #c62828; --muted: #6b7280;
  --line: #e5e7eb; --bg-fail: #fdecea; --bg-warn: #fff4e5; --bg-ok: #edf7ed; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827;
  margin: 0; background: #f9fafb; }
header, main, footer { max-width: 1280px; margin: 0 auto; padding: 16px 24px; }
header { background: #fff; border-bottom: 1px solid var(--line); max-width: none; }
header > div { max-width: 1232px; margin: 0 auto; }
h1 { font-size: 22px; margin: 0 0 8px; display: flex; gap: 12px; align-items: center; }
h2 { font-size: 17px; margin: 24px 0 8px; }
h3 { font-size: 15px; margin: 0 0 6px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600; color: #fff; background: var(--muted); text-transform: uppercase; }
.badge.ok, .badge.pass { background: var(--ok); } .badge.info { background: var(--info); }
.badge.warn { background: var(--warn); } .badge.fail { background: var(--fail); }
.badge.waived { background: #9ca3af; }
h1 .badge { font-size: 16px; padding: 2px 12px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 8px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
ul.counts { list-style: none; padding: 0; margin: 8px 0; display: flex; gap: 8px;
  flex-wrap: wrap; }
ul.notes { margin: 4px 0; padding-left: 20px; color: #374151; }
.charts { display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, __CHART_W__px), 1fr)); }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 8px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
figcaption small { display: block; font-weight: 400; color: var(--muted); }
svg { display: block; width: 100%; max-width: __CHART_MAX__px; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #374151; }
svg .bar { fill: #60a5fa; } svg .bar.beyond { fill: #9ca3af; }
svg .bar.over.fail { fill: var(--fail); } svg .bar.over.warn { fill: var(--warn); }
svg .limit { stroke: var(--fail); stroke-width: 1.5; stroke-dasharray: 4 3; }
svg .limit-label { fill: var(--fail); }
svg .axis { stroke: #9ca3af; } svg .na { fill: #9ca3af; font-style: italic; }
svg a:hover text { text-decoration: underline; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
table.alone { width: auto; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: right;
  white-space: nowrap; }
th:nth-child(-n+2), td:nth-child(-n+2), th:last-child, td:last-child { text-align: left; }
td:first-child, td:last-child { white-space: normal; overflow-wrap: anywhere; }
td:first-child { min-width: 12ch; max-width: 40ch; }
.scroll { overflow-x: auto; }
th button { font: inherit; font-weight: 600; border: 0; background: none; cursor: pointer;
  padding: 0; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
tr.fail td { background: var(--bg-fail); } tr.warn td { background: var(--bg-warn); }
tr:target td { outline: 2px solid var(--info); }
.layer-findings { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 10px 12px; margin: 8px 0; }
.layer-findings:target { outline: 2px solid var(--info); }
.layer-findings ul { margin: 0; padding-left: 18px; }
.finding { margin: 4px 0; } .finding.waived { color: var(--muted); }
.fix { color: #374151; } .why { color: var(--muted); font-style: italic; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f3f4f6;
  padding: 0 3px; border-radius: 3px; }
footer { color: var(--muted); font-size: 12px; }
""".replace("__CHART_W__", str(CHART_W)).replace("__CHART_MAX__", str(CHART_MAX))

# Sorting only: rows are moved, never rebuilt, so no untrusted text passes through the script.
# `#sort=<column>` or `#sort=<column>-desc` in the address sorts on load.
_JS = """
(function () {
  "use strict";
  var table = document.getElementById("layer-table");
  var body = table.tBodies[0];
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(body.rows, function (row, i) { row.dataset.index = i; });
  function value(row, i, numeric) {
    var v = row.cells[i].getAttribute("data-v");
    if (!numeric) return v === null ? row.cells[i].textContent : v;
    var n = parseFloat(v);
    return isNaN(n) ? null : n;
  }
  function sortBy(i, ascending) {
    var numeric = heads[i].getAttribute("data-type") === "number";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, i, numeric), y = value(b, i, numeric), c;
      if (x === null || y === null) {
        c = (x === null) - (y === null);  /* missing values last, either direction */
        if (c !== 0) return c;
      } else {
        c = numeric ? x - y : String(x).localeCompare(String(y));
        if (c !== 0) return ascending ? c : -c;
      }
      return a.dataset.index - b.dataset.index;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(heads, function (h) { h.setAttribute("aria-sort", "none"); });
    heads[i].setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    th.querySelector("button").addEventListener("click", function () {
      sortBy(i, th.getAttribute("aria-sort") !== "ascending");
    });
  });
  var wanted = /^#sort=([a-z-]+?)(-desc)?$/.exec(window.location.hash);
  if (wanted) {
    Array.prototype.forEach.call(heads, function (th, i) {
      if (th.getAttribute("data-key") === wanted[1]) sortBy(i, !wanted[2]);
    });
  }
  document.documentElement.setAttribute("data-ready", "1");
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "-" if math.isnan(value) else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _data(value: float | int | None) -> str:
    """A sort key for the table: the number, or "" when there is none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value))


def _short(name: str) -> str:
    return shorten(name, _LABEL_CHARS)


# --------------------------------------------------------------------------------------------
# Charts


@dataclass(frozen=True)
class _Chart:
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


def _chart_svg(chart: _Chart, names: list[str]) -> str:
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
        f"<title>{_e(chart.title)}</title>",
    ]
    x0 = x(chart.origin)
    parts.append(
        f'<line class="axis" x1="{x0:.1f}" y1="{top - 4}" x2="{x0:.1f}" y2="{height - 4}"/>'
    )
    for i, (name, value) in enumerate(zip(names, chart.values, strict=True)):
        y = top + i * row_h
        label = f"{name}: {'not measured' if value is None else chart.fmt(value)}"
        parts.append(f'<a href="#layer-{i}"><title>{_e(label)}</title>')
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{_e(_short(name))}</text>'
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
            f"{_e(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _beyond(value: float, limit: float, origin: float) -> bool:
    """Whether a bar crosses a limit line drawn on its side of the origin."""
    return value > limit if limit >= origin else value < limit


def _charts(report: AuditRecord) -> list[_Chart]:
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
        pair = [v for v in (m.recon_train_ratio, m.recon_eval_ratio) if not math.isnan(v)]
        recon.append(max(pair) if pair else None)
        judged = m.stale_judged == "yes"
        shift.append(m.stale_shift_max if judged and not math.isnan(m.stale_shift_max) else None)
        lv = m.stale_log_var_max
        var.append(math.exp(lv) if judged and not math.isnan(lv) else None)
    return [
        _Chart(
            "Reconstruction error / tolerance",
            "worst of train and eval mode; log scale; above the limit the layer is not plain BN",
            recon,
            [(t.max_error_ratio, f"limit {_num(t.max_error_ratio)}")],
            log=True,
            origin=min([1e-3, *[v for v in recon if v is not None and v > 0]]),
            fmt=lambda v: f"{_num(v)}x the tolerance",
            severities=worst(("recon-train", "recon-eval")),
        ),
        _Chart(
            "Stale mean shift",
            "|mean of batch means - running mean| in running sds, worst channel",
            shift,
            [(t.stale_shift, f"limit {_num(t.stale_shift)}")],
            log=False,
            origin=0.0,
            fmt=lambda v: f"{_num(v)} sd",
            severities=worst(("stale-stats",)),
        ),
        _Chart(
            "Variance ratio",
            "mean batch variance / running variance, largest deviation; log scale",
            var,
            [
                (math.exp(-t.stale_log_var), f"x{_num(math.exp(-t.stale_log_var))}"),
                (math.exp(t.stale_log_var), f"x{_num(math.exp(t.stale_log_var))}"),
            ],
            log=True,
            origin=1.0,
            fmt=lambda v: f"x{_num(v)}",
            severities=worst(("stale-stats",)),
        ),
    ]


# --------------------------------------------------------------------------------------------
# Page


_COLUMNS = [  # (key for #sort=, header, numeric)
    ("layer", "layer", False),
    ("type", "type", False),
    ("channels", "C", True),
    ("n", "N", True),
    ("verdict", "verdict", True),
    ("train-err", "train ×tol", True),
    ("eval-err", "eval ×tol", True),
    ("shift", "shift", True),
    ("ln-var", "ln var", True),
    ("gap", "gap", True),
    ("momentum", "momentum", True),
    ("t", "T", True),
    ("findings", "findings", False),
]


def _row(i: int, r: LayerResult) -> str:
    m = r.metrics
    judged = m.stale_judged == "yes"
    gap = m.gap_fraction if m.gap_judged == "yes" else None
    name = _e(r.name)
    link = f'<a href="#findings-{i}">{name}</a>' if r.findings else name
    codes = [_e(f.code) for f in r.findings if f.counts]
    codes += [f'<span class="why">{_e(f.code)} ({f.status.value})</span>' for f in r.waived]
    cells = [
        f'<td data-v="{name}">{link}</td>',
        f"<td>{_e(r.type)}</td>",
        f'<td data-v="{m.channels}">{m.channels}</td>',
        f'<td data-v="{_data(m.values_per_channel or None)}">'
        f"{_num(m.values_per_channel or None)}</td>",
        f'<td data-v="{int(r.severity)}"><span class="badge {r.verdict}">{r.verdict}</span></td>',
        f'<td data-v="{_data(m.recon_train_ratio)}">{_num(m.recon_train_ratio, 2)}</td>',
        f'<td data-v="{_data(m.recon_eval_ratio)}">{_num(m.recon_eval_ratio, 2)}</td>',
        f'<td data-v="{_data(m.stale_shift_max if judged else None)}">'
        f"{_num(m.stale_shift_max, 2) if judged else '-'}</td>",
        f'<td data-v="{_data(m.stale_log_var_max if judged else None)}">'
        f"{_num(m.stale_log_var_max, 2) if judged else '-'}</td>",
        f'<td data-v="{_data(gap)}">{_num(gap, 2)}</td>',
        f'<td data-v="{_data(m.momentum)}">'
        f"{'cumul.' if m.momentum is None else _num(m.momentum)}</td>",
        f'<td data-v="{_data(m.num_batches_tracked)}">{_num(m.num_batches_tracked)}</td>',
        f"<td>{' '.join(codes)}</td>",
    ]
    return f'<tr id="layer-{i}" class="{r.verdict}">{"".join(cells)}</tr>'


def _findings(i: int, r: LayerResult) -> str:
    items = []
    for f in sorted(r.findings, key=lambda f: (not f.counts, -f.severity)):
        label = f.severity.label
        status = ""
        if f.status.value != "open":
            status = f' <span class="why">[{_e(f.status.value)}: {_e(f.status_reason)}]</span>'
        fix = f'<br><span class="fix">fix: {_e(f.hint)}</span>' if f.hint and f.counts else ""
        items.append(
            f'<li class="finding {label}{"" if f.counts else " waived"}">'
            f'<span class="badge {label if f.counts else "waived"}">{label}</span> '
            f"<code>{_e(f.code)}</code> {_e(f.message)}{status}{fix}</li>"
        )
    return (
        f'<article class="layer-findings" id="findings-{i}"><h3>'
        f'<a href="#layer-{i}">{_e(r.name)}</a> <span class="badge {r.verdict}">{r.verdict}'
        f"</span> <small>{_e(r.type)}</small></h3><ul>{''.join(items)}</ul></article>"
    )


def _summary(report: AuditRecord) -> str:
    facts = [
        ("checkpoint", report.checkpoint or "-"),
        ("sha256", report.sha256 or report.sha256_note or "-"),
        ("layers", str(len(report.layers))),
        ("batches", f"{report.batches} ({report.forward_passes} forward passes)"),
        ("fail on", report.fail_on.value),
    ]
    status = report.status_counts()
    accepted = [f"{status[k]} {k}" for k in ("ignored", "baselined") if status[k]]
    if accepted:
        facts.append(("accepted findings", ", ".join(accepted)))
    b = report.baseline
    if b is not None:
        facts.append(
            (
                "baseline",
                f"{'written to' if b.written else 'compared with'} {b.path} (margin "
                f"{_num(100 * b.margin)}%): {status['new']} new, {status['worse']} worse, "
                f"{status['baselined']} baselined, {len(b.stale)} stale",
            )
        )
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    counts = "".join(
        f'<li><span class="badge {k}">{k} {v}</span></li>' for k, v in report.counts().items()
    )
    notes = list(report.notes)
    if report.synthetic_data:
        notes.insert(0, "synthetic N(0,1) batches: data-dependent verdicts are not drawn")
    if b is not None:
        notes += [f"stale baseline entry: {e.layer} {e.code} (no longer found)" for e in b.stale]
    note_list = (
        '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
        if notes
        else ""
    )
    return (
        f'<h1>bnaudit <span class="badge {report.verdict}" id="verdict">'
        f"{report.verdict.upper()}</span></h1>"
        f'<dl class="facts">{dl}</dl><ul class="counts">{counts}</ul>{note_list}'
    )


def _impact(report: AuditRecord) -> str:
    """The output-impact figures: how much recalibrating the statistics changes the eval
    output (and the task metric, with labels); each flagged layer alone with --attribution."""
    i = report.impact
    if i is None:
        return ""
    facts = [
        ("relative L2 change", _num(i.rel_l2)),
        ("largest absolute change", _num(i.max_abs)),
    ]
    if i.top1_agreement is not None:
        facts.append(("top-1 agreement", f"{100 * i.top1_agreement:.1f}%"))
    facts.append(("regime", f"{i.regime} ({i.batches} batches, {i.forward_passes} extra passes)"))
    if i.evidence is not None:
        facts.append(("task metric", i.evidence.describe()))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    alone = ""
    if i.per_layer:
        index = {r.name: n for n, r in enumerate(report.layers)}
        rows = "".join(
            f'<tr><td><a href="#layer-{index[name]}">{_e(name)}</a></td><td>{_num(change)}</td>'
            "</tr>"
            if name in index
            else f"<tr><td>{_e(name)}</td><td>{_num(change)}</td></tr>"
            for name, change in sorted(i.per_layer.items(), key=lambda kv: -kv[1])
        )
        alone = (
            '<table class="alone"><thead><tr><th>recalibrated alone</th><th>rel L2</th></tr>'
            f"</thead><tbody>{rows}</tbody></table>"
        )
    return (
        '<section id="impact"><h2>Output impact of recalibrating</h2>'
        "<p>Eval-mode output with the stored statistics against recalibrated ones, on the "
        f'audit batches.</p><dl class="facts">{dl}</dl>{alone}</section>'
    )


def render_html(report: AuditRecord) -> str:
    names = [r.name for r in report.layers]
    figures = "".join(
        f"<figure><figcaption>{_e(c.title)}<small>{_e(c.note)}</small></figcaption>"
        f"{_chart_svg(c, names)}</figure>"
        for c in _charts(report)
    )
    heads = "".join(
        f'<th data-key="{key}" data-type="{"number" if numeric else "text"}" aria-sort="none">'
        f'<button type="button">{_e(label)}</button></th>'
        for key, label, numeric in _COLUMNS
    )
    rows = "\n".join(_row(i, r) for i, r in enumerate(report.layers))
    with_findings = [(i, r) for i, r in enumerate(report.layers) if r.findings]
    findings = "\n".join(_findings(i, r) for i, r in with_findings) or "<p>None.</p>"
    title = f"bnaudit: {report.verdict.upper()}" + (
        f" - {report.checkpoint}" if report.checkpoint else ""
    )
    worst = max((r.severity for r in report.layers), default=Severity.OK).label
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="bnaudit {_e(__version__)}">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body class="verdict-{report.verdict} worst-{worst}">
<header><div>{_summary(report)}</div></header>
<main>
{_impact(report)}
<section id="charts"><h2>Per-layer measurements</h2>
<p>Dashed red lines are the limits. Red (fail) and amber (warn) bars are beyond them on a
layer whose finding counts for the gate; grey bars are beyond them on a layer where the finding is
information only or accepted. Click a bar for its layer.</p>
<div class="charts">{figures}</div>
</section>
<section id="layers"><h2>Layers</h2>
<p>Click a column to sort; click a layer to see its findings.</p>
<div class="scroll"><table id="layer-table"><thead><tr>{heads}</tr></thead>
<tbody>
{rows}
</tbody></table></div>
</section>
<section id="findings"><h2>Findings</h2>
{findings}
</section>
</main>
<footer>bnaudit {_e(__version__)}: a self-contained report (no network access).</footer>
<script>{_JS}</script>
</body>
</html>
"""
