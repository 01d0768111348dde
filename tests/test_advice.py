"""shapeprof.advise and its batch sweep: the seed's Linear exactly, decode sweeps against direct analyses, online and
offline batches, memory and tensor parallelism, the CLI."""
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shapeprof
from examples.llama import LlamaConfig, Transformer
from shapeprof.advice import READING_TOKENS_PER_SECOND, batch_sweep

REPO = Path(__file__).resolve().parent.parent


def _tiny_llama():
    with torch.device("meta"):
        return Transformer(LlamaConfig.tiny())


def test_seed_linear_crosses_the_ridge_at_189():
    sweep = batch_sweep(torch.nn.Linear(1024, 4096), lambda b: (shapeprof.InputShape((b, 1024)),),
                        spec="a100-80gb-sxm", dtype=torch.bfloat16)
    assert sweep.exact
    assert sweep.step(1)[1] == "memory" and sweep.step(512)[1] == "compute"
    (linear,) = sweep.crossings()
    # F(b) = 2 b 1024 4096 = 8,388,608 b; bytes(b) = weight 8,388,608 + bias 8,192 + b (1024 + 4096) 2.
    # Compute-bound once F / 312e12 >= bytes / 2.039e12: b (8,388,608 x 2.039 - 10,240 x 312) >= 312 x 8,396,800,
    # b >= 2,619,801,600 / 13,909,491.7 = 188.3
    assert linear.batch == 189 and linear.calls == 1
    assert (linear.flops_at_1, linear.bytes_at_1) == (8_388_608, 8_396_800 + 10_240)
    assert sweep.step(188)[1] == "memory" and sweep.step(189)[1] == "compute"
    assert sweep.step_crossing() == 189


def test_decode_sweep_equals_direct_analyses():
    model = _tiny_llama()
    sweep = batch_sweep(model, lambda b: (shapeprof.Decode(b, 24),), dtype=torch.bfloat16)
    assert sweep.exact
    for b in (3, 32, 100):   # the oracle: analysing that batch directly
        direct = shapeprof.analyze(model, shapeprof.Decode(b, 24), dtype=torch.bfloat16)
        seconds, _, flops, nbytes = sweep.step(b)
        assert (flops, nbytes) == (direct.total.flops, direct.total.bytes)
        assert seconds == pytest.approx(direct.total.predicted_seconds, rel=1e-12)


def test_advise_answers_for_a_small_llama():
    adv = shapeprof.advise(_tiny_llama(), spec="h100-sxm", dtype=torch.bfloat16, context=100)
    # bf16 cache: 2 layers x (k + v) x 2 kv heads x 16 x 2 bytes = 256 per position; 128 positions at most
    assert adv.memory["kv_per_token"] == 256 and adv.memory["full_context"] == 128
    assert adv.memory["kv_per_sequence_full_context"] == 128 * 256
    assert adv.memory["weights"] == 131_392 * 2 and adv.parallel is None
    assert adv.decode["kv_read_bytes"] == 101 * 256 and adv.prefill["kv_written_bytes"] == 100 * 256
    online = adv.online
    assert online["reading_tokens_per_second"] == pytest.approx(238 / 60 / 0.75) == READING_TOKENS_PER_SECOND
    assert online["per_sequence"] >= READING_TOKENS_PER_SECOND
    assert [r["batch"] for r in adv.sweep] == [2 ** i for i in range(11)]
    rows = adv.sweep
    assert all(a["tokens_per_second"] <= b["tokens_per_second"] for a, b in zip(rows, rows[1:]))
    assert adv.offline["batch"] >= online["batch"]
    assert {c.group.split()[-1] for c in adv.crossings} >= {"aten.mm"}
    text = str(adv)
    for title in ("Prefill and decode", "Decode batch sweep", "Where each matmul turns compute-bound", "online:",
                  "offline:", "memory:"):
        assert title in text
    assert json.loads(adv.to_json())["memory"]["kv_per_token"] == 256


def test_online_batch_is_the_largest_above_reading_speed():
    model = _tiny_llama()
    spec = dataclasses.replace(shapeprof.get_spec("a100-80gb-sxm"), name="slow", memory_bandwidth=2e6)
    adv = shapeprof.advise(model, spec=spec, dtype=torch.bfloat16, context=64)
    sweep = batch_sweep(model, lambda b: (shapeprof.Decode(b, 64),), spec=spec, dtype=torch.bfloat16)
    b = adv.online["batch"]
    assert b is not None and 1 / sweep.step(b)[0] >= READING_TOKENS_PER_SECOND > 1 / sweep.step(b + 1)[0]


