"""Tests for shapeprof/hardware.py: device specs, peaks per dtype, ridge points, spec files."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

from shapeprof.hardware import (
    BUILTIN_SPECS,
    DEFAULT_SPEC_NAME,
    PEAK_KEYS,
    DeviceSpec,
    SpecError,
    get_spec,
    list_specs,
    load_spec,
)

A100 = BUILTIN_SPECS["a100-80gb-sxm"]
H100 = BUILTIN_SPECS["h100-sxm"]


# ---- the roofline numbers DESIGN.md is built on ----------------------------------------------

def test_default_is_a100_80gb_sxm():
    assert DEFAULT_SPEC_NAME == "a100-80gb-sxm"
    assert get_spec() is A100
    assert get_spec(None) is A100
    assert A100.display_name == "NVIDIA A100-SXM4-80GB"


def test_a100_figures():
    assert A100.peak_flops["bf16"] == 312e12
    assert A100.peak_flops["fp16"] == 312e12
    assert A100.peak_flops["tf32"] == 156e12
    assert A100.peak_flops["fp32"] == 19.5e12
    assert A100.peak_flops["int8"] == 624e12
    assert "fp8" not in A100.peak_flops
    assert A100.memory_bandwidth == 2.039e12
    assert A100.memory_capacity == 80 * 2**30
    assert A100.l2_cache == 40 * 2**20 == 41_943_040   # what torch reports as L2_cache_size
    assert A100.sm_count == 108
    assert A100.interconnect_bandwidth == 600e9


def test_a100_bf16_ridge_is_153():
    r = A100.ridge(torch.bfloat16)
    assert r == 312e12 / 2.039e12                      # = 153.016...
    assert 153 <= r <= 153.1
    assert A100.ridge(torch.bfloat16, matmul=True) == r


def _linear_bf16(batch: int, d_in: int = 1024, d_out: int = 4096) -> tuple[int, int]:
    """FLOPs and bytes of nn.Linear(d_in, d_out) on (batch, d_in) in bf16 (2 bytes/element):
    read x, W and b once, write y once; 1 multiply-add = 2 FLOPs."""
    flops = 2 * batch * d_in * d_out
    nbytes = 2 * (batch * d_in + d_in * d_out + d_out + batch * d_out)
    return flops, nbytes


def test_design_seed_example_linear_batch_512_is_compute_bound():
    flops, nbytes = _linear_bf16(512)
    assert flops == 4_294_967_296          # 2 * 512 * 1024 * 4096
    # x 512*1024 = 524,288; W 1024*4096 = 4,194,304; b 4,096; y 512*4096 = 2,097,152
    # -> 6,819,840 elements * 2 bytes
    assert nbytes == 13_639_680
    intensity = flops / nbytes             # 314.9 FLOP/byte
    assert 314 < intensity < 316
    assert intensity > A100.ridge(torch.bfloat16)      # above the ridge: compute-bound
    # time bound: max(F/P, M/B) is the compute term
    assert flops / A100.peak_for(torch.bfloat16, matmul=True) > nbytes / A100.memory_bandwidth


def test_design_seed_example_linear_batch_1_is_memory_bound():
    flops, nbytes = _linear_bf16(1)
    assert flops == 8_388_608              # 2 * 1 * 1024 * 4096
    # x 1,024 + W 4,194,304 + b 4,096 + y 4,096 = 4,203,520 elements * 2 bytes
    assert nbytes == 8_407_040
    intensity = flops / nbytes             # 0.998 FLOP/byte: every weight read once, used once
    assert 0.99 < intensity < 1.0
    assert intensity < A100.ridge(torch.bfloat16)      # below the ridge: memory-bound


# ---- peak_for: dtype -> peak key -------------------------------------------------------------

@pytest.mark.parametrize("dtype, tf32, key", [
    (torch.bfloat16, False, "bf16"),
    (torch.float16, False, "fp16"),
    (torch.float32, False, "fp32"),
    (torch.float32, True, "tf32"),
    (torch.complex64, True, "tf32"),
    (torch.float64, False, "fp64_tensor"),
    (torch.complex128, False, "fp64_tensor"),
    (torch.int8, False, "int8"),
    (torch.uint8, False, "int8"),
    (torch.int32, False, "fp32"),
    (torch.int64, False, "fp32"),
    (torch.bool, False, "fp32"),
    (torch.float8_e4m3fn, False, "fp8"),
    (torch.float8_e5m2, False, "fp8"),
    (torch.float8_e4m3fnuz, False, "fp8"),
    (torch.float8_e5m2fnuz, False, "fp8"),
])
def test_peak_for_matmul_h100(dtype, tf32, key):
    assert H100.peak_key(dtype, matmul=True, tf32=tf32) == key
    assert H100.peak_for(dtype, matmul=True, tf32=tf32) == H100.peak_flops[key]


def test_peak_for_matmul_values_h100():
    assert H100.peak_for(torch.bfloat16, matmul=True) == 989.4e12
    assert H100.peak_for(torch.float8_e4m3fn, matmul=True) == 1978.9e12
    assert H100.peak_for(torch.float32, matmul=True) == 66.9e12
    assert H100.peak_for(torch.float32, matmul=True, tf32=True) == 494.7e12
    assert H100.peak_for(torch.float64, matmul=True) == 66.9e12    # FP64 tensor cores


def test_float8_falls_back_to_fp16_without_fp8():
    # A100 has no fp8 tensor cores: an fp8 matmul is upcast and runs at the fp16 rate
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert A100.peak_key(dt, matmul=True) == "fp16"
        assert A100.peak_for(dt, matmul=True) == 312e12
    assert BUILTIN_SPECS["a10g"].peak_key(torch.float8_e4m3fn, matmul=True) == "fp16"


def test_tf32_flag_ignored_for_other_dtypes():
    assert A100.peak_for(torch.bfloat16, matmul=True, tf32=True) == 312e12
    assert A100.peak_for(torch.float32, matmul=False, tf32=True) == 19.5e12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float8_e4m3fn, torch.int8, torch.int64, torch.bool,
                                   torch.complex64])
def test_elementwise_uses_fp32_vector_peak(dtype):
    # opmath: bf16/fp16 elementwise ops compute in fp32 on the vector units
    assert A100.peak_key(dtype, matmul=False) == "fp32"
    assert A100.peak_for(dtype, matmul=False) == 19.5e12
    assert H100.peak_for(dtype, matmul=False) == 66.9e12


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_elementwise_fp64_uses_fp64_vector_peak(dtype):
    assert A100.peak_for(dtype, matmul=False) == 9.7e12
    assert H100.peak_for(dtype, matmul=False) == 33.5e12


def test_fallbacks_on_a_minimal_spec():
    # A user spec with only the vector rates: every matmul falls back to them.
    cpu = DeviceSpec(name="cpu", display_name="some CPU",
                     peak_flops={"fp32": 2e12, "fp64": 1e12}, memory_bandwidth=100e9,
                     memory_capacity=64 * 2**30, l2_cache=32 * 2**20, sm_count=32,
                     interconnect_bandwidth=0)
    assert cpu.peak_for(torch.bfloat16, matmul=True) == 2e12
    assert cpu.peak_for(torch.float8_e5m2, matmul=True) == 2e12
    assert cpu.peak_for(torch.int8, matmul=True) == 2e12
    assert cpu.peak_for(torch.float32, matmul=True, tf32=True) == 2e12
    assert cpu.peak_for(torch.float64, matmul=True) == 1e12
    assert cpu.ridge(torch.float32) == 20.0


def test_missing_fp64_is_a_clear_error():
    spec = DeviceSpec(name="nofp64", display_name="x", peak_flops={"fp32": 1e12},
                      memory_bandwidth=1e11, memory_capacity=1e9, l2_cache=0, sm_count=1,
                      interconnect_bandwidth=0)
    assert spec.peak_for(torch.float32, matmul=True) == 1e12
    with pytest.raises(SpecError, match=r"'nofp64' has no peak for torch.float64"):
        spec.peak_for(torch.float64, matmul=False)


def test_peak_for_rejects_non_dtype():
    with pytest.raises(TypeError, match="torch.dtype"):
        A100.peak_for("bf16", matmul=True)


def test_ridge_elementwise_and_matmul():
    assert A100.ridge(torch.bfloat16, matmul=False) == 19.5e12 / 2.039e12   # ~9.6
    assert A100.ridge(torch.float32, tf32=True) == 156e12 / 2.039e12


# ---- the built-in table ----------------------------------------------------------------------

EXPECTED_NAMES = ["a100-40gb-sxm", "a100-80gb-sxm", "a100-40gb-pcie", "a100-80gb-pcie",
                  "h100-sxm", "h100-pcie", "h200", "l4", "a10g", "rtx-4090", "mi300x"]


def test_builtin_names_and_list_specs():
    assert list(BUILTIN_SPECS) == EXPECTED_NAMES
    assert [s.name for s in list_specs()] == EXPECTED_NAMES
    assert all(BUILTIN_SPECS[s.name] is s for s in list_specs())


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_builtin_spec_is_sane(name):
    s = BUILTIN_SPECS[name]
    assert s.name == name
    assert s.display_name and s.source
    assert set(s.peak_flops) <= set(PEAK_KEYS)
    assert {"fp32", "fp64", "tf32", "bf16", "fp16", "int8"} <= set(s.peak_flops)
    assert all(v > 0 for v in s.peak_flops.values())
    assert s.memory_bandwidth > 0 and s.memory_capacity > 0 and s.interconnect_bandwidth > 0
    assert s.l2_cache > 0 and s.sm_count > 0
    assert isinstance(s.l2_cache, int) and isinstance(s.sm_count, int)
    pf = s.peak_flops
    assert pf["bf16"] >= pf["fp32"] and pf["fp16"] >= pf["fp32"] and pf["tf32"] >= pf["fp32"]
    assert pf["fp32"] > pf["fp64"]
    assert pf.get("fp64_tensor", pf["fp64"]) >= pf["fp64"]
    assert pf.get("fp8", pf["bf16"]) >= pf["bf16"]
    assert 50 <= s.ridge(torch.bfloat16) <= 700
    assert s.memory_capacity >= 16 * 2**30
    assert 100e9 <= s.memory_bandwidth <= 10e12


def test_h100_and_h200_share_compute():
    h200 = BUILTIN_SPECS["h200"]
    assert h200.peak_flops == H100.peak_flops
    assert h200.memory_bandwidth == 4.8e12 and H100.memory_bandwidth == 3.35e12
    assert h200.memory_capacity == 141 * 2**30


def test_spot_figures():
    assert BUILTIN_SPECS["a100-80gb-pcie"].memory_bandwidth == 1.935e12
    assert BUILTIN_SPECS["h100-pcie"].peak_flops["bf16"] == 756e12
    assert BUILTIN_SPECS["h100-pcie"].sm_count == 114
    assert BUILTIN_SPECS["h100-pcie"].memory_bandwidth == 2.0e12
    mi = BUILTIN_SPECS["mi300x"]
    assert (mi.peak_flops["bf16"], mi.peak_flops["fp8"], mi.peak_flops["fp32"]) == \
        (1307.4e12, 2614.9e12, 163.4e12)
    assert mi.memory_bandwidth == 5.3e12 and mi.sm_count == 304
    assert mi.memory_capacity == 192 * 2**30 and mi.l2_cache == 256 * 2**20


def test_spec_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        A100.memory_bandwidth = 1.0
    with pytest.raises(TypeError, match="read-only"):
        A100.peak_flops["bf16"] = 1.0
    with pytest.raises(TypeError):
        del A100.peak_flops["bf16"]
    with pytest.raises(TypeError):
        A100.peak_flops.update(bf16=1.0)
    assert A100.peak_flops["bf16"] == 312e12


def test_constructor_copies_peaks():
    peaks = {"fp32": 1e12, "bf16": 8e12}
    s = DeviceSpec("x", "X", peaks, 1e11, 1e9, 0, 1, 0)
    peaks["bf16"] = 0.0
    assert s.peak_flops["bf16"] == 8e12


def test_spec_is_hashable_copyable_picklable_asdictable():
    assert hash(A100) == hash(copy.deepcopy(A100))
    assert {A100, BUILTIN_SPECS["a100-80gb-sxm"]} == {A100}
    assert copy.deepcopy(A100) == A100
    assert pickle.loads(pickle.dumps(A100)) == A100
    d = dataclasses.asdict(A100)
    assert json.loads(json.dumps(d))["peak_flops"]["bf16"] == 312e12
    assert dataclasses.replace(A100, memory_bandwidth=1e12).ridge(torch.bfloat16) == 312.0


def test_builtins_are_distinct():
    assert len({s for s in list_specs()}) == len(EXPECTED_NAMES)


# ---- get_spec --------------------------------------------------------------------------------

@pytest.mark.parametrize("query, name", [
    ("a100-80gb-sxm", "a100-80gb-sxm"),
    ("A100-80GB-SXM", "a100-80gb-sxm"),
    ("  h100_sxm ", "h100-sxm"),
    ("RTX 4090", "rtx-4090"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb-sxm"),    # torch.cuda.get_device_name() strings
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("AMD Instinct MI300X", "mi300x"),
])
def test_get_spec_by_name(query, name):
    assert get_spec(query) is BUILTIN_SPECS[name]


def test_get_spec_passes_a_spec_through():
    s = dataclasses.replace(A100, name="mine")
    assert get_spec(s) is s


def test_unknown_name_suggests_closest():
    with pytest.raises(SpecError) as e:
        get_spec("a100x")
    msg = str(e.value)
    assert msg.startswith("unknown device spec 'a100x'; closest: a100-80gb-sxm, a100-40gb-sxm")
    assert msg.endswith("; see `shapeprof specs`")
    assert "\n" not in msg and "a10g" not in msg


@pytest.mark.parametrize("query, expected", [
    ("h100", "closest: h100-sxm, h100-pcie;"),      # ambiguous short forms are not guessed
    ("a100", "closest: a100-80gb-sxm, a100-40gb-sxm, a100-40gb-pcie, a100-80gb-pcie;"),
    ("4090", "closest: rtx-4090;"),
    ("mi300", "closest: mi300x;"),
    ("h100-sxm5", "closest: h100-sxm;"),
])
def test_short_or_mistyped_names_are_refused_with_candidates(query, expected):
    with pytest.raises(SpecError, match=expected):
        get_spec(query)


def test_hopeless_name_lists_known_specs():
    with pytest.raises(SpecError, match=r"unknown device spec 'zzz'; known: a100-40gb-sxm, .*mi300x;"):
        get_spec("zzz")


def test_get_spec_from_path(tmp_path):
    p = dataclasses.replace(H100, name="my-h100").save(tmp_path / "my.toml")
    assert get_spec(p).name == "my-h100"            # a Path
    assert get_spec(str(p)).name == "my-h100"       # a str path
    with pytest.raises(SpecError, match="not found"):
        get_spec(str(tmp_path / "missing.json"))


def test_get_spec_type_error():
    with pytest.raises(TypeError):
        get_spec(3)


# ---- files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".toml"])
@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_save_load_round_trip(tmp_path, name, suffix):
    spec = BUILTIN_SPECS[name]
    path = spec.save(tmp_path / f"spec{suffix}")
    assert path == tmp_path / f"spec{suffix}"
    back = load_spec(path)
    assert back == spec
    assert back.to_dict() == spec.to_dict()
    assert os.listdir(tmp_path) == [path.name]          # no temp file left behind


def test_saved_files_are_readable(tmp_path):
    t = A100.save(tmp_path / "a.toml").read_text()
    assert t.startswith("# shapeprof device spec")
    assert tomllib.loads(t)["peak_flops"]["bf16"] == 312e12
    j = json.loads(A100.save(tmp_path / "a.json").read_text())
    assert j["memory_bandwidth"] == 2.039e12 and j["sm_count"] == 108


def test_save_overwrites_atomically(tmp_path):
    p = tmp_path / "s.json"
    A100.save(p)
    H100.save(p)
    assert load_spec(p) == H100
    assert os.listdir(tmp_path) == ["s.json"]


def test_save_rejects_unknown_suffix(tmp_path):
    with pytest.raises(SpecError, match=r"use a \.toml or \.json suffix"):
        A100.save(tmp_path / "a.yaml")
    assert os.listdir(tmp_path) == []


def test_to_dict_is_plain():
    d = A100.to_dict()
    assert type(d["peak_flops"]) is dict
    assert json.loads(json.dumps(d)) == d


def test_from_dict_defaults():
    d = A100.to_dict()
    del d["display_name"], d["source"]
    s = DeviceSpec.from_dict(d)
    assert s.display_name == "a100-80gb-sxm" and s.source == ""
    assert s.peak_flops == A100.peak_flops


_DELETE = object()


def _bad(**changes) -> dict:
    """A100's dict with keys changed (or deleted with _DELETE)."""
    d = A100.to_dict()
    for k, v in changes.items():
        if v is _DELETE:
            del d[k]
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("d, message", [
    (_bad(memory_bandwidth=_DELETE), r"^missing key 'memory_bandwidth'$"),
    (_bad(name=_DELETE), r"^missing key 'name'$"),
    (_bad(peak_flops=_DELETE), r"^missing key 'peak_flops'$"),
    (_bad(memory_bandwith=1e12), r"^unknown key 'memory_bandwith'; did you mean 'memory_bandwidth'\?$"),
    (_bad(memory_bandwidth=-1.0), r"^memory_bandwidth must be > 0, got -1\.0$"),
    (_bad(memory_bandwidth=0), r"^memory_bandwidth must be > 0"),
    (_bad(memory_bandwidth="2TB/s"), r"^memory_bandwidth must be a number, got str '2TB/s'$"),
    (_bad(memory_capacity=True), r"^memory_capacity must be a number, got bool"),
    (_bad(interconnect_bandwidth=float("nan")), r"^interconnect_bandwidth must be >= 0"),
    (_bad(sm_count=1.5), r"^sm_count must be an integer, got float 1\.5$"),
    (_bad(sm_count=0), r"^sm_count must be >= 1, got 0$"),
    (_bad(l2_cache=-1), r"^l2_cache must be >= 0"),
    (_bad(name=""), r"^name must not be empty$"),
    (_bad(name=3), r"^name must be a string, got int 3$"),
    (_bad(peak_flops=[1, 2]), r"^peak_flops must be a table"),
    (_bad(peak_flops={"fp32": 1e12, "bf8": 2e12}), r"^unknown peak key 'peak_flops\.bf8'; did you mean"),
    (_bad(peak_flops={"fp32": 1e12, "fp4": 2e12}), r"^unknown peak key 'peak_flops\.fp4'.*\(known: fp64, "),
    (_bad(peak_flops={"bf16": 1e12}), r"^missing key 'peak_flops\.fp32'"),
    (_bad(peak_flops={"fp32": 1e12, "bf16": -5.0}), r"^peak_flops\.bf16 must be > 0, got -5\.0$"),
    (_bad(peak_flops={"fp32": "fast"}), r"^peak_flops\.fp32 must be a number, got str 'fast'$"),
])
def test_from_dict_errors_name_the_key(d, message):
    with pytest.raises(SpecError, match=message) as e:
        DeviceSpec.from_dict(d)
    assert "\n" not in str(e.value)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(SpecError, match="must be a table of keys, got list"):
        DeviceSpec.from_dict([("name", "x")])


