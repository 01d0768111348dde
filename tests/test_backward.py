"""Tests for shapeprof/backward.py: a training step's forward and backward, captured on meta, against FlopCounterMode,
against what autograd saves on a real CPU run, and against hand counts."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from examples.cnn import SmallCNN
from examples.nanogpt import GPT, GPTConfig
from shapeprof.backward import LOSS, UNATTRIBUTED, capture_backward

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

B, T = 2, 16


def flop_counts(run) -> dict[str, int]:
    """FlopCounterMode's integers per op over `run()` (which runs a forward and loss.backward())."""
    with FlopCounterMode(display=False) as counter:
        run()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    # no dropout: see test_saved_activations_match_a_real_cpu_run
    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def transformer_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2)


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# FLOPs against FlopCounterMode


def fused_attention_flops(batch_heads_shape, head_dim) -> tuple[int, int]:
    """FlopCounterMode's (forward, backward) FLOPs of one flash attention call of these shapes, on meta: its own
    formulas for the fused kernels a GPU runs (its backward counts the kernel's recompute of Q K^T)."""
    q = torch.empty(*batch_heads_shape, T, head_dim, device="meta", requires_grad=True)
    counts = flop_counts(lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, True)[0]
                         .backward(torch.empty(*batch_heads_shape, T, head_dim, device="meta")))
    return (counts["aten._scaled_dot_product_flash_attention"],
            counts["aten._scaled_dot_product_flash_attention_backward"])


def test_nanogpt_flops_equal_flop_counter_on_every_op_class():
    config = GPTConfig.tiny()   # 2 layers, 4 heads of 16, n_embd 64, vocab 256
    with torch.device("meta"):
        model = GPT(config)
    idx = torch.zeros(B, T, dtype=torch.long, device="meta")
    p = capture_backward(model, idx, idx)
    ours = p.flops_by_op()
    theirs = flop_counts(lambda: model(idx, idx)[1].backward())
    # Linears: forward addmm per layer 2*32*64*(192 + 64 + 256 + 256) = 3,145,728, x 2 layers; lm_head (no bias)
    # forward mm 2*32*64*256 = 1,048,576; backward: every Linear's input- and weight-grad mm, 2x its forward
    assert ours["aten.addmm"] == theirs["aten.addmm"] == 2 * 3_145_728
    assert ours["aten.mm"] == theirs["aten.mm"] == 1_048_576 + 2 * (2 * 3_145_728 + 1_048_576)
    # Attention: on meta, FlopCounterMode sees torch's math path (no fused kernel runs on meta): forward 2 bmm, backward
    # 4, each 2*B*nh*T*T*hs = 65,536 over all T*T scores
    assert theirs["aten.bmm"] == config.n_layer * 6 * 2 * (B * 4) * T * T * 16
    assert set(theirs) == {"aten.addmm", "aten.mm", "aten.bmm"}
    # shapeprof prices the fused kernels a GPU runs (flash: forward 2 matmuls, backward 5 with the recompute of
    # Q K^T, FlopCounterMode's own formulas for them) over the causal half computed: T*(T+1)/2 = 136 of the
    # 256 scores, an exact factor of 17/32
    fwd, bwd = fused_attention_flops((B, 4), 16)
    assert (fwd, bwd) == (2 * 8 * 256 * 32, 2 * 8 * 256 * 80)
    assert ours["aten.scaled_dot_product_attention"] * 32 == config.n_layer * fwd * 17
    assert ours["aten._scaled_dot_product_flash_attention_backward"] * 32 == config.n_layer * bwd * 17
    assert "aten.bmm" not in ours


def test_nanogpt_manual_attention_equals_flop_counter_exactly():
    # flash=False spells attention out (q @ k^T, masked_fill, softmax, @ v): every op class FlopCounterMode counts
    # is one shapeprof counts the same way
    config = GPTConfig.tiny(flash=False)
    with torch.device("meta"):
        model = GPT(config)
    idx = torch.zeros(B, T, dtype=torch.long, device="meta")
    ours = capture_backward(model, idx, idx).flops_by_op()
    theirs = flop_counts(lambda: model(idx, idx)[1].backward())
    assert theirs == {op: ours[op] for op in theirs}
    assert theirs["aten.bmm"] == config.n_layer * 6 * 2 * (B * 4) * T * T * 16


