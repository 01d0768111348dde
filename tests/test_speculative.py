"""shapeprof.speculative and Decode(tokens=...): a verification pass is one forward over tokens = g + 1 positions
(its KV bytes counted by hand), and every speedup shown is recomputed here from the result's own step times with
Leviathan, Kalman and Matias's formula (ICML 2023)."""
import json
import re
import warnings

import pytest
import torch

import shapeprof
from examples.llama import LlamaConfig, Transformer
from examples.nanogpt import GPT, GPTConfig
from shapeprof.costs import cost_of
from tests.test_phases import _records, _ReferenceStyleLlama

SDPA = "aten.scaled_dot_product_attention"


def _on_meta(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return build()


def _sdpa(report):
    return [rec for rec in _records(report) if rec.name == SDPA]


def _analyze(model, phase, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return shapeprof.analyze(model, phase, **kw)


def _speedup(times, a, g):
    """Leviathan et al. (2023): an iteration of g draft steps and one verification yields on average
    (1 - a^(g+1)) / (1 - a) tokens (g + 1 at a = 1); plain decoding yields one per target step."""
    expected = g + 1 if a == 1 else (1 - a ** (g + 1)) / (1 - a)
    return expected * times["target"] / (g * times["draft"] + times["verify"])


# ---------------------------------------------------------------------------------------------- Decode(tokens=)

def test_decode_tokens_defaults_to_one_and_is_checked():
    assert shapeprof.Decode(2, 32) == shapeprof.Decode(2, 32, tokens=1)
    assert shapeprof.Decode(2, 32).new_tokens == 1 and shapeprof.Decode(2, 32, tokens=5).new_tokens == 5
    with pytest.raises(shapeprof.PhaseError, match="Decode.tokens must be a positive int, got 0"):
        shapeprof.Decode(tokens=0)


def test_verification_through_the_inserted_cache_is_one_forward():
    model = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    one = _analyze(model, shapeprof.Decode(batch=2, context=32))
    r = _analyze(model, shapeprof.Decode(batch=2, context=32, tokens=5))
    p = r.phase
    assert (p.kind, p.batch, p.tokens, p.context) == ("decode", 2, 5, 32)
    assert r.inputs == ("decode step: batch 2, 5 query positions each, cache of 32 positions "
                        "(inserted (kv_cache rewrite))",)
    # per position of one sequence: 2 layers x (k + v) x 2 kv heads x head_dim 16 x 4 bytes (fp32) = 512;
    # attention reads the 32 cached positions and the 5 new ones, for both sequences: 2 x 37 x 512 = 37,888
    assert p.kv_bytes_per_token == 512 and p.kv_read_bytes == 37_888
    assert sum(m.nbytes for rec in _sdpa(r) for m in rec.input_metas()[1:3]) == 37_888
    # keys and values written for the 5 new positions of each sequence: 2 x 5 x 512 (the graph's copy_ agree)
    assert p.kv_written_bytes == 5_120
    assert sum(cost_of(rec).bytes_written for rec in _records(r) if rec.name == "aten.copy_") == 5_120
    # one forward, not five steps: one attention per layer, its queries the 5 positions, its keys all 37
    assert len(_sdpa(r)) == len(_sdpa(one)) == 2
    assert all(rec.input_metas()[0].shape == (2, 4, 5, 16) and rec.input_metas()[1].shape[-2] == 37
               for rec in _sdpa(r))
    # every weight read once: 131,392 parameters in fp32, of the untied embedding only its 2 x 5 rows
    assert p.weight_bytes == (131_392 - 16_384) * 4 + 10 * 64 * 4 == 462_592
    # matmul FLOPs: Linears 2 x 10 rows x 49,152 parameters per layer, output 2 x 10 x 16,384, attention
    # (qk and pv) 2 x 2 x B 2 x 4 heads x 16 x the scores its causal mask keeps per layer: query i of the 5 sees
    # the 32 cached positions and the new ones up to itself, 33 + 34 + 35 + 36 + 37 = 175 (of 5 x 37)
    matmul = sum(cost_of(rec).flops for rec in _records(r) if cost_of(rec).matmul)
    assert matmul == 2 * (2 * 10 * 49_152) + 2 * 10 * 16_384 + 2 * (2 * 2 * 2 * 4 * 16 * 175) == 2_472_960


def test_verification_of_a_huggingface_model_over_its_dynamic_cache():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model = _on_meta(lambda: transformers.LlamaForCausalLM(cfg))
    r = _analyze(model, shapeprof.Decode(batch=2, context=40, tokens=5), dtype=torch.bfloat16)
    p = r.phase
    # 2 layers x (k + v) x 2 kv heads x head_dim 32 x 2 bytes = 512 per position; 45 positions read per sequence
    assert (p.tokens, p.kv_bytes_per_token, p.kv_read_bytes, p.kv_written_bytes) == (5, 512, 2 * 45 * 512,
                                                                                    2 * 5 * 512)
    sdpa = _sdpa(r)
    assert len(sdpa) == 2 and all(rec.input_metas()[0].shape[-2] == 5 and rec.input_metas()[1].shape[-2] == 45
                                  for rec in sdpa)
    # with a mask (several queries) transformers repeats the 2 kv heads to 4 before attention: the eager graph
    # reads them twice over; the KV figure is what the cache holds
    kv = sum((rec.input_metas()[1].nbytes + rec.input_metas()[2].nbytes) * 2 // rec.input_metas()[1].shape[1]
             for rec in sdpa)
    assert kv == p.kv_read_bytes

    mistral = transformers.MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                         sliding_window=16)
    r = _analyze(_on_meta(lambda: transformers.MistralForCausalLM(mistral)),
                 shapeprof.Decode(batch=1, context=100, tokens=5))
    # each of the 5 queries sees its last 16 positions: 16 + 4 in all; 2 layers x 20 x (k + v) x 2 x 32 x 4 bytes
    assert r.phase.kv_read_bytes == 2 * 20 * 2 * 2 * 32 * 4
    assert all(rec.input_metas()[1].shape[-2] == 20 for rec in _sdpa(r))


def test_verification_through_a_cache_of_its_own_and_nanogpt():
    model = _on_meta(_ReferenceStyleLlama)   # Meta's reference Llama's way: its cache in buffers, start_pos
    r = _analyze(model, shapeprof.Decode(batch=2, context=40, tokens=5))
    # per position: 2 layers x (k + v) x 4 heads x 16 x 4 bytes = 1,024; 45 positions read, 5 written per sequence
    assert (r.phase.kv_bytes_per_token, r.phase.kv_read_bytes, r.phase.kv_written_bytes) == (1024, 2 * 45 * 1024,
                                                                                          2 * 5 * 1024)
    assert all(rec.input_metas()[0].shape[-2] == 5 and rec.input_metas()[1].shape[-2] == 45 for rec in _sdpa(r))
    with pytest.raises(shapeprof.PhaseError, match="124 \\+ 5 positions exceed the 128 its cache holds"):
        _analyze(model, shapeprof.Decode(batch=1, context=124, tokens=5))
    gpt = _on_meta(lambda: GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=128)))
    r = _analyze(gpt, shapeprof.Decode(batch=3, context=64, tokens=4), dtype=torch.bfloat16)
    # bf16: 2 layers x (k + v) x 64 wide x 2 bytes = 512 per position; 3 sequences x 68 positions
    assert (r.phase.kv_read_bytes, r.phase.kv_written_bytes) == (3 * 68 * 512, 3 * 4 * 512)