def test_integral_floats_are_accepted_for_integer_fields():
    s = DeviceSpec.from_dict(_bad(sm_count=108.0, l2_cache=41943040.0))
    assert s.sm_count == 108 and type(s.sm_count) is int
    assert s == A100


def test_hand_written_toml(tmp_path):
    p = tmp_path / "my-gpu.toml"
    p.write_text(
        'name = "my-gpu"\n'
        'memory_bandwidth = 2.0e12\n'
        'memory_capacity = 85899345920\n'      # an int where a float is expected: fine
        'l2_cache = 52428800\n'
        'sm_count = 114\n'
        'interconnect_bandwidth = 128e9\n'
        '\n'
        '[peak_flops]\n'
        'fp32 = 51.2e12\n'
        'bf16 = 756e12\n'
    )
    s = load_spec(p)
    assert s.name == s.display_name == "my-gpu"
    assert s.memory_capacity == 80 * 2**30 and isinstance(s.memory_capacity, float)
    assert s.ridge(torch.bfloat16) == 378.0
    assert s.peak_for(torch.float8_e4m3fn, matmul=True) == 51.2e12   # no fp8, no fp16: fp32


def test_malformed_toml_names_file_and_line(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text('name = "x"\nmemory_bandwidth = = 2e12\n')
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert f"spec file '{p}': invalid TOML:" in msg
    assert "line 2" in msg
    assert "\n" not in msg


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n  "name": "x",\n  "memory_bandwidth": ,\n}\n')
    with pytest.raises(SpecError, match=r"spec file '.*broken\.json': invalid JSON: .*line 3"):
        load_spec(p)