def test_conv_net_flops_equal_flop_counter_on_every_op_class():
    with torch.device("meta"):
        model = SmallCNN(num_classes=10)
    x = torch.empty(B, 3, 32, 32, device="meta")
    ours = capture_backward(model, x).flops_by_op()
    theirs = flop_counts(lambda: model(x).sum().backward())
    assert theirs == {op: ours[op] for op in theirs}
    assert set(theirs) == {"aten.convolution", "aten.convolution_backward", "aten.addmm", "aten.mm"}
    # 2 x batch x prod(weight) x output positions: 2*2*(32*3*9)*32*32 + 2*2*(64*32*9)*16*16 + 2*2*(128*64*9)*8*8
    conv = [3_538_944, 18_874_368, 18_874_368]
    assert ours["aten.convolution"] == sum(conv)
    # backward: the first conv's input needs no gradient (output_mask [False, True, False]): its weight grad only;
    # the others compute input and weight grads, each the forward's count
    assert ours["aten.convolution_backward"] == conv[0] + 2 * conv[1] + 2 * conv[2]
    # classifier Linear(128, 10): addmm 2*2*128*10 forward; mm for its weight and input grads
    assert (ours["aten.addmm"], ours["aten.mm"]) == (5_120, 2 * 5_120)


def test_hf_llama_on_cpu_flops_equal_flop_counter():
    model = tiny_llama()
    ids = tokens()
    p = capture_backward(model, ids, labels=ids)
    theirs = flop_counts(lambda: model(ids, labels=ids).loss.backward())   # real weights, on the CPU
    model.zero_grad(set_to_none=True)
    ours = p.flops_by_op()
    # every op class FlopCounterMode counts: the Linears' mm (no biases). It has no formula for the CPU's attention
    # kernel (aten._scaled_dot_product_flash_attention_for_cpu), so it counts no attention here
    assert set(theirs) == {"aten.mm"}
    assert theirs == {op: ours[op] for op in theirs}
    # per layer: q, o 64x64; k, v 64x32 (2 kv heads of 16); gate, up, down 64x128; lm_head 64x256; 32 tokens
    linears = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 256
    assert ours["aten.mm"] == 3 * 2 * B * T * linears   # forward + input grad + weight grad
    assert p.unattributed_ops == 0


# ---------------------------------------------------------------------------------------------
# Saved activations against a real run


