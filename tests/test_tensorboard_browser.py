"""TensorBoard in a real headless Chromium: the Text, Images and Graphs tabs show what shapeprof wrote.

Needs Debian's `chromium` (apt-get install -y chromium) and the `playwright` Python package driving it (never
`playwright install`, which downloads a browser). The PyTorch Profiler tab itself loads its charts library from the
internet, so it is checked through its data API in test_tensorboard.py instead.
Set SHAPEPROF_SCREENSHOTS=<folder> to keep the screenshots.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

import shapeprof
from examples.mlp import MLP
from shapeprof.output.tensorboard import export_tensorboard
from tests.tensorboard_server import serve

pytestmark = pytest.mark.browser

from tests.browser import CHROMIUM, FLAGS, sync_playwright  # noqa: E402  (skips without chromium)

RUN = "MLP-predicted-a100-80gb-sxm"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A headless Chromium and the URL of a TensorBoard serving one run with compute- and memory-bound nodes."""
    logdir = tmp_path_factory.mktemp("logs")
    # bf16, 512 rows: the Linears are compute-bound on the A100, the ReLUs memory-bound
    report = shapeprof.analyze(MLP(), torch.randn(512, 768), dtype=torch.bfloat16)
    assert {n.bound for n in report.nodes} == {"compute", "memory"}
    export_tensorboard(logdir, report)
    log = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with serve(logdir, log, profiler_runs={RUN}) as server, sync_playwright() as p:
        server.wait_for("the text, images and graph", lambda: all(
            RUN in server.json(f"/data/plugin/{plugin}/{route}")
            for plugin, route in (("text", "tags"), ("images", "tags"), ("graphs", "info"))))
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser, server.url
        finally:
            browser.close()


@pytest.fixture
def page(served):
    """A fresh page per test: TensorBoard keeps dashboards it has shown in the page, hidden."""
    browser, url = served
    tab = browser.new_page(viewport={"width": 1600, "height": 1000})
    tab.base = url
    yield tab
    tab.close()


def shown(page, text: str, timeout: float = 10_000) -> None:
    """Wait until `text` is visible on the page (locators see into TensorBoard's shadow DOM; body.innerText does
    not)."""
    page.get_by_text(text, exact=True).filter(visible=True).first.wait_for(timeout=timeout)


def not_blank(png: Path) -> None:
    pixels = matplotlib.image.imread(png)[..., :3]
    colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    ink = float((pixels < 0.9).any(axis=-1).mean())
    assert colours > 50 and ink > 0.05, f"{png} looks blank: {colours} colours, {ink:.1%} non-white"


def test_text_tab_renders_the_markdown_tables(page, shots):
    page.goto(page.base + "/#text")
    page.locator("table").first.wait_for(timeout=30_000)
    assert page.locator("table th", has_text="FLOP/B").count() >= 1
    assert page.locator("table td code", has_text="blocks_0_0").count() >= 1
    assert page.locator("table td strong", has_text="memory").count() >= 1     # the bound column
    shown(page, "Memory-bound hot spots")
    path = shots / "text.png"
    page.screenshot(path=str(path), full_page=True)
    not_blank(path)


def test_images_tab_shows_the_roofline(page, shots):
    page.goto(page.base + "/#images")
    image = page.locator("img[src*='individualImage']").first
    image.wait_for(timeout=30_000)
    page.get_by_text("Show actual image size").filter(visible=True).first.click()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=30_000)
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1200, 650]
    path = shots / "images.png"
    page.screenshot(path=str(path), full_page=True)
    not_blank(path)


def test_graphs_tab_colours_nodes_by_bound(page, shots):
    page.goto(page.base + f"/#graphs&run={RUN}")
    page.locator("g.node[data-name='blocks']").wait_for(timeout=30_000)
    page.get_by_text("Device", exact=True).filter(visible=True).first.click()
    for device in ("compute-bound:0", "memory-bound:0"):   # the legend of "Color by: Device"
        shown(page, device)
    for group in ("blocks", "blocks/0", "blocks/0/0"):   # open the module namespaces down to the first Linear
        page.locator(f"g.node[data-name='{group}']").dblclick()
        page.locator(f"g.node[data-name^='{group}/']").first.wait_for(timeout=10_000)
    select_node(page, "blocks/0/0/blocks_0_0")
    for text in ("Operation: Linear", "flops", "/device:compute-bound:0"):   # the node's info card
        shown(page, text)
    assert page.get_by_text("bf16[512, 3072]", exact=False).filter(visible=True).count() >= 1
    path = shots / "graphs.png"
    page.screenshot(path=str(path))
    not_blank(path)


def select_node(page, name: str, tries: int = 5) -> None:
    """Click a graph node until its info card opens: the graph animates while namespaces open, and edges are drawn
    over small nodes, so the click goes to the node's own shape, and is repeated if it landed while things moved."""
    shape = page.locator(f"g.node[data-name='{name}'] .nodeshape").first
    card = page.get_by_text("Operation: ", exact=False).filter(visible=True).first
    for _ in range(tries):
        shape.click(force=True)
        try:
            card.wait_for(timeout=2_000)
            return
        except Exception:   # playwright's TimeoutError: not selected yet
            page.wait_for_timeout(500)
    raise AssertionError(f"clicking graph node {name!r} never opened its info card")
