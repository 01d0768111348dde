"""KV-cache insertion: greedy decoding tokens/s of a nanoGPT-style GPT-2 (no cache of its own), the same model after
`shapeprof.optimize` (which inserts a KV cache; its unchanged `generate()` then decodes incrementally), and
HuggingFace's `GPT2LMHeadModel` with its own cache, timed side by side in one run.

    python benchmarks/kv_cache.py                        # GPT-2 small shapes, batch 1 and 8, CPU fp32
    python benchmarks/kv_cache.py --batch 1 --runs 1     # one batch size, one run of each
    python benchmarks/kv_cache.py --small                # tiny shapes, 8 new tokens, 1 run: a smoke test of seconds
    python benchmarks/kv_cache.py --device cuda --dtype bf16    # on a GPU

Three ways of decoding the same prompt (random token ids, fixed seed; default 16 tokens, 256 new, greedy):

1. original: `examples/nanogpt.py`'s GPT (`GPTConfig.gpt2()`: 12 layers, 768 wide, 12 heads, vocab 50304, block
   1024; ``flash=True``, ``--manual`` for the spelled-out attention) calling its own ``generate(greedy=True)``,
   which runs the whole sequence again for every new token;
2. optimized: ``fast = shapeprof.optimize(model, idx)``, called once before any timing (its time is reported on its
   own line), then ``fast.generate(...)``, the same method, now served by the inserted cache;
3. HF: ``GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50304, n_positions=1024))`` with
   random weights (nothing is downloaded), SDPA attention where accepted, decoded by a hand-written greedy loop on its
   own cache: a prefill ``hf(ids, use_cache=True)``, then one token per call with the cache the last call returned.
   ``hf.generate`` is not used: its per-step overhead is not what is compared.

Every model is in eval mode with frozen weights (``requires_grad_(False)``, as an inference deployment loads them)
and runs under ``torch.no_grad()``; torch's default thread count is left as it is. (1) and (2) share their weights
and must give identical tokens (checked with ``torch.equal``; in bf16 the two ways round differently, so there the
agreement is reported, not asserted); HF's weights are other random ones, so only its speed is compared.
Each timing is repeated ``--runs`` times (``--runs-original`` for the original, which takes minutes a run), in
interleaved rounds, and the medians reported. Before each timed ``fast.generate`` a one-token call with another
first token empties the cache, so every timed run prefills from scratch like the others.
Results go into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # examples/ from a source checkout

import shapeprof  # noqa: E402
from examples.nanogpt import GPT, GPTConfig  # noqa: E402

TARGET_VS_ORIGINAL = 10.0   # optimized / original tokens/s
TARGET_VS_HF = 1.1          # optimized / HF tokens/s
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def configs(small: bool, manual: bool) -> tuple[GPTConfig, dict]:
    """The nanoGPT config and the matching GPT2Config keyword arguments."""
    if small:
        gpt = GPTConfig.tiny(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64, flash=not manual)
    else:
        gpt = GPTConfig.gpt2(flash=not manual)
    hf = dict(n_layer=gpt.n_layer, n_embd=gpt.n_embd, n_head=gpt.n_head, vocab_size=gpt.vocab_size,
              n_positions=gpt.block_size)
    return gpt, hf


def build_hf(hf_kwargs: dict, device: str, dtype: torch.dtype):
    """GPT2LMHeadModel with random weights, SDPA attention if this transformers accepts it. -> (model, attention)"""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(1)
    try:
        config = transformers.GPT2Config(**hf_kwargs, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(config)
    except (TypeError, ValueError, ImportError):
        config = transformers.GPT2Config(**hf_kwargs)
        model = transformers.GPT2LMHeadModel(config)
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), attention


def hf_cache_names(model) -> tuple[str, str]:
    """(forward keyword, output attribute) of HF's cache: `cache` in transformers 5.x, `past_key_values` before
    (5.x still takes `past_key_values`, with a deprecation warning on every call)."""
    if "cache" in inspect.signature(type(model).forward).parameters:
        return "cache", "cache"
    return "past_key_values", "past_key_values"


def hf_greedy(model, ids: torch.Tensor, new_tokens: int, cache_names: tuple[str, str]) -> torch.Tensor:
    """Greedy decoding on HF's own cache, by hand: prefill, then one token per call."""
    keyword, attribute = cache_names
    out = model(ids, use_cache=True)
    tokens = [ids]
    for i in range(new_tokens):
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)   # (b, 1)
        tokens.append(nxt)
        if i + 1 < new_tokens:
            out = model(nxt, use_cache=True, **{keyword: getattr(out, attribute)})
    return torch.cat(tokens, dim=1)


def timed(fn, sync) -> tuple[float, torch.Tensor]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def decoder_calls(fast) -> dict | None:
    """How the inserted cache served the drop-in's calls (incremental / from scratch / not served), if it has one."""
    decoder = type(fast).__dict__.get("_shapeprof_decoder")
    calls = getattr(decoder, "calls", None)
    return dict(calls) if isinstance(calls, dict) else None


