"""Tests for shapeprof/optimizer_step.py: bytes of a torch.optim step counted by hand from the ops torch runs."""
import copy
import dataclasses
import itertools
import json
import re

import pytest
import torch
import torch.nn as nn

from shapeprof.hardware import get_spec
from shapeprof.optimizer_step import optimizer_step

F32, BF16 = 4, 2   # bytes per element


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


N = 64 * 128 + 128 + 128 * 10 + 10   # 9,610 parameters
T = 4                                # in 4 tensors (2 weights, 2 biases)
IMPLS = ("for-loop", "foreach", "fused")


def step(name="adamw", model=None, impl="for-loop", **kwargs):
    return optimizer_step(name, model if model is not None else small_model(),
                          foreach=impl == "foreach", fused=impl == "fused", **kwargs)


def test_adamw_fp32_bytes_for_each_implementation():
    forloop, foreach, fused = (step("adamw", impl=impl) for impl in IMPLS)
    # torch/optim/adam.py with decoupled weight decay (lr=1e-3, wd=1e-2), per tensor, one pass each:
    #   param.mul_(1 - lr * wd)                  read p        write p
    #   exp_avg.lerp_(grad, 1 - beta1)           read m, g     write m
    #   exp_avg_sq.mul_(beta2)                   read v        write v
    #   exp_avg_sq.addcmul_(grad, grad, 1-b2)    read v, g     write v
    #   exp_avg_sq.sqrt()                        read v        write s
    #   s / bias_correction2_sqrt                read s        write d
    #   d.add_(eps)                              read d        write d
    #   param.addcdiv_(exp_avg, d, -step_size)   read p, m, d  write p
    # (step += 1 and its .item() run on the CPU-held step tensor: host ops, not priced)
    read, written = (1 + 2 + 1 + 2 + 1 + 1 + 1 + 3) * F32 * N, 8 * F32 * N
    assert (forloop.bytes_read, forloop.bytes_written) == (read, written) == (48 * N, 32 * N)
    assert forloop.kernels == 8 * T and forloop.host_ops == 2 * T
    # foreach: the same eight passes, each one _foreach_* op over the 4-tensor lists
    assert (foreach.bytes_read, foreach.bytes_written) == (read, written)
    assert foreach.kernels == 8
    # fused: _foreach_add_(state_steps, 1) on the device steps (read 4 B, write 4 B each), then one
    # _fused_adamw_: read p, g, m, v and each step, write p, m, v
    assert fused.bytes_read == 4 * F32 * N + F32 * T + F32 * T
    assert fused.bytes_written == 3 * F32 * N + F32 * T
    assert fused.kernels == 2 and fused.host_ops == 0
    assert fused.implementation == "fused" and forloop.implementation == "for-loop"


def test_fused_is_the_single_pass_the_others_move_more():
    forloop, foreach, fused = (step("adamw", impl=impl) for impl in IMPLS)
    for c in (forloop, foreach, fused):   # the ideal: read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq
        assert (c.ideal.bytes_read, c.ideal.bytes_written) == (16 * N, 12 * N)
    # the fused kernel itself is exactly the single pass plus its reads of the 4-byte step counters ...
    kernel = fused.ops["aten._fused_adamw_"]
    assert (kernel.count, kernel.bytes_read - F32 * T, kernel.bytes_written) == (1, 16 * N, 12 * N)
    # ... and the step counters' own increment is the only other traffic
    assert fused.ops["aten._foreach_add_"].bytes_read == fused.ops["aten._foreach_add_"].bytes_written == F32 * T
    assert forloop.bytes > fused.bytes and foreach.bytes > fused.bytes
    assert forloop.passes == foreach.passes == (48 + 32) / (16 + 12)


def test_flops_are_the_same_math_in_every_implementation():
    forloop, foreach, fused = (step("adamw", impl=impl) for impl in IMPLS)
    # 8 elementwise ops per element (the 8 passes above), 1 FLOP each; fused counts the same math,
    # plus 1 per tensor for the device step counter's increment
    assert forloop.flops == foreach.flops == 8 * N
    assert fused.flops == 8 * N + T
    assert fused.ideal.flops == fused.flops


