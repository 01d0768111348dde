"""The SHAPEPROF TensorBoard tab and the one-file HTML report in a real headless Chromium, offline.

A real `shapeprof trace --profile --optimize` of examples/mlp.py makes the run directory; TensorBoard serves it on
127.0.0.1 and `shapeprof report --html` writes it into one file. In both, a point of the roofline is hovered and its
tooltip checked against report.json, the table is sorted by time and its first row checked, the before/after view of
the optimize run opened, and a report whose strings are markup shows them as text and runs nothing. Any request to
an address other than 127.0.0.1 (for the file, any request that is not for a file) fails the test.

Needs Debian's `chromium` and the `playwright` package driving it (never `playwright install`).
Set SHAPEPROF_SCREENSHOTS=<folder> to keep the screenshots (docs/ has them).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

import shapeprof
from shapeprof.output.jsonfiles import read_saved
from shapeprof.output.tensorboard import export_tensorboard
from shapeprof.text import fmt_bytes, fmt_flops, fmt_intensity, fmt_seconds
from tests.tensorboard_server import serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]

from tests.browser import CHROMIUM, FLAGS, sync_playwright  # noqa: E402  (skips without chromium)

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_MODULE = "blocks.<script>alert(2)</script>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real trace's run directory (predicted, measured and optimize reports, TensorBoard runs), plus a TensorBoard
    run of a report whose model name and module path are markup."""
    logdir = tmp_path_factory.mktemp("runs")
    subprocess.run([sys.executable, "-m", "shapeprof", "trace", "--profile", "--optimize", "--steps", "2",
                    "--logdir", str(logdir), "examples/mlp.py"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    [run] = [p for p in logdir.iterdir() if p.is_dir()]
    report = read_saved(run / "MLP" / "report.json")
    first = replace(report.nodes[0], module_path=HOSTILE_MODULE)
    export_tensorboard(run, replace(report, model=HOSTILE, nodes=[first, *report.nodes[1:]]), name="hostile")
    return run


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


class Guard:
    """Every request the page makes: those off this machine are aborted and fail the test; so does any dialog
    (alert) and any script error."""

    def __init__(self, page, allowed):
        self.offsite, self.dialogs, self.errors = [], [], []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

        def route(r):
            url = r.request.url
            if allowed(url) and not url.endswith("/x"):    # '/x': the hostile <img src=x>, if it ever became markup
                r.continue_()
            else:
                self.offsite.append(url)
                r.abort()
        page.route("**/*", route)

    def check(self):
        assert not self.offsite, f"requests off this machine (or for the hostile <img src=x>): {self.offsite}"
        assert not self.dialogs, f"script from a report ran: {self.dialogs}"
        assert not self.errors, f"script errors: {self.errors}"


def local(url: str) -> bool:
    return urlparse(url).hostname == "127.0.0.1" or url.startswith(("data:", "blob:"))


def on_disk(url: str) -> bool:
    return url.startswith(("file:", "data:", "blob:"))


@pytest.fixture(scope="module")
def tensorboard(run_dir, tmp_path_factory):
    with serve(run_dir, tmp_path_factory.mktemp("tb") / "tensorboard.log") as server:
        server.wait_for("the shapeprof reports", lambda: len(server.json("/data/plugin/shapeprof/runs")) >= 4)
        yield server


@pytest.fixture(scope="module")
def html_file(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    subprocess.run([sys.executable, "-m", "shapeprof", "report", str(run_dir), "--html", str(out)], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


@pytest.fixture(params=["tab", "html"])
def view(request, browser, run_dir):
    """The page showing the views, and the frame they are in: TensorBoard's SHAPEPROF tab, or the HTML file."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    if request.param == "tab":
        server = request.getfixturevalue("tensorboard")
        guard = Guard(page, local)
        page.goto(server.url + "/#shapeprof")
        page.wait_for_selector("iframe", timeout=30_000)
        frame = next(f for f in _wait_frames(page) if "plugin_entry" in f.url)
    else:
        guard = Guard(page, on_disk)
        page.goto(request.getfixturevalue("html_file").as_uri())
        frame = page.main_frame
    frame.wait_for_selector("#sp-roofline .scatterlayer .point", timeout=30_000)
    yield request.param, page, frame
    guard.check()
    page.close()


def _wait_frames(page, timeout: float = 30.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("plugin_entry" in f.url for f in page.frames):
            return page.frames
        page.wait_for_timeout(100)
    raise AssertionError("TensorBoard never loaded the SHAPEPROF tab's frame")


def choose(frame, text: str) -> None:
    """Pick the report whose selector entry contains `text`."""
    options = frame.locator("#sp-runs option").all_inner_texts()
    frame.select_option("#sp-runs", label=next(o for o in options if text in o))


def point_index(frame, row_id: int) -> tuple[int, int]:
    """(trace, point) of table row `row_id`'s point in the roofline's data (at its predicted speed)."""
    return frame.evaluate("""id => {
        const gd = document.getElementById("sp-roofline");
        for (let t = 0; t < gd.data.length; t++) {
          const d = gd.data[t];
          if (!d.customdata || !d.name.includes("(predicted)")) continue;
          const j = d.customdata.findIndex(c => c[0] === id);
          if (j >= 0) return [t, j];
        }
        return null;
    }""", row_id)


def point_of(frame, row_id: int):
    """The roofline point of table row `row_id`."""
    trace, point = point_index(frame, row_id)
    return frame.locator("#sp-roofline .scatterlayer .trace").nth(trace).locator("path.point").nth(point)


def hover_point_of(frame, row_id: int) -> str:
    """Hover the roofline point of table row `row_id` and return the tooltip's text."""
    # force: plotly's drag layer lies over the points and takes the mouse; it finds the point under it
    point_of(frame, row_id).hover(force=True)
    tip = frame.locator("#sp-roofline .hoverlayer .hovertext").first
    tip.wait_for(timeout=10_000)
    return tip.text_content()


def test_hovering_a_point_shows_its_figures_from_report_json(view, run_dir, shots):
    kind, page, frame = view
    report = read_saved(run_dir / "MLP" / "report.json")
    top = report.top(1)[0]
    row = frame.locator("#sp-nodes tbody tr").first               # sorted by predicted time, biggest first
    assert row.locator("td[data-key='module']").text_content() == top.module_path
    # the mouse on the top node's point: where circles overlap plotly may name a neighbour, so the tooltip is
    # checked against report.json for whichever node it names
    text = hover_point_of(frame, int(row.get_attribute("data-id")))
    module, _, op = re.match(r"(.*?)module ", text).group(1).partition(" · ")
    [node] = [n for n in report.nodes if n.module_path == module and n.op == op]
    for expected in (f"module {node.module_path}", f"op {node.op}", f"FLOPs {fmt_flops(node.flops)}",
                     f"bytes {fmt_bytes(node.bytes)}", f"intensity {fmt_intensity(node.intensity)} FLOP/B",
                     f"predicted {fmt_seconds(node.predicted_seconds)}"):
        assert expected in text, (expected, text)
    page.screenshot(path=str(shots / f"{kind}-roofline.png"), full_page=kind == "html")


def test_clicking_a_point_selects_its_row(view):
    _, _, frame = view
    last = frame.locator("#sp-nodes tbody tr").last
    wanted = int(last.get_attribute("data-id"))
    point_of(frame, wanted).click(force=True)
    frame.locator(f"#sp-nodes tr.sp-selected[data-id='{wanted}']").wait_for(timeout=10_000)


def test_the_table_sorts_by_time_and_filters(view, run_dir):
    _, _, frame = view
    report = read_saved(run_dir / "MLP" / "report.json")
    by_time = sorted(report.nodes, key=lambda n: n.predicted_seconds)
    frame.click("#sp-nodes th[data-key='flops']")                     # away, then back: biggest time first
    frame.click("#sp-nodes th[data-key='predicted']")
    first = frame.locator("#sp-nodes tbody tr").first
    assert first.locator("td[data-key='predicted']").text_content() == fmt_seconds(by_time[-1].predicted_seconds)
    assert first.locator("td[data-key='module']").text_content() == by_time[-1].module_path
    frame.click("#sp-nodes th[data-key='predicted']")                 # again: smallest first
    first = frame.locator("#sp-nodes tbody tr").first
    assert first.locator("td[data-key='predicted']").text_content() == fmt_seconds(by_time[0].predicted_seconds)
    frame.fill("#sp-filter", "relu")
    ops = frame.locator("#sp-nodes tbody td[data-key='op']").all_text_contents()
    assert ops and set(ops) == {"ReLU"} and len(ops) == sum(n.op == "ReLU" for n in report.nodes)


def test_the_optimize_run_shows_before_and_after(view, run_dir, shots):
    kind, page, frame = view
    optimized = read_saved(run_dir / "MLP" / "optimize.json")
    choose(frame, "optimize")
    table = frame.locator("#sp-before-after")
    table.wait_for(timeout=10_000)
    predicted = table.locator("tbody tr").first.locator("td").all_text_contents()
    assert predicted[:2] == [fmt_seconds(optimized.predicted_seconds),
                             fmt_seconds(optimized.predicted_seconds - optimized.seconds_saved)]
    measured = table.locator("tbody tr").nth(2).locator("td").all_text_contents()
    assert measured[:2] == [fmt_seconds(optimized.measurement.original_seconds),
                            fmt_seconds(optimized.measurement.optimized_seconds)]
    fused = frame.locator(".sp-rewrite[data-rewrite='fuse_linear_activation']")
    assert fused.locator(".sp-status").text_content() == "applied"
    assert fused.locator("table.sp-applied tbody td:first-child").all_text_contents() == \
        [m.where for m in optimized.applied]
    frame.locator("#sp-before-after-chart .barlayer").first.wait_for(timeout=10_000)
    page.screenshot(path=str(shots / f"{kind}-before-after.png"), full_page=kind == "html")


def test_the_measured_run_shows_predicted_and_measured(view, run_dir):
    _, _, frame = view
    measured = read_saved(run_dir / "MLP" / "measured.json")
    choose(frame, "MLP · measured")
    frame.locator("#sp-nodes th[data-key='measured']").wait_for(timeout=10_000)
    cells = frame.locator("#sp-nodes tbody td[data-key='measured']").all_text_contents()
    assert sorted(cells) == sorted(fmt_seconds(n.measured_seconds) for n in measured.nodes)


def test_markup_in_a_report_is_shown_as_text_and_runs_nothing(view):
    _, _, frame = view
    choose(frame, "hostile")
    frame.locator("h1.sp-title").wait_for(timeout=10_000)
    frame.locator("#sp-roofline .scatterlayer .point").first.wait_for(timeout=10_000)
    summary = frame.locator(".sp-summary td").first
    assert summary.text_content() == HOSTILE
    assert frame.locator("#sp-view img").count() == 0 and frame.locator("#sp-view script").count() == 0
    modules = frame.locator("#sp-nodes tbody td[data-key='module']").all_text_contents()
    assert HOSTILE_MODULE in modules
    row = frame.locator("#sp-nodes tbody tr", has=frame.locator("td", has_text="alert(2)")).first
    trace, point = point_index(frame, int(row.get_attribute("data-id")))
    frame.evaluate("([t, j]) => Plotly.Fx.hover('sp-roofline', [{curveNumber: t, pointNumber: j}])", [trace, point])
    assert f"module {HOSTILE_MODULE}" in frame.locator("#sp-roofline .hoverlayer .hovertext").first.text_content()
    frame.wait_for_timeout(300)     # give an injected onerror its chance to fire: the guard then fails the test


def test_folding_twin_groups_on_a_model_with_repeated_layers(browser, tmp_path):
    from examples.llama import LlamaConfig, Transformer
    with torch.device("meta"):
        model = Transformer(LlamaConfig.tiny(n_layers=6))
    report = shapeprof.analyze(model, torch.zeros(1, 32, dtype=torch.long, device="meta"), dtype=torch.bfloat16)
    groups = len(report.repeat_groups())
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    guard = Guard(page, on_disk)
    page.goto(report.to_html(tmp_path / "llama.html").as_uri())
    page.wait_for_selector("#sp-roofline .scatterlayer .point", timeout=30_000)
    assert page.locator("#sp-nodes tbody tr").count() == groups < len(report.nodes)
    assert re.match(rf"{groups} of {groups} groups \({len(report.nodes)} nodes\)",
                    page.locator("#sp-table-note").text_content())
    page.uncheck("#sp-fold")
    # polled from here: the page's CSP forbids the eval that wait_for_function uses
    rows = "document.querySelectorAll('#sp-nodes tbody tr').length"
    for _ in range(100):
        if page.evaluate(rows) == len(report.nodes):
            break
        page.wait_for_timeout(100)
    assert page.evaluate(rows) == len(report.nodes)
    guard.check()
    page.close()