# ---------------------------------------------------------------------------------------------- speculative

@pytest.fixture(scope="module")
def pair():
    target = _on_meta(lambda: Transformer(LlamaConfig.tiny(dim=256, n_layers=4)))
    draft = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    return shapeprof.speculative(target, draft, spec="h100-sxm", dtype=torch.bfloat16, context=64, batches=(1, 64))


def test_no_acceptance_is_a_loss_and_acceptance_only_helps(pair):
    sd = pair
    rates = [i / 40 for i in range(41)]                     # 0, 0.025 ... 1
    for b in sd.batches:
        for g in sd.draft_tokens:
            t = sd.step_times(b, g)
            # a = 0: one token for g draft steps and a verification that costs at least a target step
            assert sd.speedup(0.0, g, b) == pytest.approx(t["target"] / (g * t["draft"] + t["verify"]), rel=1e-12)
            assert sd.speedup(0.0, g, b) < 1
            curve = [sd.speedup(a, g, b) for a in rates]
            assert all(x < y for x, y in zip(curve, curve[1:])), (b, g)
            assert curve[-1] == pytest.approx(_speedup(t, 1, g), rel=1e-12)


def test_break_even_solves_speedup_one(pair):
    sd = pair
    for b in sd.batches:
        for g in sd.draft_tokens:
            a = sd.break_even(g, b)
            t = sd.step_times(b, g)
            if a is None:
                assert _speedup(t, 1, g) <= 1
                continue
            assert 0 <= a < 1
            assert abs(_speedup(t, a, g) - 1) < 1e-6, (b, g, a)
            assert _speedup(t, a - 1e-4, g) < 1 < _speedup(t, a + 1e-4, g)
    # a draft as slow as the target never pays: g + 1 tokens at best, for g target steps and a verification
    model = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    same = shapeprof.speculative(model, model, spec="h100-sxm", context=32, batches=(1,), draft_tokens=(2,))
    assert same.break_even(2, 1) is None and same.speedup(1.0, 2, 1) < 1
    assert "never" in str(same)


