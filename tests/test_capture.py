"""Capture: the three ways, twins, meta shadows, and leaving the user's model alone."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.llama import LlamaConfig, Transformer
from examples.nanogpt import GPT, GPTConfig
from shapeprof.capture import CaptureError, InputShape, NodeError, capture, meta_shadow


def _ops(cn):
    return [str(r.op) for r in cn.records]


def test_symbolic_trace_gives_module_level_nodes_with_their_aten_ops():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    cap = capture(model, torch.randn(2, 4))
    assert cap.method == "symbolic_trace" and cap.attempts == []
    by_name = {cn.node.name: cn for cn in cap.nodes}
    linear = next(cn for cn in cap.nodes if cn.node.op == "call_module" and cn.module_type == "Linear")
    assert linear.module_path == "0"
    assert _ops(linear) == ["aten.t.default", "aten.addmm.default"]
    relu = next(cn for cn in cap.nodes if cn.module_type == "ReLU")
    assert _ops(relu) == ["aten.relu.default"]
    assert relu.output.shape == (2, 8)
    assert len(by_name) == len(cap.nodes)


def test_twin_layers_are_traced_and_run_once_but_every_node_is_in_the_graph():
    cfg = LlamaConfig.tiny(n_layers=4)
    cap = capture(Transformer(cfg), torch.zeros(2, 16, dtype=torch.long))
    assert cap.method == "symbolic_trace"
    paths = {cn.module_path for cn in cap.nodes}
    for i in range(4):
        assert f"layers.{i}.attention.wq" in paths
        assert f"layers.{i}.feed_forward" in paths
    twins = [cn for cn in cap.nodes if cn.twin_of is not None]
    # layers 1..3 are copies of layer 0 (plus RMSNorms that copy the first RMSNorm)
    per_layer = sum(1 for cn in cap.nodes if cn.module_path.startswith("layers.0.") or cn.module_path == "layers.0")
    assert len(twins) >= 3 * per_layer
    by_name = {cn.node.name: cn for cn in cap.nodes}
    for cn in twins:
        assert cn.records is by_name[cn.twin_of].records   # shared, not recomputed
    wq3 = next(cn for cn in cap.nodes if cn.module_path == "layers.3.attention.wq")
    assert wq3.twin_of is not None and wq3.node.target == "layers.3.attention.wq"
    assert wq3.node.meta["nn_module_stack"]["layers.3"][0] == "layers.3"


def test_twin_graph_runs_like_the_model():
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.tiny(n_layers=3)).eval()
    tokens = torch.randint(0, 256, (2, 12))
    cap = capture(model, tokens)
    # the graph's targets live in the meta shadow; rebuild it over the real model to run it
    gm = torch.fx.GraphModule(model, cap.graph)
    torch.testing.assert_close(gm(tokens), model(tokens))


def test_twins_called_with_other_shapes_are_run_again():
    class TwoWidths(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(8, 8), nn.GELU())
            self.b = nn.Sequential(nn.Linear(8, 8), nn.GELU())

        def forward(self, x):
            return self.a(x) + self.b(x[:, :1]).sum()

    class Wrap(nn.Module):   # non-leaf twins: wrap the Sequentials so the twin logic applies
        def __init__(self):
            super().__init__()
            self.inner = TwoWidths()

        def forward(self, x):
            return self.inner(x)

    cap = capture(Wrap(), torch.randn(4, 3, 8))
    linears = [cn for cn in cap.nodes if cn.module_type == "Linear"]
    assert [cn.module_path for cn in linears] == ["inner.a.0", "inner.b.0"]
    assert linears[1].twin_of is None       # same module, other input shape: run for real
    mm_shapes = [r.outputs[0].shape for cn in linears for r in cn.records if "mm" in str(r.op)]
    assert mm_shapes[0] != mm_shapes[1]


def test_modules_with_different_attributes_are_not_twins():
    class Scale(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s

        def forward(self, x):
            return x * self.s if self.s > 1 else x + self.s

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Scale(2), Scale(0)

        def forward(self, x):
            return self.b(self.a(x))

    cap = capture(Two(), torch.randn(3))
    ops = [_ops(cn) for cn in cap.nodes if cn.records]
    assert ops == [["aten.mul.Tensor"], ["aten.add.Tensor"]]
    assert all(cn.twin_of is None for cn in cap.nodes)


@pytest.mark.parametrize("order, expected", [("auto", "dispatch"), ("runnable", "export")])
def test_nanogpt_falls_back_and_says_why(order, expected):
    model = GPT(GPTConfig.tiny())
    cap = capture(model, torch.zeros(1, 16, dtype=torch.long), method=order)
    assert cap.method == expected
    assert cap.attempts[0][0] == "symbolic_trace"
    assert "control flow" in cap.attempts[0][1]
    ops = {str(r.op) for cn in cap.nodes for r in cn.records}
    assert "aten.scaled_dot_product_attention.default" in ops
    paths = {cn.module_path for cn in cap.nodes}
    assert "transformer.h.1.mlp.c_fc" in paths


def test_manual_attention_with_tril_buffer_captures():
    model = GPT(GPTConfig.tiny(flash=False))
    cap = capture(model, torch.zeros(2, 32, dtype=torch.long))
    ops = [str(r.op) for cn in cap.nodes for r in cn.records]
    assert "aten.masked_fill.Scalar" in ops and "aten._softmax.default" in ops or "aten.softmax.int" in ops


def test_dispatch_capture_builds_an_aten_graph_with_module_paths():
    model = Transformer(LlamaConfig.tiny())
    cap = capture(model, torch.zeros(1, 8, dtype=torch.long), method="dispatch")
    assert cap.method == "dispatch"
    mms = [cn for cn in cap.nodes if cn.records and str(cn.records[0].op) == "aten.mm.default"]
    assert {cn.module_path for cn in mms} >= {"layers.0.attention.wq", "layers.1.feed_forward.w2", "output"}
    sdpa = [cn for cn in cap.nodes if cn.records and "scaled_dot_product" in str(cn.records[0].op)]
    assert len(sdpa) == 2 and sdpa[0].module_path == "layers.0.attention"
    cap.graph.lint()


def test_explicit_method_failure_names_the_method():
    with pytest.raises(CaptureError, match="symbolic_trace failed for GPT"):
        capture(GPT(GPTConfig.tiny()), torch.zeros(1, 8, dtype=torch.long), method="symbolic_trace")
    with pytest.raises(ValueError, match="unknown capture method 'jit'"):
        capture(nn.Linear(2, 2), torch.randn(2), method="jit")


def test_every_way_failing_is_one_error_naming_each_cause():
    class Broken(nn.Module):
        def forward(self, x):
            return x.reshape(3, -1)        # 4 elements: no way of running it works

    with pytest.raises(CaptureError) as err:
        capture(Broken(), torch.ones(4))
    message = str(err.value)
    assert "could not capture Broken" in message
    for method in ("symbolic_trace", "export", "dispatch"):
        assert f"{method}:" in message
    assert "\n" not in message


class Branches(nn.Module):
    """Control flow on a tensor's value: no symbolic, export or meta run can follow it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 16)

    def forward(self, x):
        y = self.a(x)
        if y.mean() > 0:                   # BRANCH
            return torch.dropout(self.b(y), 0.5, True)   # advances the RNG
        return y


