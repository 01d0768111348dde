"""calibrate(): measure the two roofs of *this* machine (its CPU, or a CUDA device) as a DeviceSpec.

A built-in spec holds a vendor's datasheet peaks; to hold a model's *measured* time against a roofline, the
roofline has to be the machine's own. `calibrate` measures it:

- **compute roof**, one per dtype: a square dense matmul (``torch.mm``) big enough to be compute-bound,
  2·n³ FLOPs (1 multiply-add = 2 FLOPs, as everywhere in shapeprof), timed after a warm-up, median of several runs;
- **memory roof**: STREAM-style copy (``a = b``) and triad (``a = b + s·c``) over arrays larger than the last-level
  cache, counting the bytes read and written once each as STREAM does (the write-allocate read of ``a`` that
  a CPU's normal stores add is not counted, just as shapeprof's cost model does not count it); the better median.

Both are measured through PyTorch's own kernels, so they are the roofs PyTorch code can reach on this machine,
not the silicon's theoretical peaks.

    >>> from shapeprof.calibration import calibrate
    >>> from shapeprof.hardware import get_spec
    >>> spec = calibrate(budget_seconds=1.0)          # the CPU here (a CUDA device if there is one)
    >>> spec.peak_flops["fp32"] > 1e9, spec.memory_bandwidth > 1e9
    (True, True)
    >>> spec.save("this-machine.toml")                # doctest: +SKIP
    >>> get_spec("this-machine.toml") == spec         # doctest: +SKIP
    True

Results are cached for the process per (device, dtypes, CPU threads): a second call returns at once.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from .hardware import DeviceSpec

__all__ = ["DEFAULT_BUDGET_SECONDS", "DEFAULT_DTYPES", "calibrate", "clear_calibration_cache"]

DEFAULT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
DEFAULT_BUDGET_SECONDS = 3.0

#: peak_flops key a dense matmul in each dtype measures (see hardware.PEAK_KEYS).
#: The dtypes calibrate measures a matmul peak in -> the peak_flops key it fills.
MEASURED_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

_MiB = 2 ** 20
_BANDWIDTH_SHARE = 0.3          # of the budget, for the memory roof; the rest is shared by the matmuls


@dataclass(frozen=True)
class _Matmul:
    key: str
    n: int
    seconds: float              # median of the timed runs
    runs: int

    @property
    def flops(self) -> float:
        return 2.0 * self.n ** 3 / self.seconds


@dataclass(frozen=True)
class _Stream:
    array_bytes: int
    copy: float                 # bytes/s, read + written
    triad: float
    runs: int

    @property
    def bandwidth(self) -> float:
        return max(self.copy, self.triad)


_CACHE: dict[tuple, DeviceSpec] = {}


def clear_calibration_cache() -> None:
    """Forget every spec `calibrate` measured in this process (the next call measures again)."""
    _CACHE.clear()


def calibrate(device: str | torch.device | None = None, *, dtypes: Iterable[torch.dtype] = DEFAULT_DTYPES,
              budget_seconds: float = DEFAULT_BUDGET_SECONDS, name: str | None = None,
              refresh: bool = False) -> DeviceSpec:
    """Measure this machine's dense matmul peak per dtype and its sustained memory bandwidth.

    On a CPU, ``peak_flops["fp32"]`` is the measured fp32 matmul rate. shapeprof uses the "fp32" key as the roof
    of every non-matmul op too (the vector units). That is the right roof on a CPU: a CPU has no separate matrix
    units for fp32, so SGEMM runs on the very SIMD FMA units that elementwise ops use, and a well-blocked SGEMM
    is the best sustained use of them anyone gets (about 80-95% of the theoretical SIMD peak); an elementwise
    kernel in PyTorch is bound by memory long before it is bound by FMA throughput, so it cannot measure the
    FMA roof itself. bf16/fp16 matmuls may use other units (AVX512-BF16, AMX) and get their own key.
    On CUDA, "fp32" is measured with TF32 off (SGEMM on the CUDA cores, again the vector roof) and, on
    Ampere or newer, "tf32" with TF32 on; float64 on a GPU with FP64 tensor cores (A100, H100) is stored as
    "fp64_tensor", and "fp64" (the vector rate) as half of it, the ratio NVIDIA's datasheets give for those.

    Args:
        device: "cpu", "cuda" or "cuda:N" (or a torch.device). Default: the current CUDA device when
            `torch.cuda.is_available()`, else the CPU.
        dtypes: the matmul dtypes to measure, among float32, bfloat16, float16, float64. float32 is always
            measured (every spec needs "fp32"). A dtype the hardware only emulates is slow: the matrix size
            adapts to the budget, so it is still measured, just at a smaller size.
        budget_seconds: roughly how long the measurement may take (allocation and warm-up included).
            The default keeps it to a few seconds on a 2-core CPU; more time gives larger, steadier runs.
        name: the spec's name; default "cpu-<model>-<threads>t" or "cuda-<device name>".
        refresh: measure again even if this process measured the same device and dtypes before.

    Returns:
        A `DeviceSpec`; `spec.save("x.toml")` writes it, `shapeprof.load_spec` / `get_spec` read it back.

    Raises:
        ValueError: an unknown device or dtype, CUDA asked for but not available, a budget <= 0.
    """
    dev = _resolve_device(device)
    wanted = _check_dtypes(dtypes)
    if not (isinstance(budget_seconds, (int, float)) and budget_seconds > 0):
        raise ValueError(f"budget_seconds must be a positive number, got {budget_seconds!r}")
    key = (str(dev), wanted, torch.get_num_threads() if dev.type == "cpu" else None)
    spec = None if refresh else _CACHE.get(key)
    if spec is None:
        spec = _measure(dev, wanted, float(budget_seconds))
        _CACHE[key] = spec
    if name is not None:
        spec = replace(spec, name=name)
    return spec


# ---------------------------------------------------------------------------------------------- arguments

def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"cannot calibrate {str(dev)!r}: CUDA is not available on this machine")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"cannot calibrate {str(dev)!r}: there are {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    raise ValueError(f"calibrate measures a CPU or a CUDA device, not {str(dev)!r}")


def _check_dtypes(dtypes: Iterable[torch.dtype]) -> tuple[torch.dtype, ...]:
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,)
    out = [torch.float32]
    for d in dtypes:
        if d not in MEASURED_DTYPES:
            raise ValueError(f"calibrate measures matmuls in {', '.join(str(k) for k in MEASURED_DTYPES)}; "
                             f"not {d!r}")
        if d not in out:
            out.append(d)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- measuring

class _Clock:
    """Times one call of a function: wall clock on a CPU, CUDA events on a GPU (the GPU's own time)."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


def _median_time(fn: Callable[[], object], clock: _Clock, budget: float, one: float, *,
                 first: float | None = None, min_runs: int = 3, max_runs: int = 15) -> tuple[float, int]:
    """Median of timed runs of a warmed-up `fn` taking about `one` second each: as many as `budget` allows.

    `first`: a time already taken of a warm run, counted as one of the runs.
    """
    runs = max(min_runs, min(max_runs, int(budget / max(one, 1e-9))))
    times = [first] if first is not None else []
    times += [clock(fn) for _ in range(runs - len(times))]
    return statistics.median(times), runs


def _measure(dev: torch.device, dtypes: tuple[torch.dtype, ...], budget: float) -> DeviceSpec:
    clock = _Clock(dev)
    cuda = dev.type == "cuda"
    start = time.perf_counter()
    matmul_deadline = start + budget * (1 - _BANDWIDTH_SHARE)
    with torch.no_grad(), (torch.cuda.device(dev) if cuda else contextlib.nullcontext()):
        tf32 = cuda and torch.cuda.get_device_capability(dev) >= (8, 0) and torch.float32 in dtypes
        jobs: list[tuple[str, torch.dtype, str]] = [(MEASURED_DTYPES[d], d, "highest") for d in dtypes]
        if tf32:
            jobs.append(("tf32", torch.float32, "high"))
        matmuls = []
        for i, (key, dtype, precision) in enumerate(jobs):
            # each job gets its share of what is left, so an early overrun shrinks the later jobs
            share = (matmul_deadline - time.perf_counter()) / (len(jobs) - i)
            with _matmul_precision(precision):
                matmuls.append(_matmul(key, dtype, dev, clock, max(share, budget / 50)))
        left = max(start + budget - time.perf_counter(), budget * _BANDWIDTH_SHARE / 2)
        stream = _stream(dev, clock, left, _last_level_cache(dev))
        latency = _kernel_latency(dev)
    peaks = {m.key: m.flops for m in matmuls}
    if cuda and "fp64" in peaks and torch.cuda.get_device_capability(dev) in ((8, 0), (9, 0)):
        # A100 (8.0) and H100/H200 (9.0) run DGEMM on FP64 tensor cores at twice their vector FP64 rate
        peaks["fp64_tensor"] = peaks["fp64"]
        peaks["fp64"] = peaks["fp64_tensor"] / 2
    source = _source(matmuls, stream, dev) + f"; kernel latency {latency * 1e6:.2f} µs (back-to-back 1-element adds)"
    datasheet = _datasheet(dev)
    if datasheet is not None:
        # a GPU shapeprof has a datasheet for: its peaks stay the vendor's, what real kernels reach sits beside them
        return replace(datasheet, name=_default_name(dev), kernel_latency=latency,
                       achieved_bandwidth=stream.bandwidth, achieved_flops=peaks,
                       source=f"{datasheet.source}; {source}")
    return DeviceSpec(
        name=_default_name(dev), display_name=_display_name(dev), peak_flops=peaks,
        memory_bandwidth=stream.bandwidth, memory_capacity=float(_memory_capacity(dev)),
        l2_cache=_last_level_cache(dev), sm_count=_units(dev), interconnect_bandwidth=0.0,
        source=source, kernel_latency=latency, achieved_bandwidth=stream.bandwidth, achieved_flops=peaks)


_LATENCY_CALLS = 200


def _kernel_latency(dev: torch.device) -> float:
    """The least time one kernel takes, as a decode step's many tiny kernels see it: 1-element adds issued back to
    back through PyTorch (launch and dispatch included, the work nil), wall time over the calls, median of 5."""
    x = torch.zeros(1, device=dev)
    out = torch.empty_like(x)
    for _ in range(20):   # warm-up: first launches load kernels
        torch.add(x, 1, out=out)
    times = []
    for _ in range(5):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(_LATENCY_CALLS):
            torch.add(x, 1, out=out)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - start) / _LATENCY_CALLS)
    return statistics.median(times)