def test_foreach_ops_cost_the_sum_of_their_for_loop_ops():
    forloop, foreach = step("adamw", impl="for-loop"), step("adamw", impl="foreach")
    for single, listed in [("aten.lerp_", "aten._foreach_lerp_"), ("aten.addcmul_", "aten._foreach_addcmul_"),
                           ("aten.addcdiv_", "aten._foreach_addcdiv_"), ("aten.sqrt", "aten._foreach_sqrt")]:
        a, b = forloop.ops[single], foreach.ops[listed]
        assert (a.count, b.count) == (T, 1)
        assert (a.flops, a.bytes_read, a.bytes_written) == (b.flops, b.bytes_read, b.bytes_written)


def test_sgd_plain_and_with_momentum():
    plain = {impl: step("sgd", impl=impl, lr=0.1) for impl in IMPLS}
    for c in plain.values():
        # param.add_(grad, alpha=-lr): read p, g; write p. One pass already: every implementation is the ideal.
        assert (c.bytes_read, c.bytes_written) == (2 * F32 * N, F32 * N)
        assert (c.ideal.bytes_read, c.ideal.bytes_written) == (2 * F32 * N, F32 * N)
        assert c.flops == N and c.state_bytes == 0
    assert [plain[i].kernels for i in IMPLS] == [T, 1, 1]

    moving = {impl: step("sgd", impl=impl, lr=0.1, momentum=0.9) for impl in IMPLS}
    # for-loop / foreach, per tensor (the second step: the first copies the grad into the buffer):
    #   buf.mul_(momentum)                read b     write b
    #   buf.add_(grad, 1 - dampening)     read b, g  write b
    #   param.add_(buf, alpha=-lr)        read p, b  write p
    for impl in ("for-loop", "foreach"):
        c = moving[impl]
        assert (c.bytes_read, c.bytes_written) == ((1 + 2 + 2) * F32 * N, 3 * F32 * N)
        assert c.flops == 3 * N
    assert moving["for-loop"].kernels == 3 * T and moving["foreach"].kernels == 3
    # fused: one _fused_sgd_ reading p, g, buf and writing p, buf: exactly the ideal
    fused = moving["fused"]
    assert (fused.bytes_read, fused.bytes_written) == (fused.ideal.bytes_read, fused.ideal.bytes_written)
    assert (fused.bytes_read, fused.bytes_written) == (3 * F32 * N, 2 * F32 * N)
    assert fused.kernels == 1 and fused.flops == 3 * N
    assert all(c.state_bytes == F32 * N for c in moving.values())   # one momentum buffer per parameter
    assert any("no meta kernel for aten._fused_sgd_" in n for n in fused.notes)


def test_adam_and_adamw_place_weight_decay_differently():
    adam = step("adam", impl="for-loop", weight_decay=0.01)
    adamw = step("adamw", impl="for-loop", weight_decay=0.01)
    # Adam adds wd * param to the gradient (grad.add(param): read g, p, write g', a new tensor) where
    # AdamW scales the parameter in place (param.mul_: read p, write p): 4 more bytes read per element
    assert "aten.add" in adam.ops and adam.ops["aten.add"].count == T
    assert adamw.ops["aten.mul_"].count == 2 * T and adam.ops["aten.mul_"].count == T   # + exp_avg_sq *= beta2
    assert adam.bytes_read - adamw.bytes_read == F32 * N
    assert adam.bytes_written == adamw.bytes_written == 8 * F32 * N
    # without weight decay they are the same step; Adam(decoupled_weight_decay=True) is AdamW
    a0, w0 = step("adam", impl="for-loop"), step("adamw", impl="for-loop", weight_decay=0.0)
    assert (a0.bytes_read, a0.bytes_written, a0.flops) == (w0.bytes_read, w0.bytes_written, w0.flops)
    assert (a0.bytes_read, a0.bytes_written) == (44 * N, 28 * N)   # the 8 passes less param.mul_
    decoupled = step(torch.optim.Adam, impl="for-loop", weight_decay=0.01, decoupled_weight_decay=True)
    assert (decoupled.bytes_read, decoupled.ops.keys()) == (adamw.bytes_read, adamw.ops.keys())
    # fused: different kernels, the same single pass
    fa, fw = step("adam", impl="fused", weight_decay=0.01), step("adamw", impl="fused", weight_decay=0.01)
    assert "aten._fused_adam_" in fa.ops and "aten._fused_adamw_" in fw.ops
    assert (fa.bytes_read, fa.bytes_written, fa.flops) == (fw.bytes_read, fw.bytes_written, fw.flops)