def real_saved_bytes(model: nn.Module, loss_of) -> int:
    """What autograd saves on a real CPU run of `loss_of()`: unique storages, the model's parameters and buffers
    left out."""
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved.setdefault(storage._cdata, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


@pytest.mark.parametrize("which", ["TransformerEncoder", "GPT2", "Llama"])
def test_saved_activations_match_a_real_cpu_run(which):
    # Dropout is 0 in all three: with dropout, the CPU's fused attention kernel declines and torch runs the math
    # path, which saves the T x T probabilities; a GPU's flash kernel (what shapeprof prices) takes dropout and
    # saves no score matrix. Without it both run a fused kernel that saves q, k, v, the output and the logsumexp.
    ids = tokens()
    if which == "TransformerEncoder":
        model, x = transformer_encoder(), torch.randn(B, T, 64)
        ours = capture_backward(model, x)
        real = real_saved_bytes(model, lambda: model(x).sum())
    else:
        model = tiny_gpt2() if which == "GPT2" else tiny_llama()
        ours = capture_backward(model, ids, labels=ids)
        real = real_saved_bytes(model, lambda: model(ids, labels=ids).loss)
    assert abs(ours.saved_activation_bytes - real) <= 0.02 * real
    # the flash kernel also saves its two 8-byte RNG tensors (seed (2,), offset ()), which the CPU kernel does not:
    # 24 B per attention layer is all that differs
    assert ours.saved_activation_bytes - real == 2 * 24
    assert ours.saved_parameter_bytes > 0


# ---------------------------------------------------------------------------------------------
# Each backward op tied to its module


def two_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("input_grad", [False, True])
def test_linear_backward_is_tied_to_its_module(input_grad):
    model = two_linears()
    x = torch.randn(B, 8, requires_grad=input_grad)
    p = capture_backward(model, x)
    first, relu, last = p.modules["0"], p.modules["1"], p.modules["2"]
    # forward: addmm 2*2*8*16 and 2*2*16*4; ReLU 1 FLOP per element of (2, 16); the loss's sum over (2, 4)
    assert (first.forward.flops, relu.forward.flops, last.forward.flops) == (512, 32, 256)
    assert p.modules[LOSS].forward.flops == 8
    # last layer: input-grad mm 2*2*4*16 + weight-grad mm 2*4*2*16 (2x its forward) + bias grad, a sum over the
    # batch of grad (2, 4): 8
    assert last.backward.flops == 2 * 256 + 8
    # ReLU: threshold_backward, 1 per element
    assert relu.backward.flops == 32
    # first layer: weight-grad mm 512 + bias-grad sum over (2, 16) 32; its input-grad mm only if x needs a gradient
    assert first.backward.flops == (2 * 512 if input_grad else 512) + 32
    # what autograd really runs: FlopCounterMode over the real backward on the CPU
    loss = model(x).sum()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert counter.get_total_flops() == p.flops_by_op("backward")["aten.mm"] == 2 * 256 + (2 if input_grad else 1) * 512
    assert p.unattributed_ops == 0 and UNATTRIBUTED not in p.modules


def test_nothing_unattributed_on_nanogpt_and_hf_llama():
    ids = tokens()
    for p in (capture_backward(GPT(GPTConfig.tiny()), ids, ids), capture_backward(tiny_llama(), ids, labels=ids)):
        assert p.unattributed_ops == 0
        assert p.backward.ops == sum(m.backward.ops for m in p.modules.values())
        assert p.forward.flops == sum(m.forward.flops for m in p.modules.values())


def test_nanogpt_backward_rolls_up_by_block():
    ids = tokens()
    p = capture_backward(GPT(GPTConfig.tiny()), ids, ids)
    block = p.subtree("transformer.h.0")
    # the block's Linears: addmm 3,145,728 forward, twice that backward (all their inputs need gradients)
    linear_paths = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    linears = [p.modules[f"transformer.h.0.{name}"] for name in linear_paths]
    assert sum(m.forward.flops for m in linears) == 3_145_728
    assert block.forward.flops > 3_145_728 and block.backward.flops > 2 * 3_145_728
    # the loss is the model's own (inside it): the whole model is every op but the loss's seed gradient
    whole = p.subtree("")
    assert (whole.forward.flops, whole.backward.flops) == (p.forward.flops, p.backward.flops)
    assert whole.backward.ops == p.backward.ops - p.modules[LOSS].backward.ops


# ---------------------------------------------------------------------------------------------
# The loss


def test_loss_sources():
    ids = tokens()
    hf = capture_backward(tiny_llama(), ids, labels=ids)
    assert hf.loss_source == "model .loss"
    gpt = capture_backward(GPT(GPTConfig.tiny()), ids, ids)   # returns (logits, loss)
    assert gpt.loss_source == "output[1]"
    plain = capture_backward(two_linears(), torch.randn(B, 8))
    assert plain.loss_source == "output.sum()"
    assert any("output.sum()" in note for note in plain.notes)
    given = capture_backward(two_linears(), torch.randn(B, 8), loss_fn=F.cross_entropy,
                             targets=(torch.zeros(B, dtype=torch.long),))
    assert given.loss_source == "loss_fn" and not any("sum()" in note for note in given.notes)
    # the loss is computed outside the model: its ops, and its gradient's, are filed under (loss)
    assert given.modules[LOSS].forward.ops > 0 and given.modules[LOSS].backward.ops > 0


# ---------------------------------------------------------------------------------------------
# Errors


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x).detach()


def test_errors_are_one_line_and_say_why():
    x = torch.randn(B, 8)
    frozen = two_linears().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters") as e:
        capture_backward(frozen, x)
    assert "\n" not in str(e.value)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode") as e:
        capture_backward(two_linears(), x)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not differentiable") as e:
        capture_backward(Detached(), x)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="W8A8"):
        capture_backward(two_linears(), x, dtype="int8")


# ---------------------------------------------------------------------------------------------
# The user's model


def snapshot(model: nn.Module) -> dict:
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": [p.grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(d) for m in model.modules() for k, d in vars(m).items()
                     if k.startswith("_") and "hooks" in k and isinstance(d, dict)),
    }


def test_the_users_model_is_unchanged():
    model = tiny_llama()
    model.model.layers[1].requires_grad_(False)   # a frozen part stays frozen
    model.model.embed_tokens.eval()               # a mode set on a part stays so
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    before = snapshot(model)
    ids = tokens()
    p = capture_backward(model, ids, labels=ids)
    after = snapshot(model)
    assert after["values"].keys() == before["values"].keys()
    for k, v in before["values"].items():
        assert torch.equal(after["values"][k], v), k
        assert after["values"][k].device.type == "cpu"
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"])
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"] >= 1
    assert calls == []   # the user's hook never saw our meta run
    # the frozen layer's Linears compute input grads only: no weight-grad mm
    frozen, trained = p.modules["model.layers.1.mlp.down_proj"], p.modules["model.layers.0.mlp.down_proj"]
    assert trained.backward.flops == 2 * frozen.backward.flops == 2 * frozen.forward.flops == 2 * 2 * B * T * 128 * 64


