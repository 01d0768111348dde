"""Device specs: the two roofs (peak FLOP/s per number format, main-memory bandwidth) of a GPU.

A device does at most `P` FLOP/s and moves at most `B` bytes/s from its main memory; an op that
does `F` FLOPs and moves `M` bytes takes at least `max(F/P, M/B)`. This module holds `P` (one figure
per number format, since a bf16 matmul on tensor cores and an fp32 add on the vector units run at
very different rates) and `B` for a table of common devices, and reads and writes user specs as
TOML or JSON.

    >>> spec = get_spec("a100-80gb-sxm")
    >>> round(spec.ridge(torch.bfloat16), 1)      # FLOP per byte where bf16 matmuls turn compute-bound
    153.0
    >>> spec.peak_for(torch.bfloat16, matmul=False) / 1e12   # elementwise bf16 runs in fp32 opmath
    19.5

Units, everywhere (built-ins, files, fields): FLOP/s, bytes/s and bytes, as plain numbers.
Bandwidths are decimal as the vendors quote them (2.039e12 B/s is "2,039 GB/s"); memory and cache
capacities are binary, because that is what the "80 GB" of an HBM or GDDR card is (5 stacks of
16 GiB; `torch.cuda.get_device_properties` reports an A100-80GB's L2 as 41,943,040 bytes = 40 MiB).

Every peak is the vendor's *dense* figure: datasheets print the 2:4 structured-sparsity rate (twice
the dense one) with an asterisk, and a dense matmul never reaches it. Peaks are peaks: achieved
rates are lower (clocks under power limits, tile quantisation, launch overhead); the roofline
is a lower bound on time, which is what makes it useful for finding the bottleneck.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

__all__ = [
    "BUILTIN_SPECS",
    "DEFAULT_SPEC_NAME",
    "PEAK_KEYS",
    "DeviceSpec",
    "SpecError",
    "check_spec_path",
    "get_spec",
    "list_specs",
    "load_spec",
]

#: Number formats a spec may give a peak for, in the order they are written out.
#: "fp32" and "fp64" are the vector units (CUDA cores / SIMD lanes, no tensor cores); "fp64_tensor"
#: is the FP64 tensor-core / matrix-core rate that DGEMM reaches on A100, H100 and MI300X;
#: the rest are tensor-core (matrix-core) dense rates.
PEAK_KEYS: tuple[str, ...] = ("fp64", "fp64_tensor", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")
_REQUIRED_PEAKS = ("fp32",)


class SpecError(ValueError):
    """A device spec that cannot be found, read or validated. The message is one line."""


class _ReadOnlyDict(dict):
    """A dict that refuses mutation.

    A dict subclass rather than `types.MappingProxyType` so that `dataclasses.asdict`, `copy.deepcopy`,
    `pickle` and `json.dumps` keep working on a DeviceSpec (a mappingproxy can be none of these).
    """

    __slots__ = ()

    def _readonly(self, *args, **kwargs):
        raise TypeError("DeviceSpec.peak_flops is read-only; build a new spec with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v!r}' for k, v in self.items())}}}"


@dataclass(frozen=True)
class DeviceSpec:
    """One device's roofline figures.

        >>> spec = get_spec("h100-sxm")
        >>> spec.peak_flops["bf16"] / 1e12, spec.memory_bandwidth / 1e12
        (989.4, 3.35)
        >>> round(spec.ridge(torch.bfloat16))
        295

    Attributes:
        name: registry key, e.g. "a100-80gb-sxm" (built-ins are lower case).
        display_name: the name `torch.cuda.get_device_name()` reports for the device (so
            `get_spec(torch.cuda.get_device_name())` finds the running GPU's spec).
        peak_flops: dense FLOP/s (OP/s for int8) by number format; keys from `PEAK_KEYS`, "fp32"
            required. Read-only.
        memory_bandwidth: bytes/s of main memory (HBM or GDDR), the vendor's peak.
        memory_capacity: bytes of main memory.
        l2_cache: bytes of the last-level on-chip cache in front of main memory (L2 on NVIDIA;
            on MI300X the 256 MiB Infinity Cache, not the 4 MiB per-XCD L2).
        sm_count: streaming multiprocessors (compute units on AMD; cores for a CPU spec).
        interconnect_bandwidth: bytes/s one device exchanges with its peers, both directions
            added, as NVIDIA and AMD quote it (A100 NVLink: 600 GB/s = 300 each way); for a PCIe
            card, its x16 slot (Gen4: 64 GB/s, Gen5: 128 GB/s, both directions). 0 means none.
        source: where the numbers come from.
        kernel_latency: seconds one kernel takes at least, however little it does (launch and ramp-up): a decode
            step is made of kernels of a few microseconds, where a pure roofline is optimistic. Measured by
            `shapeprof.calibrate` on the device; 0 on the built-in datasheet specs.
        achieved_bandwidth, achieved_flops: what real kernels reach (a STREAM copy, a large matmul per format),
            beside the datasheet's peaks; measured by calibrate, empty on the built-in specs. `achievable_time`
            prices an op with them and the latency floor.
    """

    name: str
    display_name: str
    peak_flops: Mapping[str, float]
    memory_bandwidth: float
    memory_capacity: float
    l2_cache: int
    sm_count: int
    interconnect_bandwidth: float
    source: str = ""
    kernel_latency: float = 0.0            # seconds: the least one kernel takes (launch, ramp-up); 0: not measured
    achieved_bandwidth: float = 0.0        # bytes/s a large copy really reaches; 0: not measured
    achieved_flops: Mapping[str, float] = field(default_factory=dict)   # per peak key, what a large matmul reaches

    def __post_init__(self) -> None:
        def set_(key: str, value: Any) -> None:   # frozen: normalise each field once, here
            object.__setattr__(self, key, value)

        set_("name", _check_str("name", self.name, nonempty=True))
        set_("display_name", _check_str("display_name", self.display_name, nonempty=True))
        set_("source", _check_str("source", self.source))
        set_("peak_flops", _check_peaks(self.peak_flops))
        set_("memory_bandwidth", _check_float("memory_bandwidth", self.memory_bandwidth, positive=True))
        set_("memory_capacity", _check_float("memory_capacity", self.memory_capacity, positive=True))
        set_("l2_cache", _check_int("l2_cache", self.l2_cache, minimum=0))
        set_("sm_count", _check_int("sm_count", self.sm_count, minimum=1))
        set_("interconnect_bandwidth",
             _check_float("interconnect_bandwidth", self.interconnect_bandwidth, positive=False))
        set_("kernel_latency", _check_float("kernel_latency", self.kernel_latency, positive=False))
        set_("achieved_bandwidth", _check_float("achieved_bandwidth", self.achieved_bandwidth, positive=False))
        if not isinstance(self.achieved_flops, Mapping):
            raise SpecError(f"achieved_flops: expected a table of peak key -> FLOP/s, got {_got(self.achieved_flops)}")
        achieved = _ReadOnlyDict({str(k): _check_float(f"achieved_flops.{k}", v, positive=True)
                                  for k, v in self.achieved_flops.items()})
        set_("achieved_flops", achieved)

    @property
    def measured(self) -> bool:
        """Whether this spec holds measured figures (a latency floor, achieved bandwidth or FLOP/s)."""
        return bool(self.kernel_latency or self.achieved_bandwidth or self.achieved_flops)

    def achieved_peak(self, key: str) -> float:
        """What a real kernel reaches of peak `key`: the measured figure where there is one, else the datasheet's."""
        return self.achieved_flops.get(key, self.peak_flops[key])

    # ---- peaks -------------------------------------------------------------------------------

    def peak_key(self, dtype: torch.dtype, *, matmul: bool, tf32: bool = False) -> str:
        """The `peak_flops` key that `peak_for` uses for an op in `dtype` (see `peak_for`).

            >>> get_spec("a100-80gb-sxm").peak_key(torch.float8_e4m3fn, matmul=True)  # A100 has no fp8
            'fp16'
        """
        for key in _candidate_keys(dtype, matmul=matmul, tf32=tf32):
            if key in self.peak_flops:
                return key
        raise SpecError(f"device spec '{self.name}' has no peak for {dtype} "
                        f"({'matmul' if matmul else 'elementwise'}): add peak_flops.fp64")

    def peak_for(self, dtype: torch.dtype, *, matmul: bool, tf32: bool = False) -> float:
        """Peak FLOP/s an op computing in `dtype` can reach on this device.

        matmul=True (mm, bmm, addmm, convolution, attention's two products): the tensor-core
        rate of the dtype. bf16 -> "bf16", fp16 -> "fp16"; float8_* -> "fp8", or "fp16" on a
        device without fp8 (A100), where the operands are upcast to fp16 and run at that rate;
        float4 likewise (no fp4 figure is kept); int8/uint8 -> "int8"; fp32 -> "tf32" when
        `tf32` (torch.backends.cuda.matmul.allow_tf32, or set_float32_matmul_precision("high"))
        and "fp32" on the vector units otherwise; fp64 -> "fp64_tensor" (DGEMM on FP64 tensor
        cores), or "fp64" where the device has none. A format missing from the spec falls back
        to "fp32": without tensor-core support the product runs on the vector units. Other
        integer and bool dtypes have no tensor-core path and use "fp32".

        matmul=False (elementwise ops, reductions, norms, softmax): "fp32" for every float
        dtype, "fp64" for float64. PyTorch's CUDA kernels compute in the dtype's *opmath* type
        (`at::opmath_type<T>`), which is float for half and bfloat16: each element is loaded in
        bf16/fp16, converted, computed in fp32 on the CUDA cores and converted back on store. So
        neither the tensor cores nor packed half2 arithmetic apply; the vector fp32 rate is the
        roof. (These ops are memory-bound on every device here anyway: their intensity is
        about 1 FLOP/byte against ridges in the hundreds.) Integer and bool ops use the same
        fp32 figure: integer ALU throughput is of the same order and the bytes dominate.

        Args:
            dtype: the dtype the op computes in (its inputs' dtype).
            matmul: whether the op runs on tensor cores (matrix products and convolutions).
            tf32: whether fp32 matmuls may use TF32 tensor cores.

        Returns:
            FLOP/s (OP/s for int8).

        Raises:
            SpecError: a float64 op on a spec that gives no "fp64" peak.

            >>> spec = get_spec("h100-sxm")
            >>> [spec.peak_for(d, matmul=True) / 1e12 for d in (torch.bfloat16, torch.float8_e4m3fn)]
            [989.4, 1978.9]
            >>> spec.peak_for(torch.float32, matmul=True, tf32=True) / 1e12
            494.7
        """
        return self.peak_flops[self.peak_key(dtype, matmul=matmul, tf32=tf32)]

    def ridge(self, dtype: torch.dtype, *, matmul: bool = True, tf32: bool = False) -> float:
        """The ridge point in FLOP/byte: `peak_for(dtype, ...) / memory_bandwidth`.

        An op whose arithmetic intensity (FLOPs / bytes moved) is below it is memory-bound.

            >>> round(get_spec("a100-80gb-sxm").ridge(torch.bfloat16), 2)   # 312e12 / 2.039e12
            153.02
        """
        return self.peak_for(dtype, matmul=matmul, tf32=tf32) / self.memory_bandwidth

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON and TOML ready) that `from_dict` reads back to an equal spec."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "source": self.source,
            "memory_bandwidth": self.memory_bandwidth,
            "memory_capacity": self.memory_capacity,
            "l2_cache": self.l2_cache,
            "sm_count": self.sm_count,
            "interconnect_bandwidth": self.interconnect_bandwidth,
            "peak_flops": dict(self.peak_flops),
            "kernel_latency": self.kernel_latency,
            "achieved_bandwidth": self.achieved_bandwidth,
            "achieved_flops": dict(self.achieved_flops),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeviceSpec":
        """Build and validate a spec from a dict as `to_dict` writes it.

        `display_name` defaults to `name`, `source` to "", the measured figures to none; every other field is
        required.

            >>> d = get_spec("l4").to_dict(); del d["memory_bandwidth"]
            >>> DeviceSpec.from_dict(d)
            Traceback (most recent call last):
            ...
            shapeprof.hardware.SpecError: missing key 'memory_bandwidth'

        Raises:
            SpecError: one line naming the missing, unknown or bad key.
        """
        if not isinstance(d, Mapping):
            raise SpecError(f"a device spec must be a table of keys, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise SpecError(f"unknown key {key!r}{_did_you_mean(str(key), known)}")
        for key in known:
            if key not in d and key not in _OPTIONAL:
                raise SpecError(f"missing key {key!r}")
        kwargs = dict(d)
        kwargs.setdefault("display_name", kwargs["name"])
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the spec to `path`, TOML or JSON by its suffix; atomic (temp file, then rename).

        Returns:
            The path written.

        Raises:
            SpecError: the suffix is neither .toml nor .json.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif suffix == ".toml":
            text = ("# shapeprof device spec. Units: FLOP/s, bytes/s, bytes. Peaks are dense.\n"
                    + _tomli_w().dumps(self.to_dict()))
        else:
            raise SpecError(_BAD_SUFFIX.format(name=path.name))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return path


_OPTIONAL = ("display_name", "source", "kernel_latency", "achieved_bandwidth", "achieved_flops")
_BAD_SUFFIX = "cannot save a device spec as '{name}': use a .toml or .json suffix"


def check_spec_path(path: str | os.PathLike) -> Path:
    """Raise `SpecError` (one line) unless `DeviceSpec.save(path)` can write there: a .toml or .json suffix, not a
    folder, in a folder that exists and takes a new file. For a caller with minutes of work to do first (calibrate)
    that must not find out afterwards. Nothing is left behind by the check.

        >>> check_spec_path("no/such/folder/mine.toml")
        Traceback (most recent call last):
        ...
        shapeprof.hardware.SpecError: cannot write a device spec into 'no/such/folder': no such directory
    """
    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise SpecError(_BAD_SUFFIX.format(name=path.name))
    folder = path.parent
    if path.is_dir():
        raise SpecError(f"cannot save a device spec as '{path}': it is a directory")
    if not folder.is_dir():
        above = next((p for p in folder.parents if p.exists()), None) if not folder.exists() else folder
        why = (f"'{above}' is a file, not a directory" if above is not None and not above.is_dir()
               else "no such directory")
        raise SpecError(f"cannot write a device spec into '{folder}': {why}")
    try:   # the same temp file save() writes first, removed at once
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SpecError(f"cannot write a device spec into '{folder}': {e.strerror or e}") from None
    return path


# ---- validation helpers ----------------------------------------------------------------------

def _tomli_w():
    # imported when a TOML file is written, not with the package: reading specs needs only the stdlib
    import tomli_w
    return tomli_w


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _got(x: Any) -> str:
    return f"{type(x).__name__} {x!r}"


def _check_str(key: str, x: Any, *, nonempty: bool = False) -> str:
    if not isinstance(x, str):
        raise SpecError(f"{key} must be a string, got {_got(x)}")
    if nonempty and not x.strip():
        raise SpecError(f"{key} must not be empty")
    return x


def _check_float(key: str, x: Any, *, positive: bool) -> float:
    if not _is_number(x):
        raise SpecError(f"{key} must be a number, got {_got(x)}")
    x = float(x)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise SpecError(f"{key} must be {'> 0' if positive else '>= 0'}, got {x!r}")
    return x


def _check_int(key: str, x: Any, *, minimum: int) -> int:
    if not _is_number(x) or (isinstance(x, float) and not x.is_integer()):
        raise SpecError(f"{key} must be an integer, got {_got(x)}")
    x = int(x)
    if x < minimum:
        raise SpecError(f"{key} must be >= {minimum}, got {x}")
    return x


def _check_peaks(peaks: Any) -> _ReadOnlyDict:
    if not isinstance(peaks, Mapping):
        raise SpecError(f"peak_flops must be a table of number format -> FLOP/s, got {_got(peaks)}")
    for key in peaks:
        if key not in PEAK_KEYS:
            raise SpecError(f"unknown peak key 'peak_flops.{key}'{_did_you_mean(str(key), PEAK_KEYS)}"
                            f" (known: {', '.join(PEAK_KEYS)})")
    for key in _REQUIRED_PEAKS:
        if key not in peaks:
            raise SpecError(f"missing key 'peak_flops.{key}' (the vector rate every elementwise op uses)")
    return _ReadOnlyDict((k, _check_float(f"peak_flops.{k}", peaks[k], positive=True))
                         for k in PEAK_KEYS if k in peaks)


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _candidate_keys(dtype: torch.dtype, *, matmul: bool, tf32: bool) -> tuple[str, ...]:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"peak_for takes a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    wide = dtype in (torch.float64, torch.complex128)
    if not matmul:
        return ("fp64",) if wide else ("fp32",)
    if wide:
        return ("fp64_tensor", "fp64")
    if dtype in (torch.float32, torch.complex64):
        return ("tf32", "fp32") if tf32 else ("fp32",)
    if dtype == torch.bfloat16:
        return ("bf16", "fp32")
    if dtype in (torch.float16, torch.complex32):
        return ("fp16", "fp32")
    if str(dtype).startswith(("torch.float8", "torch.float4")):
        return ("fp8", "fp16", "fp32")
    if dtype in (torch.int8, torch.uint8):
        return ("int8", "fp32")
    return ("fp32",)


# ---- the built-in table ----------------------------------------------------------------------

_GiB = 2 ** 30   # memory capacity
_MiB = 2 ** 20   # cache capacity

_A100_SRC = ("NVIDIA A100 Tensor Core GPU datasheet (dense figures; * in the datasheet = sparse) "
             "and NVIDIA Ampere GA100 architecture whitepaper")
# A100, every variant: FP64 9.7, FP64 tensor 19.5, FP32 19.5, TF32 156, BF16/FP16 312 TFLOP/s,
# INT8 624 TOPS (dense; the datasheet's 312/624/1248 with * are 2:4 sparse). No FP8.
# 108 SMs, 40 MiB L2. The PCIe cards have a 250-300 W limit and sustain lower clocks than the SXM
# modules under load, but their datasheet peaks are the same.
_A100_PEAKS = {"fp64": 9.7e12, "fp64_tensor": 19.5e12, "fp32": 19.5e12, "tf32": 156e12,
               "bf16": 312e12, "fp16": 312e12, "int8": 624e12}

# H100 SXM5 (132 SMs): NVIDIA H100 whitepaper (Hopper architecture in-depth), table of H100 SXM5
# peaks: FP64 33.5, FP64 tensor 66.9, FP32 66.9, TF32 494.7, BF16/FP16 989.4, FP8 1978.9 TFLOP/s,
# INT8 1978.9 TOPS, dense. (The datasheet rounds these to 34/67/67 and prints 989/1979/3958 with
# sparsity.) H200 is the same GH100 die at the same clocks, per the H200 datasheet.
_H100_SXM_PEAKS = {"fp64": 33.5e12, "fp64_tensor": 66.9e12, "fp32": 66.9e12,
                   "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12,
                   "fp8": 1978.9e12, "int8": 1978.9e12}


def _builtin_specs() -> list[DeviceSpec]:
    return [
        DeviceSpec(
            name="a100-40gb-sxm", display_name="NVIDIA A100-SXM4-40GB",
            peak_flops=_A100_PEAKS,
            memory_bandwidth=1555e9,              # HBM2, 1,555 GB/s
            memory_capacity=40 * _GiB,
            l2_cache=40 * _MiB, sm_count=108,
            interconnect_bandwidth=600e9,         # NVLink 3: 12 links, 600 GB/s both directions
            source=_A100_SRC,
        ),
        DeviceSpec(
            name="a100-80gb-sxm", display_name="NVIDIA A100-SXM4-80GB",
            peak_flops=_A100_PEAKS,
            memory_bandwidth=2039e9,              # HBM2e, 2,039 GB/s -> bf16 ridge 312/2.039 = 153
            memory_capacity=80 * _GiB,
            l2_cache=40 * _MiB, sm_count=108,
            interconnect_bandwidth=600e9,         # NVLink 3, both directions
            source=_A100_SRC,
        ),
        DeviceSpec(
            name="a100-40gb-pcie", display_name="NVIDIA A100-PCIE-40GB",
            peak_flops=_A100_PEAKS,
            memory_bandwidth=1555e9,              # HBM2, 1,555 GB/s
            memory_capacity=40 * _GiB,
            l2_cache=40 * _MiB, sm_count=108,
            interconnect_bandwidth=64e9,          # PCIe Gen4 x16, both directions (an optional
            source=_A100_SRC,                     # NVLink bridge pairs two cards at 600 GB/s)
        ),
        DeviceSpec(
            name="a100-80gb-pcie", display_name="NVIDIA A100 80GB PCIe",
            peak_flops=_A100_PEAKS,
            memory_bandwidth=1935e9,              # HBM2e, 1,935 GB/s
            memory_capacity=80 * _GiB,
            l2_cache=40 * _MiB, sm_count=108,
            interconnect_bandwidth=64e9,          # PCIe Gen4 x16, both directions
            source=_A100_SRC,
        ),
        DeviceSpec(
            name="h100-sxm", display_name="NVIDIA H100 80GB HBM3",
            peak_flops=_H100_SXM_PEAKS,
            memory_bandwidth=3350e9,              # HBM3, 3.35 TB/s
            memory_capacity=80 * _GiB,
            l2_cache=50 * _MiB, sm_count=132,
            interconnect_bandwidth=900e9,         # NVLink 4: 18 links, 900 GB/s both directions
            source="NVIDIA H100 Tensor Core GPU datasheet; NVIDIA H100 (Hopper) architecture "
                   "whitepaper, H100 SXM5 column (dense figures)",
        ),
        DeviceSpec(
            name="h100-pcie", display_name="NVIDIA H100 PCIe",
            # whitepaper, H100 PCIe column (114 SMs, lower clocks): FP64 25.6, FP64 tensor 51.2,
            # FP32 51.2, TF32 378, BF16/FP16 756, FP8 1513 TFLOP/s, INT8 1513 TOPS, dense
            # (datasheet: 26/51/51, and 756/1513/3026 with sparsity).
            peak_flops={"fp64": 25.6e12, "fp64_tensor": 51.2e12, "fp32": 51.2e12,
                        "tf32": 378e12, "bf16": 756e12, "fp16": 756e12,
                        "fp8": 1513e12, "int8": 1513e12},
            memory_bandwidth=2000e9,              # HBM2e, 2 TB/s
            memory_capacity=80 * _GiB,
            l2_cache=50 * _MiB, sm_count=114,
            interconnect_bandwidth=128e9,         # PCIe Gen5 x16, both directions (an optional
                                                  # NVLink bridge pairs two cards at 600 GB/s)
            source="NVIDIA H100 Tensor Core GPU datasheet; NVIDIA H100 (Hopper) architecture "
                   "whitepaper, H100 PCIe column (dense figures)",
        ),
        DeviceSpec(
            name="h200", display_name="NVIDIA H200",
            peak_flops=_H100_SXM_PEAKS,           # same die and clocks as H100 SXM
            memory_bandwidth=4800e9,              # HBM3e, 4.8 TB/s
            memory_capacity=141 * _GiB,           # 141 GB HBM3e (6 stacks, part fused off)
            l2_cache=50 * _MiB, sm_count=132,
            interconnect_bandwidth=900e9,         # NVLink 4, both directions
            source="NVIDIA H200 Tensor Core GPU datasheet (SXM; compute identical to H100 SXM, "
                   "whose whitepaper gives the dense figures)",
        ),
        DeviceSpec(
            name="l4", display_name="NVIDIA L4",
            # datasheet, halved from its sparse figures: TF32 120* -> 60, BF16/FP16 242* -> 121,
            # FP8 485* -> 242.5 TFLOP/s, INT8 485* -> 242.5 TOPS; FP32 30.3. FP64 is not in the
            # datasheet: Ada runs it at 1/64 of FP32 (58 SMs x 2 FMA/clk x 2 x 2.04 GHz = 0.47).
            peak_flops={"fp64": 0.473e12, "fp32": 30.3e12, "tf32": 60e12,
                        "bf16": 121e12, "fp16": 121e12, "fp8": 242.5e12, "int8": 242.5e12},
            memory_bandwidth=300e9,               # GDDR6, 300 GB/s
            memory_capacity=24 * _GiB,
            l2_cache=48 * _MiB, sm_count=58,      # AD104, 7,424 CUDA cores / 128 per SM
            interconnect_bandwidth=64e9,          # PCIe Gen4 x16, both directions
            source="NVIDIA L4 Tensor Core GPU datasheet (sparse figures halved); NVIDIA Ada "
                   "Lovelace architecture whitepaper",
        ),
        DeviceSpec(
            name="a10g", display_name="NVIDIA A10G",
            # AWS's GA102 variant (G5 instances). NVIDIA publishes no datasheet for it, so these
            # are derived and less certain than the rest of the table: 80 SMs (what
            # torch.cuda.get_device_properties reports on g5) at the 1.71 GHz boost clock give
            # FP32 80 x 128 x 2 x 1.71 GHz = 35.0 TFLOP/s and FP16/BF16 tensor with FP32
            # accumulate 80 x 512 FLOP/clk x 1.71 GHz = 70 TFLOP/s (the GeForce-Ampere rate, half
            # the A10's 1024 FLOP/clk/SM: a public cuBLAS fp16-in, fp32-accumulate burn-in measured
            # 67.1 TFLOP/s on an A10G, which fits 70 and not 140). TF32 at half that, 35;
            # INT8 at twice it, 140 TOPS (the datacenter-Ampere ratio; GeForce Ampere runs INT8 at
            # 4x, so this may be low). FP64 1/64 of FP32.
            peak_flops={"fp64": 0.547e12, "fp32": 35.0e12, "tf32": 35.0e12,
                        "bf16": 70.0e12, "fp16": 70.0e12, "int8": 140e12},
            memory_bandwidth=600e9,               # GDDR6, 600 GB/s (same as A10)
            memory_capacity=24 * _GiB,
            l2_cache=6 * _MiB, sm_count=80,
            interconnect_bandwidth=64e9,          # PCIe Gen4 x16, both directions
            source="derived from clocks and SM count (no NVIDIA datasheet for the A10G); memory "
                   "per AWS EC2 G5 documentation; see the comment in shapeprof/hardware.py",
        ),
        DeviceSpec(
            name="rtx-4090", display_name="NVIDIA GeForce RTX 4090",
            # Ada whitepaper, appendix table for the RTX 4090 (128 SMs, 2.52 GHz boost), dense:
            # FP32 82.6; TF32 82.6; FP16 and BF16 tensor *with FP32 accumulate* 165.2 (GeForce
            # halves the rate with FP32 accumulate; 330.3 with FP16 accumulate, which PyTorch's
            # matmuls do not use); FP8 with FP32 accumulate 330.3 (the accumulation
            # torch._scaled_mm uses); INT8 660.6 TOPS; FP64 1/64 of FP32 = 1.29.
            peak_flops={"fp64": 1.29e12, "fp32": 82.6e12, "tf32": 82.6e12,
                        "bf16": 165.2e12, "fp16": 165.2e12, "fp8": 330.3e12,
                        "int8": 660.6e12},
            memory_bandwidth=1008e9,              # GDDR6X 21 Gbps x 384 bit = 1,008 GB/s
            memory_capacity=24 * _GiB,
            l2_cache=72 * _MiB, sm_count=128,
            interconnect_bandwidth=64e9,          # PCIe Gen4 x16, both directions (no NVLink)
            source="NVIDIA Ada Lovelace GPU architecture whitepaper, appendix (GeForce RTX 4090, "
                   "dense, FP32 accumulate)",
        ),
        DeviceSpec(
            name="mi300x", display_name="AMD Instinct MI300X",
            # AMD datasheet, dense: FP64 vector 81.7, FP64 matrix 163.4, FP32 vector 163.4,
            # TF32 matrix 653.7, FP16/BF16 matrix 1307.4, FP8 2614.9 TFLOP/s, INT8 2614.9 TOPS
            # (sparse figures are twice these).
            peak_flops={"fp64": 81.7e12, "fp64_tensor": 163.4e12, "fp32": 163.4e12,
                        "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12,
                        "fp8": 2614.9e12, "int8": 2614.9e12},
            memory_bandwidth=5300e9,              # HBM3, 5.3 TB/s
            memory_capacity=192 * _GiB,           # 8 stacks of 24 GiB
            # l2_cache holds the last-level cache in front of HBM: the 256 MB Infinity Cache
            # (MALL). The L2 proper is 4 MB per XCD, 32 MB in all, and each XCD sees only its own.
            l2_cache=256 * _MiB,
            sm_count=304,                         # compute units
            interconnect_bandwidth=896e9,         # 7 Infinity Fabric links x 128 GB/s, both directions
            source="AMD Instinct MI300X accelerator datasheet and CDNA 3 architecture whitepaper "
                   "(dense figures)",
        ),
    ]


class _SpecTable(Mapping):
    """Read-only name -> DeviceSpec table, in declaration order."""

    def __init__(self, specs: Iterable[DeviceSpec]) -> None:
        self._specs = {s.name: s for s in specs}

    def __getitem__(self, name: str) -> DeviceSpec:
        return self._specs[name]

    def __iter__(self):
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"BUILTIN_SPECS({', '.join(self._specs)})"


BUILTIN_SPECS: Mapping[str, DeviceSpec] = _SpecTable(_builtin_specs())
DEFAULT_SPEC_NAME = "a100-80gb-sxm"


def list_specs() -> list[DeviceSpec]:
    """The built-in specs, in table order.

        >>> [s.name for s in list_specs()][:2]
        ['a100-40gb-sxm', 'a100-80gb-sxm']
    """
    return list(BUILTIN_SPECS.values())


def load_spec(path: str | os.PathLike) -> DeviceSpec:
    """Read a device spec from a .toml or .json file (the layout `DeviceSpec.save` writes).

    A TOML spec looks like this (units: FLOP/s, bytes/s, bytes)::

        name = "my-gpu"
        display_name = "My GPU"
        memory_bandwidth = 2.0e12
        memory_capacity = 85899345920
        l2_cache = 52428800
        sm_count = 114
        interconnect_bandwidth = 128e9

        [peak_flops]
        fp32 = 51.2e12
        bf16 = 756e12

    Raises:
        SpecError: one line naming the file and what is wrong with it (not found, bad TOML or
            JSON syntax with its line, a missing or unknown key, a wrong type, a negative number).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SpecError(f"spec file '{path}': unsupported format '{path.suffix}' (use .toml or .json)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"spec file '{path}': cannot read it: {e}") from e
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec file '{path}': invalid TOML: {e}") from e
    except json.JSONDecodeError as e:
        raise SpecError(f"spec file '{path}': invalid JSON: {e}") from e
    try:
        return DeviceSpec.from_dict(data)
    except SpecError as e:
        raise SpecError(f"spec file '{path}': {e}") from e


def _normalise(name: str) -> str:
    return "-".join(name.strip().lower().replace("_", " ").split())


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):   # a name too long for a path, or with a NUL in it
        return False


def get_spec(spec: str | os.PathLike | DeviceSpec | None = None) -> DeviceSpec:
    """Resolve what a user passed as `--device` (or in code) to a DeviceSpec.

    Accepts None (the default, A100-SXM4-80GB), a DeviceSpec (returned as is), a built-in name
    (case-insensitive; "_" and spaces read as "-"), a built-in's display name (what
    `torch.cuda.get_device_name()` reports), or the path of a .toml/.json spec file. Short forms
    such as "a100" or "h100" are ambiguous between variants and are not guessed: the error lists
    the candidates.

        >>> get_spec().name
        'a100-80gb-sxm'
        >>> get_spec("NVIDIA H100 80GB HBM3").name
        'h100-sxm'
        >>> get_spec("a100x")
        Traceback (most recent call last):
        ...
        shapeprof.hardware.SpecError: unknown device spec 'a100x'; closest: a100-80gb-sxm, a100-40gb-sxm, a100-40gb-pcie, a100-80gb-pcie; see `shapeprof specs`

    Raises:
        SpecError: an unknown name (with the closest names), or a spec file that cannot be loaded.
    """
    if spec is None:
        return BUILTIN_SPECS[DEFAULT_SPEC_NAME]
    if isinstance(spec, DeviceSpec):
        return spec
    if isinstance(spec, os.PathLike):
        return load_spec(spec)
    if not isinstance(spec, str):
        raise TypeError(f"get_spec takes a name, a path or a DeviceSpec, got {type(spec).__name__}")
    key = _normalise(spec)
    if key in BUILTIN_SPECS:
        return BUILTIN_SPECS[key]
    for s in BUILTIN_SPECS.values():
        if _normalise(s.display_name) == key:
            return s
    if Path(spec).suffix.lower() in (".toml", ".json") or os.sep in spec or _is_file(spec):
        return load_spec(spec)
    close = _closest_names(key)
    hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(BUILTIN_SPECS)}"
    raise SpecError(f"unknown device spec {spec!r}; {hint}; see `shapeprof specs`")


def _closest_names(key: str, limit: int = 4) -> list[str]:
    """Built-in names a mistyped or shortened `key` most likely meant, best first.

    Names sharing the longest prefix with `key` come first ("a100x" -> the four A100s, not
    "a10g", which plain difflib ranks first), then names containing it ("4090" -> "rtx-4090"),
    else difflib's close matches. Ties go to the default spec, then to table order.
    """
    names = list(BUILTIN_SPECS)
    order = {n: (n != DEFAULT_SPEC_NAME, i) for i, n in enumerate(names)}
    ratio = lambda n: difflib.SequenceMatcher(None, key, n).ratio()  # noqa: E731
    found: list[str] = []
    for end in range(len(key), 1, -1):
        prefixed = [n for n in names if n.startswith(key[:end])]
        if prefixed:
            found = sorted(prefixed, key=lambda n: (-ratio(n), order[n]))
            break
    found += [n for n in names if key and key in n and n not in found]
    if not found:
        found = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    return found[:limit]