def applied_summary(report) -> str:
    parts = []
    for o in report.outcomes:
        n = len(o.result.applied) if o.result is not None else 0
        parts.append(f"{o.name} {o.status}" + (f" ({n})" if n else "") + (f": {o.error}" if o.error else ""))
    return "; ".join(parts) or f"nothing ran ({report.refused or 'no rewrite'})"


def kv_cache_applied(report) -> bool:
    return any(o.name == "kv_cache" and o.kept and o.result is not None and o.result.applied
               for o in report.outcomes)


def first_difference(a: torch.Tensor, b: torch.Tensor, prompt: int) -> str:
    if a.shape != b.shape:
        return f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    differs = (a != b).any(dim=0).nonzero()
    step = int(differs[0]) - prompt + 1 if len(differs) else 0
    return f"first difference at new token {step} of {a.shape[1] - prompt}; {(a == b).float().mean():.1%} equal"


def bench(model: GPT, hf, hf_names, attention: str, batch: int, args, device: str, dtype: torch.dtype) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    vocab, prompt, new = model.config.vocab_size, args.prompt, args.new_tokens
    gen = torch.Generator().manual_seed(args.seed + batch)
    idx = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    flush = ((idx[:, :1] + 1) % vocab)   # a different first token: the cache starts again

    start = time.perf_counter()
    fast = shapeprof.optimize(model, idx)
    optimize_s = time.perf_counter() - start
    report = fast.shapeprof_report
    if args.report:
        print(report)
    cached = kv_cache_applied(report)

    with torch.no_grad():
        # warm-up (not timed): one short generation each
        model.generate(idx, 1, greedy=True)
        fast(flush)
        fast.generate(idx, min(2, new), greedy=True)
        hf_greedy(hf, idx, min(2, new), hf_names)

        times = {"original": [], "optimized": [], "hf": []}
        reference, mismatch = None, None
        calls_before = decoder_calls(fast)
        for r in range(max(args.runs, args.runs_original)):
            if r < args.runs_original:
                seconds, out = timed(lambda: model.generate(idx, new, greedy=True), sync)
                times["original"].append(seconds)
                reference = out if reference is None else reference
            if r < args.runs:
                fast(flush)   # empty the cache (outside the timing): this run prefills from scratch
                seconds, out_fast = timed(lambda: fast.generate(idx, new, greedy=True), sync)
                times["optimized"].append(seconds)
                if reference is not None and not torch.equal(out_fast, reference) and mismatch is None:
                    mismatch = first_difference(out_fast, reference, prompt)
                seconds, out_hf = timed(lambda: hf_greedy(hf, idx, new, hf_names), sync)
                times["hf"].append(seconds)
                assert out_hf.shape == (batch, prompt + new), out_hf.shape
        calls_after = decoder_calls(fast)

    identical = mismatch is None
    if dtype == torch.float32:
        assert identical, f"original and optimized generate() differ: {mismatch}"
    medians = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: batch * new / s for k, s in medians.items()}
    served = None
    if calls_before is not None and calls_after is not None:
        served = {k: calls_after[k] - calls_before.get(k, 0) for k in calls_after}
    return dict(batch=batch, times=times, medians=medians, rate=rate, optimize_s=optimize_s, identical=identical,
                mismatch=mismatch, applied=applied_summary(report), cached=cached, served=served,
                attention=attention)


def print_result(res: dict, args, label: str) -> None:
    batch, new = res["batch"], args.new_tokens
    print(f"\n{label}, batch {batch}, prompt {args.prompt} tokens, {new} new tokens (greedy)")
    header = f"{'':<44} {'runs (s)':<26} {'median s':>9} {'tokens/s':>10} {'ms/step':>8}"
    print(header)
    print("-" * len(header))
    names = {"original": "original generate() (no cache)",
             "optimized": "shapeprof.optimize -> fast.generate()",
             "hf": f"HF GPT2LMHeadModel, own cache ({res['attention']})"}
    for key, name in names.items():
        runs = " ".join(f"{t:.2f}" for t in res["times"][key])
        m = res["medians"][key]
        print(f"{name:<44} {runs:<26} {m:>9.3f} {res['rate'][key]:>10.1f} {m / new * 1e3:>8.2f}")
    print(f"optimize(): {res['optimize_s']:.2f} s, once, not in the timings; {res['applied']}")
    if not res["cached"]:
        print("  WARNING: the kv_cache rewrite did not apply (run with --report to see why)")
    if res["served"] is not None:
        s = res["served"]
        print(f"  the inserted cache served the timed calls: {s.get('incremental', 0)} incremental, "
              f"{s.get('from scratch', 0)} from scratch (incl. {args.runs} cache-emptying "
              f"call{'s' if args.runs > 1 else ''}), "
              f"{s.get('not served', 0)} not served")
    print(f"identical tokens: {'yes' if res['identical'] else 'no (' + res['mismatch'] + ')'}")
    r_orig = res["rate"]["optimized"] / res["rate"]["original"]
    r_hf = res["rate"]["optimized"] / res["rate"]["hf"]
    print(f"optimized / original: {r_orig:7.2f}x  (target >= {TARGET_VS_ORIGINAL:g}x: "
          f"{'met' if r_orig >= TARGET_VS_ORIGINAL else 'NOT met'})")
    print(f"optimized / HF:       {r_hf:7.2f}x  (target >= {TARGET_VS_HF:g}x: "
          f"{'met' if r_hf >= TARGET_VS_HF else 'NOT met'})")


