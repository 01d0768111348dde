"""Tests for KV-cache insertion (rewrites/kv_cache.py, shapeprof/kvcache.py, shapeprof/sequence.py): a decoder
written without a cache, optimized, decodes incrementally and returns exactly what the original returns.

Modelled on how caches are tested where they are written with care (../shared/notes/prior-art.md): the rewritten
full forward against the original, token-by-token decoding against the full forward at every step, greedy
generation token for token, rewinds, crossing the context limit, batches; on models written in the forms people
use (nanoGPT flash and manual, a Llama with rotary tables and GQA, nn.MultiheadAttention, nn.TransformerEncoder
with a causal mask, repeat_kv by expand) and refusals on the ones a cache would change.
"""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

import shapeprof.rewrites as rewrites
from shapeprof.kvcache import CacheFull, DecodeError, KVCache, causal_attention
from shapeprof.optimize import optimize
from shapeprof.text import fmt_bytes
from examples.llama import LlamaConfig, Transformer
from examples.nanogpt import GPT, GPTConfig

CACHE = ["kv_cache"]


pytestmark = pytest.mark.usefixtures("seeded_quiet")


def outcome(fast, name="kv_cache"):
    return next(o for o in fast.shapeprof_report.outcomes if o.name == name)


def served(fast) -> dict:
    return dict(type(fast)._shapeprof_decoder.calls)


