"""shapeprof/output/views.py and html.py: the data the interactive views show, and the one-file HTML report."""
import base64
import hashlib
import json
import re
from dataclasses import replace

import pytest
import torch

import shapeprof
from examples.llama import LlamaConfig, Transformer
from examples.mlp import MLP
from shapeprof.output.html import data_block, html_page, write_html
from shapeprof.output.views import optimize_view, report_view
from shapeprof.text import fmt_bytes, fmt_flops, fmt_seconds

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama of four identical layers, on meta: nodes repeat across layers (twin groups)."""
    with torch.device("meta"):
        model = Transformer(LlamaConfig.tiny(n_layers=4))
    return shapeprof.analyze(model, torch.zeros(2, 16, dtype=torch.long, device="meta"), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def optimized():
    from shapeprof.optimize import optimize
    model = MLP(d_in=32, d_hidden=64, d_out=8).eval()
    return optimize(model, torch.randn(4, 32), spec=shapeprof.get_spec("l4")).shapeprof_report


def test_every_node_is_in_the_view_with_the_reports_exact_figures(llama):
    view = report_view(llama)["report"]
    assert [n["name"] for n in view["nodes"]] == [n.name for n in llama.nodes]
    for row, n in zip(view["nodes"], llama.nodes):
        assert (row["flops"], row["bytes"], row["predicted"], row["module"], row["op"]) == \
            (n.flops, n.bytes, n.predicted_seconds, n.module_path, n.op)
        assert row["text"]["flops"] == fmt_flops(n.flops)
        assert row["text"]["predicted"] == fmt_seconds(n.predicted_seconds)


def test_twin_groups_fold_the_repeated_layers_and_add_up_to_the_nodes(llama):
    view = report_view(llama)["report"]
    groups, nodes = view["groups"], view["nodes"]
    members = sorted(i for g in groups for i in g["members"])
    assert members == list(range(len(nodes)))              # every node in exactly one group
    assert len(groups) < len(nodes) / 3                    # four layers fold into one
    assert {g["count"] for g in groups} >= {4}
    for g in groups:
        assert g["count"] == len(g["members"])
        assert g["flops"] == sum(nodes[i]["flops"] for i in g["members"])
        assert g["bytes"] == sum(nodes[i]["bytes"] for i in g["members"])
        assert all(nodes[i]["group"] == g["id"] for i in g["members"])
    assert sum(g["flops"] for g in groups) == llama.total.flops


def test_the_roofline_has_a_point_per_group_folded_and_per_node_unfolded(llama):
    figures = report_view(llama)["report"]["figures"]

    def point_ids(fig):
        return sorted(c[0] for t in fig["figure"]["data"] if t.get("mode") == "markers"
                      and t["name"] != "measured" for c in t["customdata"])
    drawn_groups = point_ids(figures["roofline_groups"])
    drawn_nodes = point_ids(figures["roofline_nodes"])
    groups = report_view(llama)["report"]["groups"]
    assert len(drawn_groups) + figures["roofline_groups"]["left_out"] == len(groups)
    assert len(drawn_nodes) + figures["roofline_nodes"]["left_out"] == len(llama.nodes)
    # points sit at the FLOP/s reached in the predicted time
    by_name = {n.name: n for n in llama.nodes}
    for trace in figures["roofline_nodes"]["figure"]["data"]:
        for x, y, c in zip(trace.get("x", []), trace.get("y", []), trace.get("customdata") or []):
            n = by_name[c[1]]
            assert x == pytest.approx(n.flops / n.bytes) and y == pytest.approx(n.flops / n.predicted_seconds)


def test_module_tree_shares_add_up(llama):
    tree = report_view(llama)["report"]["figures"]["tree_groups"]["figure"]["data"][0]
    values = dict(zip(tree["ids"], tree["values"]))
    assert values["(model)"] == pytest.approx(llama.total.predicted_seconds)
    assert "layers.*" in values and not any(i.startswith("layers.0") for i in values)   # folded by pattern
    for child, parent in zip(tree["ids"], tree["parents"]):
        if parent:
            assert values[child] <= values[parent] * (1 + 1e-9)
    unfolded = report_view(llama)["report"]["figures"]["tree_nodes"]["figure"]["data"][0]
    assert {"layers.0", "layers.3"} <= set(unfolded["ids"])


def test_strings_from_a_report_are_data_in_the_view_and_escaped_in_chart_labels(llama):
    node = replace(llama.nodes[0], module_path="layers.<script>alert(2)</script>", op="<b>op</b>")
    hostile = replace(llama, model=HOSTILE, nodes=[node, *llama.nodes[1:]])
    view = report_view(hostile)
    assert view["report"]["model"] == HOSTILE and view["report"]["nodes"][0]["module"] == node.module_path
    text = json.dumps(view["report"]["figures"])
    assert "<script>" not in text and "<b>op</b>" not in text and "<img" not in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text


def test_a_data_block_cannot_be_closed_by_a_string_inside_it():
    value = {"name": "</script><script>alert(1)</script>", "amp": "a & b", "sep": "\u2028"}
    block = data_block(value)
    assert "<" not in block and ">" not in block and "&" not in block and "\u2028" not in block
    assert json.loads(block) == value


def test_the_page_carries_everything_and_allows_only_its_own_scripts(llama):
    page = html_page([("a", report_view(llama))], HOSTILE)
    assert "<script src" not in page and "<link" not in page
    assert f"<title>{HOSTILE}</title>" not in page and "&lt;img src=x" in page
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "connect-src 'none'" in policy and "default-src 'none'" in policy and "unsafe-inline'" not in \
        policy.split("style-src")[0]
    inline = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    assert len(inline) == 3                                 # plotly.js, the view, the start-up
    for script in inline:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy


def test_to_html_writes_atomically_and_keeps_the_old_file_when_it_cannot(llama, tmp_path):
    path = tmp_path / "out" / "report.html"
    assert llama.to_html(path) == path
    first = path.read_text(encoding="utf-8")
    assert first.startswith("<!DOCTYPE html>") and "layers.*" in first
    with pytest.raises(TypeError, match="no view for a dict"):
        write_html(path, {"not": "a report"})
    assert path.read_text(encoding="utf-8") == first
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]   # no temporary file left


def test_the_optimize_view_shows_each_rewrite_and_before_and_after(optimized):
    view = optimize_view(optimized)["optimize"]
    applied = [a for w in view["rewrites"] for a in w["applied"]]
    assert [a["where"] for a in applied] == [m.where for m in optimized.applied]
    assert [a["bytes_saved"] for a in applied] == [fmt_bytes(m.bytes_saved) for m in optimized.applied]
    before, after = view["sides"][0][1:3]
    assert before == fmt_seconds(optimized.predicted_seconds)
    assert after == fmt_seconds(optimized.predicted_seconds - optimized.seconds_saved)
    assert {w["name"]: w["status"] for w in view["rewrites"]} == {o.name: o.status for o in optimized.outcomes}


def test_a_measured_report_shows_measured_times(tmp_path):
    result = shapeprof.profile(MLP(d_in=32, d_hidden=64, d_out=8), torch.randn(4, 32), steps=2, warmup=1)
    view = report_view(result.measured)["report"]
    assert view["measured"] and "measured" in [c["key"] for c in view["columns"]]
    assert [r["measured"] for r in view["nodes"]] == [n.measured_seconds for n in result.measured.nodes]
    assert "measured" not in [c["key"] for c in report_view(result.predicted)["report"]["columns"]]
    page = result.to_html(tmp_path / "profile.html").read_text(encoding="utf-8")
    names = [v["name"] for v in json.loads(re.search(r'id="shapeprof-views">(.*?)</script>', page).group(1))]
    assert len(names) == 2 and "measured on" in names[0] and "predicted on" in names[1]


def test_a_training_report_shows_its_step_in_the_summary():
    from examples.nanogpt import GPT, GPTConfig
    x = torch.randint(0, 256, (2, 16))
    rep = shapeprof.analyze(GPT(GPTConfig.tiny()), x, x, train=True)
    summary = dict(report_view(rep)["report"]["summary"])
    assert summary["training step"].startswith(f"{fmt_seconds(rep.training.seconds)} predicted")
    assert fmt_bytes(rep.memory["peak"]) in summary["training memory"]