def test_amsgrad_reads_and_writes_the_running_max():
    foreach = step("adam", impl="foreach", amsgrad=True)
    fused = step("adam", impl="fused", amsgrad=True)
    # foreach: Adam's 7 passes (no weight decay) + _foreach_maximum_(max_v, v): read max_v, v, write max_v
    assert (foreach.bytes_read, foreach.bytes_written) == ((11 + 2) * F32 * N, (7 + 1) * F32 * N)
    # fused: read p, g, m, v, max_v (+ steps), write p, m, v, max_v (+ steps' increment)
    assert (fused.ideal.bytes_read, fused.ideal.bytes_written) == (5 * F32 * N, 4 * F32 * N)
    assert (fused.bytes_read, fused.bytes_written) == (5 * F32 * N + 2 * F32 * T, 4 * F32 * N + F32 * T)
    assert fused.state_bytes == 3 * F32 * N + F32 * T   # exp_avg, exp_avg_sq, max_exp_avg_sq, step


def test_bf16_parameters():
    forloop = step("adamw", impl="for-loop", param_dtype=torch.bfloat16)
    fused = step("adamw", impl="fused", param_dtype=torch.bfloat16, state_dtype=torch.bfloat16)
    # the same passes at 2 B per element; the state is bf16 too (torch keeps it in the param's dtype)
    assert (forloop.bytes_read, forloop.bytes_written) == (12 * BF16 * N, 8 * BF16 * N)
    # fused: p, g, m, v in bf16; the step counters stay fp32 (4 B): read twice, written once
    assert (fused.bytes_read, fused.bytes_written) == (4 * BF16 * N + 2 * F32 * T, 3 * BF16 * N + F32 * T)
    assert fused.state_bytes == 2 * BF16 * N + F32 * T


def test_fp32_state_for_bf16_parameters_is_refused():
    # torch.optim has no such mode: its for-loop and foreach ops reject the mixed dtypes and CUDA's fused
    # kernels require one dtype (meta's fused kernel would not check, so it must not be priced)
    for impl in IMPLS:
        with pytest.raises(ValueError, match="state_dtype=torch.float32 differs"):
            step("adamw", impl=impl, param_dtype=torch.bfloat16, state_dtype=torch.float32)


def test_state_bytes():
    c = step("adamw", impl="for-loop")
    assert c.state_bytes == 2 * F32 * N + F32 * T   # exp_avg, exp_avg_sq, and a 0-dim fp32 step per tensor


def test_user_model_grads_and_optimizer_untouched():
    model = small_model()
    user_opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 64)).sum().backward()
    user_opt.step()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    params = [(p, p.detach().clone()) for p in model.parameters()]
    opt_state = copy.deepcopy(user_opt.state_dict())
    for name in ("sgd", "adam", "adamw"):
        for impl in IMPLS:
            step(name, model, impl)
    assert all(p.grad is None for p in model.parameters())   # no .grad appeared
    assert all(p is q for (p, _), q in zip(params, model.parameters()))
    assert all(torch.equal(p, before) and p.device.type == "cpu" for p, before in params)
    after = user_opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for k, s in opt_state["state"].items():
        assert all(torch.equal(after["state"][k][key], v) for key, v in s.items())
    # existing gradients stay as they are too
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    step("adamw", model, "fused")
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        optimizer_step("rmsprop", small_model())
    with pytest.raises(ValueError, match="unsupported optimizer"):
        optimizer_step(torch.optim.RMSprop, small_model())
    with pytest.raises(ValueError, match="no trainable parameters"):
        optimizer_step("adamw", small_model().requires_grad_(False))
    with pytest.raises(ValueError, match="no trainable parameters"):
        optimizer_step("sgd", [])
    # a mode that cannot run on meta tensors says so in one line, and prices nothing else
    with pytest.raises(RuntimeError, match="cannot run a foreach AdamW step on meta tensors") as err:
        optimizer_step("adamw", small_model(), foreach=True, capturable=True)
    assert "\n" not in str(err.value)


def test_kernels_grow_with_tensors_in_the_for_loop_only():
    def stack(layers):
        return nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])
    for layers in (1, 3, 6):
        tensors = 2 * layers
        forloop, foreach, fused = (step("adamw", stack(layers), impl) for impl in IMPLS)
        assert forloop.tensors == tensors
        assert forloop.kernels == 8 * tensors   # 8 elementwise ops per tensor
        assert foreach.kernels == 8             # 8 list ops
        assert fused.kernels == 2               # the step counters' increment + _fused_adamw_


