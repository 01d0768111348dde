"""Tests for shapeprof/batching.py: many requests of different lengths decoded together on paged KV memory give
each request exactly the tokens it gives alone, with and without preemption."""
import warnings

import pytest
import torch
import torch.nn as nn

from shapeprof.batching import RaggedUnsupported, generate_batch
from shapeprof.optimize import optimize
from examples.llama import LlamaConfig, Transformer
from examples.nanogpt import GPT, GPTConfig

BYTES_PER_TOKEN = 2 * 2 * 64 * 4     # GPTConfig.tiny: 2 layers x (keys, values) x 64 wide x fp32


pytestmark = pytest.mark.usefixtures("seeded_quiet")


def alone(model, prompt, new):
    return model.generate(prompt[None], new, greedy=True)[0]


@pytest.fixture(scope="module", params=[True, False], ids=["sdpa", "manual"])
def gpt(request):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(flash=request.param, block_size=128)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast = optimize(model, torch.randint(0, 256, (1, 8)), rewrites=["kv_cache"])
    return model, fast


PROMPTS = [3, 9, 17, 5, 30, 1]
NEW = [10, 4, 20, 7, 12, 15]


@pytest.mark.parametrize("blocks", [256, 16, 11], ids=["roomy", "tight", "tighter"])
def test_each_request_gets_the_tokens_it_gets_alone(gpt, blocks):
    model, fast = gpt
    prompts = [torch.randint(0, 256, (n,)) for n in PROMPTS]
    outs = generate_batch(fast, prompts, max_new_tokens=NEW, kv_budget=blocks * 4 * BYTES_PER_TOKEN, block_size=4)
    for out, prompt, new in zip(outs, prompts, NEW):
        assert torch.equal(out, alone(model, prompt, new))
    s = outs.stats
    assert s.num_blocks == blocks and s.new_tokens == sum(NEW)
    if blocks == 256:
        assert s.peak_concurrent == len(PROMPTS) and s.preemptions == 0
    else:   # the requests do not all fit: some waited or were preempted, and nothing was lost
        assert s.peak_concurrent < len(PROMPTS) and (s.preemptions > 0 or blocks == 16)
    assert all(step["blocks_in_use"] <= blocks for step in s.steps)
    assert 0 <= s.waste < 0.25 and s.tokens_per_second > 0


def test_preemption_happens_and_is_recomputed_exactly(gpt):
    model, fast = gpt
    prompts = [torch.randint(0, 256, (n,)) for n in (6, 6, 6)]
    outs = generate_batch(fast, prompts, max_new_tokens=30, kv_budget=20 * 4 * BYTES_PER_TOKEN, block_size=4)
    assert outs.stats.preemptions > 0
    for out, prompt in zip(outs, prompts):
        assert torch.equal(out, alone(model, prompt, 30))


def test_seeded_sampling_does_not_depend_on_the_other_requests(gpt):
    _, fast = gpt
    prompts = [torch.randint(0, 256, (n,)) for n in (4, 11, 7)]
    together = generate_batch(fast, prompts, max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    first = generate_batch(fast, prompts[:1], max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    assert torch.equal(together[0], first[0])
    assert not torch.equal(together[0][4:], generate_batch(fast, prompts[:1], 8, temperature=0.8, seed=4)[0][4:])


def test_a_request_that_cannot_fit_alone_names_the_budget_it_needs(gpt):
    _, fast = gpt
    with pytest.raises(ValueError, match=r"prompt 1 needs 5 blocks of 4 tokens \(20,480 bytes of KV memory\)"):
        generate_batch(fast, [torch.tensor([1]), torch.arange(10)], max_new_tokens=10,
                       kv_budget=4 * 4 * BYTES_PER_TOKEN, block_size=4)


def test_a_llama_with_rotary_tables_and_gqa_batches_too():
    torch.manual_seed(0)
    llama = Transformer(LlamaConfig.tiny()).eval()
    fast = optimize(llama, torch.randint(0, 256, (1, 8)), rewrites=["kv_cache"])
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 9, 5, 14)]
    outs = generate_batch(fast, prompts, max_new_tokens=9, kv_budget="1MiB", block_size=4)
    for out, prompt in zip(outs, prompts):
        assert torch.equal(out, llama.generate(prompt[None], 9)[0])
    assert outs.stats.peak_concurrent == 4


