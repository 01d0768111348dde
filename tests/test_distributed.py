"""Tests for shapeprof/distributed.py: DDP and FSDP memory per GPU and collectives, figures computed by hand."""
import json

import pytest

from shapeprof.distributed import (INTER_NODE_EACH_WAY, distributed_plan, one_way_bandwidth, ring_bytes_per_gpu,
                                   smallest_fit)
from shapeprof.hardware import get_spec

GiB = 2**30
LIMIT = 0.9 * 80 * GiB   # A100-80GB and H100 SXM: 80 GiB each; 77,309,411,328 bytes usable

# Llama-3-8B: 32 layers of 218,112,000 (q, o 4096^2; k, v 4096 x 1024; gate, up, down 4096 x 14336; 2 norms)
# + embed_tokens and lm_head 128,256 x 4096 each + the final norm 4096 = 8,030,261,248 parameters
P8 = 32 * 218_112_000 + 2 * 128_256 * 4096 + 4096
assert P8 == 8_030_261_248
ROOT8 = 2 * (2 * 128_256 * 4096 + 4096)     # the root FSDP unit (embeddings, head, norm) in bf16: 2,101,354,496 B
LLAMA8 = dict(parameter_bytes=2 * P8,        # bf16 parameters: 16,060,522,496
              gradient_bytes=2 * P8,         # bf16 gradients: 16,060,522,496
              optimizer_state_bytes=12 * P8,  # fp32 master weights + AdamW exp_avg, exp_avg_sq: 96,363,134,976
              activation_bytes=8 * GiB)      # a per-GPU figure given as input: 8,589,934,592

# Llama-3-70B-like: 70.6e9 parameters, same accounting; root unit: 2 x 128,256 x 8192 + 8192 parameters in bf16
P70 = 70_600_000_000
ROOT70 = 2 * (2 * 128_256 * 8192 + 8192)     # 4,202,708,992 B
LLAMA70 = dict(parameter_bytes=2 * P70, gradient_bytes=2 * P70, optimizer_state_bytes=12 * P70,
               activation_bytes=10 * GiB)    # 10,737,418,240

EACH_WAY = {"a100-80gb-sxm": 300e9, "h100-sxm": 450e9}   # half of NVLink's 600 / 900 GB/s, both directions added


def plan(strategy, gpus, spec="a100-80gb-sxm", model=LLAMA8, **kw):
    if strategy == "fsdp" and "units" not in kw:
        kw.setdefault("largest_unit_bytes", ROOT8 if model is LLAMA8 else ROOT70)
    return distributed_plan(**model, spec=spec, gpus=gpus, strategy=strategy, **kw)


