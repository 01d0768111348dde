"""Precision: dtypes by name, 8-bit formats as W8A8 models, specs without a format's peak."""
import pytest
import torch
import torch.nn as nn

import shapeprof
from shapeprof.hardware import DeviceSpec, get_spec
from shapeprof.precision import DTYPES, resolve


def test_names_that_specs_show_resolve_like_the_dtypes():
    assert resolve("bf16").dtype is torch.bfloat16 and resolve("BF16").dtype is torch.bfloat16
    assert resolve("tf32").dtype is torch.float32 and resolve("tf32").tf32
    for name in ("fp16", "fp32", "fp64", "fp8", "int8"):
        assert name in DTYPES
    model, x = nn.Linear(64, 64), torch.randn(8, 64)
    by_name = shapeprof.analyze(model, x, dtype="bf16")
    by_dtype = shapeprof.analyze(model, x, dtype=torch.bfloat16)
    assert by_name.total == by_dtype.total and by_name.dtype == "bfloat16"


@pytest.mark.parametrize("bad", ["bf17", torch.int64, 3])
def test_a_bad_dtype_is_one_line_naming_it(bad):
    with pytest.raises(ValueError) as err:
        shapeprof.analyze(nn.Linear(4, 4), torch.randn(2, 4), dtype=bad)
    assert str(bad).removeprefix("torch.") in str(err.value) and "\n" not in str(err.value)


def test_int8_prices_matmuls_in_8_bits_and_the_rest_in_bf16():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.LayerNorm(1024))
    report = shapeprof.analyze(model, torch.randn(512, 1024), dtype="int8")
    linear, norm = report.nodes
    # reads x (512x1024), W (1024x1024) and the bias (1024) at 1 byte, writes y (512x1024) in bf16
    assert linear.bytes == 512 * 1024 + 1024 * 1024 + 1024 + 2 * 512 * 1024
    assert linear.flops == 2 * 512 * 1024 * 1024
    # at the A100's int8 peak (624 TOP/s) against its HBM: compute time is FLOPs / 624e12
    assert linear.compute_seconds == pytest.approx(linear.flops / 624e12)
    # the LayerNorm stays bf16: its input is the bf16 output of the Linear
    assert report.nodes[1].output.startswith("bf16")
    assert report.dtype == "int8 (W8A8)" and any("W8A8" in note for note in report.notes)
    assert report.parameter_bytes == sum(p.numel() for p in model.parameters())   # 1 byte each


def test_fp8_on_a_spec_without_fp8_runs_at_fp16_and_says_w8a8():
    report = shapeprof.analyze(nn.Linear(256, 256), torch.randn(64, 256), dtype="fp8", spec="a100-80gb-sxm")
    assert report.nodes[0].compute_seconds == pytest.approx(2 * 64 * 256 * 256 / 312e12)
    assert any("fp8" in note and "W8A8" in note for note in report.notes)


def test_a_spec_without_an_fp64_peak_prices_fp64_at_fp32_with_a_note():
    base = get_spec("a100-80gb-sxm")
    no_fp64 = DeviceSpec(name="no-fp64", display_name="No FP64", peak_flops={"fp32": 1e12},
                         memory_bandwidth=1e11, memory_capacity=1e9, l2_cache=0, sm_count=1,
                         interconnect_bandwidth=0)

    class Doubles(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x).double().exp()

    report = shapeprof.analyze(Doubles(), torch.randn(4, 8), spec=no_fp64)
    exp = next(n for n in report.nodes if n.op == "exp")
    assert exp.compute_seconds == pytest.approx(32 / 1e12)
    assert any("no float64 peak" in note for note in report.notes)
    assert base.peak_flops["fp64"] > 0      # built-in GPUs have it: no note there
    assert not any("peak" in n for n in shapeprof.analyze(Doubles(), torch.randn(4, 8)).notes)
