"""Tests for the backward-kernel formulas at the end of shapeprof/costs.py (norms, softmax, embedding, losses,
pooling, view gradients, activations): exact integers by hand on small recorded ops, and no uncovered op left in
the training steps of the example and HuggingFace models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.cnn import SmallCNN
from examples.llama import LlamaConfig, Transformer
from examples.nanogpt import GPT, GPTConfig
from shapeprof.backward import capture_backward
from shapeprof.costs import OpCost, cost_of, has_formula
from shapeprof.records import OpRecord, OpRecorder

aten = torch.ops.aten
F32, BF16, I64 = 4, 2, 8  # bytes per element


def t(*shape, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad)


def idx(*shape) -> torch.Tensor:
    return torch.zeros(shape, device="meta", dtype=torch.long)


def recorded(name: str, fn) -> OpRecord:
    """The one record of op `name` (`aten.native_layer_norm_backward`) among those `fn()` dispatches on meta."""
    with OpRecorder() as rec:
        fn()
    found = [r for r in rec.records if r.name == name]
    assert len(found) == 1, [r.name for r in rec.records]
    return found[0]


def cost(name: str, fn) -> OpCost:
    c = cost_of(recorded(name, fn))
    assert c.covered and not c.matmul
    return c


def backward_of(fn, *inputs, grad_shape=None):
    """fn(*inputs).backward() with a contiguous gradient (a loss's sum would hand the kernel a stride-0 one)."""
    def run():
        out = fn(*inputs)
        out.backward(t(*(grad_shape or out.shape), dtype=out.dtype))
    return run


# ---------------------------------------------------------------------------------------------
# Norms


def test_layer_norm_backward_13_per_element_with_all_gradients():
    x, w, b = t(4, 8, grad=True), t(8, grad=True), t(8, grad=True)
    c = cost("aten.native_layer_norm_backward", backward_of(lambda: F.layer_norm(x, (8,), w, b)))
    # 32 elements x (x_hat 2 + grad_input 7 + weight 1 + grad_weight 2 + grad_bias 1 = 13) = 416
    # reads dy 32*4, x 32*4, mean and rstd (4, 1) 16 each, weight 32 (not the bias) = 320
    # writes grad_input 128, grad_weight 32, grad_bias 32 = 192
    assert c == OpCost(416, 320, 192)


def test_layer_norm_backward_counts_only_the_gradients_asked_for():
    g, x, mean, rstd, w, b = t(4, 8), t(4, 8), t(4, 1), t(4, 1), t(8), t(8)
    only_input = cost("aten.native_layer_norm_backward",
                      lambda: aten.native_layer_norm_backward(g, x, [8], mean, rstd, w, b, [True, False, False]))
    assert only_input == OpCost(32 * (2 + 7 + 1), 320, 128)          # x_hat 2, grad_input 7 + weight 1
    no_weight = cost("aten.native_layer_norm_backward",
                     lambda: aten.native_layer_norm_backward(g, x, [8], mean, rstd, None, None, [True, False, False]))
    assert no_weight == OpCost(32 * (2 + 7), 320 - 32, 128)          # no g = dy * w, no weight read
    params_only = cost("aten.native_layer_norm_backward",
                       lambda: aten.native_layer_norm_backward(g, x, [8], mean, rstd, w, b, [False, True, True]))
    assert params_only == OpCost(32 * (2 + 2 + 1), 320, 64)          # x_hat 2, grad_weight 2, grad_bias 1


def test_group_norm_backward_counts_as_layer_norm():
    x, w, b = t(2, 4, 3, 3, grad=True), t(4, grad=True), t(4, grad=True)
    c = cost("aten.native_group_norm_backward", backward_of(lambda: F.group_norm(x, 2, w, b)))
    # 72 elements x 13 = 936; reads dy 288, x 288, mean and rstd (2, 2) 16 each, weight 16 = 624;
    # writes 288 + 16 + 16 = 320
    assert c == OpCost(936, 624, 320)


@pytest.mark.skipif(not hasattr(aten, "_fused_rms_norm_backward"), reason="torch without _fused_rms_norm")
def test_rms_norm_backward():
    g, x, rstd, w = t(2, 8), t(2, 8), t(2, 1), t(8)
    both = cost("aten._fused_rms_norm_backward",
                lambda: aten._fused_rms_norm_backward(g, x, [8], rstd, w, [True, True]))
    # 16 elements x (x * rstd 1 + grad_input 5 + weight 1 + grad_weight 2 = 9) = 144
    # reads dy 64, x 64, rstd 8, weight 32 = 168; writes 64 + 32 = 96
    assert both == OpCost(144, 168, 96)
    input_only = cost("aten._fused_rms_norm_backward",
                      lambda: aten._fused_rms_norm_backward(g, x, [8], rstd, w, [True, False]))
    assert input_only == OpCost(16 * 7, 168, 64)


def test_batch_norm_backward_training_9_per_element():
    x, w, b = t(2, 4, 3, 3, grad=True), t(4, grad=True), t(4, grad=True)
    rm, rv = t(4), t(4)
    c = cost("aten.native_batch_norm_backward",
             backward_of(lambda: F.batch_norm(x, rm, rv, w, b, training=True)))
    # 72 elements x (x_hat 2 + sum(dy) 1 + sum(dy * x_hat) 2 + grad_input 4 = 9) = 648
    # reads dy 288, x 288, weight 16, save_mean and save_invstd 16 each (not the running stats) = 624
    # writes 288 + 16 + 16 = 320
    assert c == OpCost(648, 624, 320)


def test_batch_norm_backward_inference_and_masks():
    g, x, w, rm, rv, sm, si = t(2, 4, 3, 3), t(2, 4, 3, 3), t(4), t(4), t(4), t(4), t(4)

    def bn(train, mask):
        return cost("aten.native_batch_norm_backward",
                    lambda: aten.native_batch_norm_backward(g, x, w, rm, rv, sm, si, train, 1e-5, mask))
    # inference: grad_input 1, grad_weight (x_hat 2 + dy * x_hat 1 + sum 1) 4, grad_bias 1 = 6; reads the running stats
    assert bn(False, [True, True, True]) == OpCost(72 * 6, 624, 320)
    assert bn(False, [True, False, False]) == OpCost(72 * 1, 624, 288)
    # training without grad_input: x_hat 2, sum(dy) 1, sum(dy * x_hat) 2 = 5
    assert bn(True, [False, True, True]) == OpCost(72 * 5, 624, 32)


def test_cudnn_miopen_and_batch_norm_backward_count_as_training():
    g, x, w, rm, rv, sm, sv = t(2, 4, 3, 3), t(2, 4, 3, 3), t(4), t(4), t(4), t(4), t(4)
    reserve = t(16, dtype=torch.uint8)
    cudnn = cost("aten.cudnn_batch_norm_backward",
                 lambda: aten.cudnn_batch_norm_backward(x, g, w, rm, rv, sm, sv, 1e-5, reserve))
    assert cudnn == OpCost(648, 624 + 16, 320)                       # + the 16-byte reserve space it reads
    miopen = cost("aten.miopen_batch_norm_backward",
                  lambda: aten.miopen_batch_norm_backward(x, g, w, rm, rv, sm, sv, 1e-5))
    assert miopen == OpCost(648, 624, 320)
    new = cost("aten.batch_norm_backward",
               lambda: aten.batch_norm_backward(g, x, w, rm, rv, sm, sv, True, 1e-5, [True, True, True], reserve))
    assert new == OpCost(648, 624 + 16, 320)
    no_update = cost("aten.batch_norm_backward", lambda: aten.batch_norm_backward(
        g, x, w, rm, rv, sm, sv, False, 1e-5, [True, True, True], reserve))
    assert no_update.flops == 72 * 6                                 # update=False: running statistics


# ---------------------------------------------------------------------------------------------
# Softmax, embedding, losses


@pytest.mark.parametrize("fn, name", [(torch.softmax, "aten._softmax_backward_data"),
                                      (torch.log_softmax, "aten._log_softmax_backward_data")])
def test_softmax_backward_4_per_element(fn, name):
    x = t(4, 8, grad=True)
    c = cost(name, backward_of(lambda: fn(x, -1)))
    # 32 x 4 = 128; reads dy and the saved output, 128 each; writes 128
    assert c == OpCost(128, 256, 128)


def test_embedding_dense_backward_is_a_scatter_add_into_a_zero_filled_weight_gradient():
    weight, ids = t(10, 4, grad=True), idx(2, 3)
    c = cost("aten.embedding_dense_backward", backward_of(lambda: F.embedding(ids, weight)))
    # 6 rows of 4 added: 24 FLOPs; reads dy (2, 3, 4) 96 and the indices 6*8 = 48
    # writes the zero fill 10*4*4 = 160 and the 6 touched rows over it 6*4*4 = 96
    assert c == OpCost(24, 144, 256)
    scaled = cost("aten.embedding_dense_backward",
                  backward_of(lambda: F.embedding(ids, weight, scale_grad_by_freq=True)))
    assert scaled == OpCost(48, 144, 256)                            # + 1 divide per element


def test_embedding_dense_backward_touches_at_most_every_row_once():
    g, ids = t(6, 4, dtype=torch.bfloat16), idx(6)
    c = cost("aten.embedding_dense_backward", lambda: aten.embedding_dense_backward(g, ids, 4, -1, False))
    # reads dy 6*4*2 = 48, indices 48; writes the fill 4*4*2 = 32 and at most 4 distinct rows 32
    assert c == OpCost(24, 96, 64)


def test_nll_loss_backward_writes_the_zero_fill_and_one_element_per_target():
    logp, target = t(4, 5, grad=True), idx(4)
    c = cost("aten.nll_loss_backward", backward_of(lambda: F.nll_loss(logp, target)))
    # 1 per target: 4; reads dy () 4, target 32, total_weight () 4 = 40 (not the input)
    # writes the fill 4*5*4 = 80 and the 4 picked elements 16
    assert c == OpCost(4, 40, 96)
    weighted = cost("aten.nll_loss_backward", backward_of(lambda: F.nll_loss(logp, target, weight=t(5))))
    assert weighted == OpCost(4, 40 + 20, 96)                        # + the class weights (5,)


def test_nll_loss2d_backward():
    x, target = t(2, 5, 3, 3, grad=True), idx(2, 3, 3)
    c = cost("aten.nll_loss2d_backward", backward_of(lambda: F.cross_entropy(x, target)))
    # 18 targets; reads dy 4, target 18*8 = 144, total_weight 4 = 152; writes 2*5*9*4 = 360 + 18*4 = 72
    assert c == OpCost(18, 152, 432)


def test_mse_loss_backward_2_per_element():
    x, y = t(4, 8, grad=True), t(4, 8)
    c = cost("aten.mse_loss_backward", backward_of(lambda: F.mse_loss(x, y)))
    # 32 x (subtract 1, multiply 1) = 64; reads dy () 4, x 128, target 128; writes 128
    assert c == OpCost(64, 260, 128)


# ---------------------------------------------------------------------------------------------
# Pooling


def test_max_pool_backward_one_add_per_output_gradient():
    x = t(1, 2, 4, 4, grad=True)
    c = cost("aten.max_pool2d_with_indices_backward", backward_of(lambda: F.max_pool2d(x, 2)))
    # dy (1, 2, 2, 2): 8 adds; reads dy 32 and the indices 64 (not the input); writes (1, 2, 4, 4) 128
    assert c == OpCost(8, 96, 128)
    x3 = t(1, 1, 4, 4, 4, grad=True)
    c3 = cost("aten.max_pool3d_with_indices_backward", backward_of(lambda: F.max_pool3d(x3, 2)))
    assert c3 == OpCost(8, 96, 256)                                  # dy (1, 1, 2, 2, 2); writes 64*4
    adaptive = cost("aten.adaptive_max_pool2d_backward", backward_of(lambda: F.adaptive_max_pool2d(x, 2)))
    assert adaptive == OpCost(8, 96, 128)


def test_avg_pool_backward_spreads_each_gradient_over_its_window():
    x = t(1, 1, 4, 4, grad=True)
    c = cost("aten.avg_pool2d_backward", backward_of(lambda: F.avg_pool2d(x, 3, stride=1)))
    # dy (1, 1, 2, 2) x 9 window positions = 36; reads dy 16 (not the input); writes 64
    assert c == OpCost(36, 16, 64)
    x3 = t(1, 1, 4, 4, 4, grad=True)
    c3 = cost("aten.avg_pool3d_backward", backward_of(lambda: F.avg_pool3d(x3, 2)))
    assert c3 == OpCost(8 * 8, 32, 256)


def test_adaptive_avg_pool_backward_counts_the_bins_as_the_forward():
    x = t(1, 2, 5, 5, grad=True)
    c = cost("aten._adaptive_avg_pool2d_backward", backward_of(lambda: F.adaptive_avg_pool2d(x, 3)))
    # 5 -> 3 bins: [0, 2), [1, 4), [3, 5): widths 2 + 3 + 2 = 7 per dim; 7*7 per channel x 2 = 98
    # reads dy (1, 2, 3, 3) 72; writes (1, 2, 5, 5) 200
    assert c == OpCost(98, 72, 200)
    x3 = t(1, 1, 4, 4, 4, grad=True)
    c3 = cost("aten._adaptive_avg_pool3d_backward", backward_of(lambda: F.adaptive_avg_pool3d(x3, 2)))
    assert c3 == OpCost(64, 32, 256)                                 # bins 2 + 2 per dim: 4*4*4


# ---------------------------------------------------------------------------------------------
# Gradients of views and of activations


def test_view_backwards_write_a_zero_filled_tensor_and_the_viewed_part():
    x = t(5, 3, 4, grad=True)
    select = cost("aten.select_backward", backward_of(lambda: x[1]))
    # 0 FLOPs; reads dy (3, 4) 48; writes the fill 5*3*4*4 = 240 and the slice 48
    assert select == OpCost(0, 48, 288)
    y = t(6, 4, grad=True)
    sliced = cost("aten.slice_backward", backward_of(lambda: y[1:5:2]))
    assert sliced == OpCost(0, 32, 96 + 32)                          # dy (2, 4)
    z = t(4, 4, grad=True)
    diagonal = cost("aten.diagonal_backward", backward_of(lambda: torch.diagonal(z)))
    assert diagonal == OpCost(0, 16, 64 + 16)                        # dy (4,)


@pytest.mark.parametrize("fn, name", [
    (F.hardswish, "aten.hardswish_backward"), (F.hardsigmoid, "aten.hardsigmoid_backward"),
    (F.leaky_relu, "aten.leaky_relu_backward"), (F.elu, "aten.elu_backward"),
    (F.softplus, "aten.softplus_backward"), (F.hardtanh, "aten.hardtanh_backward"),
    (F.softshrink, "aten.softshrink_backward"), (F.hardshrink, "aten.hardshrink_backward"),
])
def test_untagged_activation_backwards_count_1_per_element(fn, name):
    x = t(4, 8, grad=True)
    c = cost(name, backward_of(lambda: fn(x)))
    # 32 x 1; reads dy and x (or elu's result) 128 each; writes 128
    assert c == OpCost(32, 256, 128)


def test_log_sigmoid_backward_reads_its_buffer():
    x = t(4, 8, grad=True)
    r = recorded("aten.log_sigmoid_backward", backward_of(lambda: F.logsigmoid(x)))
    buffer = r.args[2].nbytes
    assert cost_of(r) == OpCost(32, 256 + buffer, 128)


def test_tagged_activation_backwards_stay_on_the_pointwise_rule():
    # 1 per element already, by the pointwise tag: this section registers nothing for them
    x = t(4, 8, grad=True)
    for fn, name in [(F.gelu, "aten.gelu_backward"), (F.silu, "aten.silu_backward"),
                     (torch.tanh, "aten.tanh_backward"), (torch.sigmoid, "aten.sigmoid_backward"),
                     (F.relu, "aten.threshold_backward")]:
        assert cost(name, backward_of(lambda: fn(x))) == OpCost(32, 256, 128), name


def test_the_softmax_backwards_name_an_argument_output_but_get_their_outputs_right():
    # their schema's `output` is the saved softmax output; the formula reads dy's shape, the bytes the default rule
    assert has_formula(aten._softmax_backward_data) and has_formula(aten._log_softmax_backward_data.out)
    g, y = t(3, 5), t(3, 5)
    c = cost("aten._softmax_backward_data", lambda: aten._softmax_backward_data(g, y, 1, torch.float32))
    assert c == OpCost(60, 120, 60)


# ---------------------------------------------------------------------------------------------
# Whole training steps: nothing left uncovered

B, T = 2, 16
try:
    import transformers
    transformers.logging.set_verbosity_error()
except ImportError:   # the HuggingFace models are then skipped, the rest still run
    transformers = None


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())   # (B*T, vocab), (B*T,)


