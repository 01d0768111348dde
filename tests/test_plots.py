"""Tests for shapeprof/plots.py: the roofline figure's roofs, ridges and points."""
from __future__ import annotations

import pytest
import torch

import shapeprof
from examples.mlp import MLP
from shapeprof.hardware import get_spec
from shapeprof.output.tensorboard.plots import points, roofline_figure, roofs


def test_roofs_of_an_a100():
    spec = get_spec("a100-80gb-sxm")
    bf16 = roofs(spec, torch.bfloat16)
    assert [(r.key, r.peak, r.possible) for r in bf16] == [("bf16", 312e12, False), ("fp32", 19.5e12, False)]
    assert bf16[0].ridge == pytest.approx(312e12 / 2.039e12)         # 153 FLOP/B
    fp32 = roofs(spec, torch.float32)   # fp32 matmuls run on the vector units unless TF32 is allowed
    assert [(r.key, r.possible) for r in fp32] == [("tf32", True), ("fp32", False)]


def test_points_sum_each_group():
    # bf16, 512 rows, d_in = d_hidden: the two blocks (Linear(3072, 3072) + ReLU) are repeats, so their ReLUs are
    # one point and their Linears another; the output Linear(3072, 768) is not a repeat: a point of its own
    report = shapeprof.analyze(MLP(d_in=3072), torch.randn(512, 3072), dtype=torch.bfloat16)
    pts, left_out = points(report)
    assert left_out == 0
    relus = next(p for p in pts if p.label == "blocks.*.1 · ReLU x2")
    nodes = [n for n in report.nodes if n.op == "ReLU"]
    assert relus.intensity == pytest.approx(sum(n.flops for n in nodes) / sum(n.bytes for n in nodes))
    assert relus.seconds == pytest.approx(sum(n.predicted_seconds for n in nodes))
    assert relus.bound == "memory"
    linears = [p for p in pts if "Linear" in p.label]
    assert [p.label for p in linears] == ["blocks.*.0 · Linear x2", "out · Linear"]
    assert {p.bound for p in linears} == {"compute"}
    assert pts == sorted(pts, key=lambda p: -p.seconds)
    assert sum(p.share for p in pts) == pytest.approx(1.0)


def test_figure_draws_roofs_points_and_the_list():
    report = shapeprof.analyze(MLP(d_in=3072), torch.randn(512, 3072), dtype=torch.bfloat16)
    fig = roofline_figure(report)
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.get_lines()]
    assert "bf16 tensor cores 312 TFLOP/s" in labels and "memory 2.04 TB/s" in labels
    texts = " ".join(t.get_text() for t in fig.texts + ax.texts)
    assert "ridge 153 FLOP/B (bf16)" in texts and "blocks.*.1 · ReLU x2" in texts
    assert len(ax.collections[0].get_offsets()) == len(points(report)[0])


def test_measured_figure_needs_measured_times():
    report = shapeprof.analyze(torch.nn.Linear(64, 64), torch.randn(8, 64))
    measured = report.with_measurements({report.nodes[0].name: 1e-6})
    (p,), _ = points(measured, measured=True)
    assert p.flops_per_second == pytest.approx(report.nodes[0].flops / 1e-6)
    assert roofline_figure(measured, measured=True).axes[0].get_ylabel() == "FLOP/s (measured)"
