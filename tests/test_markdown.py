"""Tests for shapeprof/markdown.py: the Report as markdown sections (what TensorBoard's Text tab shows)."""
from __future__ import annotations

import dataclasses

import torch

import shapeprof
from examples.llama import LlamaConfig, Transformer
from shapeprof.output.markdown import markdown_sections, to_markdown


def test_sections_in_report_order():
    report = shapeprof.analyze(torch.nn.Linear(64, 64), torch.randn(8, 64))
    sections = markdown_sections(report)
    assert list(sections) == sorted(sections)   # the Text tab sorts tags; numbering keeps the report's order
    top = sections["2-top-nodes"].splitlines()
    assert top[2] == "| module | op | node | output | calls | FLOPs | bytes | FLOP/B | bound | time | share |"
    assert top[3] == "|" + "---|" * 11
    # Linear(64, 64) on 8 rows: 2*8*64*64 = 65,536 FLOPs; (8*64 + 64*64 + 64 + 8*64) * 4 = 20,736 bytes
    assert top[4].split(" | ")[5:8] == ["65.5 k", "20.7 kB", "3.16"]
    assert [line for line in to_markdown(report).splitlines() if line.startswith("|---|")] == [
        "|" + "---|" * 11, "|" + "---|" * 8]   # the top-nodes and the modules tables


def test_module_patterns_are_code_so_their_stars_stay_stars():
    report = shapeprof.analyze(Transformer(LlamaConfig.tiny()), torch.zeros(1, 8, dtype=torch.long))
    top = markdown_sections(report)["2-top-nodes"]
    assert "`layers.*.feed_forward.w1`" in top and "| x2 |" in top
    assert "`layers.*.attention`" in markdown_sections(report)["4-findings"]


def test_measured_columns_and_pipes():
    report = shapeprof.analyze(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()), torch.randn(4, 16))
    measured = report.with_measurements({n.name: n.predicted_seconds * 4 for n in report.nodes})
    sections = markdown_sections(measured)
    assert "| measured | eff. |" in sections["2-top-nodes"] and "| 25% |" in sections["2-top-nodes"]
    assert "efficiency 25%" in sections["1-summary"]
    piped = dataclasses.replace(report, nodes=[dataclasses.replace(report.nodes[0], op="a|b")] + report.nodes[1:])
    assert "| a\\|b |" in markdown_sections(piped)["2-top-nodes"]   # a '|' in a cell would split the table
