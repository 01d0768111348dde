"""The drop-in stays right after what users do to models: train them, hook them, wrap them, cast them, compile them.

Every test optimizes a model, changes it the way users do, and compares the drop-in's output with the original
model's (or with the same change made to a plain copy): the oracle is the user's own module, never shapeprof.
"""
import copy
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shapeprof
from shapeprof.rewrites import packed_weights
from shapeprof.rewrites.fuse_linear_activation import fused_linear_activation
from examples.mlp import MLP


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def fused_calls(module: nn.Module) -> int:
    return sum(sum(1 for n in type(m)._shapeprof_graph_module.graph.nodes if n.target is fused_linear_activation)
               for m in module.modules() if hasattr(type(m), "_shapeprof_graph_module"))


def optimized(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    fast = shapeprof.optimize(model, x, **kw)
    assert fused_calls(fast) > 0, fast.shapeprof_report
    return fast


def same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    # optimize's own promise (Tolerance.for_output): a fused kernel sums in another order, so each output moves by
    # about rtol x the size of the values summed; with randn weights (load_state_dict below) those reach hundreds
    with torch.no_grad():
        expected = b(x)
        tol = shapeprof.Tolerance.for_output(expected)
        torch.testing.assert_close(a(x), expected, rtol=tol.rtol, atol=tol.atol)


def mlp():
    torch.manual_seed(0)
    return MLP(d_in=64, d_hidden=256, d_out=16).eval(), torch.randn(32, 64)


# ---------------------------------------------------------------------------------------------- weights change

def test_a_fused_adam_step_on_the_original_is_seen_by_the_drop_in():
    model, x = mlp()
    fast = optimized(model, x)
    same(fast, model, x)                          # packs (or would pack) the weights on this first call
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    model(x).square().mean().backward()
    opt.step()                                    # no version bump, no new storage
    same(fast, model, x)


@pytest.mark.parametrize("how", ["data", "numpy"])
def test_writes_no_version_counter_sees_are_seen(how):
    model, x = mlp()
    fast = optimized(model, x)
    same(fast, model, x)
    for p in model.parameters():
        if how == "data":
            p.data.mul_(0.5)                      # an EMA-style update through .data
        else:
            p.detach().numpy()[...] *= 0.5        # a numpy view of the weight
    same(fast, model, x)


def test_frozen_weights_are_packed_and_repacked_after_an_in_place_update():
    model, x = mlp()
    model.requires_grad_(False)                   # frozen: the only weights packed by default
    fast = optimized(model, x)
    packed_weights._cache.clear()
    same(fast, model, x)
    assert len(packed_weights._cache) == fused_calls(fast) == 3   # 2 fused Linear + ReLU, 1 prepacked Linear
    with torch.no_grad():
        model.blocks[0][0].weight.mul_(2)        # an in-place PyTorch update: its version counter moves
    same(fast, model, x)


def test_trainable_weights_are_never_packed_by_default():
    model, x = mlp()
    fast = optimized(model, x)
    packed_weights._cache.clear()
    same(fast, model, x)
    assert len(packed_weights._cache) == 0


def test_packing_always_is_an_explicit_choice_the_report_names():
    model, x = mlp()
    fast = optimized(model, x, pack_weights="always")
    assert fast.shapeprof_report.pack_weights == "always"
    assert "NOT seen" in str(fast.shapeprof_report).replace("\n", " ")
    with pytest.raises(shapeprof.OptimizeError, match="pack_weights='sometimes'"):
        shapeprof.optimize(model, x, pack_weights="sometimes")


# ---------------------------------------------------------------------------------------------- the model changes

def test_hooks_registered_after_optimize_fire():
    model, x = mlp()
    fast = optimized(model, x)
    zero = lambda m, i, o: torch.zeros_like(o)   # noqa: E731  (an ablation: knock out the first block)
    fast.blocks[0][1].register_forward_hook(zero)
    model.blocks[0][1].register_forward_hook(zero)
    same(fast, model, x)
    scale = lambda m, args: (args[0] * 3,)       # noqa: E731
    fast.blocks[1][0].register_forward_pre_hook(scale)
    model.blocks[1][0].register_forward_pre_hook(scale)
    same(fast, model, x)


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 8)
        self.temperature = 1.0
        self.use_act = True

    def forward(self, x):
        h = self.fc1(x)
        if self.use_act:
            h = F.relu(h)
        return self.fc2(h) / self.temperature


@pytest.mark.parametrize("change", ["temperature", "use_act", "new attribute read with getattr"])
def test_attribute_changes_after_optimize_are_seen(change):
    torch.manual_seed(0)
    model, x = Tempered().eval(), torch.randn(16, 32)
    fast = optimized(model, x)
    reference = copy.deepcopy(model)
    for m in (fast, reference):
        if change == "temperature":
            m.temperature = 0.25
        elif change == "use_act":
            m.use_act = False
        else:
            m.fc2.extra = 1.0                     # the graph did not see it: no graph may run now
    same(fast, reference, x)


