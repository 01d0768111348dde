"""Tests for shapeprof/calibration.py: calibrate() measures this machine's roofs as a DeviceSpec.

Wall times are never asserted: the numbers are checked for plausibility only (any CPU that runs PyTorch does
more than 1 GFLOP/s in fp32 and moves more than 1 GB/s).
"""
from __future__ import annotations

import math
import os

import psutil
import pytest
import torch

import shapeprof
from shapeprof.calibration import _parse_size, _slug, calibrate
from shapeprof.hardware import DeviceSpec, get_spec, load_spec


@pytest.fixture(scope="module")
def spec() -> DeviceSpec:
    return calibrate("cpu")


def test_calibrate_measures_plausible_cpu_roofs(spec):
    assert isinstance(spec, DeviceSpec)
    assert set(spec.peak_flops) == {"fp32", "bf16"}
    assert spec.peak_flops["fp32"] > 1e9          # FLOP/s: any CPU running PyTorch does more
    assert spec.peak_flops["bf16"] > 1e8          # even emulated bf16 does more
    assert spec.memory_bandwidth > 1e9            # bytes/s
    # the figures are this machine's, not a GPU's: far below an A100's 19.5 TFLOP/s fp32 and 2 TB/s
    assert spec.peak_flops["fp32"] < 19.5e12 and spec.memory_bandwidth < 2.039e12
    assert math.isfinite(spec.ridge(torch.float32)) and spec.ridge(torch.float32) > 0


def test_calibrated_spec_describes_this_machine(spec):
    threads = torch.get_num_threads()
    assert spec.name.startswith("cpu-") and spec.name.endswith(f"-{threads}t")
    assert spec.name == spec.name.lower() and " " not in spec.name
    assert f"({threads} threads)" in spec.display_name
    assert spec.memory_capacity == psutil.virtual_memory().total
    assert spec.sm_count == threads
    assert spec.l2_cache >= 0
    assert spec.interconnect_bandwidth == 0
    assert spec.source.startswith("measured by shapeprof.calibrate on ")
    assert "fp32 mm n=" in spec.source and "triad" in spec.source


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_saved_spec_loads_back_equal(spec, tmp_path, suffix):
    path = spec.save(tmp_path / f"this-machine{suffix}")
    assert load_spec(path) == spec
    assert get_spec(str(path)) == spec
    assert shapeprof.load_spec(path).peak_flops == spec.peak_flops


def test_second_call_is_cached(spec):
    assert calibrate("cpu") is spec
    if not torch.cuda.is_available():
        assert calibrate() is spec               # the default device is the CPU here
    # float32 is always measured, so asking for bf16 alone is the same measurement
    assert calibrate("cpu", dtypes=(torch.bfloat16,)) is spec
    renamed = calibrate("cpu", name="my-box")
    assert renamed.name == "my-box" and renamed.peak_flops == spec.peak_flops
    assert calibrate("cpu") is spec              # the cache keeps the default name


def test_refresh_measures_again_with_the_dtypes_asked_for():
    fresh = calibrate("cpu", dtypes=(torch.float32,), budget_seconds=0.3, refresh=True)
    assert set(fresh.peak_flops) == {"fp32"}
    assert fresh.peak_flops["fp32"] > 1e9
    assert calibrate("cpu", dtypes=(torch.float32,)) is fresh


def test_calibrated_spec_drives_an_analysis(spec):
    report = shapeprof.analyze(torch.nn.Linear(512, 512), torch.randn(64, 512), spec=spec)
    node = report.nodes[0]
    # 64 x 512 x 512 multiply-adds = 2 * 16,777,216 FLOPs, at the measured fp32 matmul rate or slower
    assert node.flops == 33_554_432
    assert node.predicted_seconds >= node.flops / spec.peak_flops["fp32"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="meta"), "CPU or a CUDA device"),
    (dict(device="not-a-device"), "unknown device"),
    (dict(dtypes=(torch.int8,)), "not torch.int8"),
    (dict(budget_seconds=0), "budget_seconds"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        calibrate("cuda")


def test_names_and_cache_sizes_parse():
    assert _slug("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "intel-xeon-platinum-8375c"
    assert _slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core"
    assert _slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert _parse_size("491520K") == 491520 * 1024
    assert _parse_size("32M") == 32 * 2 ** 20
    assert _parse_size("1024") == 1024


@pytest.mark.skipif(not os.path.isdir("/sys/devices/system/cpu/cpu0/cache"), reason="no sysfs cache info")
def test_last_level_cache_comes_from_sysfs(spec):
    assert spec.l2_cache > 0


def test_calibrate_measures_a_kernel_latency_floor(spec):
    # one PyTorch op on a 1-element tensor: dispatch and launch, no work; microseconds on any CPU
    assert 1e-8 < spec.kernel_latency < 1e-3
    assert spec.measured and spec.achieved_bandwidth == spec.memory_bandwidth
    assert dict(spec.achieved_flops) == dict(spec.peak_flops)
    assert "kernel latency" in spec.source