def test_defaults_price_what_cuda_runs():
    c = optimizer_step(small_model())   # AdamW, torch's defaults
    assert c.optimizer == "AdamW" and c.implementation == "foreach"
    assert any("CUDA" in n for n in c.notes)
    # foreach=False alone (or fused=False) turns torch's foreach default off
    assert optimizer_step("adamw", small_model(), fused=False).implementation == "for-loop"
    assert optimizer_step(torch.optim.AdamW, small_model(), foreach=False).implementation == "for-loop"


def test_param_groups_and_shared_parameters():
    model = small_model()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    c = optimizer_step("adamw", [{"params": weights}, {"params": biases + weights, "weight_decay": 0.0}],
                       foreach=False)
    n_w, n_b = 64 * 128 + 128 * 10, 128 + 10
    # weights: the 8 passes (48 B read, 32 B written per element); biases, no weight decay: 7 (44, 28);
    # the weights listed again in the second group are stepped once
    assert c.tensors == 4
    assert (c.bytes_read, c.bytes_written) == (48 * n_w + 44 * n_b, 32 * n_w + 28 * n_b)


def test_predicted_time_and_json():
    spec = get_spec("a100-80gb-sxm")
    c = step("adamw", impl="fused", spec=spec)
    assert c.spec == spec.name
    # memory-bound: the single pass's time is its bytes over the bandwidth
    assert c.ideal.seconds == pytest.approx((16 + 12) * N / spec.memory_bandwidth)
    assert c.seconds >= c.ideal.seconds
    assert sum(op.seconds for op in c.ops.values()) == pytest.approx(c.seconds)
    data = json.loads(json.dumps(c.to_dict()))
    assert data["implementation"] == "fused" and data["bytes"] == c.bytes and data["ideal"]["bytes_read"] == 16 * N
    assert data["ops"]["aten._fused_adamw_"]["count"] == 1


@pytest.mark.parametrize("name,kwargs", [
    ("adamw", {}), ("adam", {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1})])
def test_every_op_has_a_formula(name, kwargs):
    for impl in IMPLS:
        c = step(name, impl=impl, **kwargs)
        assert c.uncovered == ()
        if impl == "fused":   # same math, same FLOPs (+ 1 per tensor for Adam's device step counters)
            forloop = step(name, impl="for-loop", **kwargs)
            assert c.flops == forloop.flops + (T if name != "sgd" else 0)


def test_llama_8b_sized_parameter_list():
    # Llama-3-8B: 32 layers of q, k, v, o, gate, up, down and 2 norms, plus embeddings, final norm, lm_head.
    # Meta tensors: no memory is allocated, and none is by the step.
    d, kv, ff, vocab = 4096, 1024, 14336, 128256
    shapes = [(vocab, d)] + [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)] * 32 + \
             [(d,), (vocab, d)]
    params = [torch.empty(s, device="meta", requires_grad=True) for s in shapes]
    n = 2 * vocab * d + 32 * (2 * d * d + 2 * kv * d + 3 * ff * d + 2 * d) + d
    c = optimizer_step("adamw", params, fused=True, param_dtype=torch.bfloat16)
    assert (c.parameters, c.tensors) == (n, len(shapes)) == (8_030_261_248, 291)
    assert (c.bytes_read, c.bytes_written) == (4 * BF16 * n + 2 * F32 * 291, 3 * BF16 * n + F32 * 291)
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------------------------------------
# One representative per distinct parameter: the same figures as the step over every parameter

def same_cost(fast, exact):
    """Every figure equal (ints exactly, seconds to float rounding): the step over representatives is the
    step over every parameter."""
    as_dict = dataclasses.asdict
    a, b = as_dict(fast), as_dict(exact)
    for c in (a, b):
        c["seconds_"] = c.pop("seconds")
        c["ideal_seconds"] = c["ideal"].pop("seconds")
        c["op_seconds"] = {k: op.pop("seconds") for k, op in c["ops"].items()}
    assert a.pop("seconds_") == pytest.approx(b.pop("seconds_"), rel=1e-12)
    assert a.pop("ideal_seconds") == pytest.approx(b.pop("ideal_seconds"), rel=1e-12)
    sa, sb = a.pop("op_seconds"), b.pop("op_seconds")
    assert sa.keys() == sb.keys() and all(sa[k] == pytest.approx(sb[k], rel=1e-12) for k in sa)
    assert a == b


def llama_8b():
    from examples.llama import LlamaConfig, Transformer
    with torch.device("meta"):
        return Transformer(LlamaConfig.llama3_8b()).to(torch.bfloat16)


def gpt2_small():
    from examples.nanogpt import GPT, GPTConfig
    with torch.device("meta"):
        return GPT(GPTConfig.gpt2())   # lm_head tied to the token embedding: stepped once