def close(a, b, atol=2e-5):
    """Every tensor leaf of a equals b's to fp32 rounding (Nones and numbers equal)."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=1e-5, atol=atol)
        else:
            assert x == y


# ---------------------------------------------------------------------------------------------- models

class MHADecoder(nn.Module):
    """A decoder-only LM on nn.MultiheadAttention (batch_first) with a boolean causal mask built per call."""

    def __init__(self, vocab=256, d=64, h=4, layers=2, ctx=64, need_weights=True):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, h, batch_first=True) for _ in range(layers))
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.need_weights = need_weights

    def forward(self, ids):
        t = ids.size(1)
        x = self.emb(ids) + self.pos(torch.arange(t, device=ids.device))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=ids.device), diagonal=1)
        for attn, ln in zip(self.attn, self.ln):
            h = ln(x)
            x = x + attn(h, h, h, attn_mask=mask, need_weights=self.need_weights)[0]
        return self.head(x)


class TorchLM(nn.Module):
    """PyTorch's word_language_model TransformerModel: (T, B) ids, nn.TransformerEncoder with a causal mask,
    sinusoidal positions sliced from a buffer, log-probabilities at every position."""

    def __init__(self, vocab=256, d=64, h=4, layers=2, causal=True):
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, h, 128, dropout=0.0)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d, vocab)
        self.causal = causal
        pe = torch.zeros(512, 1, d)
        pos = torch.arange(512).unsqueeze(1).float()
        div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
        pe[:, 0, 0::2], pe[:, 0, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)

    def forward(self, src):
        t = src.size(0)
        x = self.encoder(src) * 8.0 + self.pe[:t]
        if self.causal:
            x = self.transformer(x, nn.Transformer.generate_square_subsequent_mask(t, device=src.device),
                                 is_causal=True)
        else:
            x = self.transformer(x)
        return F.log_softmax(self.decoder(x), dim=-1)


class RepeatKV(nn.Module):
    """Grouped-query attention by expand + reshape (HF's repeat_kv), an additive float mask, and learned positions
    as a parameter sliced [:, :T]."""

    def __init__(self, vocab=256, d=64, h=4, hkv=2, layers=2, ctx=64):
        super().__init__()
        self.h, self.hkv, self.hd = h, hkv, d // h
        self.emb = nn.Embedding(vocab, d)
        self.wq = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.wkv = nn.ModuleList(nn.Linear(d, 2 * hkv * self.hd) for _ in range(layers))
        self.wo = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.pos_emb = nn.Parameter(torch.randn(1, ctx, d) * 0.02)

    def forward(self, ids):
        b, t = ids.shape
        x = self.emb(ids) + self.pos_emb[:, :t, :]
        mask = torch.full((t, t), float("-inf"), device=ids.device).triu(1)
        for wq, wkv, wo in zip(self.wq, self.wkv, self.wo):
            q = wq(x).view(b, t, self.h, self.hd).transpose(1, 2)
            k, v = wkv(x).view(b, t, 2, self.hkv, self.hd).unbind(2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            n = self.h // self.hkv
            k = k[:, :, None].expand(b, self.hkv, n, t, self.hd).reshape(b, self.h, t, self.hd)
            v = v[:, :, None].expand(b, self.hkv, n, t, self.hd).reshape(b, self.h, t, self.hd)
            att = q @ k.transpose(-2, -1) / math.sqrt(self.hd) + mask
            x = x + wo((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        return self.head(x)


class MixingDecoder(nn.Module):
    """Causal attention, and then something that mixes positions outside it (a cumulative sum or a causal
    convolution over time): a cache would be wrong for it."""

    def __init__(self, mix: str, vocab=64, d=32):
        super().__init__()
        self.mix = mix
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.conv = nn.Conv1d(d, d, 3, padding=2)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        if self.mix == "cumsum":
            x = x.cumsum(1)
        else:
            x = self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2)
        return self.head(torch.relu(self.fc(x)))


def nanogpt(flash=True, **over):
    return GPT(GPTConfig.tiny(flash=flash, **over)).eval()


def ids(b=1, t=8, vocab=256):
    return torch.randint(0, vocab, (b, t))


# ---------------------------------------------------------------------------------------------- the kernels

def test_causal_attention_is_bottom_right_aligned_where_sdpa_is_causal_is_not():
    """One query after four cached keys attends to all five; SDPA's is_causal would let it see only the first."""
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    last = causal_attention(q[:, :, -1:], k, v)
    torch.testing.assert_close(last, full[:, :, -1:])
    top_left = F.scaled_dot_product_attention(q[:, :, -1:], k, v, is_causal=True)
    assert not torch.allclose(top_left, full[:, :, -1:])
    two = causal_attention(q[:, :, 3:], k, v)
    torch.testing.assert_close(two, full[:, :, 3:])


def test_cache_writes_in_place_and_grows_by_doubling_not_per_step():
    cache = KVCache(limit=1000)
    x = torch.randn(1, 2, 3, 4)
    out = cache.append(0, x, dim=2)
    assert torch.equal(out, x)
    buf = cache.buffers[0]
    ptr, capacity = buf.data_ptr(), buf.shape[2]
    for start in range(3, capacity):
        cache.start = start
        step = torch.randn(1, 2, 1, 4)
        out = cache.append(0, step, dim=2)
        assert out.shape[2] == start + 1 and torch.equal(out[:, :, -1:], step)
        assert cache.buffers[0].data_ptr() == ptr   # the same storage: written in place, no copy per step
    cache.start = capacity
    out = cache.append(0, torch.randn(1, 2, 1, 4), dim=2)
    assert cache.buffers[0].shape[2] == min(2 * capacity, 1000) and torch.equal(out[:, :, :3], x)


def test_fixed_cache_raises_cachefull_past_its_size():
    cache = KVCache(capacity=4)
    cache.append(0, torch.randn(1, 1, 4, 2), dim=2)
    cache.start = 4
    with pytest.raises(CacheFull):
        cache.append(0, torch.randn(1, 1, 1, 2), dim=2)


# ---------------------------------------------------------------------------------------------- what users see

def test_registered_and_listed():
    assert "kv_cache" in dict(rewrites.available())
    assert rewrites.get("kv_cache").capture == "sequence"


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "manual"])
def test_nanogpt_full_forward_and_200_decode_steps_equal_the_original(flash):
    model = nanogpt(flash=flash, block_size=256)
    prompt = ids(t=8)
    fast = optimize(model, prompt, rewrites=CACHE)
    assert outcome(fast).status == "applied", fast.shapeprof_report
    before = served(fast)                                    # verification's calls are counted too
    seq = torch.randint(0, 256, (1, 208))
    with torch.no_grad():
        close(fast(prompt), model(prompt))                   # the rewritten full forward
        for t in range(8, 209):                              # then token by token: 200 steps on the cache
            close(fast(seq[:, :t]), model(seq[:, :t]))
    calls = {k: v - before[k] for k, v in served(fast).items()}
    assert calls == {"incremental": 200, "from scratch": 2, "not served": 0}


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "manual"])
def test_greedy_generate_gives_identical_tokens_across_block_size(flash):
    """The model's own generate(), unchanged, crossing block_size (it crops the window, positions shift: every
    call past it runs from scratch, and is still right)."""
    model = nanogpt(flash=flash)                 # block_size 64
    prompt = ids(b=2, t=5)
    fast = optimize(model, prompt, rewrites=CACHE)
    expected = model.generate(prompt, max_new_tokens=80, greedy=True)
    got = fast.generate(prompt, max_new_tokens=80, greedy=True)
    assert torch.equal(got, expected)
    calls = served(fast)
    assert calls["incremental"] >= 55            # the steps before the window is full ran on the cache