def test_falling_back_warns_once_naming_what_changed():
    torch.manual_seed(0)
    model, x = Tempered().eval(), torch.randn(16, 32)
    fast = optimized(model, x)
    fast.temperature = 3.0
    import sys
    sys.modules["shapeprof.dropin"]._warned.clear()   # once per process and reason: other tests may have warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fast(x)
            fast(x)
    messages = [str(w.message) for w in caught if "runs its own forward" in str(w.message)]
    assert len(messages) == 1 and "temperature changed" in messages[0] and "optimize() again" in messages[0]


class LoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


def test_swapping_or_wrapping_a_submodule_is_seen():
    model, x = mlp()
    fast = optimized(model, x)
    torch.manual_seed(1)
    lora = LoRA(fast.blocks[0][0])
    fast.blocks[0][0] = lora
    reference = copy.deepcopy(model)
    reference.blocks[0][0] = LoRA(reference.blocks[0][0])
    reference.blocks[0][0].load_state_dict(lora.state_dict())
    same(fast, reference, x)
    fast.blocks[1] = nn.Sequential(nn.Linear(256, 256), nn.Tanh())
    reference.blocks[1] = copy.deepcopy(fast.blocks[1])
    same(fast, reference, x)


def test_load_state_dict_with_assign_on_the_original_is_followed():
    model, x = mlp()
    fast = optimized(model, x)
    torch.manual_seed(2)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)       # new tensor objects in the original
    same(fast, model, x)
    assert fused_calls(fast) > 0


def test_train_mode_on_a_submodule_is_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16)
    fast = optimized(model, x)
    fast[2].train()
    model[2].train()
    torch.manual_seed(3)
    with torch.no_grad():
        a = fast(x)
    torch.manual_seed(3)
    with torch.no_grad():
        b = model(x)
    torch.testing.assert_close(a, b)


def test_quantize_dynamic_of_the_drop_in_works_like_of_the_model():
    model, x = mlp()
    fast = optimized(model, x)
    q_fast = torch.ao.quantization.quantize_dynamic(fast, {nn.Linear}, dtype=torch.qint8)
    q_model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    same(q_fast, q_model, x)
    same(fast, model, x)                          # the drop-in itself is untouched by quantizing its copy


# ---------------------------------------------------------------------------------------------- casts, compile

@pytest.mark.parametrize("cast", ["double", "half", "bfloat16"])
def test_casting_the_drop_in_works_and_leaves_the_users_model_alone(cast):
    model, x = mlp()
    fast = optimized(model, x)
    reference = getattr(copy.deepcopy(model), cast)()
    getattr(fast, cast)()
    xc = x.to(next(reference.parameters()).dtype)
    same(fast, reference, xc)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_moving_the_drop_in_leaves_the_users_model_alone():
    model, x = mlp()
    fast = optimized(model, x)
    fast.to(torch.float64)
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(fast(x.double()).float(), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_of_the_drop_in_with_the_default_backend():
    model, x = mlp()
    fast = optimized(model, x)
    compiled = torch.compile(fast)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- never slower

class SlowDown(shapeprof.rewrites.Rewrite):
    """A rewrite that is correct and much slower: every ReLU also waits 20 ms (a wait, not work, so that it is
    slower by the same margin however loaded the machine is)."""

    name, description = "slow_down", "correct and slower"

    def run(self, gm, ctx):
        result = shapeprof.rewrites.RewriteResult(self.name)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
                with gm.graph.inserting_after(node):
                    slow = gm.graph.call_function(_slow_relu, (node.args[0],))
                node.replace_all_uses_with(slow)
                gm.graph.erase_node(node)
                result.applied.append(shapeprof.rewrites.Match(node.name, "ReLU -> a ReLU that waits"))
        return result


def _slow_relu(x):
    time.sleep(0.02)
    return torch.relu(x)


torch.fx.wrap("_slow_relu")


def test_measure_undoes_a_rewrite_that_measures_slower():
    model, x = mlp()
    fast = shapeprof.optimize(model, x, rewrites=[SlowDown()], measure=True)
    [outcome] = fast.shapeprof_report.outcomes
    assert outcome.verification.ok and outcome.status == "slower"
    assert outcome.measurement.optimized_seconds > outcome.measurement.original_seconds + 0.03   # 2 x 20 ms
    assert not any(hasattr(type(m), "_shapeprof_graph_module") for m in fast.modules())   # undone
    assert "undone: measured slower" in str(fast.shapeprof_report).replace("\n", " ")
    same(fast, model, x)