def test_every_printed_speedup_is_recomputed_from_the_step_times(pair):
    sd = pair
    text = str(sd)
    batch, columns, seen, rows = None, None, {}, 0
    for line in text.splitlines():
        if m := re.match(r"batch (\d+): target step", line):
            batch = int(m.group(1))
        elif line.strip().startswith("acceptance"):
            columns = [int(g) for g in re.findall(r"g=(\d+)", line)]
        elif m := re.match(r"\s*(\d\.\d\d)\s+((?:\d+\.\d\dx\s+)+)g=(\d+)\s*$", line):
            a = float(m.group(1))
            cells = [float(c) for c in re.findall(r"(\d+\.\d\d)x", m.group(2))]
            assert len(cells) == len(columns) == len(sd.draft_tokens)
            recomputed = [_speedup(sd.step_times(batch, g), a, g) for g in columns]
            for printed, exact in zip(cells, recomputed):
                assert abs(printed - exact) <= 0.005 + 1e-9, (batch, a, printed, exact)
            assert int(m.group(3)) == columns[max(range(len(columns)), key=recomputed.__getitem__)]
            seen[(batch, a)] = cells
        elif m := re.match(r"\s*break-even((?:\s+(?:\d\.\d{3}|never))+)\s*$", line):
            printed = m.group(1).split()
            rows += 1
            assert printed == [f"{sd.break_even(g, batch):.3f}" if sd.break_even(g, batch) is not None else "never"
                               for g in columns]
    assert set(seen) == {(b, a) for b in sd.batches for a in sd.acceptance} and rows == len(sd.batches)
    # the dict holds the same, JSON-safe
    d = json.loads(json.dumps(sd.to_dict(), allow_nan=False))
    assert d["draft_tokens"] == list(sd.draft_tokens) and d["acceptance"] == list(sd.acceptance)
    for row in d["batches"]:
        t = row["step_times"]
        for i, a in enumerate(d["acceptance"]):
            for j, g in enumerate(d["draft_tokens"]):
                times = {"target": t["target"], "draft": t["draft"], "verify": t["verify"][str(g)]}
                assert row["speedup"][i][j] == pytest.approx(_speedup(times, a, g), rel=1e-12)


def test_verification_costs_more_steps_as_the_batch_grows(pair):
    sd = pair
    for g in sd.draft_tokens:
        ratio = {b: sd.step_times(b, g)["verify"] / sd.step_times(b, g)["target"] for b in sd.batches}
        assert 1 <= ratio[1] < ratio[64]
    assert sd.speedup(0.8, 4, 64) < sd.speedup(0.8, 4, 1)
    assert "from batch 1 to 64 the speedup at a=0.8, g=4 shrinks" in str(sd).replace("\n", " ")
    # a wider target (one Llama-3-8B-wide layer): at batch 64 verifying 9 positions is 576 rows per matmul, past
    # the H100's ridge (about 295 FLOP/B in bf16), where a 64-row step is not: most of its time turns compute-bound
    wide = _on_meta(lambda: Transformer(LlamaConfig.tiny(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8,
                                                         multiple_of=256)))
    draft = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    sd = shapeprof.speculative(wide, draft, spec="h100-sxm", dtype=torch.bfloat16, context=64, batches=(1, 64),
                               draft_tokens=(8,))
    verify, step = sd.steps[64]["verify"][8], sd.steps[64]["target"]
    assert verify.compute_share > 0.5 > step.compute_share and sd.steps[1]["verify"][8].compute_share < 0.5
    assert sd.verify_ratio(64, 8) > 2 * sd.verify_ratio(1, 8)


def test_different_vocabularies_are_refused():
    target = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    draft = _on_meta(lambda: Transformer(LlamaConfig.tiny(vocab_size=512)))
    with pytest.raises(ValueError, match="^draft and target vocabularies differ: target Transformer has 256 tokens, "
                                         "draft Transformer 512: [^\n]*$"):
        shapeprof.speculative(target, draft, context=32)
    gpt = _on_meta(lambda: GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=300, block_size=128)))
    with pytest.raises(ValueError, match="target Transformer has 256 tokens, draft GPT 300"):
        shapeprof.speculative(target, gpt, context=32)


