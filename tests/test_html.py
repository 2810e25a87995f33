"""The HTML report: its structure in plain tests, its rendering in a real headless Chromium.

The browser test skips only when no Chromium is installed (`apt-get install chromium`, or point
BNAUDIT_BROWSER at a binary); it needs no network and no display.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import bnaudit
from bnaudit.gate.ignores import Ignore, apply_ignores
from bnaudit.report.audit_report import AuditReport
from bnaudit.report.html import _CSS, CHART_MAX, CHART_W, render_html
from bnaudit.report.numbers import num
from bnaudit.verdict.results import Severity, Status
from tests import nets
from tests.reports import EVIL, hostile_report, metrics, single_thread

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WINDOW = (1280, 1400)


class Page(HTMLParser):
    """Every start tag with its attributes, in document order, and the text of the page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())
        ]

    @property
    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}


@pytest.fixture(scope="module")
def stale_report() -> AuditReport:
    """A real audit: the MLP with BN "4" stale (a local disagreement: BN "1" and "7" fit, so
    the finding fails), small batches (var-bias warns), one ignore."""
    with single_thread():
        model = nets.healthy_mlp()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model[3].weight.mul_((1.5 + 1.5 * torch.rand(32, generator=gen))[:, None])
        batches = torch.split(nets.mlp_data(4 * 16, seed=5), 16)
        report = bnaudit.audit(model, batches, checkpoint="stale.pt")
    return apply_ignores(report, [Ignore("10", "var-bias", "head layer, small N by design")])


@pytest.fixture(scope="module")
def page(stale_report: AuditReport) -> Page:
    return Page(render_html(stale_report))


def test_is_self_contained(page: Page) -> None:
    assert not page.find("link") and not page.find("img") and not page.find("iframe")
    scripts = page.find("script")
    assert len(scripts) == 1 and "src" not in scripts[0]
    for _, attrs in page.tags:
        for key in ("src", "href", "action", "data"):
            assert not attrs.get(key, "#").strip() or attrs.get(key, "#").startswith("#"), attrs
    csp = page.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert csp and csp[0]["content"].startswith("default-src 'none';")


def test_summary_table_and_findings_are_linked(stale_report: AuditReport, page: Page) -> None:
    assert page.find("span", id="verdict")[0]["class"] == "badge fail"
    rows = [a for t, a in page.tags if t == "tr" and a.get("id", "").startswith("layer-")]
    assert [r["id"] for r in rows] == [f"layer-{i}" for i in range(len(stale_report.layers))]
    assert rows[1]["class"] == "fail"  # BN "4" is the stale one
    links = {a["href"] for a in page.find("a") if a.get("href", "").startswith("#findings-")}
    with_findings = {f"#findings-{i}" for i, r in enumerate(stale_report.layers) if r.findings}
    assert links == with_findings and len(with_findings) == 4
    assert {h.lstrip("#") for h in links} <= page.ids  # every link has its target
    text = " ".join(page.text)
    assert "stale-stats" in text
    assert "[ignored: head layer, small N by design]" in text
    assert "accepted findings" in text


def test_table_is_sortable_on_every_column(page: Page) -> None:
    heads = page.find("th")
    assert [h["data-key"] for h in heads][:5] == ["layer", "type", "channels", "n", "verdict"]
    assert all(h["aria-sort"] == "none" and h["data-type"] in {"number", "text"} for h in heads)
    assert len(page.find("button", type="button")) == len(heads)


def test_charts_draw_values_and_limits(stale_report: AuditReport, page: Page) -> None:
    svgs = page.find("svg")
    assert len(svgs) == 3
    limits = page.find("line", **{"class": "limit"})
    assert len(limits) == 1 + 1 + 2  # error ratio; shift; variance ratio below and above
    bars = [a for t, a in page.tags if t == "rect" and a["class"].startswith("bar")]
    assert len(bars) == 3 * len(stale_report.layers)  # every value was measured
    over = [a for a in bars if a["class"] == "bar over fail"]
    assert len(over) >= 1  # the stale layer's shift is beyond 0.3 sd
    width = {float(svg["viewbox"].split()[2]) for svg in svgs}.pop()
    labels = page.find("text", **{"class": "limit-label"})
    assert len(labels) == len(limits)
    assert all(0 < float(label["x"]) < width for label in labels)  # inside the picture
    chart_links = {a["href"] for a in page.find("a") if a.get("href", "").startswith("#layer-")}
    assert {h.lstrip("#") for h in chart_links} <= page.ids
    assert len(chart_links) == len(stale_report.layers)


def test_hostile_names_stay_text() -> None:
    text = render_html(hostile_report())
    page = Page(text)
    assert len(page.find("script")) == 1  # the layer name's <script> is text, not an element
    assert not page.find("a", href="http://x")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert EVIL.replace("\x1b", "") not in text  # never unescaped
    assert all(not i.startswith("evil") for i in page.ids)  # ids come from indices
    assert render_html(hostile_report()) == text  # deterministic: no timestamps


def _bar_classes(report: AuditReport, chart: int) -> list[str]:
    """The class of each layer's bar in chart `chart` (0 error, 1 shift, 2 variance)."""
    page = Page(render_html(report))
    bars = [a["class"] for t, a in page.tags if t == "rect" and a["class"].startswith("bar")]
    n = len(report.layers)
    return bars[chart * n : (chart + 1) * n]