def _models():
    """name -> (model built on meta, args, kwargs for capture_backward)."""
    ids = torch.zeros(B, T, dtype=torch.long, device="meta")
    found = {}
    with torch.device("meta"):
        found["nanogpt"] = GPT(GPTConfig.tiny()), (ids, ids), {}          # returns (logits, loss)
        found["cnn"] = SmallCNN(), (t(B, 3, 32, 32),), dict(loss_fn=F.cross_entropy, targets=(idx(B),))
        found["llama"] = Transformer(LlamaConfig.tiny()), (ids,), dict(loss_fn=_cross_entropy, targets=(ids,))
        found["encoder"] = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, batch_first=True), 2), \
            (t(B, T, 64),), {}
        if transformers is not None:
            found["hf-gpt2"] = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)), (ids,), dict(labels=ids)
            found["hf-llama"] = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)), (ids,), dict(labels=ids)
    return found


# the backward ops each training step runs that this section prices (the rest had formulas already)
PRICED_HERE = {
    "nanogpt": {"aten.native_layer_norm_backward", "aten._log_softmax_backward_data", "aten.embedding_dense_backward",
                "aten.nll_loss_backward"},
    "cnn": {"aten.native_batch_norm_backward", "aten.max_pool2d_with_indices_backward",
            "aten._log_softmax_backward_data", "aten.nll_loss_backward"},
    "llama": {"aten._log_softmax_backward_data", "aten.embedding_dense_backward", "aten.select_backward",
              "aten.nll_loss_backward"},
    "hf-gpt2": {"aten.native_layer_norm_backward", "aten._log_softmax_backward_data",
                "aten.embedding_dense_backward", "aten.nll_loss_backward"},
    "hf-llama": {"aten._log_softmax_backward_data", "aten.embedding_dense_backward", "aten.slice_backward",
                 "aten.nll_loss_backward"},
    "encoder": {"aten.select_backward", "aten.native_layer_norm_backward"},
}


