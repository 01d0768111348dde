"""The one-file HTML report: the same views as the SHAPEPROF TensorBoard tab, in a file that opens offline.

Everything is inside the file: plotly.js (from the installed plotly package), the view script and style
(`static/`), and the views as JSON in a data block. A Content-Security-Policy in the page allows only those
scripts (by hash) and no connection anywhere, so the file loads nothing from the network and a string in a report
cannot become script even if it were ever put into the page as markup.

    >>> import tempfile, torch, shapeprof
    >>> from pathlib import Path
    >>> report = shapeprof.analyze(torch.nn.Linear(64, 64), torch.randn(8, 64))
    >>> path = report.to_html(Path(tempfile.mkdtemp()) / "report.html")
    >>> text = path.read_text()
    >>> text.startswith("<!DOCTYPE html>"), "Plotly" in text, "<script src" in text
    (True, True, False)
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..files import write_atomic
from .base import Format, Results, register
from .views import view_of

__all__ = ["HtmlFormat", "html_page", "static_file", "write_html"]


@lru_cache(maxsize=None)
def static_file(name: str) -> str:
    """A file of the view's front end, as shipped in the package (`shapeprof/output/static/`)."""
    return resources.files("shapeprof.output").joinpath("static", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js as the installed plotly package ships it for offline use."""
    from plotly.offline import get_plotlyjs
    return get_plotlyjs()


def data_block(value: Any) -> str:
    """`value` as JSON that can sit inside a <script type="application/json"> block: '<', '>' and '&' escaped
    (so no '</script>' in a name ends the block early), and the two line separators JavaScript once rejected."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


_BOOT = """\
(function () {
  var views = JSON.parse(document.getElementById("shapeprof-views").textContent);
  window.shapeprofView.mount(document.body, views.map(function (v, i) { return {id: String(i), name: v.name}; }),
                             function (id) { return views[Number(id)].view; });
})();
"""


def html_page(views: Iterable[tuple[str, dict[str, Any]]], title: str) -> str:
    """The page of `views` ((name, view) pairs, a selector when there are several), titled `title`."""
    views = [{"name": name, "view": view} for name, view in views]
    scripts = [plotly_js(), static_file("view.js"), _BOOT]
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data: blob:; "
              f"font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n",
        f"<meta name=\"generator\" content=\"shapeprof\">\n<title>{html.escape(title)}</title>\n",
        "<style>\n", static_file("view.css"), "</style>\n</head>\n<body>\n",
        "<script>", scripts[0], "</script>\n",
        "<script type=\"application/json\" id=\"shapeprof-views\">", data_block(views), "</script>\n",
        "<script>", scripts[1], "</script>\n<script>", scripts[2], "</script>\n</body>\n</html>\n"])


def write_html(path: str | os.PathLike, saved: Any, *, title: str | None = None) -> Path:
    """Write the HTML report of `saved` (a Report, an OptimizeReport, or a list of (name, either) pairs) to `path`
    atomically: a failed write leaves whatever was at `path` as it was. Returns the path."""
    pairs = saved if isinstance(saved, list) else [("", saved)]
    views = [(name or view["title"], view) for name, view in ((n, view_of(s)) for n, s in pairs)]
    path = Path(path)
    write_atomic(path, html_page(views, title or views[0][0]))
    return path


@register
class HtmlFormat(Format):
    name = "html"
    description = "report.html of each model: the interactive views (roofline, nodes, modules, before/after) in " \
                  "one file that opens offline"

    def write(self, results: Results, run_dir: Path) -> dict[str, Path]:
        saved = [("predicted", results.report)]
        if results.measured is not None:
            saved.append(("measured", results.measured))
        if results.optimized is not None:
            saved.append(("optimize", results.optimized))
        titled = [(f"{results.name} · {kind}", s) for kind, s in saved]
        return {"html": write_html(Path(run_dir) / results.name / "report.html", titled, title=results.name)}
