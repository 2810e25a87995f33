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

from bnaudit.core.version import __version__
from bnaudit.report.charts import CHART_MAX, CHART_W, chart_svg, charts
from bnaudit.report.numbers import num, percent, share
from bnaudit.report.record import AuditRecord
from bnaudit.verdict.results import LayerResult, Severity

_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
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


def _data(value: float | int | None) -> str:
    """A sort key for the table: the number, or "" when there is none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value))


# --------------------------------------------------------------------------------------------
# The page: summary, output impact, charts, the sortable layer table, the findings


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
    m, a, stale = r.metrics, r.metrics.attrs, r.metrics.train.drift
    judged = stale.judged == "yes"
    gap = m.eval.drift.fraction if m.eval.drift.judged == "yes" else None
    name = _e(r.name)
    link = f'<a href="#findings-{i}">{name}</a>' if r.findings else name
    codes = [_e(f.code) for f in r.findings if f.counts]
    codes += [f'<span class="why">{_e(f.code)} ({f.status.value})</span>' for f in r.waived]
    cells = [
        f'<td data-v="{name}">{link}</td>',
        f"<td>{_e(r.type)}</td>",
        f'<td data-v="{a.channels}">{a.channels}</td>',
        f'<td data-v="{_data(m.seen.values_per_channel or None)}">'
        f"{num(m.seen.values_per_channel or None)}</td>",
        f'<td data-v="{int(r.severity)}"><span class="badge {r.verdict}">{r.verdict}</span></td>',
        f'<td data-v="{_data(m.train.recon.ratio)}">{num(m.train.recon.ratio, 2)}</td>',
        f'<td data-v="{_data(m.eval.recon.ratio)}">{num(m.eval.recon.ratio, 2)}</td>',
        f'<td data-v="{_data(stale.shift_max if judged else None)}">'
        f"{num(stale.shift_max, 2) if judged else '-'}</td>",
        f'<td data-v="{_data(stale.log_var_max if judged else None)}">'
        f"{num(stale.log_var_max, 2) if judged else '-'}</td>",
        f'<td data-v="{_data(gap)}">{num(gap, 2)}</td>',
        f'<td data-v="{_data(a.momentum)}">'
        f"{'cumul.' if a.momentum is None else num(a.momentum)}</td>",
        f'<td data-v="{_data(a.num_batches_tracked)}">{num(a.num_batches_tracked)}</td>',
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
                f"{percent(b.margin)}%): {status['new']} new, {status['worse']} worse, "
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
        ("relative L2 change", num(i.rel_l2)),
        ("largest absolute change", num(i.max_abs)),
    ]
    if i.top1_agreement is not None:
        basis = f" ({i.top1_basis})" if i.top1_basis else ""
        facts.append(("top-1 agreement", share(i.top1_agreement) + basis))
    facts.append(("regime", f"{i.regime} ({i.batches} batches, {i.forward_passes} extra passes)"))
    if i.evidence is not None:
        facts.append(("task metric", i.evidence.describe()))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    alone = ""
    if i.per_layer:
        index = {r.name: n for n, r in enumerate(report.layers)}
        rows = "".join(
            f'<tr><td><a href="#layer-{index[name]}">{_e(name)}</a></td><td>{num(change)}</td></tr>'
            if name in index
            else f"<tr><td>{_e(name)}</td><td>{num(change)}</td></tr>"
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
        f"{chart_svg(c, names)}</figure>"
        for c in charts(report)
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