def test_load_errors_name_file_and_key(tmp_path):
    d = A100.to_dict()
    d["memory_bandwidth"] = -2.039e12
    p = tmp_path / "neg.json"
    p.write_text(json.dumps(d))
    with pytest.raises(SpecError, match=r"^spec file '.*neg\.json': memory_bandwidth must be > 0"):
        load_spec(p)

    d = A100.to_dict()
    del d["sm_count"]
    p = tmp_path / "missing.toml"
    p.write_text(tomli_w.dumps(d))
    with pytest.raises(SpecError, match=r"^spec file '.*missing\.toml': missing key 'sm_count'$"):
        load_spec(p)

    d = A100.to_dict()
    d["peak_flops"]["fp7"] = 1e12
    p = tmp_path / "peak.json"
    p.write_text(json.dumps(d))
    with pytest.raises(SpecError, match=r"^spec file '.*peak\.json': unknown peak key 'peak_flops\.fp7'"):
        load_spec(p)

    d = A100.to_dict()
    d["sm_count"] = "108"
    p = tmp_path / "type.json"
    p.write_text(json.dumps(d))
    with pytest.raises(SpecError, match=r"^spec file '.*type\.json': sm_count must be an integer, got str"):
        load_spec(p)


def test_load_spec_top_level_not_a_table(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    with pytest.raises(SpecError, match=r"list\.json': a device spec must be a table of keys, got list"):
        load_spec(p)


def test_load_spec_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(SpecError, match=r"^spec file '.*nope\.toml' not found$"):
        load_spec(tmp_path / "nope.toml")
    (tmp_path / "a.yaml").write_text("name: x")
    with pytest.raises(SpecError, match=r"unsupported format '\.yaml' \(use \.toml or \.json\)"):
        load_spec(tmp_path / "a.yaml")


def test_load_spec_is_a_directory(tmp_path):
    d = tmp_path / "dir.json"
    d.mkdir()
    with pytest.raises(SpecError, match="cannot read it"):
        load_spec(d)


def test_spec_error_is_value_error():
    assert issubclass(SpecError, ValueError)
    with pytest.raises(ValueError):
        get_spec("nope")


def test_paths_as_path_objects(tmp_path):
    p = A100.save(str(tmp_path / "s.toml"))         # str accepted, Path returned
    assert isinstance(p, Path)
    assert load_spec(str(p)) == A100


def test_measured_figures_are_optional_checked_and_kept():
    from shapeprof.costs import OpCost
    from shapeprof.roofline import achievable_time
    a100 = get_spec("a100-80gb-sxm")
    assert not a100.measured and a100.kernel_latency == 0 and not a100.achieved_flops
    measured = dataclasses.replace(a100, name="a100-measured", kernel_latency=5e-6, achieved_bandwidth=1.6e12,
                                   achieved_flops={"bf16": 250e12})
    assert DeviceSpec.from_dict(measured.to_dict()) == measured
    old = {k: v for k, v in a100.to_dict().items() if k not in ("kernel_latency", "achieved_bandwidth",
                                                               "achieved_flops")}
    assert DeviceSpec.from_dict(old) == a100          # spec files written before these keys still load
    with pytest.raises(SpecError, match="achieved_flops.bf16"):
        dataclasses.replace(a100, achieved_flops={"bf16": -1.0})
    tiny = OpCost(2_000, 1_000, 1_000, True, True)    # 2 kFLOP, 2 kB: far under the 5 µs floor
    assert achievable_time(tiny, torch.bfloat16, measured) == 5e-6
    big = OpCost(2 * 4096 ** 3, 3 * 4096 * 4096 * 2, 0, True, True)   # compute-bound: 137 GFLOP at 250 TFLOP/s
    assert achievable_time(big, torch.bfloat16, measured) == pytest.approx(2 * 4096 ** 3 / 250e12)
    stream = OpCost(0, 8_000_000_000, 8_000_000_000, True, False)    # 16 GB at the achieved 1.6 TB/s
    assert achievable_time(stream, torch.bfloat16, measured) == pytest.approx(10e-3)
    assert achievable_time(OpCost(0, 0, 0, True, False), torch.bfloat16, measured) == 0.0   # a view: no kernel