@pytest.fixture(scope="module")
def training_steps():
    return {name: capture_backward(model, *args, **kwargs) for name, (model, args, kwargs) in _models().items()}


@pytest.mark.parametrize("name", list(PRICED_HERE))
def test_training_step_has_no_uncovered_op(training_steps, name):
    if name not in training_steps:
        pytest.skip("transformers is not installed")
    p = training_steps[name]
    assert [o.op for o in p.uncovered] == []
    backward_ops = {o.op for o in p.ops if o.phase == "backward"}
    assert PRICED_HERE[name] <= backward_ops
    # every one has its FLOPs counted, but the view gradients: data movement, 0 FLOPs by convention
    assert all(o.flops > 0 for o in p.ops if o.op in PRICED_HERE[name] - {"aten.select_backward", "aten.slice_backward"})


def test_nanogpt_layer_norm_backward_totals(training_steps):
    norm = next(o for o in training_steps["nanogpt"].ops if o.op == "aten.native_layer_norm_backward")
    # 5 calls (2 per block + ln_f), each on x (2, 16, 64) = 2048 elements with all three gradients: 13 per element
    assert norm.count == 5 and norm.flops == 5 * 2048 * 13
    # each reads dy and x 8192 each, mean and rstd (2, 16, 1) 128 each, weight 256 (not the bias);
    # writes grad_input 8192, grad_weight and grad_bias 256 each
    assert norm.bytes == 5 * ((2 * 8192 + 2 * 128 + 256) + (8192 + 2 * 256))