def test_rewind_then_continue_stays_equal():
    model = nanogpt()
    seq = ids(b=2, t=40)
    fast = optimize(model, seq[:, :8], rewrites=CACHE)
    with torch.no_grad():
        for t in (8, 9, 10, 20, 21, 12, 13, 30, 5, 6, 40):   # extend, jump, rewind, continue, shorter than the prompt
            close(fast(seq[:, :t]), model(seq[:, :t]))
        other = seq.clone()
        other[1, 15] += 1                                     # one sequence of the batch differs from position 15
        close(fast(other[:, :30]), model(other[:, :30]))
        close(fast(other[:, :31]), model(other[:, :31]))
        close(fast(seq[:1, :31]), model(seq[:1, :31]))       # another batch size: from scratch
    assert served(fast)["incremental"] >= 8


def test_outputs_returned_earlier_never_change():
    """A full-sequence output comes from a history buffer: a rewind must not overwrite what a caller holds."""
    model = MHADecoder().eval()
    seq = ids(b=1, t=20)
    fast = optimize(model, seq[:, :6], rewrites=CACHE)
    with torch.no_grad():
        first = fast(seq[:, :12])
        kept = first.clone()
        fast(seq[:, :13])
        changed = seq.clone()
        changed[0, 8] = (changed[0, 8] + 1) % 256
        fast(changed[:, :14])                                 # rewinds to 8 and continues differently
        assert torch.equal(first, kept)
        out = fast(seq[:, :10])
        out.mul_(0)                                           # the caller writes into what it got back
        close(fast(seq[:, :11]), model(seq[:, :11]))


@pytest.mark.parametrize("make,example,seq_dim", [
    (lambda: Transformer(LlamaConfig.tiny()).eval(), lambda: ids(b=2, t=8), 1),       # rotary tables, GQA
    (lambda: MHADecoder().eval(), lambda: ids(b=2, t=8), 1),                          # need_weights=True path
    (lambda: MHADecoder(need_weights=False).eval(), lambda: ids(b=2, t=8), 1),        # the fused MHA path
    (lambda: TorchLM().eval(), lambda: ids(b=8, t=2), 0),                             # (T, B) ids
    (lambda: RepeatKV().eval(), lambda: ids(b=2, t=8), 1),                            # expand GQA, float mask
], ids=["llama-rotary-gqa", "mha", "mha-no-weights", "transformer-encoder-lm", "repeat-kv"])
def test_forms_people_write_decode_equal(make, example, seq_dim):
    model, prompt = make(), example()
    fast = optimize(model, prompt, rewrites=CACHE)
    assert outcome(fast).status == "applied", fast.shapeprof_report
    b = prompt.shape[1 - seq_dim]
    seq = torch.randint(0, 256, (b, 40) if seq_dim == 1 else (40, b))
    with torch.no_grad():
        for t in list(range(8, 30)) + [15, 16, 40]:
            part = seq.narrow(seq_dim, 0, t)
            close(fast(part), model(part))
    assert served(fast)["incremental"] >= 20


def test_llama_generate_identical_and_gqa_cache_is_the_small_one():
    config = LlamaConfig.tiny()
    model = Transformer(config).eval()
    prompt = ids(b=1, t=6)
    fast = optimize(model, prompt, rewrites=CACHE)
    assert torch.equal(fast.generate(prompt, max_new_tokens=30), model.generate(prompt, max_new_tokens=30))
    buffers = type(fast)._shapeprof_decoder._state.cache.buffers.values()
    heads = {buf.shape[1] for buf in buffers}
    assert heads == {config.n_kv_heads}          # cached before the heads are repeated for GQA