def stack(layers=4, width=16):
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def frozen_and_tied():
    m = stack(5)
    m[1].requires_grad_(False)     # skipped
    m[0].weight = m[4].weight      # stepped once
    return m


def mixed_dtypes():
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double(), nn.Linear(8, 8), nn.Linear(8, 8).double())


def param_groups():
    m = stack(4, 8)
    # the biases and one weight in a group of their own settings; one weight also listed again (stepped once)
    return [{"params": [m[0].weight, m[1].weight, m[2].weight]},
            {"params": [m[0].bias, m[1].bias, m[2].bias, m[3].weight, m[3].bias, m[0].weight], "lr": 0.5,
             "weight_decay": 0.0}]


def layouts():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    return [a.weight, b.weight.t(), nn.Linear(8, 8).weight, nn.Linear(8, 8).weight.t(), a.bias, b.bias]


CONFIGS = [("adamw", {}), ("adam", {"amsgrad": True, "maximize": True, "weight_decay": 0.1}), ("sgd", {}),
           ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1})]


@pytest.mark.parametrize("model", [llama_8b, gpt2_small], ids=["llama-3-8b", "gpt2"])
@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_dedupe_is_the_step_over_every_parameter_big_models(model, name, kwargs):
    model = model()
    for impl in IMPLS:
        same_cost(step(name, model, impl, **kwargs), step(name, model, impl, _dedupe=False, **kwargs))


SMALL_CONFIGS = CONFIGS + [("adam", {}), ("adamw", {"amsgrad": True}), ("adamw", {"weight_decay": 0.0}),
                           ("sgd", {"momentum": 0.9, "dampening": 0.1, "maximize": True}),
                           ("adamw", {"lr": torch.tensor(0.01)}), ("sgd", {"lr": torch.tensor(0.1), "momentum": 0.5})]


@pytest.mark.parametrize("model", [small_model, stack, frozen_and_tied, mixed_dtypes, param_groups, layouts])
def test_dedupe_is_the_step_over_every_parameter_small_models(model):
    for (name, kwargs), impl in itertools.product(SMALL_CONFIGS, IMPLS):
        params = model()
        try:
            exact = step(name, params, impl, _dedupe=False, **kwargs)
        except RuntimeError as e:   # a Tensor lr torch cannot run on meta (fused) or refuses (foreach)
            with pytest.raises(RuntimeError) as err:
                step(name, params, impl, **kwargs)
            assert str(err.value) == str(e)
            continue
        except ValueError as e:
            with pytest.raises(ValueError, match=re.escape(str(e))):
                step(name, params, impl, **kwargs)
            continue
        same_cost(step(name, params, impl, **kwargs), exact)
        same_cost(step(name, params, impl, param_dtype=torch.bfloat16, **kwargs),
                  step(name, params, impl, param_dtype=torch.bfloat16, _dedupe=False, **kwargs))


def test_dedupe_runs_the_step_on_one_parameter_per_shape(monkeypatch):
    import shapeprof.optimizer_step as module
    ran = []
    record = module._record

    def counting(cls, impl, groups, *args, **kwargs):
        ran.append(sum(len(g["params"]) for g in groups))
        return record(cls, impl, groups, *args, **kwargs)

    monkeypatch.setattr(module, "_record", counting)
    model = llama_8b()   # 291 tensors of 6 shapes: embedding/lm_head, wq/wo, wk/wv, w1/w3, w2, the norms
    for impl in IMPLS:
        ran.clear()
        c = step("adamw", model, impl)
        assert ran == [6] and c.tensors == 291
    # the for-loop's ops still count once per tensor, a foreach op once, fused once per call
    assert step("adamw", model, "for-loop").kernels == 8 * 291
    assert step("adamw", model, "foreach").kernels == 8
    assert step("adamw", model, "fused").kernels == 2
    # a subclass whose step is its own runs every parameter, as does a Tensor lr in the for-loop
    class Mine(torch.optim.AdamW):
        def step(self, closure=None):
            return super().step(closure)

    model = stack(4)   # 8 tensors of 2 shapes
    ran.clear()
    optimizer_step(torch.optim.AdamW, model, foreach=True)
    assert ran == [2]
    ran.clear()
    optimizer_step(Mine, model, foreach=True)
    assert ran == [8]
    ran.clear()
    optimizer_step("adamw", model, foreach=False, lr=torch.tensor(0.01))
    assert ran == [8]