class TablePositions(nn.Module):
    """Positions from a sliced table, used through .t(): per-row table rows would be 3-D, where .t() raises."""

    def __init__(self, vocab=64, d=32, ctx=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.register_buffer("table", torch.randn(ctx, d))
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        b, t = ids.shape
        x = self.emb(ids) + self.table[:t].t().t()
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + y.transpose(1, 2).reshape(b, t, 32))


def test_models_it_cannot_batch_say_why():
    torch.manual_seed(0)
    fast = optimize(TablePositions().eval(), torch.randint(0, 64, (1, 8)), rewrites=["kv_cache"])
    assert next(o for o in fast.shapeprof_report.outcomes if o.name == "kv_cache").kept
    with pytest.raises(RaggedUnsupported, match="a batched step of rows at different positions fails"):
        generate_batch(fast, [torch.tensor([1, 2, 3])], max_new_tokens=2)
    with pytest.raises(ValueError, match="no cached forward"):
        generate_batch(nn.Linear(2, 2), [torch.tensor([1])])


def test_samples_of_one_prompt_share_its_blocks_until_they_diverge(gpt):
    model, fast = gpt
    prompts = [torch.randint(0, 256, (n,)) for n in (13, 8)]
    budget = 256 * 4 * BYTES_PER_TOKEN
    greedy = generate_batch(fast, prompts, max_new_tokens=6, kv_budget=budget, block_size=4, n=3)
    for out, prompt in zip(greedy, prompts):
        assert out.shape == (3, len(prompt) + 6)
        assert all(torch.equal(row, alone(model, prompt, 6)) for row in out)
    first = greedy.stats.steps[0]
    # two prompts (4 and 2 blocks) shared by their 3 samples, plus the blocks they diverged into: not 3 copies
    assert first["blocks_in_use"] == 4 + 2 + 2 + 3 < 3 * (4 + 2)
    sampled = generate_batch(fast, prompts, max_new_tokens=6, temperature=1.0, seed=1, n=2)
    again = generate_batch(fast, prompts, max_new_tokens=6, temperature=1.0, seed=1, n=2)
    assert all(torch.equal(a, b) for a, b in zip(sampled, again))
    assert torch.equal(sampled[0][0], generate_batch(fast, prompts[:1], 6, temperature=1.0, seed=1)[0])
    tight = generate_batch(fast, prompts, max_new_tokens=20, kv_budget=14 * 4 * BYTES_PER_TOKEN, block_size=4, n=3)
    assert tight.stats.preemptions > 0
    for out, prompt in zip(tight, prompts):
        assert all(torch.equal(row, alone(model, prompt, 20)) for row in out)