def _datasheet(dev: torch.device) -> DeviceSpec | None:
    """The built-in spec of this GPU (by the name CUDA reports), None for a CPU or a GPU shapeprof has none for."""
    if dev.type != "cuda":
        return None
    from .hardware import list_specs
    name = torch.cuda.get_device_name(dev)
    return next((s for s in list_specs() if s.display_name == name), None)


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """fp32 matmuls in full fp32 ("highest") or allowed to use TF32 ("high"); restored afterwards."""
    before = torch.get_float32_matmul_precision()
    if before == precision:
        yield
        return
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _matmul(key: str, dtype: torch.dtype, dev: torch.device, clock: _Clock, budget: float) -> _Matmul:
    """Median time of an n x n x n matmul, n doubled from a small start while the next size still fits.

    Each doubling makes a run up to 8x longer; n grows while the next size's run would take at most a quarter
    of the budget (so a warm-up and three timed runs fit), up to a cap where any device is compute-bound
    (intensity n/6 FLOP/byte in fp32: 680 at n=4096, far above every ridge point). Small sizes are dominated
    by fixed costs (thread wake-up, kernel launch) and grow less than 8x per doubling; the next run's time is
    predicted with the growth just seen (4x to 8x). Only the last size's rate is kept.
    """
    cuda = dev.type == "cuda"
    n, n_max = (1024, 16384) if cuda else (256, 4096)
    gen = torch.Generator(device=dev).manual_seed(0)
    growth, previous = 4.0, None
    while True:
        # random operands: on a GPU, zeros run faster (less power, higher clocks) than real data
        a = torch.empty(n, n, dtype=dtype, device=dev).uniform_(-1, 1, generator=gen)
        b = torch.empty(n, n, dtype=dtype, device=dev).uniform_(-1, 1, generator=gen)
        out = torch.empty(n, n, dtype=dtype, device=dev)
        fn = lambda: torch.mm(a, b, out=out)  # noqa: E731
        clock(fn)                 # first call: library dispatch, kernel selection, JIT (oneDNN, cuBLAS)
        one = clock(fn)
        if previous is not None:
            growth = min(max(one / previous, 4.0), 8.0)
        if growth * one > budget / 4 or n >= n_max:
            break
        n, previous = n * 2, one
    seconds, runs = _median_time(fn, clock, budget - 2 * one, one, first=one)
    return _Matmul(key, n, seconds, runs)