def test_a_model_too_big_for_the_device_gets_a_tensor_parallel_degree():
    # 200 kB of memory: 180 kB usable, less than the 262,784 bytes of bf16 weights; half of them fit
    spec = dataclasses.replace(shapeprof.get_spec("a100-80gb-sxm"), name="small", memory_capacity=200_000)
    adv = shapeprof.advise(_tiny_llama(), spec=spec, dtype=torch.bfloat16, context=32)
    p = adv.parallel
    assert adv.memory["fits_on_one_device"] is False and p["degree"] == 2
    assert p["weights_per_device"] == 131_392
    # two all-reduces per layer of one token's residual (64 x 2 bytes), a ring over 2 sending half of it each
    # way at 300 GB/s (NVLink 3: 600 GB/s both directions)
    assert p["decode_all_reduce_seconds_per_layer_batch_1"] == pytest.approx(2 * (2 * 1 / 2 * 128 / 300e9))
    assert p["decode_all_reduce_seconds_per_token_step"] == pytest.approx(2 * 2 * 128 / 2 / 300e9 * 2)
    assert "tensor parallel x2" in str(adv)


def test_context_past_the_model_is_refused():
    with pytest.raises(ValueError, match="context=128: a decode step adds a position, and Transformer holds at "
                                         "most 128"):
        shapeprof.advise(_tiny_llama(), context=128)


SCRIPT = """
import torch
from examples.llama import LlamaConfig, Transformer
model = Transformer(LlamaConfig.tiny()).eval()
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
"""


def _run(args, cwd):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "shapeprof", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_advise_and_trace_phase(tmp_path):
    (tmp_path / "llm.py").write_text(textwrap.dedent(SCRIPT))
    adv = _run(["advise", "--spec", "h100-sxm", "--context", "64", "--json", "llm.py"], tmp_path)
    assert adv.returncode == 0, adv.stderr
    data = json.loads(adv.stdout)
    assert data["model"] == "Transformer" and data["context"] == 64 and data["spec"] == "h100-sxm"
    assert data["decode"]["kv_read_bytes"] == 65 * 256
    trace = _run(["trace", "--phase", "decode", "--batch", "2", "--context", "16", "--json", "--no-tensorboard",
                  "--logdir", "runs", "llm.py"], tmp_path)
    assert trace.returncode == 0, trace.stderr
    report = shapeprof.Report.from_json(next((tmp_path / "runs").rglob("Transformer/report.json")))
    assert report.phase.kind == "decode" and report.phase.kv_read_bytes == 2 * 17 * 512
    saved = _run(["advise", "--context", "16", "--logdir", "tb", "llm.py"], tmp_path)
    assert saved.returncode == 0, saved.stderr
    assert "Decode batch sweep" in saved.stdout and (tmp_path / "tb" / "llm-advise" / "advice.json").is_file()
    bad = _run(["trace", "--phase", "decode", "--optimize", "llm.py"], tmp_path)
    assert bad.returncode == 2 and "cannot be combined with --optimize" in bad.stderr
    measured = _run(["trace", "--phase", "decode", "--context", "16", "--profile", "--steps", "2", "--json",
                     "--no-tensorboard", "--logdir", "prof", "llm.py"], tmp_path)
    assert measured.returncode == 0, measured.stderr
    saved = shapeprof.Report.from_json(next((tmp_path / "prof").rglob("Transformer/measured.json")))
    assert saved.total.measured_seconds > 0


def test_a_measured_latency_floor_decides_the_online_batch():
    # 5 ms a kernel: a decode step of about ninety kernels takes about 0.45 s, 2.2 tokens/s, under reading speed
    floor = dataclasses.replace(shapeprof.get_spec("h100-sxm"), name="h100-slow-kernels", kernel_latency=5e-3)
    adv = shapeprof.advise(_tiny_llama(), spec=floor, dtype=torch.bfloat16, context=32)
    row = adv.sweep[0]
    assert row["achievable_seconds"] > 1 / READING_TOKENS_PER_SECOND and row["seconds"] < 1e-6
    assert row["per_sequence"] == pytest.approx(1 / row["achievable_seconds"])
    assert adv.online["batch"] is None and "slower than reading speed" in adv.online["why"]
    decode = adv.accountings["decode"]
    assert decode["fused"]["seconds_with_floor"] == pytest.approx(decode["fused"]["kernels"] * 5e-3)
    assert "achievable" in str(adv) and "latency floor of 5000.0 µs" in " ".join(adv.notes)


def test_tensorboard_text_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    adv = shapeprof.advise(_tiny_llama(), context=16)
    first, second = adv.write_tensorboard(tmp_path), adv.write_tensorboard(tmp_path)
    assert (first.name, second.name) == ("advise", "advise-1")      # a second run never overwrites the first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging folder left
    ea = EventAccumulator(str(first), size_guidance={"tensors": 0, "images": 0})
    ea.Reload()
    assert ea.Tags()["images"] == ["advise/sweep"]
    sweep = ea.Tensors("advise/sweep/text_summary")[0].tensor_proto.string_val[0].decode()
    assert sweep.startswith("| batch | step |") and "| 1024 |" in sweep