def test_nanogpt_embedding_and_loss_backward_totals(training_steps):
    ops = {o.op: o for o in training_steps["nanogpt"].ops if o.phase == "backward"}
    emb = ops["aten.embedding_dense_backward"]
    # wte (256, 64) from idx (2, 16): dy 2048 elements; wpe (64, 64) from pos (16,): dy (16, 64), summed over the
    # batch first, 1024 elements -> 3072 adds
    # wte: reads dy 8192 + idx 32*8 = 8448; writes the fill 256*64*4 = 65536 + 32 touched rows 32*64*4 = 8192
    # wpe: reads dy 4096 + pos 16*8 = 4224; writes the fill 64*64*4 = 16384 + 16 rows 4096
    assert emb.count == 2 and emb.flops == 3072
    assert emb.bytes == (8448 + 65536 + 8192) + (4224 + 16384 + 4096)
    lsm = ops["aten._log_softmax_backward_data"]
    # logits (32, 256): 8192 x 4 = 32768; reads dy and the saved output, writes the gradient: 3 x 32768 bytes
    assert (lsm.flops, lsm.bytes) == (32768, 3 * 32768)
    nll = ops["aten.nll_loss_backward"]
    # 32 targets; reads dy () 4, targets 256, total_weight () 4; writes the fill 32768 + the 32 picked 128
    assert (nll.flops, nll.bytes) == (32, 4 + 256 + 4 + 32768 + 128)