def test_only_bars_that_count_are_coloured() -> None:
    report = hostile_report()  # blocks.0.bn: stale-stats fail, shift 1.7 (limit 0.3)
    assert _bar_classes(report, 1)[1] == "bar over fail"
    # The same numbers with the finding only informative, or accepted: beyond, not red.
    stale = report.layers[1]
    for change in ({"severity": Severity.INFO}, {"status": Status.IGNORED}):
        f = dataclasses.replace(stale.findings[0], **change)
        layers = (report.layers[0], dataclasses.replace(stale, findings=(f,)), *report.layers[2:])
        classes = _bar_classes(dataclasses.replace(report, layers=layers), 1)
        assert classes[1] == "bar beyond", change
        assert not any("over" in c for c in classes)
    # within the limit: a plain bar
    assert _bar_classes(report, 1)[0] == "bar"


def test_impact_figures_are_shown() -> None:
    with single_thread():
        model = nets.healthy_mlp()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model[0].weight.mul_((1.5 + 1.5 * torch.rand(32, generator=gen))[:, None])
        batches = torch.split(nets.mlp_data(4 * 32, seed=5), 32)
        report = bnaudit.audit(model, batches, attribution=True)
    impact = report.impact
    assert impact is not None and impact.per_layer
    text = render_html(report)
    page = Page(text)
    assert "impact" in page.ids
    section = text[text.index('<section id="impact">') : text.index('<section id="charts">')]
    assert f"<dd>{num(impact.rel_l2)}</dd>" in section
    assert f"<dd>{num(impact.max_abs)}</dd>" in section
    assert f"{impact.forward_passes} extra passes" in section
    for name, change in impact.per_layer.items():
        assert f">{name}</a></td><td>{num(change)}</td>" in section
    assert 'id="impact"' not in render_html(hostile_report())  # none measured: no section


def test_upstream_lists_stay_short() -> None:
    from bnaudit.verdict.findings import UPSTREAM_SHOWN, Thresholds, judge_layer

    upstream = tuple(f"stage{i}.bn" for i in range(UPSTREAM_SHOWN + 4))
    m = metrics(gap_fraction=0.5, gap_p=1e-9, gap_shift_max=1.0, gap_log_var_max=0.8,
                gap_channel=0, calls=4)  # fmt: skip
    found = judge_layer("late.bn", m, Thresholds(), type_name="BatchNorm1d",
                        overrides_forward=False, batches=4, upstream_stale=upstream)  # fmt: skip
    gap = next(f for f in found if f.code == "train-eval-gap")
    shown = ", ".join(upstream[:UPSTREAM_SHOWN])
    assert f"({shown} and 4 more)" in gap.message
    assert upstream[UPSTREAM_SHOWN] not in gap.message + gap.hint
    assert gap.hint.startswith(f"recalibrate {shown} and 4 more first")


def test_chart_labels_readable_at_800_px() -> None:
    page = Page(render_html(hostile_report()))
    widths = {float(a["viewbox"].split()[2]) for a in page.find("svg")}
    assert widths == {CHART_W}
    assert f"minmax(min(100%, {CHART_W}px), 1fr)" in _CSS and "svg text { font: 11px" in _CSS
    # At 800 px (24 px page padding, 9 px figure padding and border each side) one chart fits a
    # row, drawn at least at its own width: 11-unit labels are at least 11 px.
    room = 800 - 2 * 24 - 2 * 9
    assert 2 * CHART_W + 16 > 800 - 2 * 24  # one chart a row
    drawn = min(room, CHART_MAX)
    assert 11 * drawn / CHART_W >= 11
    assert 11 * CHART_MAX / CHART_W <= 17  # nor poster-sized on a wide screen
    drawn_labels = re.findall(r'text-anchor="end">([^<]*)</text>', render_html(hostile_report()))
    labels = [html.unescape(label) for label in drawn_labels]
    assert len(labels) == 3 * 4 and all(len(label) <= 24 for label in labels)
    assert "stem.bn" in labels and any(label.startswith("evil") for label in labels)


# --------------------------------------------------------------------------------------------
# A real browser


def browser() -> str | None:
    wanted = os.environ.get("BNAUDIT_BROWSER")
    if wanted:
        return wanted
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def run_browser(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ]  # fmt: skip
    return subprocess.run(
        [exe, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_renders_in_headless_chromium(stale_report: AuditReport, tmp_path: Path) -> None:
    exe = browser()
    if exe is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set BNAUDIT_BROWSER)")
    report = tmp_path / "report.html"
    report.write_text(render_html(stale_report), encoding="utf-8")
    url = report.as_uri()

    # The script ran (it marks the page) and sorting works: #sort=shift orders the rows by
    # ascending stale mean shift, so the stale layer (second in the report) comes last.
    dom = run_browser(exe, tmp_path / "profile", "--dump-dom", url + "#sort=shift")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    assert page.find("html")[0].get("data-ready") == "1", "the inline script did not run"
    assert page.find("th", **{"data-key": "shift"})[0]["aria-sort"] == "ascending"
    rows = [a["id"] for t, a in page.tags if t == "tr" and a.get("id", "").startswith("layer-")]
    assert rows[-1] == "layer-1"  # the stale layer has the largest shift
    assert sorted(rows) == [f"layer-{i}" for i in range(len(stale_report.layers))]

    shot = tmp_path / "report.png"
    result = run_browser(exe, tmp_path / "profile", f"--screenshot={shot}", url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(shot) == WINDOW
    assert shot.stat().st_size > 20_000  # a blank page compresses to a few kB
