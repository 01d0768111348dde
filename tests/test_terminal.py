"""Tests for shapeprof/terminal.py: the report laid out for the width it is printed at.

(The contents of the rendering are tested in tests/test_report.py; here: widths, wrapping, what gives way.)
"""
import io
import os
import re

import pytest
import torch
from rich.console import Console

import shapeprof
from examples.cnn import SmallCNN
from examples.nanogpt import GPT, GPTConfig
from shapeprof.output.terminal import render, to_text

_BORDER = re.compile(r"^[\s─━┏┓┗┛┡┩└┘┳┻╇┴┬┃│]*$")


def _lines(report, width, top):
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(render(report, top=top))
    return console.file.getvalue().splitlines()


def top_rows(lines):
    """The header and the rows of the top-nodes table, border lines left out."""
    start = next(i for i, line in enumerate(lines) if line.startswith("Top "))
    end = next(i for i, line in enumerate(lines) if line.startswith("By module"))
    rows = [line for line in lines[start + 1:end] if not _BORDER.match(line)]
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def cnn():
    # batch 8 on an A100, fp32; "measured" at twice the prediction, so every efficiency is 50%
    report = shapeprof.analyze(SmallCNN().eval(), torch.randn(8, 3, 32, 32))
    return report, report.with_measurements({n.name: 2 * n.predicted_seconds for n in report.nodes})


@pytest.fixture(scope="module")
def gpt():
    # long module paths ('transformer.h.*.attn.c_attn'), twins, an op name of 28 letters
    report = shapeprof.analyze(GPT(GPTConfig.tiny()), torch.zeros(1, 8, dtype=torch.long))
    return report, report.with_measurements({n.name: 2 * n.predicted_seconds for n in report.nodes})


@pytest.mark.parametrize("width", [80, 100, 120])
@pytest.mark.parametrize("which", ["cnn", "gpt"])
@pytest.mark.parametrize("measured", [False, True], ids=["predicted", "measured"])
def test_each_row_is_one_line_and_no_number_is_cropped(request, which, width, measured):
    report = request.getfixturevalue(which)[measured]
    groups = report.repeat_groups()[:13]
    lines = _lines(report, width, top=13)
    assert max(len(line) for line in lines) <= width
    header, rows = top_rows(lines)
    assert len(rows) == len(groups)                        # no row wrapped into a second line
    for words in ("calls", "FLOP/B", "bound", "time", "share", *(("eff.",) if measured else ())):
        assert words in header
    for row, group in zip(rows, groups):
        n = group[0]
        calls = f"x{len(group)}" if len(group) > 1 else "1"
        share = f"{sum(g.share for g in group):.1%}"
        # calls, intensity and bound, then (after the time) the share and the efficiency end the row, whole
        assert re.search(rf"\s{calls}\s.*\s{re.escape(f'{n.intensity:.3g}')}\s+│?\s*(memory|mem|compute|comp)\s",
                         row), row
        ending = rf"\s{re.escape(share)}\s.*\s50%\s*│?$" if measured else rf"\s{re.escape(share)}\s*│?$"
        assert re.search(ending, row), row


def test_every_table_row_fits_at_80_columns(cnn):
    _, measured = cnn
    lines = _lines(measured, 80, top=15)
    module_rows = lines[next(i for i, line in enumerate(lines) if line.startswith("By module")) + 1:]
    module_rows = [line for line in module_rows[:next(i for i, line in enumerate(module_rows)
                                                      if line.startswith("Memory-bound"))]
                   if not _BORDER.match(line)]
    assert len(module_rows) == 1 + 12                       # the header and the 12 biggest of 13 modules
    assert all(len(line) <= 80 for line in lines)


def test_wide_terminals_get_every_column(cnn):
    report, _ = cnn
    header, rows = top_rows(_lines(report, 200, top=13))
    assert [w for w in header.replace("┃", " ").split()] == [
        "module", "op", "node", "output", "calls", "FLOPs", "bytes", "FLOP/B", "bound", "time", "share"]
    assert "│ features.8  │ Conv2d" in rows[1] and "features_8" in rows[1] and "f32[8, 128, 8, 8]" in rows[1]


def test_to_text_honours_columns_whatever_it_is(cnn, monkeypatch):
    report, _ = cnn
    for columns in (72, 80, 90, 160):
        monkeypatch.setenv("COLUMNS", str(columns))
        lines = to_text(report, color=False).splitlines()
        assert max(len(line) for line in lines) <= columns
    assert max(len(line) for line in lines) > 120          # 160 is used, not cut to a default
    monkeypatch.delenv("COLUMNS")

    def piped(fd=None):
        raise OSError("not a terminal")
    monkeypatch.setattr(os, "get_terminal_size", piped)   # what shutil asks when COLUMNS is not set
    assert max(len(line) for line in to_text(report, color=False).splitlines()) <= 120


# ---------------------------------------------------------------------------------------------- control characters

_HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1bP+q\x1b\\\r\x9b31m\x9d8;;x\x9c\x00\x7f"   # OSC title, clear, DCS, CR, C1 CSI/OSC


def test_no_string_of_a_report_reaches_the_terminal_with_its_control_characters():
    # a report read from a file someone else wrote: every field the rendering prints carries escape sequences
    import dataclasses
    from shapeprof.report import Finding, UncoveredOp
    r = shapeprof.analyze(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.randn(1, 8))

    def bad(text):
        return f"{text}{_HOSTILE}!"

    nodes = [dataclasses.replace(n, name=bad(n.name), op=bad(n.op), module_path=bad(n.module_path),
                                 output=bad(n.output), module_type=bad(n.module_type)) for n in r.nodes]
    hostile = dataclasses.replace(
        r, model=bad("Net"), dtype=bad("bf16"), inputs=(bad("f32[1, 8]"),), notes=(bad("a note"),), nodes=nodes,
        spec=dataclasses.replace(r.spec, display_name=bad("GPU")),
        capture=dataclasses.replace(r.capture, method=bad("dispatch"), attempts=((bad("export"), bad("why")),)),
        findings=[Finding(bad("0"), bad("linear"), 1, 0.5, 1.0, 9.5, bad("why"), bad("fix"))],
        coverage=dataclasses.replace(r.coverage, ops=(UncoveredOp(bad("aten.foo"), 1, 8, 0.1, bad("node")),)))
    text = to_text(hostile, width=160, color=False)
    assert not [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f], repr(text)
    # what is around the sequences is still there, and nothing of their insides ('owned', the title) is left
    assert "shapeprof Net!" in text and "note: a note!" in text and "on GPU!" in text and "aten.foo!" in text
    assert "owned" not in text and "31m" not in text
    # with colour on, the only escapes are rich's own styling (SGR: ESC [ ... m)
    coloured = re.sub(r"\x1b\[[0-9;]*m", "", to_text(hostile, width=160, color=True))
    assert not [c for c in coloured if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f]
    from shapeprof.text import without_control
    assert without_control(r) is r                   # a clean report is shown as it is, not copied