@pytest.mark.parametrize("spec", ["a100-80gb-sxm", "h100-sxm"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_gpu_holds_everything_and_moves_nothing(strategy, spec):
    p = plan(strategy, 1, spec)
    # 16,060,522,496 x 2 + 96,363,134,976 + 8,589,934,592
    assert p.memory_per_gpu == {"parameters": 16_060_522_496, "gradients": 16_060_522_496,
                                "optimizer_state": 96_363_134_976, "activations": 8_589_934_592,
                                "gathered_parameters": 0, "unsharded_gradient": 0, "reducer_buckets": 0,
                                "total": 137_074_114_560}
    assert p.communication == () and p.comm_seconds == 0 and p.comm_bytes_per_gpu == 0
    assert (p.link, p.bandwidth_each_way, p.nodes) == ("none", 0.0, 1)
    assert p.memory_limit == LIMIT and not p.fits        # 16 B/param of an 8B model: 128.5 GB > 77.3 GB
    assert distributed_plan(**LLAMA8, spec=spec, gpus=1, strategy="fsdp").memory_per_gpu["total"] == 137_074_114_560


@pytest.mark.parametrize("spec", ["a100-80gb-sxm", "h100-sxm"])
def test_ddp_llama8b_8_gpus(spec):
    p = plan("ddp", 8, spec)
    m = p.memory_per_gpu
    assert (m["parameters"], m["gradients"], m["optimizer_state"]) == (16_060_522_496, 16_060_522_496,
                                                                       96_363_134_976)
    assert m["reducer_buckets"] == 16_060_522_496      # gradient_as_bucket_view=False: a second copy of the grads
    assert m["total"] == 137_074_114_560 + 16_060_522_496 == 153_134_637_056 and not p.fits
    (ar,) = p.communication
    # ring all-reduce: 2 x (8 - 1) chunks of 16,060,522,496 / 8 = 2,007,565,312 bytes sent by each GPU
    assert (ar.op, ar.count, ar.nbytes, ar.bytes_per_gpu) == ("all-reduce", 1, 16_060_522_496, 28_105_914_368)
    assert p.link == "intra-node" and p.bandwidth_each_way == EACH_WAY[spec]
    assert ar.seconds == 28_105_914_368 / EACH_WAY[spec]      # A100: 93.7 ms, H100: 62.5 ms
    assert p.comm_bytes_per_gpu == 28_105_914_368
    assert distributed_plan(**LLAMA8, spec=spec, gpus=8, strategy="ddp",
                            gradient_as_bucket_view=True).memory_per_gpu["total"] == 137_074_114_560


@pytest.mark.parametrize("spec", ["a100-80gb-sxm", "h100-sxm"])
def test_ddp_llama8b_64_gpus_crosses_nodes(spec):
    p = plan("ddp", 64, spec)
    assert p.memory_per_gpu["total"] == 153_134_637_056      # DDP memory does not fall with N
    (ar,) = p.communication
    # 2 x 63 chunks of 16,060,522,496 / 64 = 250,945,664 bytes; 8 nodes: the ring runs at the network's 50 GB/s
    assert ar.bytes_per_gpu == 31_619_153_664
    assert (p.nodes, p.link, p.bandwidth_each_way) == (8, "inter-node", 50e9)
    assert ar.seconds == 31_619_153_664 / 50e9                # 0.632 s on either device
    assert any("crosses nodes" in n for n in p.notes)


@pytest.mark.parametrize("spec", ["a100-80gb-sxm", "h100-sxm"])
def test_fsdp_llama8b_8_gpus(spec):
    p = plan("fsdp", 8, spec)
    # shards of 1/8: 16,060,522,496 / 8 = 2,007,565,312; 96,363,134,976 / 8 = 12,045,391,872; the root unit
    # gathered and one unit prefetched beside it (2 x 2,101,354,496), and its bf16 gradient before reduce-scatter
    assert p.memory_per_gpu == {"parameters": 2_007_565_312, "gradients": 2_007_565_312,
                                "optimizer_state": 12_045_391_872, "activations": 8_589_934_592,
                                "gathered_parameters": 4_202_708_992, "unsharded_gradient": 2_101_354_496,
                                "reducer_buckets": 0, "total": 30_954_520_576}
    assert p.fits
    ag, rs = p.communication
    # each: 7 chunks of 2,007,565,312 = 14,052,957,184 bytes sent per GPU; all-gather in forward and in backward
    assert (ag.op, ag.count, ag.nbytes, ag.bytes_per_gpu) == ("all-gather", 2, 16_060_522_496, 14_052_957_184)
    assert (rs.op, rs.count, rs.nbytes, rs.bytes_per_gpu) == ("reduce-scatter", 1, 16_060_522_496, 14_052_957_184)
    assert p.comm_bytes_per_gpu == 3 * 14_052_957_184 == 42_158_871_552
    assert ag.seconds == rs.seconds == 14_052_957_184 / EACH_WAY[spec]
    assert p.comm_seconds == pytest.approx(42_158_871_552 / EACH_WAY[spec], rel=1e-15)   # A100: 0.1405 s


@pytest.mark.parametrize("spec", ["a100-80gb-sxm", "h100-sxm"])
def test_fsdp_llama8b_64_gpus(spec):
    p = plan("fsdp", 64, spec)
    # 16,060,522,496 / 64 = 250,945,664; 96,363,134,976 / 64 = 1,505,673,984
    assert p.memory_per_gpu == {"parameters": 250_945_664, "gradients": 250_945_664,
                                "optimizer_state": 1_505_673_984, "activations": 8_589_934_592,
                                "gathered_parameters": 4_202_708_992, "unsharded_gradient": 2_101_354_496,
                                "reducer_buckets": 0, "total": 16_901_563_392}
    ag, rs = p.communication
    assert ag.bytes_per_gpu == rs.bytes_per_gpu == 63 * 250_945_664 == 15_809_576_832
    assert (p.link, p.bandwidth_each_way) == ("inter-node", 50e9)
    assert p.comm_seconds == pytest.approx(3 * 15_809_576_832 / 50e9, rel=1e-15)   # 0.949 s


def test_an_all_reduce_is_a_reduce_scatter_and_an_all_gather():
    (ar,), (ag, rs) = plan("ddp", 8).communication, plan("fsdp", 8).communication
    assert ar.bytes_per_gpu == rs.bytes_per_gpu + ag.bytes_per_gpu == 2 * 14_052_957_184


def test_times_follow_nccl_tests_bus_bandwidth():
    # nccl-tests (PERFORMANCE.md) reports busbw = algbw x 2(n-1)/n for all-reduce and x (n-1)/n for all-gather and
    # reduce-scatter, algbw = size / time, one way: at a bus bandwidth B a collective of S bytes takes S x factor / B
    size, n, bus = 8 * 2**20, 8, 300e9
    assert ring_bytes_per_gpu("all-reduce", size, n) / bus == pytest.approx(size * 2 * (n - 1) / n / bus, rel=1e-15)
    assert ring_bytes_per_gpu("all-gather", size, n) / bus == pytest.approx(size * (n - 1) / n / bus, rel=1e-15)
    # advice.py's tensor-parallel all-reduce: 2 (t - 1) / t x bytes / (interconnect_bandwidth / 2)
    spec = get_spec("a100-80gb-sxm")
    assert ring_bytes_per_gpu("all-reduce", 16_384, 4) / one_way_bandwidth(spec) == \
        pytest.approx(2 * 3 / 4 * 16_384 / (spec.interconnect_bandwidth / 2), rel=1e-15)
    # a buffer that does not divide: chunks of ceil(1001 / 8) = 126
    assert ring_bytes_per_gpu("reduce-scatter", 1001, 8) == 7 * 126


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_comm_time_rises_with_n_across_the_node_boundary(strategy):
    seconds = [plan(strategy, n).comm_seconds for n in range(1, 41)]
    assert seconds[0] == 0
    assert all(a < b for a, b in zip(seconds[1:], seconds[2:]))        # strictly rising from N = 2
    # at 9 GPUs the ring leaves the node: 300 GB/s -> 50 GB/s each way, a jump of about 6x
    assert seconds[8] / seconds[7] > 5.5
    assert plan(strategy, 8).link == "intra-node" and plan(strategy, 9).link == "inter-node"
    assert plan(strategy, 9).nodes == 2


def test_slowest_link_bounds_the_ring():
    # A100 PCIe: 64 GB/s both ways, 32 each way, slower than the 50 GB/s network: it bounds a 16-GPU ring
    p = plan("ddp", 16, spec="a100-80gb-pcie")
    assert (p.link, p.bandwidth_each_way) == ("intra-node", 32e9)
    # one GPU a node: every hop is on the network; a slower network (DGX A100's 200 Gb/s HDR) bounds NVLink nodes
    assert plan("ddp", 4, gpus_per_node=1).bandwidth_each_way == INTER_NODE_EACH_WAY
    slow = plan("fsdp", 64, inter_node_each_way=25e9)
    assert slow.comm_seconds == pytest.approx(3 * 15_809_576_832 / 25e9, rel=1e-15)


def test_fsdp_dtypes_reshard_and_units():
    # gradients reduce-scattered in fp32: 4 B x P8 = 32,121,044,992 bytes; 7 chunks of 4,015,130,624
    p = plan("fsdp", 8, grad_reduce_dtype_bytes=4)
    ag, rs = p.communication
    assert ag.bytes_per_gpu == 14_052_957_184 and rs.bytes_per_gpu == 28_105_914_368
    assert p.memory_per_gpu["unsharded_gradient"] == 2 * ROOT8 == 4_202_708_992   # the unit's gradient in fp32
    # reshard_after_forward=False (ZeRO-2): one all-gather; every unit gathered at the end of forward
    z2 = plan("fsdp", 8, reshard_after_forward=False)
    assert [(c.op, c.count) for c in z2.communication] == [("all-gather", 1), ("reduce-scatter", 1)]
    assert z2.memory_per_gpu["gathered_parameters"] == 16_060_522_496
    # no prefetch: only the unit being computed is gathered
    assert plan("fsdp", 8, prefetch=0).memory_per_gpu["gathered_parameters"] == ROOT8
    # an even split over 33 units (32 layers and the root): ceil(16,060,522,496 / 33) = 486,682,500, with a note
    even = plan("fsdp", 8, units=33)
    assert even.memory_per_gpu["gathered_parameters"] == 2 * 486_682_500
    assert even.memory_per_gpu["unsharded_gradient"] == 486_682_500
    assert any("units" in n for n in even.notes)
    # parameters held in fp32 (FSDP1 MixedPrecision keeps fp32 shards), gathered in bf16
    fp32 = distributed_plan(parameter_bytes=4 * P8, gradient_bytes=2 * P8, optimizer_state_bytes=8 * P8,
                            activation_bytes=0, parameters=P8, param_dtype_bytes=2, largest_unit_bytes=ROOT8,
                            gpus=8, strategy="fsdp")
    assert fp32.memory_per_gpu["parameters"] == 4_015_130_624
    assert fp32.communication[0].nbytes == 2 * P8


def test_smallest_fit_llama70b_fsdp_on_a100():
    # fixed per GPU: root unit gathered + one prefetched (2 x 4,202,708,992) + its gradient (4,202,708,992)
    # + activations 10,737,418,240 = 23,345,545,216; room for shards: 77,309,411,328 - that = 53,963,866,112.
    # shards: 16 B x 70.6e9 / N = 1,129,600,000,000 / N: 70.6e9 at N = 16 (no), 35.3e9 at N = 32 (yes)
    fit = smallest_fit(**LLAMA70, largest_unit_bytes=ROOT70, spec="a100-80gb-sxm", strategy="fsdp")
    assert fit.gpus == 32 and fit.fits and fit.reason == "fits on 32 GPUs"
    assert fit.plan.memory_per_gpu["total"] == 4_412_500_000 * 2 + 26_475_000_000 + 23_345_545_216 == 58_645_545_216
    assert fit.tried == (1, 4096, 2, 4, 8, 16, 32)
    assert not plan("fsdp", 16, model=LLAMA70).fits
    assert plan("fsdp", 16, model=LLAMA70).memory_per_gpu["total"] == 70_600_000_000 + 23_345_545_216
    # every N: 1,129.6e9 / 21 = 53.79e9 fits, / 20 = 56.48e9 does not. At 21, with ceilings:
    # ceil(141.2e9 / 21) = 6,723,809,524 twice + ceil(847.2e9 / 21) = 40,342,857,143
    every = smallest_fit(**LLAMA70, largest_unit_bytes=ROOT70, spec="a100-80gb-sxm", strategy="fsdp",
                         search="every")
    assert every.gpus == 21
    assert every.plan.memory_per_gpu["total"] == 2 * 6_723_809_524 + 40_342_857_143 + 23_345_545_216 \
        == 77_136_021_407


def test_ddp_never_fits_llama70b():
    fit = smallest_fit(**LLAMA70, spec="a100-80gb-sxm", strategy="ddp")
    assert fit.gpus is None and not fit.fits and fit.tried == (1,)
    assert fit.reason.startswith("DDP does not shard: every GPU holds the full parameters, gradients and optimizer "
                                 "state (1.13 TB)")
    assert "on any number of GPUs" in fit.reason and "\n" not in fit.reason


def test_smallest_fit_none_and_one():
    # activations alone over the limit: no N fits, and the reason says why
    fit = smallest_fit(**{**LLAMA70, "activation_bytes": 80 * GiB}, largest_unit_bytes=ROOT70, strategy="fsdp")
    assert fit.gpus is None and "however many GPUs" in fit.reason and fit.tried == (1, 4096)
    # shards still too big at max_gpus
    short = smallest_fit(**LLAMA70, largest_unit_bytes=ROOT70, strategy="fsdp", max_gpus=16)
    assert short.gpus is None and short.reason.startswith("no N <= 16 fits under FSDP: even 16 GPUs hold")
    # max_gpus not a power of two is tried too
    assert smallest_fit(**LLAMA70, largest_unit_bytes=ROOT70, strategy="fsdp", max_gpus=24).gpus == 24
    tiny = smallest_fit(parameter_bytes=2, gradient_bytes=2, optimizer_state_bytes=12, activation_bytes=0)
    assert (tiny.gpus, tiny.reason) == (1, "fits on 1 GPU")


def test_to_dict_is_json_and_exact():
    for p in (plan("fsdp", 64), plan("ddp", 8), plan("ddp", 1)):
        d = p.to_dict()
        assert json.loads(json.dumps(d, allow_nan=False)) == d
        assert d["memory_per_gpu"] == p.memory_per_gpu and d["comm_seconds"] == p.comm_seconds
        assert d["fits"] == p.fits and d["comm_bytes_per_gpu"] == p.comm_bytes_per_gpu
    d = plan("fsdp", 64).to_dict()
    assert d["memory_per_gpu"]["total"] == 16_901_563_392 and type(d["memory_per_gpu"]["total"]) is int
    assert d["communication"][0] == {"op": "all-gather", "what": "parameters", "phase": "forward, backward",
                                     "count": 2, "nbytes": 16_060_522_496, "bytes_per_gpu": 15_809_576_832,
                                     "bandwidth_each_way": 50e9, "seconds": 15_809_576_832 / 50e9}
    fit = smallest_fit(**LLAMA70, spec="a100-80gb-sxm", strategy="ddp").to_dict()
    assert json.loads(json.dumps(fit, allow_nan=False)) == fit and fit["gpus"] is None


def test_float_bytes_that_are_whole_are_accepted():
    p = distributed_plan(parameter_bytes=70.6e9 * 2, gradient_bytes=70.6e9 * 2, optimizer_state_bytes=70.6e9 * 12,
                         activation_bytes=0, largest_unit_bytes=ROOT70, gpus=32)
    assert p.memory_per_gpu["parameters"] == 4_412_500_000 and type(p.memory_per_gpu["parameters"]) is int


@pytest.mark.parametrize("kwargs, name", [
    ({"parameter_bytes": -1}, "parameter_bytes"),
    ({"gradient_bytes": 1.5}, "gradient_bytes"),
    ({"optimizer_state_bytes": float("nan")}, "optimizer_state_bytes"),
    ({"activation_bytes": -8}, "activation_bytes"),
    ({"gpus": 0}, "gpus"),
    ({"gpus": 2.0}, "gpus"),
    ({"strategy": "zero2"}, "strategy"),
    ({"memory_utilization": 0}, "memory_utilization"),
    ({"memory_utilization": 1.2}, "memory_utilization"),
    ({"param_dtype_bytes": 0}, "param_dtype_bytes"),
    ({"grad_reduce_dtype_bytes": -2}, "grad_reduce_dtype_bytes"),
    ({"largest_unit_bytes": None}, "largest_unit_bytes"),         # FSDP over 8 GPUs needs it (or units)
    ({"largest_unit_bytes": 10**15}, "largest_unit_bytes"),       # bigger than the whole model
    ({"units": 33}, "largest_unit_bytes"),                        # both given
    ({"units": 0, "largest_unit_bytes": None}, "units"),
    ({"prefetch": -1}, "prefetch"),
    ({"gpus_per_node": 0}, "gpus_per_node"),
    ({"inter_node_each_way": 0}, "inter_node_each_way"),
    ({"parameter_bytes": 3}, "parameters"),                       # 3 bytes is no whole number of bf16 elements
])
def test_bad_input_is_one_line_naming_the_argument(kwargs, name):
    args = {**LLAMA8, "largest_unit_bytes": ROOT8, "gpus": 8, "strategy": "fsdp", **kwargs}
    with pytest.raises(ValueError, match=f"^{name}") as e:
        distributed_plan(**args)
    assert "\n" not in str(e.value)


def test_bad_search_arguments():
    with pytest.raises(ValueError, match="^search"):
        smallest_fit(**LLAMA8, search="odd")
    with pytest.raises(ValueError, match="^max_gpus"):
        smallest_fit(**LLAMA8, max_gpus=0)
    with pytest.raises(ValueError, match="^gpus"):
        smallest_fit(**LLAMA8, gpus=8)
    with pytest.raises(ValueError, match="^strategy"):
        smallest_fit(**LLAMA8, strategy="tp")