def _branch_line() -> int:
    import inspect
    lines, start = inspect.getsourcelines(Branches.forward)
    return start + next(i for i, line in enumerate(lines) if "# BRANCH" in line)


def test_a_forward_that_branches_on_values_is_run_once_on_real_data_on_a_copy():
    torch.manual_seed(0)
    model = Branches()
    with torch.no_grad():
        model.a.bias.fill_(5.0)            # y.mean() > 0: the branch through b is taken
    x = torch.randn(4, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_before, rng = x.clone(), torch.get_rng_state()
    cap = capture(model, x)
    assert cap.method == "dispatch_real"
    assert [m for m, _ in cap.attempts] == ["symbolic_trace", "dispatch", "export"]
    mms = [cn for cn in cap.nodes if cn.records and str(cn.records[0].op) == "aten.addmm.default"]
    assert [cn.module_path for cn in mms] == ["a", "b"]
    assert mms[1].records[0].outputs[0].shape == (4, 16)
    assert any(f"test_capture.py:{_branch_line()}" in note for note in cap.notes)
    # nothing the user holds changed, and the copy's weights were dropped: the root is a meta shadow
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before) and torch.equal(torch.get_rng_state(), rng)
    assert all(t.is_meta for t in cap.root.state_dict().values())


def test_a_forward_that_branches_on_values_names_the_line_on_meta_inputs():
    with pytest.raises(CaptureError) as err:
        capture(Branches(), InputShape((4, 8)))
    message = str(err.value)
    assert f"test_capture.py:{_branch_line()} (`if y.mean() > 0:                   # BRANCH`)" in message
    assert "real example inputs" in message and "\n" not in message


