"""shapeprof/output/tensorboard/plugin.py: the SHAPEPROF tab's routes, asked through TensorBoard's own WSGI app.

The browser side (the tab in a real TensorBoard, hovering, sorting) is in test_views_browser.py.
"""
import json
from importlib import metadata
from pathlib import Path

import plotly
import pytest
import torch
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

import shapeprof
from examples.mlp import MLP
from shapeprof.output.tensorboard import export_tensorboard
from shapeprof.output.tensorboard.plugin import ShapeprofPlugin
from shapeprof.output.views import report_view


def client(logdir: Path) -> Client:
    """TensorBoard's WSGI app with only the shapeprof plugin: the routes as TensorBoard serves them, with its
    security middleware (a response without the headers it wants is refused there)."""
    context = base_plugin.TBContext(logdir=str(logdir))
    app = application.TensorBoardWSGI([ShapeprofPlugin(context)])
    return Client(app)


def get_json(c: Client, url: str):
    response = c.get(url)
    assert response.status_code == 200, response.get_data(as_text=True)
    return json.loads(response.get_data())


@pytest.fixture(scope="module")
def report():
    return shapeprof.analyze(MLP(), torch.randn(64, 768), dtype=torch.bfloat16)


def test_installing_shapeprof_registers_the_plugin_with_tensorboard():
    [entry] = [e for e in metadata.entry_points(group="tensorboard_plugins") if e.name == "shapeprof"]
    assert entry.load() is ShapeprofPlugin
    from tensorboard import default
    assert ShapeprofPlugin in default.get_dynamic_plugins()


def test_the_tab_lists_and_shows_the_runs_export_tensorboard_wrote(tmp_path, report):
    export_tensorboard(tmp_path, report, name="first")
    export_tensorboard(tmp_path, report, name="second")
    c = client(tmp_path)
    listing = get_json(c, "/data/plugins_listing")["shapeprof"]
    assert listing["enabled"] and listing["tab_name"] == "SHAPEPROF"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/shapeprof/index.js"}
    runs = get_json(c, "/data/plugin/shapeprof/runs")
    assert [r["id"] for r in runs] == ["first-predicted-a100-80gb-sxm/report.json",
                                       "second-predicted-a100-80gb-sxm/report.json"]
    view = get_json(c, "/data/plugin/shapeprof/view?run=" + runs[0]["id"])
    expected = json.loads(json.dumps(report_view(report, runs[0]["name"])))
    assert view == expected


def test_a_trace_run_directory_lists_each_report_once(tmp_path, report):
    run = tmp_path / "mlp-20250101-000000"
    report.to_json(run / "MLP" / "report.json")
    export_tensorboard(run, report, name="MLP")            # its run holds the same report.json again
    runs = get_json(client(tmp_path), "/data/plugin/shapeprof/runs")
    assert [r["id"] for r in runs] == ["mlp-20250101-000000/MLP/report.json"]


def test_the_front_end_is_served_from_the_installed_packages(tmp_path, report):
    export_tensorboard(tmp_path, report)
    c = client(tmp_path)
    shipped = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert c.get("/data/plugin/shapeprof/plotly.min.js").get_data() == shipped.read_bytes()
    for route in ("index.js", "view.js", "view.css"):
        response = c.get(f"/data/plugin/shapeprof/{route}")
        assert response.status_code == 200
        body = response.get_data(as_text=True)
        assert "//cdn" not in body and "https://" not in body and "http://" not in body


def test_only_listed_reports_are_served(tmp_path, report):
    export_tensorboard(tmp_path, report)
    (tmp_path.parent / "secret.json").write_text("{}")
    c = client(tmp_path)
    for wanted in ("../secret.json", "/etc/passwd", "nothing/report.json", ""):
        response = c.get("/data/plugin/shapeprof/view", query_string={"run": wanted})
        assert response.status_code == 404, wanted


def test_a_damaged_report_says_why_and_hides_nothing_else(tmp_path, report):
    export_tensorboard(tmp_path, report, name="good")
    bad = tmp_path / "bad" / "report.json"
    bad.parent.mkdir()
    bad.write_text('{"schema": "shapeprof.report", "version": 2, "model": 3}')
    c = client(tmp_path)
    runs = {r["id"]: r for r in get_json(c, "/data/plugin/shapeprof/runs")}
    assert set(runs) == {"bad/report.json", "good-predicted-a100-80gb-sxm/report.json"}
    view = get_json(c, "/data/plugin/shapeprof/view?run=bad/report.json")
    assert view["kind"] == "error" and "bad/report.json: malformed shapeprof report: model" in view["error"]
    assert get_json(c, "/data/plugin/shapeprof/view?run=good-predicted-a100-80gb-sxm/report.json")["kind"] == "report"


def test_an_empty_logdir_leaves_the_tab_inactive(tmp_path):
    c = client(tmp_path)
    assert not get_json(c, "/data/plugins_listing")["shapeprof"]["enabled"]
    assert get_json(c, "/data/plugin/shapeprof/runs") == []
