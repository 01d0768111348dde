"""Makes the README's pictures of the interactive views: python docs/view_pictures.py

- docs/shapeprof-tab.png: the SHAPEPROF tab of a real TensorBoard (127.0.0.1) over a GPT-2-small-shaped nanoGPT
  (bf16, 8 x 1024 tokens, analysed on meta on an A100), a point of the roofline hovered;
- docs/html-report.png: the one-file HTML report of the same model opened from disk, the node table sorted by time;
- docs/html-before-after.png: the HTML report of `shapeprof.optimize` on examples/mlp.py, before and after.
Needs Debian's chromium and the playwright package.
"""
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shapeprof  # noqa: E402
from examples.mlp import MLP  # noqa: E402
from examples.nanogpt import GPT, GPTConfig  # noqa: E402
from shapeprof.output.tensorboard import export_tensorboard  # noqa: E402
from tests.tensorboard_server import serve  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    from playwright.sync_api import sync_playwright
    work = Path(tempfile.mkdtemp())
    with torch.device("meta"):
        gpt = GPT(GPTConfig.gpt2())
    report = shapeprof.analyze(gpt, torch.zeros(8, 1024, dtype=torch.long, device="meta"), dtype=torch.bfloat16)
    export_tensorboard(work / "logs", report, name="gpt2-small")
    model = MLP().eval()
    optimized = shapeprof.optimize(model, torch.randn(64, 768), measure=True).shapeprof_report
    report.to_html(work / "gpt2.html")
    optimized.to_html(work / "mlp-optimize.html")
    with serve(work / "logs", work / "tensorboard.log") as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server.url + "/#shapeprof")
        page.wait_for_selector("iframe")
        while not any("plugin_entry" in f.url for f in page.frames):
            page.wait_for_timeout(100)
        frame = next(f for f in page.frames if "plugin_entry" in f.url)
        frame.wait_for_selector("#sp-roofline .scatterlayer .point")
        frame.locator("#sp-roofline").scroll_into_view_if_needed()
        biggest = frame.locator("#sp-roofline .scatterlayer .trace").last.locator("path.point").first
        biggest.hover(force=True)
        frame.wait_for_selector("#sp-roofline .hoverlayer .hovertext")
        page.screenshot(path=str(ROOT / "docs" / "shapeprof-tab.png"))

        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((work / "gpt2.html").as_uri())
        page.wait_for_selector("#sp-nodes tbody tr")
        page.locator("#sp-nodes").scroll_into_view_if_needed()
        page.evaluate("window.scrollBy(0, -60)")
        page.screenshot(path=str(ROOT / "docs" / "html-report.png"))

        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((work / "mlp-optimize.html").as_uri())
        page.wait_for_selector("#sp-before-after-chart .barlayer")
        page.screenshot(path=str(ROOT / "docs" / "html-before-after.png"))
        browser.close()
    for name in ("shapeprof-tab.png", "html-report.png", "html-before-after.png"):
        print(f"wrote docs/{name}")


if __name__ == "__main__":
    main()