def test_report_says_what_is_cached_and_what_it_costs():
    model = nanogpt()
    fast = optimize(model, ids(t=8))
    report = fast.shapeprof_report
    kv = outcome(fast)
    assert kv.status == "applied" and len(kv.result.applied) == model.config.n_layer
    # keys and values of 2 layers, 4 heads x 16 dims, fp32: 2 * 2 * 64 * 4 bytes per position
    per_position = 2 * 2 * 64 * 4
    text = " ".join(kv.result.notes)
    assert f"{fmt_bytes(per_position)} per position" in text
    assert f"{fmt_bytes(per_position * 64)} per sequence" in text        # block_size 64
    assert f"{fmt_bytes(per_position * 64)} for the example's batch of 1" in text
    buf = io.StringIO()
    Console(file=buf, width=200).print(report)
    out = buf.getvalue()
    assert "kv_cache: applied" in out and "cached decoding" in out and "KV cache" in out
    assert "kv_cache (the cached forward)" in report.code
    assert outcome(fast, "fuse_linear_activation").kept        # the other rewrites still apply


def test_state_dict_unchanged_and_cache_not_in_it():
    model = nanogpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(model, ids(t=8), rewrites=CACHE)
    with torch.no_grad():
        fast(ids(t=10))
    assert list(fast.state_dict()) == list(before)
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(isinstance(b, KVCache) for b in vars(fast).values())
    assert type(fast)._shapeprof_decoder.tensors()                           # it holds a cache, off the model


def test_training_targets_and_grad_run_from_scratch():
    model = nanogpt()
    seq = ids(t=12)
    fast = optimize(model, seq[:, :8], rewrites=CACHE)
    before = served(fast)
    with torch.no_grad():
        fast(seq[:, :8])
        logits, loss = fast(seq[:, :9], targets=seq[:, 1:10])   # targets=: full logits and a loss
        ref_logits, ref_loss = model(seq[:, :9], targets=seq[:, 1:10])
    close((logits, loss), (ref_logits, ref_loss))
    assert served(fast)["not served"] == before["not served"] + 1
    fast.train()
    model.train()
    torch.manual_seed(1)
    a = fast(seq[:, :10])[0]
    torch.manual_seed(1)
    b = model(seq[:, :10])[0]
    close(a, b)
    a.sum().backward()                                           # autograd sees the whole forward
    assert fast.lm_head.weight.grad is not None


def test_weight_change_invalidates_the_cache():
    """An optimizer step or an in-place write between calls: the cached keys are stale, so it recomputes."""
    model = nanogpt()
    seq = ids(t=12)
    fast = optimize(model, seq[:, :8], rewrites=CACHE)
    with torch.no_grad():
        fast(seq[:, :8])
        fast(seq[:, :9])
        fast.transformer.h[0].attn.c_attn.weight.mul_(1.5)
        model.load_state_dict(fast.state_dict())
        before = served(fast)["from scratch"]
        close(fast(seq[:, :10]), model(seq[:, :10]))
    assert served(fast)["from scratch"] == before + 1
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    fast.train()
    fast(seq[:, :10], targets=seq[:, 1:11])[1].backward()
    opt.step()
    fast.eval()
    model.load_state_dict(fast.state_dict())
    with torch.no_grad():
        close(fast(seq[:, :11]), model(seq[:, :11]))


