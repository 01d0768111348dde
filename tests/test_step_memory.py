"""Memory over a training step and activation checkpointing, against torch's own accounting: the allocation
events of torch.profiler on real CPU runs, FlopCounterMode over a real checkpointed step, and hand counts."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import shapeprof
from examples.cnn import SmallCNN
from examples.nanogpt import GPT, GPTConfig
from shapeprof.backward import _loss_of, blocks_of, capture_backward
from shapeprof.optimizer_step import step_temporaries
from shapeprof.step_memory import LiveBytes
from shapeprof.training import train_step

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def allocation_peak(run) -> tuple[int, int]:
    """(the most bytes allocated at once, what is left allocated) over `run()` on the CPU, as torch.profiler's
    memory events count them: what existed before is not in it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak, now


def real_step(model, args, loss_fn=None, targets=()):
    """A forward and backward on the CPU, holding the output until backward ends as a training loop does."""
    def run():
        out = model(*args)
        loss, _, _ = _loss_of(out, loss_fn, targets, "model")
        loss.backward()
    return run


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def cases():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512), nn.LayerNorm(512))
    yield "MLP", mlp, (torch.randn(64, 512),), None, ()
    gpt = GPT(GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_embd=128, dropout=0.0))
    idx = torch.randint(0, 512, (2, 128))
    yield "nanoGPT", gpt, (idx, idx), None, ()
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2)
    yield "TransformerEncoder", encoder, (torch.randn(4, 32, 64),), None, ()
    yield "SmallCNN", SmallCNN(), (torch.randn(8, 3, 32, 32),), F.cross_entropy, (torch.zeros(8, dtype=torch.long),)


@pytest.mark.parametrize("name,model,args,loss_fn,targets", list(cases()), ids=[c[0] for c in cases()])
def test_peak_over_forward_and_backward_matches_the_cpu_allocator(name, model, args, loss_fn, targets):
    model.train()
    ours = capture_backward(model, *args, loss_fn=loss_fn, targets=targets)
    peak, _ = allocation_peak(real_step(model, args, loss_fn, targets))
    model.zero_grad(set_to_none=True)
    assert abs(ours.peak_bytes - peak) <= 0.01 * peak, (ours.peak_bytes, peak)
    assert ours.peak_at.phase in ("forward", "backward") and ours.peak_at.op.startswith("aten.")


def test_peak_of_hf_llama_matches_the_cpu_allocator():
    model, ids = tiny_llama(), torch.randint(0, 512, (2, 64))
    ours = capture_backward(model, ids, labels=ids)
    def run():   # a training loop holds the output (logits and all) until the next step
        out = model(ids, labels=ids)
        out.loss.backward()
    peak, _ = allocation_peak(run)
    assert abs(ours.peak_bytes - peak) <= 0.01 * peak, (ours.peak_bytes, peak)


def test_live_bytes_by_hand():
    # Linear 1000 -> 1000, ReLU, Linear: forward keeps the ReLU's output (2 MB); the first addmm's output dies
    # with the ReLU; after backward only the four gradients are left (2 x (4 MB + 4 kB))
    net = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000)).to("meta")
    x = torch.randn(500, 1000, device="meta")
    live = LiveBytes(known=[*net.parameters(), x])
    with live.watching():
        loss = net(x).sum()
        after_forward = live.current
        loss.backward()
    assert after_forward == 500 * 1000 * 4 + 4     # the ReLU's output and the loss
    assert live.current == 2 * (1000 * 1000 + 1000) * 4 + 4   # the gradients and the loss
    live.close()


@pytest.mark.parametrize("optimizer,kwargs", [("adamw", {"foreach": True}), ("adamw", {"foreach": False}),
                                              ("adam", {"foreach": True, "weight_decay": 0.1}),
                                              ("sgd", {"foreach": True, "momentum": 0.9})])
def test_optimizer_temporaries_match_the_cpu_allocator(optimizer, kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    real = copy.deepcopy(model)
    opt = cls(real.parameters(), lr=1e-3, **kwargs)
    for p in real.parameters():
        p.grad = torch.randn_like(p)
    opt.step()   # the state is made; the steady step is measured
    peak, left = allocation_peak(opt.step)
    assert left == 0
    # (the CPU run also makes a few host scalars, 4 bytes each, that a GPU step keeps on the host)
    assert abs(step_temporaries(optimizer, model, **kwargs) - peak) <= 16


def test_fused_steps_make_no_temporaries():
    assert step_temporaries("adamw", nn.Linear(64, 64), fused=True) == 0


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


def nanogpt(flash=True):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=3, n_head=4, n_embd=64, dropout=0.0, flash=flash))


def test_checkpointed_step_flops_equal_flop_counter_over_a_real_checkpointed_step():
    # torch.utils.checkpoint applied by hand to a copy of every block, the step run under FlopCounterMode: the
    # forward runs again in backward as far as torch recomputes it (it stops after the last saved tensor)
    model = nanogpt(flash=False)
    idx = torch.randint(0, 256, (2, 64))
    ours = capture_backward(model, idx, idx, checkpoint="blocks")
    wrapped = copy.deepcopy(model)
    for path in blocks_of(wrapped):
        block = wrapped.get_submodule(path)
        block.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False))(block.forward)
    with FlopCounterMode(display=False) as counter:
        wrapped(idx, idx)[1].backward()
    theirs = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    mine = ours.flops_by_op()
    assert theirs == {op: mine[op] for op in theirs}
    plain = capture_backward(model, idx, idx)
    assert ours.forward.flops == plain.forward.flops
    assert ours.backward.flops == plain.backward.flops + ours.recompute_flops