def _stream(dev: torch.device, clock: _Clock, budget: float, llc: int) -> _Stream:
    """STREAM copy (a = b) and triad (a = b + 3c) over three float32 arrays of 4x the last-level cache each.

    The arrays are at least 32 MiB and are capped, to 1/16 of memory and by the budget (on a CPU 128 MiB
    each under 1.5 s, 256 MiB above; on a GPU 1 GiB): first-touching a GiB of fresh pages alone takes seconds
    on some virtual machines. Where the cap is below 4x the cache, part of the working set could still be
    served from it; `source` records the array size used.
    """
    if dev.type == "cuda":
        cap = 1024 * _MiB
    else:
        cap = (256 if budget >= 1.5 else 128) * _MiB
    size = min(max(4 * llc, 32 * _MiB), cap, int(_memory_capacity(dev) // 16))
    n = size // 4
    start = time.perf_counter()
    a = torch.zeros(n, device=dev)           # zeros/full touch every page before anything is timed
    b = torch.full((n,), 1.0, device=dev)
    c = torch.full((n,), 2.0, device=dev)
    clock.sync()
    copy = lambda: a.copy_(b)  # noqa: E731
    triad = lambda: torch.add(b, c, alpha=3.0, out=a)  # noqa: E731
    clock(copy)
    one = clock(copy)
    left = budget - (time.perf_counter() - start)
    t_copy, runs = _median_time(copy, clock, left / 2, one, first=one)
    clock(triad)
    one = clock(triad)
    t_triad, _ = _median_time(triad, clock, left / 2 - one, one, first=one)
    return _Stream(n * 4, 2 * n * 4 / t_copy, 3 * n * 4 / t_triad, runs)


# ---------------------------------------------------------------------------------------------- the machine

def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for field in ("model name", "Model", "Hardware", "cpu model"):
        m = re.search(rf"^{field}\s*:\s*(.+)$", text, re.MULTILINE)
        if m and m.group(1).strip():
            return " ".join(m.group(1).split())
    return platform.processor() or platform.machine() or "unknown"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", " ", text.lower())
    text = re.sub(r"@.*$", " ", text)                     # "@ 2.90GHz": the clock is not the model
    words = [w for w in re.split(r"[^a-z0-9.]+", text) if w and w not in ("cpu", "processor", "with")]
    return "-".join(words).strip("-.") or "unknown"


def _default_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda-{_slug(torch.cuda.get_device_name(dev))}"
    return f"cpu-{_slug(_cpu_model())}-{torch.get_num_threads()}t"


def _display_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def _units(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return max(1, torch.get_num_threads())


def _memory_capacity(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:  # psutil is a dependency; this is for a stripped-down environment
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _last_level_cache(dev: torch.device) -> int:
    """Bytes of the last-level cache: CUDA's L2; on a CPU the highest-level data cache in sysfs (0 if unknown).

    A CPU's L3 is shared by all cores (and, in a VM, is the host's whole L3), so it is reported as is.
    """
    if dev.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0))
    best = (0, 0)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and (level, size) > best:
            best = (level, size)
    return best[1]


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[m.group(2).upper()]


def _source(matmuls: list[_Matmul], stream: _Stream, dev: torch.device) -> str:
    mm = ", ".join(f"{m.key} mm n={m.n} {m.flops / 1e9:,.0f} GFLOP/s" for m in matmuls)
    threads = "" if dev.type == "cuda" else f", {torch.get_num_threads()} threads"
    return (f"measured by shapeprof.calibrate on {datetime.date.today().isoformat()}: {mm} (median of "
            f"{min(m.runs for m in matmuls)}+ runs); STREAM over {stream.array_bytes // _MiB} MiB float32 arrays: "
            f"copy {stream.copy / 1e9:,.1f} GB/s, triad {stream.triad / 1e9:,.1f} GB/s (median of {stream.runs}+ "
            f"runs; the better one is the roof); torch {torch.__version__}{threads}")