def test_step_times_and_sweep_values_are_checked(pair):
    with pytest.raises(ValueError, match="batch 3 was not priced: this result holds batches \\[1, 64\\]"):
        pair.step_times(3, 4)
    with pytest.raises(ValueError, match="draft_tokens=9 was not priced"):
        pair.speedup(0.5, 9, 1)
    with pytest.raises(ValueError, match="acceptance must be a rate in \\[0, 1\\], got 1.5"):
        pair.speedup(1.5, 4, 1)
    model = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    with pytest.raises(ValueError, match="context=120: the target Transformer holds at most 128 positions, and its "
                                         "step adds 9"):
        shapeprof.speculative(model, model, context=120)


def test_each_distinct_step_is_analysed_once(monkeypatch):
    import shapeprof.analysis
    calls = []
    real = shapeprof.analysis.analyze

    def counting(model, *args, **kwargs):
        calls.append(args)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(shapeprof.analysis, "analyze", counting)
    model = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    # the model drafts for itself: its decode step at each batch is the target's too
    sd = shapeprof.speculative(model, model, context=16, batches=(1, 2), draft_tokens=(1, 2))
    assert len(calls) == sd.analyses == 2 * (1 + 2)
    assert sorted((p.batch, p.tokens) for (p,) in calls) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


def test_a_huggingface_pair_and_a_nanogpt_pair_on_meta():
    transformers = pytest.importorskip("transformers")

    def llama(hidden, layers):
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        return _on_meta(lambda: transformers.LlamaForCausalLM(cfg))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = shapeprof.speculative(llama(256, 4), llama(64, 1), spec="h100-sxm", dtype=torch.bfloat16, context=48,
                                   batches=(1, 8), draft_tokens=(1, 4))
    assert (sd.target, sd.draft, sd.vocab) == ("LlamaForCausalLM", "LlamaForCausalLM", 512)
    # the verification's cache reads: b x (48 + 5) positions x 4 layers x (k + v) x 2 kv heads x 64 x 2 bytes
    assert sd.steps[8]["verify"][4].kv_read_bytes == 8 * 53 * 4 * 2 * 2 * 64 * 2
    assert sd.steps[8]["verify"][4].tokens == 5 and sd.steps[8]["target"].tokens == 1
    t = sd.step_times(1, 4)
    assert t["draft"] < t["target"] <= t["verify"]
    assert sd.speedup(0.0, 4, 1) < 1 < sd.speedup(0.95, 4, 1)

    def gpt(layers, width):
        return _on_meta(lambda: GPT(GPTConfig(n_layer=layers, n_head=4, n_embd=width, vocab_size=256,
                                              block_size=128)))

    sd = shapeprof.speculative(gpt(4, 256), gpt(1, 64), spec="a100-80gb-sxm", context=64, batches=(1,),
                               draft_tokens=(2, 4))
    assert sd.vocab == 256 and sd.spec.name == "a100-80gb-sxm"
    # fp32 (the models' own): 4 layers x (k + v) x 256 wide x 4 bytes per position, 64 + 3 positions read
    assert sd.steps[1]["verify"][2].kv_read_bytes == 67 * 4 * 2 * 256 * 4
    assert sd.speedup(0.0, 2, 1) < 1 < sd.speedup(0.9, 4, 1)


def test_advise_with_a_draft_adds_a_section_and_leaves_the_rest():
    target = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    draft = _on_meta(lambda: Transformer(LlamaConfig.tiny(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)))
    # the default context is the model's 128 positions less the step's one: verifying 4 drafted tokens needs 5
    plain = shapeprof.advise(target, spec="h100-sxm", batches=(1, 8))
    adv = shapeprof.advise(target, spec="h100-sxm", batches=(1, 8), draft=draft, draft_tokens=(2, 4))
    assert plain.speculative is None and "speculative" not in plain.to_dict()
    assert "Speculative decoding" not in str(plain)
    sd = adv.speculative
    assert plain.context == adv.context == 127
    assert isinstance(sd, shapeprof.Speculative) and sd.context == 123 and sd.batches == (1, 8, 32, 64)
    assert sd.draft_tokens == (2, 4) and sd.spec.name == "h100-sxm" and sd.dtype == "bf16"
    text = str(adv)
    assert "Speculative decoding with Transformer as the draft" in text
    assert f"{sd.speedup(0.8, 4, 1):.2f}x" in text and f"{sd.break_even(4, 64):.3f}" in text
    assert json.loads(adv.to_json())["speculative"]["batches"][0]["batch"] == 1
    # what advise said before the draft, it still says, and a note why the speculative context is shorter
    assert adv.notes == [*plain.notes, "speculative decoding priced at context 123: verifying 4 drafted tokens adds "
                                       "5 positions, and Transformer holds 128"]
    assert {k: v for k, v in adv.to_dict().items() if k not in ("speculative", "notes")} == \
        {k: v for k, v in plain.to_dict().items() if k != "notes"}
