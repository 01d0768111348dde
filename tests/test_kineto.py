"""Tests for shapeprof/kineto.py: our costs on real torch.profiler traces, and the predicted trace of a Report."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import shapeprof
from shapeprof.hardware import get_spec
from shapeprof.output.tensorboard.kineto import (
    GPU_STREAM,
    OpCoster,
    annotate_trace,
    aten_op_bound,
    dumps,
    predicted_trace,
    replay,
)

A100 = get_spec("a100-80gb-sxm")


def _eager_trace(fn, tmp_path, **profile_kwargs) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                **profile_kwargs) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())


def _ops(trace: dict, name: str) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("cat") == "cpu_op" and e["name"] == name]


# ---------------------------------------------------------------------------------------------- real traces

def test_op_events_get_the_cost_of_the_op_they_ran(tmp_path):
    x, w, b = torch.randn(8, 64), torch.randn(128, 64), torch.randn(128)
    trace = annotate_trace(_eager_trace(lambda: F.relu(F.linear(x, w, b)), tmp_path), nodes={}, spec=A100)
    addmm = _ops(trace, "aten::addmm")[0]["args"]
    # 2 * 8*64*128 = 131,072 FLOPs; reads x 8*64 + w 64*128 + b 128 floats, writes 8*128: (512+8192+128+1024)*4
    assert addmm["shapeprof.flops"] == 131_072
    assert addmm["shapeprof.bytes"] == 39_424
    assert addmm["shapeprof.bound"] == "memory"
    assert addmm["shapeprof.intensity"] == pytest.approx(131_072 / 39_424, rel=1e-5)
    # memory-bound on the A100: bytes / 2.039 TB/s
    assert addmm["shapeprof.predicted_us"] == pytest.approx(39_424 / 2.039e12 * 1e6, rel=1e-4)
    # aten::linear encloses t and addmm: its cost includes theirs
    assert _ops(trace, "aten::linear")[0]["args"]["shapeprof.flops"] == 131_072
    relu = _ops(trace, "aten::relu")[0]["args"]
    assert relu["shapeprof.flops"] == 8 * 128                       # 1 FLOP per output element
    assert relu["shapeprof.bytes"] == 2 * 8 * 128 * 4
    view = _ops(trace, "aten::t")[0]["args"]
    assert (view["shapeprof.flops"], view["shapeprof.bytes"], view["shapeprof.bound"]) == (0, 0, "none")


def test_torch_flops_ride_along_by_external_id(tmp_path):
    a, b = torch.randn(16, 32), torch.randn(32, 8)
    with torch.profiler.profile(record_shapes=True, with_flops=True) as prof:
        torch.mm(a, b)
    path = tmp_path / "t.json"
    prof.export_chrome_trace(str(path))
    flops = {e.id: e.flops for e in prof.events() if e.flops}
    trace = annotate_trace(json.loads(path.read_text()), nodes={}, spec=A100, torch_flops=flops)
    mm = _ops(trace, "aten::mm")[0]["args"]
    assert mm["shapeprof.torch_flops"] == mm["shapeprof.flops"] == 2 * 16 * 32 * 8


def test_causal_attention_is_costed_whole_not_as_its_meta_decomposition(tmp_path):
    q = torch.randn(1, 2, 16, 8)
    trace = annotate_trace(_eager_trace(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), tmp_path),
                           nodes={}, spec=A100)
    sdpa = _ops(trace, "aten::scaled_dot_product_attention")[0]["args"]
    # two matmuls over the 16*17/2 = 136 kept scores per head: 2 * 2 * (1*2) * 136 * 8 = 8,704
    assert sdpa["shapeprof.flops"] == 8_704


def test_dtypes_scalars_and_lists_are_rebuilt(tmp_path):
    a = torch.randn(4, 8, dtype=torch.bfloat16)

    def run():
        torch.cat([a, a], dim=0)
        a.sum(dim=(0,), keepdim=True)
        torch.ones(3, 5, dtype=torch.float16)

    trace = annotate_trace(_eager_trace(run, tmp_path), nodes={}, spec=A100)
    cat = _ops(trace, "aten::cat")[0]["args"]
    # The profiler records a tensor list's shapes but not its dtypes: float32 is assumed, and the event says so.
    # Read 2 x 4*8, write 8*8 elements, 4 bytes each.
    assert cat["shapeprof.bytes"] == (2 * 4 * 8 + 8 * 8) * 4
    assert "float32 assumed" in cat["shapeprof.note"]
    assert _ops(trace, "aten::sum")[0]["args"]["shapeprof.flops"] == 32                     # 1 per input element
    assert _ops(trace, "aten::sum")[0]["args"]["shapeprof.bytes"] == (32 + 8) * 2           # bf16 read, bf16 written
    assert _ops(trace, "aten::ones")[0]["args"]["shapeprof.bytes"] == 15 * 2                # fp16: dtype code 5


def test_an_op_meta_tensors_cannot_run_says_why_instead_of_costing_zero(tmp_path):
    x = torch.randn(4, 4)
    trace = annotate_trace(_eager_trace(lambda: torch.nonzero(x > 0), tmp_path), nodes={}, spec=A100)
    args = _ops(trace, "aten::nonzero")[0]["args"]
    assert "shapeprof.flops" not in args
    assert "nonzero" in args["shapeprof.uncosted"]


def test_replay_finds_the_overload_and_caches(tmp_path):
    event = {"name": "aten::add", "args": {"Input Dims": [[4, 4], [4, 4], []], "Input type": ["float", "float",
             "Scalar"], "Input Strides": [[4, 1], [4, 1], []], "Concrete Inputs": ["", "", "1"]}}
    (rec,) = replay(event["name"], event["args"])
    assert str(rec.op) == "aten.add.Tensor"
    coster = OpCoster(A100)
    first = coster.args_for(event)
    assert coster.args_for(event) is first
    assert coster.args_for({"name": "ProfilerStep#1", "args": {}}) is None


def test_node_ranges_get_node_stats(tmp_path):
    report = shapeprof.analyze(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU()), torch.randn(4, 16))
    trace = {"traceEvents": [{"ph": "X", "cat": "user_annotation", "name": "_0", "pid": 1, "tid": 1, "ts": 0,
                              "dur": 5, "args": {}}]}
    out = annotate_trace(trace, nodes={n.name: n for n in report.nodes}, spec=report.spec)
    args = out["traceEvents"][0]["args"]
    assert args["shapeprof.flops"] == report.nodes[0].flops == 2 * 4 * 16 * 32
    assert args["shapeprof.op"] == "Linear"
    assert trace["traceEvents"][0]["args"] == {}   # the input is not modified


# ---------------------------------------------------------------------------------------------- predicted

@pytest.fixture(scope="module")
def mlp_report():
    model = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))
    return shapeprof.analyze(model, torch.randn(512, 768), dtype=torch.bfloat16)


def test_predicted_trace_links_every_kernel_to_its_launch_and_op(mlp_report):
    trace = predicted_trace(mlp_report)
    events = trace["traceEvents"]
    assert all("name" in e for e in events)
    ops = {e["args"]["External id"]: e for e in events if e.get("cat") == "cpu_op"}
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") == "runtime"}
    kernels = [e for e in events if e.get("cat") == "kernel"]
    assert len(kernels) == len(ops) == len(launches) == sum(len(n.aten) for n in mlp_report.nodes)
    for k in kernels:
        launch = launches[k["args"]["correlation"]]
        assert launch["name"] == "cudaLaunchKernel"
        assert launch["args"]["External id"] == k["args"]["External id"]
        assert ops[k["args"]["External id"]]["ts"] == k["ts"]
        assert (k["pid"], k["tid"], k["args"]["device"]) == (0, GPU_STREAM, 0)
    # the Linears at 0 and 2 differ, so they are not repeats: each kernel under its own module path
    assert sorted(e["name"] for e in kernels) == ["0 · addmm", "1 · gelu", "2 · addmm"]


def test_kernels_of_twin_layers_share_a_name():
    from examples.llama import LlamaConfig, Transformer
    report = shapeprof.analyze(Transformer(LlamaConfig.tiny(n_layers=3)), torch.zeros(1, 8, dtype=torch.long))
    kernels = [e["name"] for e in predicted_trace(report)["traceEvents"] if e.get("cat") == "kernel"]
    assert kernels.count("layers.*.feed_forward.w1 · mm") == 3
    assert kernels.count("output · mm") == 1


def test_predicted_trace_times_are_the_predictions(mlp_report):
    events = predicted_trace(mlp_report)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    # laid out in whole nanoseconds: each kernel within half a nanosecond of its prediction
    assert sum(k["dur"] for k in kernels) == pytest.approx(mlp_report.total.predicted_seconds * 1e6,
                                                          abs=0.5e-3 * len(kernels))
    for a, b in zip(kernels, kernels[1:]):   # back to back on one stream
        assert b["ts"] == pytest.approx(a["ts"] + a["dur"])
    (step,) = [e for e in events if e["name"].startswith("ProfilerStep#")]
    assert step["cat"] == "user_annotation"
    assert step["ts"] <= kernels[0]["ts"] and step["ts"] + step["dur"] >= kernels[-1]["ts"] + kernels[-1]["dur"]


def test_predicted_trace_carries_our_args_and_the_device(mlp_report):
    trace = predicted_trace(mlp_report)
    assert trace["deviceProperties"][0]["name"] == "NVIDIA A100-SXM4-80GB"
    assert trace["deviceProperties"][0]["totalGlobalMem"] == 80 * 2**30
    fc1 = next(e for e in trace["traceEvents"] if e.get("cat") == "user_annotation" and e["name"] == "_0")
    n = mlp_report.nodes[0]
    assert fc1["args"]["shapeprof.flops"] == n.flops == 2 * 512 * 768 * 3072
    assert fc1["args"]["shapeprof.bound"] == "compute"
    assert fc1["args"]["shapeprof.predicted_us"] == pytest.approx(n.predicted_seconds * 1e6)
    gelu = next(e for e in trace["traceEvents"] if e.get("cat") == "kernel" and "gelu" in e["name"])
    assert gelu["args"]["shapeprof.bound"] == "memory"
    json.loads(dumps(trace))   # strict JSON


def test_aten_op_bound_is_recovered_from_its_time(mlp_report):
    bounds = [aten_op_bound(a, mlp_report.spec) for n in mlp_report.nodes for a in n.aten]
    assert bounds == ["compute", "memory", "compute"]


def test_json_has_no_infinity():
    # a node that moves no bytes has an infinite intensity; JSON cannot hold it
    with pytest.raises(ValueError):
        dumps({"x": math.inf})