def print_summary(rows: list[tuple[str, dict]], small: bool) -> None:
    print("\nsummary (tokens/s = batch x new tokens / median seconds)")
    header = (f"{'device, dtype':<16} {'batch':>5} {'original':>10} {'optimized':>10} {'HF':>10} "
              f"{'opt/orig':>9} {'opt/HF':>7}  identical")
    print(header)
    print("-" * len(header))
    for label, r in rows:
        rate = r["rate"]
        print(f"{label:<16} {r['batch']:>5} {rate['original']:>10.1f} {rate['optimized']:>10.1f} {rate['hf']:>10.1f} "
              f"{rate['optimized'] / rate['original']:>8.2f}x {rate['optimized'] / rate['hf']:>6.2f}x  "
              f"{'yes' if r['identical'] else 'no'}")
    print(f"targets: optimized / original >= {TARGET_VS_ORIGINAL:g}x, optimized / HF >= {TARGET_VS_HF:g}x"
          + (" (for GPT-2 small shapes and 256 new tokens: --small is a smoke test, its ratios mean nothing)"
             if small else ""))
    print(load_average("at the end"))


def load_average(when: str) -> str:
    """The 1-minute load average: other busy processes make torch's threads wait for each other (noise)."""
    try:
        return f"load average {when}: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return f"load average {when}: unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens (default 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 256; 8 with --small)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs of optimized and HF (default 3; 1 with --small)")
    parser.add_argument("--runs-original", type=int, default=1,
                        help="timed runs of the original generate(), ~1-2 min each at batch 1 (default 1)")
    parser.add_argument("--manual", action="store_true", help="nanoGPT's manual attention (flash=False)")
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes (2 layers, 64 wide, vocab 256, block 64) and 8 new tokens: a smoke test")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu",
                        help="cpu (default), cuda, or all (cpu, then cuda if available)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto (default): fp32 on the CPU, bf16 on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="print optimize()'s full report")
    args = parser.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 8 if args.small else 256
    if args.runs is None:
        args.runs = 1 if args.small else 3
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if args.runs < 1 or args.runs_original < 1:
        parser.error("--runs and --runs-original must be at least 1")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}
    devices = devices[args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    warnings.simplefilter("ignore", FutureWarning)
    gpt_config, hf_kwargs = configs(args.small, args.manual)
    if args.prompt + args.new_tokens > gpt_config.block_size:
        parser.error(f"prompt + new tokens = {args.prompt + args.new_tokens} > block size {gpt_config.block_size}")
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} CPU threads "
          f"(torch's default), {'CUDA: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}")
    c = gpt_config
    print(f"model: nanoGPT GPT ({'--small: ' if args.small else 'GPTConfig.gpt2(): '}{c.n_layer} layers, {c.n_embd} "
          f"wide, {c.n_head} heads, vocab {c.vocab_size}, block {c.block_size}, "
          f"{'flash' if c.flash else 'manual'} attention) vs HF GPT2LMHeadModel of the same shapes")
    print("every model: eval(), weights frozen with model.requires_grad_(False), run under torch.no_grad(); "
          f"runs: {args.runs} (original: {args.runs_original}), medians reported")
    print(load_average("at the start") + " (torch's threads slow down many times over on a busy machine)")

    rows = []
    for device in devices:
        dtype = DTYPES["bf16" if device == "cuda" else "fp32"] if args.dtype == "auto" else DTYPES[args.dtype]
        dname = {v: k for k, v in DTYPES.items()}[dtype]
        torch.manual_seed(args.seed)
        model = GPT(gpt_config).to(device=device, dtype=dtype).eval().requires_grad_(False)
        hf, attention = build_hf(hf_kwargs, device, dtype)
        hf_names = hf_cache_names(hf)
        label = f"{device.upper() if device == 'cpu' else 'CUDA'}, {dname}"
        for batch in batches:
            res = bench(model, hf, hf_names, attention, batch, args, device, dtype)
            print_result(res, args, label)
            rows.append((label, res))
        del model, hf
    print_summary(rows, args.small)


if __name__ == "__main__":
    main()