def test_inputs_are_unchanged():
    model, x = two_linears(), torch.randn(B, 8, requires_grad=True)
    before = x.detach().clone()
    capture_backward(model, x)
    assert x.grad is None and x.requires_grad and x.device.type == "cpu" and torch.equal(x.detach(), before)


# ---------------------------------------------------------------------------------------------
# Pricing and output


def test_dtype_spec_and_json():
    model, x = two_linears(), torch.randn(B, 8)
    fp32 = capture_backward(model, x)
    bf16 = capture_backward(model, x, dtype="bf16", spec="h100-sxm")
    assert (fp32.dtype, bf16.dtype) == (None, "bfloat16")
    assert (fp32.spec, bf16.spec) == ("a100-80gb-sxm", "h100-sxm")
    assert (bf16.forward.flops, bf16.backward.flops) == (fp32.forward.flops, fp32.backward.flops)
    assert 2 * bf16.saved_activation_bytes == fp32.saved_activation_bytes
    assert fp32.forward.seconds > 0 and fp32.backward.seconds > 0
    assert fp32.seconds == fp32.forward.seconds + fp32.backward.seconds
    data = json.loads(json.dumps(fp32.to_dict()))
    assert data["loss_source"] == "output.sum()"
    assert data["backward"]["flops"] == fp32.backward.flops
    assert data["backward"]["bytes"] == fp32.backward.bytes_read + fp32.backward.bytes_written
    assert [m["path"] for m in data["modules"]] == list(fp32.modules)
    assert data["modules"][0]["backward"]["flops"] == fp32.modules["0"].backward.flops


def test_uncovered_backward_ops_are_listed_with_their_bytes():
    p = capture_backward(nn.Sequential(nn.Linear(8, 16), nn.GLU()), torch.randn(4, 8))
    glu = {(o.op, o.phase): o for o in p.uncovered}[("aten.glu_backward", "backward")]
    # reads the sum's gradient (a stride-0 expand: 4 B) and the input (4, 16) fp32 256 B; writes (4, 16) 256 B
    assert glu.count == 1 and glu.flops == 0 and glu.bytes == 4 + 256 + 256
    assert json.dumps(p.to_dict()["uncovered"])


def test_masked_attention_runs_the_memory_efficient_kernel():
    # a mask tensor (not a causal one, which nn.TransformerEncoder would turn into is_causal): the memory-efficient
    # kernel (flash takes no mask), forward and backward
    model = transformer_encoder()
    x = torch.randn(B, T, 64)
    mask = torch.zeros(T, T).masked_fill(torch.eye(T, dtype=torch.bool), float("-inf"))   # no attending to oneself
    # is_causal=False: else nn.TransformerEncoder compares the mask with a causal one (.item(): no value on meta)
    p = capture_backward(model, x, mask=mask, is_causal=False)
    ops = p.flops_by_op("backward")
    # backward: 5 matmuls per score, all T*T of them (a mask tensor is priced in full): 2*B*nh*T*T*(3+2)*hs
    assert ops["aten._scaled_dot_product_efficient_attention_backward"] == 2 * 2 * (B * 4) * T * T * 5 * 16
    assert not any("math path" in note for note in p.notes)


def test_forward_flops_are_analyzes():
    # one convention for the forward: capture_backward's forward (the loss's ops aside) is what analyze counts
    from examples.llama import LlamaConfig, Transformer
    from shapeprof import analyze

    ids = tokens()
    for model, args in ((GPT(GPTConfig.tiny()), (ids, ids)), (Transformer(LlamaConfig.tiny()), (ids,))):
        p = capture_backward(model, *args)
        loss = p.modules[LOSS].forward.flops if LOSS in p.modules else 0
        assert p.forward.flops - loss == analyze(model, *args).total.flops


class ReadsAValue(nn.Module):
    def forward(self, x):
        return x * x.sum().item()   # a value: meta tensors have none


def test_a_forward_that_cannot_run_on_meta_names_the_module():
    model = nn.Sequential(nn.Linear(8, 8), ReadsAValue())
    with pytest.raises(RuntimeError, match=r"Sequential's forward cannot run on meta tensors in module '1'") as e:
        capture_backward(model, torch.randn(B, 8))
    assert "\n" not in str(e.value)