class _Alarm:
    """Fail a test that would hang (the bug it guards against looped forever) instead of stalling CI."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def fail(*_):
            raise TimeoutError(f"still running after {self.seconds} s")
        self.old = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def test_a_forward_that_reassigns_its_buffers_captures_and_leaves_them_alone():
    class Counts(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.register_buffer("step", torch.zeros(()))
            self.register_buffer("k", torch.zeros(1, 0, 8))

        def forward(self, x):
            self.step += 1                          # a registered buffer reassigned ...
            k = self.proj(x)
            self.k = torch.cat([self.k, k], 1)      # ... and a hand-made cache grown
            return self.k.sum(1)

    model = Counts()
    with _Alarm(60):
        cap = capture(model, torch.randn(1, 4, 8))
    assert cap.method == "symbolic_trace"
    ops = [str(r.op) for cn in cap.nodes for r in cn.records]
    assert "aten.cat.default" in ops and "aten.add.Tensor" in ops
    assert model.step.item() == 0 and model.k.shape == (1, 0, 8)
    shadow = cap.root
    assert all(isinstance(b, torch.Tensor) and b.is_meta for b in shadow._buffers.values())
    assert shadow.k.shape == (1, 0, 8)


def test_the_users_global_module_hooks_do_not_fire_during_capture():
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        for method in ("symbolic_trace", "export", "dispatch"):
            capture(model, torch.randn(2, 4), method=method)
        assert seen == []
        model(torch.randn(2, 4))                     # still registered, in place
        assert seen == ["Linear", "ReLU", "Sequential"]
    finally:
        handle.remove()


def test_plain_tensor_attributes_become_meta_in_the_shadow():
    class Holds(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.table = torch.randn(1024, 1024)                     # not a buffer: a plain attribute
            self.more = {"a": [torch.randn(8)], "b": (torch.randn(2),)}

        def forward(self, x):
            return self.proj(x) + self.table[0, :4]

    model = Holds()
    shadow = meta_shadow(model)
    assert shadow.table.is_meta and shadow.table.shape == (1024, 1024)
    assert shadow.more["a"][0].is_meta and shadow.more["b"][0].is_meta
    assert not model.table.is_meta
    assert capture(model, torch.randn(2, 4)).method == "symbolic_trace"


def test_inputs_holding_tensors_are_copied_not_changed():
    class Appends(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x, cache):
            cache.keys.append(self.proj(x))     # a cache object changed in place by the forward
            return torch.cat(cache.keys, 0).sum(0)

    class Cache:                                # not a pytree: an object holding tensors, like HF's caches
        def __init__(self, past):
            self.keys = [past]

    past = torch.randn(2, 4)
    cache = Cache(past)
    capture(Appends(), torch.randn(2, 4), cache, method="dispatch")
    assert len(cache.keys) == 1 and cache.keys[0] is past and not past.is_meta


def test_torch_transformer_modules_are_looked_inside():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.head = nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.enc(x))

    cap = capture(Encoder().eval(), torch.randn(2, 10, 32))
    paths = {cn.module_path for cn in cap.nodes if cn.records}
    for i in range(3):
        assert f"enc.layers.{i}.self_attn" in paths and f"enc.layers.{i}.linear1" in paths
    ops = [str(r.op) for cn in cap.nodes for r in cn.records]
    assert ops.count("aten.scaled_dot_product_attention.default") == 3     # one fused attention per layer
    assert not any(cn.module_type in ("TransformerEncoder", "TransformerEncoderLayer") and cn.node.op ==
                   "call_module" for cn in cap.nodes)


def test_node_errors_name_the_node_and_its_source_line():
    class NoMeta(nn.Module):
        def forward(self, x):
            return torch.nonzero(x)   # no meta kernel: the output size depends on the data

    with pytest.raises(CaptureError) as err:
        capture(NoMeta(), torch.ones(4), method="symbolic_trace")
    cause = err.value.__cause__
    assert isinstance(cause, NodeError)
    assert "node 'nonzero'" in str(cause) and "test_capture.py" in str(cause)


def test_user_model_is_untouched():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny())
    model.train()
    calls = []
    model.transformer.h[0].register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    capture(model, torch.zeros(1, 16, dtype=torch.long))
    capture(model, torch.zeros(1, 16, dtype=torch.long), method="dispatch")
    assert calls == []                                   # its hooks were not run on our tensors
    assert model.training
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert len(model.transformer.h[0]._forward_hooks) == 1
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks


def test_meta_shadow_keeps_ties_and_casts_floating_tensors_only():
    model = GPT(GPTConfig.tiny())
    shadow = meta_shadow(model, torch.bfloat16)
    assert shadow.lm_head.weight is shadow.transformer.wte.weight
    assert shadow.lm_head.weight.device.type == "meta" and shadow.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32


def test_meta_model_and_shape_inputs_allocate_nothing():
    with torch.device("meta"):
        model = Transformer(LlamaConfig.llama3_8b())
    cap = capture(model, InputShape((1, 128), torch.long))
    assert cap.method == "symbolic_trace"
    out = [cn for cn in cap.nodes if cn.module_path == "output" and cn.output is not None][-1]
    assert out.output.shape == (1, 128, 128256)


def test_keyword_only_optional_args_and_dict_outputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x, mask=None, *, scale: float = 1.0, return_dict=True):
            if mask is not None:
                x = x * mask
            y = self.proj(x) * scale
            return {"y": y, "sum": y.sum()} if return_dict else (y,)

    model = KW()
    cap = capture(model, torch.randn(2, 4), scale=2.0)
    assert cap.method == "symbolic_trace"
    muls = [cn for cn in cap.nodes if cn.records and str(cn.records[0].op) == "aten.mul.Tensor"]
    assert len(muls) == 1                # the mask branch was not taken: mask is None
    cap = capture(model, torch.randn(2, 4), torch.ones(2, 4), return_dict=False)
    assert len([cn for cn in cap.nodes if cn.records and str(cn.records[0].op) == "aten.mul.Tensor"]) == 2


def test_dtype_override_changes_what_is_recorded():
    cap = capture(nn.Linear(4, 4), torch.randn(2, 4), dtype=torch.float16)
    addmm = [r for cn in cap.nodes for r in cn.records if str(r.op) == "aten.addmm.default"][0]
    assert addmm.outputs[0].dtype == torch.float16


def test_sdpa_is_recorded_whole_with_is_causal():
    class Attn(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    cap = capture(Attn(), torch.randn(1, 2, 8, 4))
    recs = [r for cn in cap.nodes for r in cn.records]
    assert [str(r.op) for r in recs] == ["aten.scaled_dot_product_attention.default"]
    assert recs[0].kwargs["is_causal"] is True


GLOBAL_LINEAR = nn.Linear(8, 8)


def test_real_tensors_outside_the_model_meet_meta_ones():
    class UsesGlobal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            return GLOBAL_LINEAR(self.a(x)) + torch.ones(8)   # a module not in the tree, a CPU constant

    cap = capture(UsesGlobal(), torch.randn(2, 8))
    assert cap.method == "dispatch"
    mms = [cn for cn in cap.nodes if cn.records and str(cn.records[0].op) == "aten.addmm.default"]
    assert [cn.module_path for cn in mms] == ["a", "<Linear outside the model>"]
    assert GLOBAL_LINEAR.weight.device.type == "cpu"


def _work(cap):
    """Every op a capture stands for, with its cost, as a multiset: equal captures do equal work."""
    from collections import Counter

    from shapeprof.costs import cost_of
    return Counter({(str(r.op), cost_of(r)): 0 for cn in cap.nodes for r in cn.records}) + Counter(
        [(str(r.op), cost_of(r)) for cn in cap.nodes for r in cn.records for _ in range(cn.repeats)])


def test_dispatch_runs_twin_layers_once_and_counts_every_one():
    from shapeprof.capture import _run_dispatch
    model = GPT(GPTConfig.tiny(n_layer=4))
    x = torch.zeros(2, 16, dtype=torch.long)
    cap = capture(model, x, method="dispatch")
    assert cap.reused > 0
    paths = {cn.module_path for cn in cap.nodes if cn.twin_of}
    assert {f"transformer.h.{i}.attn.c_attn" for i in (1, 2, 3)} <= paths
    shadow = meta_shadow(model)
    _, unshared, _ = _run_dispatch(shadow, (x.to("meta"),), {}, twins=False, fold=False)
    full = type(cap)(None, shadow, "dispatch", unshared)
    assert _work(cap) == _work(full)
    assert sum(cn.repeats for cn in cap.nodes if cn.records) == len([cn for cn in unshared if cn.records])


class Scan(nn.Module):
    """A recurrent scan written as a Python loop over time steps, like HF Mamba's slow path."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.decay = nn.Parameter(torch.rand(d))

    def forward(self, x):                      # (B, T, d)
        u = self.inp(x)
        h = torch.zeros_like(u[:, 0])
        outs = []
        for t in range(x.shape[1]):
            h = self.decay * h + u[:, t]       # (B, d)
            outs.append(torch.tanh(h))
        return torch.stack(outs, 1)            # (B, T, d)


def test_loop_steps_fold_into_the_step_they_repeat_with_the_same_counts():
    from shapeprof.capture import _run_dispatch
    model, x = Scan(), torch.randn(2, 300, 16)
    cap = capture(model, x, method="dispatch")
    unrolled = _run_dispatch(meta_shadow(model), (x.to("meta"),), {}, twins=False, fold=False)[1]
    unrolled_cap = type(cap)(None, model, "dispatch", unrolled)
    folded = sum(cn.repeats - 1 for cn in cap.nodes)
    assert folded > 250 * 4                                # ~298 steps of ~5 ops folded
    assert len(cap.nodes) < len(unrolled) / 20
    assert _work(cap) == _work(unrolled_cap)


def test_a_forward_drawing_random_numbers_leaves_the_callers_rng_alone():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x) + torch.rand(x.shape)      # a real CPU tensor, even when x is meta

    model, x = Noisy(), torch.randn(2, 4)
    state = torch.get_rng_state()
    for method in ("symbolic_trace", "dispatch"):    # (export cannot add a CPU tensor to a meta one)
        capture(model, x, method=method)
        assert torch.equal(torch.get_rng_state(), state), method