def test_hooks_and_casts_after_optimize_fall_back_correctly():
    model = nanogpt()
    seq = ids(t=12)
    fast = optimize(model, seq[:, :8], rewrites=CACHE)
    seen = []
    with torch.no_grad():
        fast(seq[:, :8])
        fast.transformer.h[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        with pytest.warns(RuntimeWarning, match="registered after optimize"):
            close(fast(seq[:, :9]), model(seq[:, :9]))
        assert seen, "a hook registered after optimize must run"
    half = optimize(nanogpt(), seq[:, :8], rewrites=CACHE)
    half.to(torch.float64)
    ref = copy.deepcopy(half)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = half(seq[:, :9])[0]
        assert out.dtype == torch.float64
        close(out, type(ref)._shapeprof_base.forward(ref, seq[:, :9])[0])


def test_hooks_before_optimize_refuse_the_cache_with_the_reason():
    model = nanogpt()
    model.transformer.h[0].register_forward_pre_hook(lambda m, a: None)
    fast = optimize(model, ids(t=8), rewrites=CACHE)
    o = outcome(fast)
    assert not o.kept and "hooks are registered on transformer.h.0" in o.result.skipped[0].reason


def test_model_dtype_and_deepcopy():
    model = nanogpt().to(torch.float64)
    seq = ids(t=16)
    fast = optimize(model, seq[:, :8], rewrites=CACHE)
    twin = copy.deepcopy(fast)
    before = served(fast)
    with torch.no_grad():
        for t in (8, 9, 10):
            close(fast(seq[:, :t]), model(seq[:, :t]))
        close(twin(seq[:, :12]), model(seq[:, :12]))      # its own cache, empty: from scratch
        close(fast(seq[:, :11]), model(seq[:, :11]))      # the original's cache is untouched by the copy
    assert {b.dtype for b in type(fast)._shapeprof_decoder._state.cache.buffers.values()} == {torch.float64}
    assert served(twin)["from scratch"] == 1 and served(fast)["incremental"] == before["incremental"] + 3


def test_explicit_prefill_and_decode():
    model = nanogpt()
    seq = ids(b=3, t=30)
    fast = optimize(model, seq[:, :8], rewrites=CACHE)
    with torch.no_grad():
        logits, state = fast.prefill(seq[:, :10], max_tokens=24)
        close(logits, model(seq[:, :10]))
        other, other_state = fast.prefill(seq[:2, :5])             # a second, independent batch
        for t in range(10, 24):
            logits, state = fast.decode(seq[:, t:t + 1], state)
            close(logits, model(seq[:, :t + 1]))
        assert state.length == 24
        with pytest.raises(CacheFull):
            fast.decode(seq[:, 24:25], state)
        logits, other_state = fast.decode(seq[:2, 5:7], other_state)   # two positions at once
        close(logits, model(seq[:2, :7]))
        with pytest.raises(DecodeError, match="batch"):
            fast.decode(seq[:1, 7:8], other_state)
        _, state = fast.prefill(seq[:, :4])                          # default size: block_size
        assert state.cache.capacity == model.config.block_size
        fast.lm_head.weight.add_(0.1)
        with pytest.raises(DecodeError, match="weights changed"):
            fast.decode(seq[:, 4:5], state)


# ---------------------------------------------------------------------------------------------- refusals

def test_encoder_is_refused_and_the_rest_of_optimize_applies():
    model = TorchLM(causal=False).eval()
    fast = optimize(model, ids(b=8, t=2))
    o = outcome(fast)
    assert o.status == "no match" and "causal" in o.result.skipped[0].reason
    assert not hasattr(type(fast), "_shapeprof_decoder")
    x = ids(b=8, t=4)
    with torch.no_grad():
        close(fast(x), model(x))


@pytest.mark.parametrize("mix,why", [("cumsum", "cumsum"), ("conv", "convolves along the sequence")])
def test_position_mixing_model_is_refused_with_the_reason(mix, why):
    model = MixingDecoder(mix).eval().requires_grad_(False)
    prompt = ids(b=2, t=8, vocab=64)
    fast = optimize(model, prompt)
    o = outcome(fast)
    assert not o.kept
    reason = o.result.skipped[0].reason
    assert why in reason and "position" in reason, reason
    assert outcome(fast, "fuse_linear_activation").kept      # the Linear + ReLU still fuses
    with torch.no_grad():
        close(fast(prompt), model(prompt))


def test_huggingface_model_with_its_own_cache_is_left_alone():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    fast = optimize(model, ids(t=8, vocab=128), rewrites=CACHE)
    o = outcome(fast)
    assert o.status == "no match" and "has a KV cache of its own" in o.result.skipped[0].reason


def test_torch_compile_of_the_drop_in_gives_the_same_tokens():
    """torch.compile traces the user's own forward (the cache's bookkeeping is Python it would break on): the
    compiled drop-in decodes as the original does, uncached, never wrongly."""
    model = nanogpt()
    prompt = ids(b=2, t=5)
    fast = optimize(model, prompt, rewrites=CACHE)
    compiled = torch.compile(fast, backend="eager")
    out = prompt
    with torch.no_grad():
        for _ in range(6):
            logits, _ = compiled(out)
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, model.generate(prompt, 6, greedy=True))


