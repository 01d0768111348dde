"""How responsive the interactive views are on a Llama-3.1-405B report (~5,000 nodes), folded against unfolded.

    python benchmarks/view_405b.py [--rounds 3] [--layers 126]

1. The report: the hand-written Llama-3.1-405B (examples/llama.py) on meta, 1 x 2048 tokens, bf16.
2. Python: building its view (`views.report_view`: every node, the twin groups, four plotly figures) and the
   HTML file (`Report.to_html`): seconds and megabytes.
3. Headless Chromium (Debian's chromium through playwright), the HTML file from disk, each round in a fresh page:
   - open MLP: the same for a 5-node report, the baseline (loading plotly.js is most of it);
   - open: from navigation until the roofline's points and the table are drawn (folded, as it opens);
   - sort: a click on the FLOPs heading until the table is redrawn, folded and unfolded;
   - unfold: the checkbox until every node's row (first 300 drawn) and point are drawn again.
   Ratios against the 5-node baseline and unfolded / folded; medians of the rounds (every run printed).
Needs `chromium` on PATH and the playwright package.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import shapeprof  # noqa: E402
from examples.llama import LlamaConfig, Transformer  # noqa: E402
from shapeprof.output.views import report_view  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=126)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with torch.device("meta"):
        model = Transformer(LlamaConfig.llama3_405b(n_layers=args.layers))
    t = time.perf_counter()
    report = shapeprof.analyze(model, torch.zeros(1, 2048, dtype=torch.long, device="meta"), dtype=torch.bfloat16)
    print(f"Llama-3.1-405B shape, {args.layers} layers, 1 x 2048, bf16 on meta: {len(report.nodes):,} nodes, "
          f"{len(report.repeat_groups()):,} twin groups (analysis {time.perf_counter() - t:.1f} s)")
    builds, writes = [], []
    folder = Path(tempfile.mkdtemp())
    for _ in range(args.rounds):
        t = time.perf_counter()
        report_view(report)
        builds.append(time.perf_counter() - t)
        t = time.perf_counter()
        path = report.to_html(folder / "405b.html")
        writes.append(time.perf_counter() - t)
    print(f"view built in {_runs(builds)}; HTML written in {_runs(writes)}: {path.stat().st_size / 1e6:.1f} MB "
          f"(plotly.js is 4.8 MB of it)")

    figures = report_view(report)["report"]["figures"]
    points = {k: sum(len(t.get("customdata") or []) for t in figures[f"roofline_{k}"]["figure"]["data"])
              for k in ("groups", "nodes")}    # the points each roofline draws (nodes without FLOPs have none)
    from examples.mlp import MLP
    small = shapeprof.analyze(MLP(), torch.randn(64, 768), dtype=torch.bfloat16).to_html(folder / "mlp.html")
    timings: dict[str, list[float]] = {k: [] for k in ("open MLP", "open", "sort folded", "unfold",
                                                       "sort unfolded")}
    counts = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        for _ in range(args.rounds):
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            t = time.perf_counter()            # the baseline: a 5-node report, plotly.js the same
            page.goto(small.as_uri())
            page.wait_for_selector("#sp-roofline .scatterlayer .point")
            page.wait_for_selector("#sp-nodes tbody tr")
            timings["open MLP"].append(time.perf_counter() - t)
            page.close()
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            t = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_selector("#sp-roofline .scatterlayer .point")
            page.wait_for_selector("#sp-nodes tbody tr")
            timings["open"].append(time.perf_counter() - t)
            counts["folded"] = (page.locator("#sp-roofline .scatterlayer .point").count(),
                                page.locator("#sp-nodes tbody tr").count())
            timings["sort folded"].append(_timed(page, lambda: page.click("#sp-nodes th[data-key='flops']"),
                                                 "#sp-nodes th[data-key='flops'][aria-sort='descending']"))
            t = time.perf_counter()
            page.uncheck("#sp-fold")
            _until(page, "document.querySelectorAll('#sp-roofline .scatterlayer .point').length === "
                         f"{points['nodes']}")
            timings["unfold"].append(time.perf_counter() - t)
            counts["unfolded"] = (page.locator("#sp-roofline .scatterlayer .point").count(),
                                  page.locator("#sp-nodes tbody tr").count())
            timings["sort unfolded"].append(_timed(page, lambda: page.click("#sp-nodes th[data-key='bytes']"),
                                                   "#sp-nodes th[data-key='bytes'][aria-sort='descending']"))
            page.close()
        browser.close()
    print(f"points, rows drawn: folded {counts['folded']}, unfolded {counts['unfolded']}")
    for key, values in timings.items():
        print(f"{key:>14}: {_runs(values)}")
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(f"open 405B (folded) / open MLP: {med['open'] / med['open MLP']:.2f}x; unfold / open: "
          f"{med['unfold'] / med['open']:.2f}x; sort unfolded / folded: "
          f"{med['sort unfolded'] / med['sort folded']:.2f}x")


def _until(page, condition: str, every: float = 0.01) -> None:
    """Poll `condition` with page.evaluate (the page's CSP forbids the eval that wait_for_function uses)."""
    while not page.evaluate(condition):
        time.sleep(every)


def _timed(page, action, selector: str) -> float:
    t = time.perf_counter()
    action()
    page.wait_for_selector(selector)
    return time.perf_counter() - t


def _runs(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (runs {', '.join(f'{v:.2f}' for v in values)})"


if __name__ == "__main__":
    main()
