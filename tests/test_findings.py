"""Tests for shapeprof/findings.py: which memory-bound groups are reported, why, and advice that fits the op."""
import pytest
import torch
import torch.nn as nn

import shapeprof
from shapeprof.markdown import markdown_sections
from shapeprof.terminal import to_text


def test_the_ridge_is_written_as_the_intensities_are():
    # fp32 on an A100: the ridge is 19.5 TFLOP/s / 2.039 TB/s = 9.5635 FLOP/B: "9.56", 3 significant figures like
    # every intensity (rounded to "10" a node at 9.6 would look compute-bound). The ReLU does 1 FLOP per element
    # and moves 4 bytes in and 4 out: 0.125 FLOP/B.
    report = shapeprof.analyze(nn.Sequential(nn.Linear(64, 256), nn.ReLU()).eval(), torch.randn(512, 64))
    (relu,) = [f for f in report.findings if f.op == "ReLU"]
    assert relu.why.startswith("0.125 FLOP/byte against a ridge of 9.56 on NVIDIA A100-SXM4-80GB: ")
    assert relu.ridge == pytest.approx(19.5e12 / 2.039e12)
    assert "against a ridge of 9.56 on" in to_text(report, width=200, color=False)
    assert "against a ridge of 9.56 on" in markdown_sections(report)["4-findings"]