def test_a_cache_filled_under_inference_mode_is_extended_outside_it():
    """torch.inference_mode makes inference tensors, which cannot be written in place outside it: a prefill under
    inference_mode and decode steps under no_grad (or the other way round) must still be right."""
    model = MHADecoder().eval()                    # a full-sequence output: its history buffer too
    seq = ids(b=2, t=12)
    fast = optimize(model, seq[:, :5], rewrites=CACHE)
    with torch.inference_mode():
        fast(seq[:, :6])
    with torch.no_grad():
        close(fast(seq[:, :7]), model(seq[:, :7]))
    close(fast(seq[:, :8]).detach(), model(seq[:, :8]).detach())
    with torch.inference_mode():
        close(fast(seq[:, :9]), model(seq[:, :9]))
    with torch.inference_mode():
        _, state = fast.prefill(seq[:, :4])
    with torch.no_grad():
        logits, state = fast.decode(seq[:, 4:5], state)
        close(logits, model(seq[:, :5])[:, -1:])   # decode returns the new positions' outputs
    with torch.inference_mode():
        out = fast(seq[:, :10])
        out.mul_(0)                                 # written in place, where no version counter sees it
        close(fast(seq[:, :11]), model(seq[:, :11]))


def test_a_call_that_raises_part_way_leaves_nothing_half_written(monkeypatch):
    """A step that fails after some layers wrote their keys (an out-of-memory, a KeyboardInterrupt) must not leave
    them to a later call: the transparent path forgets the cache, an explicit state refuses to decode."""
    model = nanogpt()
    seq = ids(b=1, t=20)
    fast = optimize(model, seq[:, :8], rewrites=CACHE)
    real = KVCache.append

    def failing(self, slot, x, dim):
        if slot == 2:                                  # the second layer's keys: the first layer has written
            raise MemoryError("out of memory (simulated)")
        return real(self, slot, x, dim)

    with torch.no_grad():
        fast(seq[:, :10])
        other = seq.clone()
        other[0, 5:] = (other[0, 5:] + 1) % 256        # a rewind to 5, with other tokens
        monkeypatch.setattr(KVCache, "append", failing)
        with pytest.raises(MemoryError):
            fast(other[:, :12])
        monkeypatch.setattr(KVCache, "append", real)
        close(fast(seq[:, :11]), model(seq[:, :11]))   # extends the last good call: must not reuse layer 0's keys
        _, state = fast.prefill(seq[:, :6])
        monkeypatch.setattr(KVCache, "append", failing)
        with pytest.raises(MemoryError):
            fast.decode(seq[:, 6:7], state)
        monkeypatch.setattr(KVCache, "append", real)
        with pytest.raises(DecodeError, match="raised part-way"):
            fast.decode(seq[:, 6:7], state)


def test_calls_from_two_threads_at_once_are_each_right():
    """The cache holds one sequence: a call from a second thread while one runs takes the uncached forward."""
    import threading
    model = nanogpt()
    fast = optimize(model, ids(b=1, t=8), rewrites=CACHE)
    seqs = [ids(b=1, t=40), ids(b=1, t=40)]
    expected = [[model(s[:, :t])[0] for t in range(8, 40)] for s in seqs]
    errors = []

    def decode(which):
        try:
            with torch.no_grad():
                for i, t in enumerate(range(8, 40)):
                    torch.testing.assert_close(fast(seqs[which][:, :t])[0], expected[which][i], rtol=1e-5,
                                               atol=2e-5)
        except Exception as e:   # reported below: an assert in a thread does not fail the test
            errors.append(e)

    threads = [threading.Thread(target=decode, args=(w,)) for w in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("t", [1, 2, 7, 8])
def test_examples_at_or_near_the_context_limit_are_verified_and_applied(t):
    """With no room to grow past the example, the verification starts from a prefix of it (a rewind)."""
    model = nanogpt(block_size=8)
    prompt = ids(t=t)
    fast = optimize(model, prompt, rewrites=CACHE)
    o = outcome(fast)
    assert o.status == "applied", (o.error, o.verification and o.verification.error)
    assert torch.equal(fast.generate(prompt, 12, greedy=True), model.generate(prompt, 12, greedy=True))