def test_contiguous_reservation_gives_the_same_tokens_and_wastes_what_it_reserves(gpt):
    model, fast = gpt
    prompts = [torch.randint(0, 256, (n,)) for n in PROMPTS]
    budget = 4 * 128 * BYTES_PER_TOKEN                  # room for 4 sequences at the model's 128 positions
    paged = generate_batch(fast, prompts, max_new_tokens=NEW, kv_budget=budget, block_size=4)
    contiguous = generate_batch(fast, prompts, max_new_tokens=NEW, kv_budget=budget, block_size=4,
                                reserve="contiguous")
    for a, b, prompt, new in zip(paged, contiguous, prompts, NEW):
        assert torch.equal(a, b) and torch.equal(a, alone(model, prompt, new))
    assert contiguous.stats.peak_concurrent == 4 and paged.stats.peak_concurrent == len(PROMPTS)
    assert contiguous.stats.waste > 0.7 > 0.25 > paged.stats.waste
    assert contiguous.stats.preemptions == 0
    with pytest.raises(ValueError, match="reserve='contiguous' holds 131,072 bytes for a sequence"):
        generate_batch(fast, prompts, 4, kv_budget=budget // 8, block_size=4, reserve="contiguous")


def test_stats_go_to_tensorboard_as_scalars_in_a_new_run_each_time(gpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, fast = gpt
    outs = generate_batch(fast, [torch.randint(0, 256, (n,)) for n in (3, 9)], max_new_tokens=5)
    first = outs.stats.write_tensorboard(tmp_path)
    second = outs.stats.write_tensorboard(tmp_path)
    assert (first.name, second.name) == ("generate_batch", "generate_batch-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generate_batch", "generate_batch-1"]   # nothing else
    acc = EventAccumulator(str(first), size_guidance={"scalars": 0})
    acc.Reload()
    running = [e.value for e in acc.Scalars("generate_batch/running")]
    assert running == [s["running"] for s in outs.stats.steps] and len(running) == 4
    assert "generate_batch/waste" in acc.Tags()["scalars"]


def test_optimize_names_the_paged_swap_and_the_pool_or_says_why_not():
    torch.manual_seed(0)
    fast = optimize(GPT(GPTConfig.tiny()).eval(), torch.randint(0, 256, (1, 8)))
    (paged,) = [o for o in fast.shapeprof_report.outcomes if o.name == "paged_kv_cache"]
    assert paged.status == "applied" and len(paged.verification.checks) == 3
    assert "1 GiB budget holds 65,536 blocks of 16 (1,048,576 tokens)" in " ".join(paged.result.notes)
    assert "fits 16,384 sequences" in " ".join(paged.result.notes)   # 1 GiB / (1,024 bytes x 64 positions)
    refused = optimize(TablePositions().eval(), torch.randint(0, 64, (1, 8)))
    (paged,) = [o for o in refused.shapeprof_report.outcomes if o.name == "paged_kv_cache"]
    assert paged.status == "rejected" and "fails on this model" in paged.verification.error
    alone = optimize(GPT(GPTConfig.tiny()).eval(), torch.randint(0, 256, (1, 8)), rewrites=["paged_kv_cache"])
    (paged,) = alone.shapeprof_report.outcomes
    assert paged.status == "no match" and "kv_cache was not applied" in paged.result.skipped[0].reason


def test_poisoning_every_free_block_before_each_step_changes_no_output(gpt, monkeypatch):
    """What a sequence reads is its own blocks only: free blocks (a finished or preempted sequence's, reused next)
    filled with garbage before every step change nothing. (Garbage, not NaN: a masked slot's weight is 0, and
    0 * NaN is NaN; the values a model writes are finite.)"""
    from shapeprof.batching import RaggedCache
    model, fast = gpt
    real = RaggedCache.begin

    def poisoned(self, rows, new):
        free = torch.tensor(self.allocator.free_blocks, dtype=torch.long)
        for store in self.stores.values():
            store.data[free] = 1e4
        return real(self, rows, new)

    monkeypatch.setattr(RaggedCache, "begin", poisoned)
    prompts = [torch.randint(0, 256, (n,)) for n in PROMPTS]
    outs = generate_batch(fast, prompts, max_new_tokens=NEW, kv_budget=12 * 4 * BYTES_PER_TOKEN, block_size=4)
    assert outs.stats.preemptions > 0
    for out, prompt, new in zip(outs, prompts, NEW):
        assert torch.equal(out, alone(model, prompt, new))


def test_no_new_tokens_and_bad_prompts(gpt):
    _, fast = gpt
    outs = generate_batch(fast, [torch.tensor([5, 6, 7]), torch.tensor([1])], max_new_tokens=[0, 2])
    assert torch.equal(outs[0], torch.tensor([5, 6, 7])) and outs[1].shape == (3,)
    for bad, why in (([torch.tensor([1.0, 2.0])], "integer token ids"), ([torch.zeros(2, 3, dtype=torch.long)], "1-D"),
                     ([torch.tensor([], dtype=torch.long)], "non-empty")):
        with pytest.raises(ValueError, match=why):
            generate_batch(fast, bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="non-negative"):
        generate_batch(fast, [torch.tensor([1])], max_new_tokens=-1)