def test_block_trades_are_what_checkpointing_does():
    # what the step without checkpointing says each block would trade is what the checkpointed step shows
    model, idx = nanogpt(), torch.randint(0, 256, (2, 64))
    plain = capture_backward(model, idx, idx)
    done = capture_backward(model, idx, idx, checkpoint="blocks")
    assert [b.path for b in plain.blocks] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert done.recompute_flops == sum(b.recompute_flops for b in plain.blocks) > 0
    assert done.saved_activation_bytes == plain.saved_activation_bytes - sum(b.saves_bytes for b in plain.blocks)
    assert done.peak_bytes < plain.peak_bytes
    assert done.blocks == () and done.checkpointed == blocks_of(model)
    one = capture_backward(model, idx, idx, checkpoint=["transformer.h.1"])
    assert one.recompute_flops == plain.blocks[1].recompute_flops
    assert [b.path for b in one.blocks] == ["transformer.h.0", "transformer.h.2"]


def test_checkpointed_activations_match_a_real_checkpointed_run():
    # the storages alive at the end of a real checkpointed forward on the CPU (torch.profiler's events) against
    # what shapeprof says the checkpointed step keeps, with the output and loss the loop holds
    model, idx = nanogpt(), torch.randint(0, 256, (2, 64))
    ours = capture_backward(model, idx, idx, checkpoint="blocks")
    wrapped = copy.deepcopy(model)
    for path in blocks_of(wrapped):
        block = wrapped.get_submodule(path)
        # (the CPU's RNG state, 5 kB, kept per block by preserve_rng_state, is not a GPU's: left out)
        block.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False,
                                                        preserve_rng_state=False))(block.forward)
    held = []
    _, kept = allocation_peak(lambda: held.append(wrapped(idx, idx)))
    logits, loss = held[0]
    outputs = logits.untyped_storage().nbytes() + loss.untyped_storage().nbytes()
    assert abs(ours.saved_activation_bytes - (kept - outputs)) <= 0.02 * (kept - outputs)
    peak, _ = allocation_peak(lambda: loss.backward())
    assert ours.peak_bytes == pytest.approx(kept + peak, rel=0.01)


def test_train_checkpoint_prices_mfu_without_and_hfu_with_the_recompute():
    model, idx = nanogpt(), torch.randint(0, 256, (2, 64))
    plain = shapeprof.analyze(model, idx, idx, train=True).training
    done = shapeprof.analyze(model, idx, idx, train=shapeprof.Train(checkpoint="blocks")).training
    assert done.model_flops == plain.model_flops
    assert done.hardware_flops - plain.hardware_flops == sum(b.recompute_flops for b in plain.blocks)
    assert done.memory["activations"] < plain.memory["activations"]
    assert done.memory["peak"] < plain.memory["peak"]
    assert done.checkpointed == ("transformer.h.0", "transformer.h.1", "transformer.h.2")
    assert done.mfu < done.hfu


def test_step_peak_is_the_larger_of_backward_and_the_optimizer_step():
    model, idx = nanogpt(), torch.randint(0, 256, (2, 64))
    step = train_step(model, idx, idx)
    m, p = step.memory, step.passes
    base = m["weights"] + m["optimizer_state"] + p.input_bytes
    temporaries = step_temporaries("adamw", model)
    assert m["peak"] == max(base + p.peak_bytes, base + p.end_bytes + temporaries)
    assert step.peak_at == (str(p.peak_at) if base + p.peak_bytes >= base + p.end_bytes + temporaries
                            else "optimizer step")
    # an MLP whose activations are small next to its weights peaks in the optimizer step (foreach's temporaries)
    wide = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048))
    assert train_step(wide, torch.randn(2, 2048)).peak_at == "optimizer step"


def test_checkpoint_errors_are_one_line():
    with pytest.raises(ValueError, match="no ModuleList of blocks"):
        capture_backward(nn.Linear(4, 4), torch.randn(2, 4), checkpoint="blocks")
    with pytest.raises(ValueError, match="has no submodule 'nope'"):
        capture_backward(nanogpt(), torch.zeros(1, 8, dtype=torch.long), checkpoint=["nope"])
    with pytest.raises(TypeError, match="checkpoint= takes"):
        capture_backward(nanogpt(), torch.zeros(1, 8, dtype=torch.long), checkpoint="everything")


@pytest.mark.parametrize("optimizer,kwargs", [("adamw", {"foreach": True}), ("adam", {"foreach": True, "amsgrad": True}),
                                              ("sgd", {"foreach": True, "momentum": 0.9, "nesterov": True}),
                                              ("adamw", {"foreach": True, "weight_decay": 0.1})])
def test_foreach_temporaries_from_representatives_equal_stepping_every_parameter(optimizer, kwargs):
    # a Llama-shaped model (many tensors, few shapes) in two param groups, as weight-decay setups split them
    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=4, n_head=4, n_embd=64, dropout=0.0))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    for params in (model, groups):
        fast = step_temporaries(optimizer, params, **kwargs)
        assert fast == step_temporaries(optimizer, params, _dedupe=False, **kwargs)
        assert fast > 0 or optimizer == "sgd"    # SGD's foreach updates in place
