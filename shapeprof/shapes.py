"""GEMM shape advice: dimensions that keep a GEMM off the tensor cores, and GEMMs whose tiles leave SMs idle.

Two ways a model's shapes waste a GPU, both decided by M, N and K alone:

- **Alignment.** Tensor-core GEMM kernels load their operands 16 bytes at a time, so a row-major GEMM wants the
  leading dimensions of its operands (K for A, N or K for B, N for the output) to be multiples of 16 bytes: 8
  elements in bf16/fp16, 4 in fp32/tf32, 16 in 8-bit formats. GPT-2's vocabulary of 50,257 is the famous miss:
  nanoGPT pads it to 50,304.
- **Wave quantization.** The output is cut into tiles (128 x 128 by default), one thread block each, and the
  blocks run in waves of one per SM: 109 tiles on A100's 108 SMs take 2 waves, the second almost empty.

    >>> import torch, shapeprof
    >>> head = torch.nn.Linear(768, 50257, bias=False, device="meta")
    >>> advice = shape_advice(shapeprof.analyze(head, shapeprof.InputShape((8192, 768)), dtype=torch.bfloat16))
    >>> [(d.name, d.size, d.padded) for d in advice.alignment[0].dims]
    [('N', 50257, 50304)]
    >>> fc = shapeprof.analyze(torch.nn.Linear(1024, 4096), shapeprof.InputShape((512, 1024)), dtype=torch.bfloat16)
    >>> w = shape_advice(fc).waves[0]
    >>> w.tiles, w.waves, w.efficiency == 128 / 216, w.fill_m
    (128, 2, True, 3456)

GEMMs are the ATen ops in `GEMM_OPS` (mm, addmm, bmm, baddbmm, addbmm, linear, matmul, _scaled_mm, _int_mm,
_addmm_activation), whichever capture path recorded them. Other matmul-class ops of the cost registry are left out
on purpose: convolutions (an implicit GEMM whose M, N, K are not the tensors' dims), attention (a fused kernel,
not one GEMM), einsum (no fixed M, N, K) and oneDNN's CPU-only linear.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from rich.console import Console, Group
from rich.text import Text

from .costs import OpCost, _bind, cost_of
from .hardware import DeviceSpec, SpecError
from .precision import quantise
from .precision import resolve as resolve_precision
from .records import OpRecord, TensorMeta
from .roofline import OpTime, compute_dtype, op_time
from .text import fmt_bytes, fmt_flops, fmt_seconds, without_control

__all__ = ["DEFAULT_TILE", "GAIN_MODEL", "GEMM_OPS", "MIN_WAVE_EFFICIENCY", "PAD_MULTIPLE", "WAVE_MODEL",
           "AlignmentFinding", "Dim", "Gemm", "ShapeAdvice", "WaveFinding", "alignment", "gemms", "padded",
           "shape_advice"]

aten = torch.ops.aten

#: Sizes are padded to a multiple of 64: a multiple of every alignment (8, 4 and 16 elements) and of the 64-wide
#: tiles tensor-core kernels use along N and K, so a padded dimension is aligned whatever the dtype and fills
#: whole tiles. It is what Karpathy padded nanoGPT's vocabulary to: 50257 -> 50304 = 786 x 64.
PAD_MULTIPLE = 64

#: The 128 x 128 output tile: the common CUTLASS/cuBLAS threadblock tile of 16-bit GEMMs on A100 and H100.
DEFAULT_TILE = (128, 128)

#: Below this share of the SMs busy over all waves, a compute-bound GEMM is flagged.
MIN_WAVE_EFFICIENCY = 0.9

GAIN_MODEL = (
    "An unaligned GEMM (N or K not a multiple of 16 bytes of its elements) is priced at the device's vector "
    "(non-tensor-core) peak for its dtype; padded (N and K rounded up to a multiple of 64), at the tensor-core "
    "peak with the padded FLOPs and bytes; both as max(FLOPs / peak, bytes / bandwidth). The vector peak is "
    "what cuBLAS falls back to when a leading dimension is not 16-byte aligned and its tensor-core kernels' "
    "vector loads cannot be used (NVIDIA, Matrix Multiplication Background User's Guide, Tensor Core "
    "requirements); cuBLAS 11 and later still use tensor cores there, less efficiently, so the gain is an upper "
    "bound. A memory-bound GEMM (decode) gains about nothing: padding only adds bytes.")

WAVE_MODEL = (
    "The output (batch x M x N) is cut into tile_m x tile_n tiles, one thread block each, and the blocks run in "
    "waves of one per SM; a partly empty last wave costs a whole wave. tiles = batch x ceil(M / tile_m) x "
    "ceil(N / tile_n), waves = ceil(tiles / SMs), efficiency = tiles / (waves x SMs); quantized time = waves x "
    "2 x tile_m x tile_n x K / (peak / SMs), which counts partly filled tiles too. Only compute-bound GEMMs are "
    "flagged: a memory-bound one waits on bytes, not on SMs.")

_M_NOTE = ("M is batch x tokens, set at run time, not by the model; it is not a leading dimension of a row-major "
           "GEMM (PyTorch's: lda = ldb = K, ldc = N), so its alignment is shown but not priced. A dimension of 1 "
           "is a matrix-vector product, which has no tensor-core kernel to lose, and is never flagged.")


# ---------------------------------------------------------------------------------------------- the GEMM ops

@dataclass(frozen=True, slots=True)
class _Operands:
    """One GEMM call's dimensions and operands, from its record."""

    batch: int
    M: int
    N: int
    K: int
    a: TensorMeta
    b: TensorMeta
    weight: bool        # B is a 2-D operand shared by every row (a Linear's weight): N and K are the model's


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])  # (..., K): every leading dim is a row of A


def _mm(a: str, b: str) -> Callable[[dict], _Operands]:
    def dims(args: dict) -> _Operands:
        x, y = args[a], args[b]
        return _Operands(1, x.shape[0], y.shape[1], x.shape[1], x, y, True)
    return dims


def _bmm(a: str, b: str) -> Callable[[dict], _Operands]:
    def dims(args: dict) -> _Operands:
        x, y = args[a], args[b]
        batch, m, k = x.shape
        return _Operands(batch, m, y.shape[2], k, x, y, False)
    return dims


def _addbmm(args: dict) -> _Operands:
    # sums the batch of products into one (M, N) output: one GEMM over a K of batch x k (A's batches side by side)
    x, y = args["batch1"], args["batch2"]
    batch, m, k = x.shape
    return _Operands(1, m, y.shape[2], batch * k, x, y, False)


def _linear(args: dict) -> _Operands:
    x, w = args["input"], args["weight"]            # x (..., K), w (N, K)
    n = w.shape[0] if len(w.shape) == 2 else 1
    return _Operands(1, _rows(x.shape), n, x.shape[-1], x, w, True)


def _matmul(args: dict) -> _Operands:
    # torch.matmul's cases, as it dispatches them (a 1-D operand is one row or one column)
    x, y = args["self"], args["other"]
    m = _rows(x.shape) if len(x.shape) > 1 else 1
    if len(y.shape) == 1:                            # (..., M, K) @ (K,): a matrix-vector product, N = 1
        return _Operands(1, m, 1, y.shape[0], x, y, True)
    if len(y.shape) == 2:                            # (..., M, K) @ (K, N): torch folds the batch into M
        return _Operands(1, m, y.shape[1], y.shape[0], x, y, True)
    if len(x.shape) <= 2:                            # (K,) or (M, K) @ (..., K, N): one GEMM per batch of y
        return _Operands(math.prod(y.shape[:-2]), m, y.shape[-1], y.shape[-2], x, y, False)
    # (..., M, K) @ (..., K, N), batch dims broadcast against each other
    batch = math.prod(max(p, q) for p, q in _aligned_right(x.shape[:-2], y.shape[:-2]))
    return _Operands(batch, x.shape[-2], y.shape[-1], x.shape[-1], x, y, False)


def _aligned_right(s: tuple[int, ...], t: tuple[int, ...]) -> list[tuple[int, int]]:
    n = max(len(s), len(t))
    return list(zip((1,) * (n - len(s)) + tuple(s), (1,) * (n - len(t)) + tuple(t)))


#: ATen op (packet name) -> its GEMM's dims and operands, from the call's arguments bound by schema name.
#: Every one is matmul-class in the cost registry (tests check it).
GEMM_OPS: dict[str, Callable[[dict], _Operands]] = {
    "aten.mm": _mm("self", "mat2"), "aten._int_mm": _mm("self", "mat2"), "aten._scaled_mm": _mm("self", "mat2"),
    "aten.addmm": _mm("mat1", "mat2"), "aten._addmm_activation": _mm("mat1", "mat2"),
    "aten.bmm": _bmm("self", "mat2"), "aten.baddbmm": _bmm("batch1", "batch2"), "aten.addbmm": _addbmm,
    "aten.linear": _linear, "aten.matmul": _matmul,
}


def alignment(dtype: torch.dtype) -> int:
    """Elements in 16 bytes of `dtype`: what tensor-core kernels want N and K to be multiples of.

        >>> alignment(torch.bfloat16), alignment(torch.float32), alignment(torch.int8)
        (8, 4, 16)
    """
    return max(1, 16 // dtype.itemsize)


def padded(size: int, multiple: int = PAD_MULTIPLE) -> int:
    """`size` rounded up to a multiple of `multiple` (64: see PAD_MULTIPLE).

        >>> padded(50257), padded(768)
        (50304, 768)
    """
    return -(-size // multiple) * multiple


# ---------------------------------------------------------------------------------------------- results

@dataclass(frozen=True, slots=True)
class Gemm:
    """One distinct GEMM of the model, with every call of it counted.

    M is the rows of the output (tokens: batch x sequence for a Linear), N its columns (a Linear's out_features),
    K the reduction (in_features); `batch` the independent products of a bmm (1 for mm, addmm, linear).
    """

    op: str                         # the ATen op: 'aten.addmm'
    batch: int
    M: int
    N: int
    K: int
    dtype: str                      # the number format it computes in: 'bfloat16'
    alignment: int                  # elements in 16 bytes of its operands
    count: int                      # calls: twins and folded loop steps included
    flops: int                      # per call: 2 x batch x M x N x K
    bytes: int                      # per call, as the cost registry counts them (a bias included)
    seconds: float                  # per call, the report's roofline (tensor-core peak)
    bound: str                      # 'compute' or 'memory', as the report's roofline says
    where: str                      # the module pattern of its first call: 'transformer.h.*.attn.c_attn',
                                    # with ' (+1 more)' when other modules run the same GEMM
    nodes: tuple[str, ...]          # the first few graph nodes running it
    module_paths: tuple[str, ...]   # the first few modules running it

    @property
    def total_seconds(self) -> float:
        return self.seconds * self.count

    @property
    def unaligned(self) -> tuple[str, ...]:
        """The dims ('N', 'K', 'M') that are not a multiple of `alignment` (a dim of 1, a gemv, never is)."""
        return tuple(name for name, size in (("N", self.N), ("K", self.K), ("M", self.M))
                     if size > 1 and size % self.alignment)


@dataclass(frozen=True, slots=True)
class Dim:
    """One dimension that is not a multiple of its GEMM's alignment."""

    name: str          # 'N', 'K' or 'M'
    size: int
    padded: int        # the next multiple of 64
    set_by: str        # 'weight' (the model's), 'operands' (of a batched product), 'run time' (M: batch x tokens)
    priced: bool       # padded in the predicted gain (N and K; M is not a leading dimension)


@dataclass(frozen=True, slots=True)
class AlignmentFinding:
    """A GEMM whose N or K is not aligned, and what padding them would save (see GAIN_MODEL).

    Times are per call; `saved_seconds` is over all `gemm.count` calls.
    """

    gemm: Gemm
    dims: tuple[Dim, ...]
    unaligned_seconds: float        # at the vector peak
    unaligned_bound: str
    padded_seconds: float           # N and K padded, at the tensor-core peak
    padded_bound: str
    padded_flops: int
    padded_bytes: int
    gain: float                     # unaligned_seconds / padded_seconds
    saved_seconds: float            # (unaligned - padded) x count


@dataclass(frozen=True, slots=True)
class WaveFinding:
    """A compute-bound GEMM whose tiles leave SMs idle in its last wave (see WAVE_MODEL).

    `ideal_seconds` and `quantized_seconds` are per call; `lost_seconds` is over all `gemm.count` calls.
    """

    gemm: Gemm
    tiles: int
    waves: int
    efficiency: float               # tiles / (waves x SMs)
    tile_efficiency: float          # batch x M x N / (tiles x tile_m x tile_n): what partly filled tiles waste
    ideal_seconds: float            # FLOPs / peak
    quantized_seconds: float        # waves x 2 x tile_m x tile_n x K / (peak / SMs)
    lost_seconds: float             # (quantized - ideal) x count
    fill_m: int                     # the smallest M >= this one giving whole waves of whole tiles
    fill_batch: int | None          # batched GEMMs: the smallest batch >= this one giving whole waves


@dataclass(frozen=True)
class ShapeAdvice:
    """Every distinct GEMM of an analysed model, those with unaligned dims, and those losing time to waves.

    Printing it shows three tables; `to_dict()` is plain JSON-ready data.
    """

    spec: str                       # the DeviceSpec's name
    device: str                     # its display name
    sm_count: int
    tile: tuple[int, int]
    dtype: str | None               # the report's analysed dtype
    gemms: tuple[Gemm, ...]         # biggest total predicted time first
    alignment: tuple[AlignmentFinding, ...]
    waves: tuple[WaveFinding, ...]
    min_efficiency: float = MIN_WAVE_EFFICIENCY

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, str, int, float, None): what `json.dumps` takes as it is."""
        return {"schema": "shapeprof.shape_advice", "version": 1, **_plain(asdict(self)),
                "gain_model": GAIN_MODEL, "wave_model": WAVE_MODEL}

    def __rich_console__(self, console, options):
        # laid out for the console's width, as the Report's own rendering is (one row per line, nothing cropped)
        yield _render(without_control(self), options.max_width)

    def __str__(self) -> str:
        from .output.terminal import terminal_width
        console = Console(file=io.StringIO(), width=terminal_width(), color_system=None)
        console.print(self)
        return console.file.getvalue()


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- analysis

class _Site:
    """A distinct GEMM while it is being gathered: one record to price it by, and where it runs."""

    __slots__ = ("record", "dtype", "dims", "count", "nodes", "paths", "patterns")

    def __init__(self, record: OpRecord, dtype: torch.dtype, dims: _Operands):
        self.record, self.dtype, self.dims = record, dtype, dims
        self.count, self.nodes, self.paths = 0, [], []
        self.patterns: dict[str, None] = {}     # every module pattern it runs at, in order


_SHOWN_SITES = 3   # node names and module paths kept per GEMM: enough to find it, not 126 of them


def gemms(report, *, tf32: bool = False) -> list[Gemm]:
    """Every distinct GEMM the analysed model runs, with its calls counted, biggest total predicted time first.

    GEMMs with the same op, batch, M, N, K and dtype are one `Gemm`: a 126-layer model lists its attention
    projection once, with a count of 126 (twins and folded loop steps counted by their nodes' `repeats`).

        >>> import torch, shapeprof
        >>> r = shapeprof.analyze(torch.nn.Linear(1024, 4096), shapeprof.InputShape((512, 1024)), dtype=torch.bfloat16)
        >>> [(g.op, g.M, g.N, g.K, g.count, g.flops) for g in gemms(r)]      # 2 * 512 * 4096 * 1024 FLOPs
        [('aten.addmm', 512, 4096, 1024, 1, 4294967296)]

    Args:
        report: a Report from `shapeprof.analyze` (it needs `report.graph_capture`, which a report read back
            from JSON does not have).
        tf32: price fp32 GEMMs on TF32 tensor cores; pass what `analyze` was given, which the report does not
            record (its dtype reads 'float32' either way).
    """
    return [g for g, _ in _gather(report, tf32)]


def _gather(report, tf32: bool) -> list[tuple[Gemm, _Site]]:
    if report.graph_capture is None:
        raise ValueError("shape advice needs the analysed graph (report.graph_capture), which a report read "
                         "from JSON does not keep: run shapeprof.analyze again")
    matmul_dtype = _matmul_dtype(report.dtype)
    patterns = report.patterns
    sites: dict[tuple, _Site] = {}
    seen: dict[int, tuple | None] = {}     # id(record) -> its key: twins share their records, priced once
    for cn in report.graph_capture.nodes:
        for rec in cn.records:
            key = seen[id(rec)] if id(rec) in seen else _site_key(rec, matmul_dtype, sites)
            seen[id(rec)] = key
            if key is None:
                continue
            site = sites[key]
            site.count += cn.repeats
            if len(site.nodes) < _SHOWN_SITES:
                site.nodes.append(cn.node.name)
            if len(site.paths) < _SHOWN_SITES and cn.module_path not in site.paths:
                site.paths.append(cn.module_path)
            site.patterns[patterns.get(cn.module_path, cn.module_path) or "(model)"] = None
    found = []
    for site in sites.values():
        d, rec = site.dims, site.record
        cost = cost_of(rec)
        t = _op_time(cost, site.dtype, report.spec, tf32, matmul=True)
        # one GEMM can run in different modules (a Llama's wq and wo are both 4096 x 4096): name the first
        where = next(iter(site.patterns)) + (f" (+{len(site.patterns) - 1} more)" if len(site.patterns) > 1 else "")
        found.append((Gemm(rec.name, d.batch, d.M, d.N, d.K, _name(site.dtype), alignment(d.a.dtype), site.count,
                           2 * d.batch * d.M * d.N * d.K, cost.bytes, t.seconds, t.bound,
                           where, tuple(site.nodes), tuple(site.paths)), site))
    found.sort(key=lambda gs: gs[0].total_seconds, reverse=True)    # stable: ties keep the order they ran in
    return found


def _site_key(rec: OpRecord, matmul_dtype: torch.dtype | None, sites: dict[tuple, _Site]) -> tuple | None:
    dims_of = GEMM_OPS.get(rec.name)
    if dims_of is None:
        return None
    if matmul_dtype is not None:
        # a W8A8 analysis prices its GEMMs with 8-bit operands (as analyze does): so is the advice
        rec, dtype = quantise(rec, matmul_dtype), matmul_dtype
    else:
        dtype = compute_dtype(rec.input_metas(), rec.outputs)
    d = dims_of(_bind(rec.op, rec.args, rec.kwargs))
    key = (rec.name, d.batch, d.M, d.N, d.K, dtype)
    if key not in sites:
        sites[key] = _Site(rec, dtype, d)
    return key


def _matmul_dtype(name: str | None) -> torch.dtype | None:
    """The 8-bit dtype a W8A8 report ('int8 (W8A8)') priced its GEMMs in; None for every other report."""
    if not name:
        return None
    try:
        return resolve_precision(name.split()[0]).matmul_dtype
    except ValueError:          # a dtype name precision does not know ('complex64'): not an 8-bit one
        return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _op_time(cost: OpCost, dtype: torch.dtype, spec: DeviceSpec, tf32: bool, *, matmul: bool) -> OpTime:
    cost = OpCost(cost.flops, cost.bytes_read, cost.bytes_written, True, matmul)
    try:
        return op_time(cost, dtype, spec, tf32=tf32)
    except SpecError:           # a spec without this format's peak: the fp32 roof, as analyze prices it
        return op_time(cost, torch.float32, spec, tf32=tf32)


def _peak(dtype: torch.dtype, spec: DeviceSpec, tf32: bool) -> float:
    """The tensor-core peak `_op_time` prices a GEMM in `dtype` at."""
    return _op_time(OpCost(1, 0, 0), dtype, spec, tf32, matmul=True).peak_flops


def shape_advice(report, tile: tuple[int, int] = DEFAULT_TILE, *, tf32: bool = False,
                 min_efficiency: float = MIN_WAVE_EFFICIENCY) -> ShapeAdvice:
    """Which GEMMs of an analysed model have shapes that waste the report's device, and what to change.

        >>> import torch, shapeprof
        >>> r = shapeprof.analyze(torch.nn.Linear(1024, 4096), shapeprof.InputShape((384, 1024)), dtype=torch.bfloat16)
        >>> w = shape_advice(r).waves[0]          # 3 x 32 = 96 tiles on 108 SMs: one wave, 12 SMs idle
        >>> w.tiles, w.waves, w.efficiency == 96 / 108
        (96, 1, True)

    Args:
        report: a Report from `shapeprof.analyze`, with its graph (`report.graph_capture`).
        tile: the output tile (M, N) of one thread block; 128 x 128 is the common CUTLASS/cuBLAS tile of 16-bit
            GEMMs on A100 and H100.
        tf32: fp32 GEMMs run on TF32 tensor cores (what `analyze(tf32=...)` was given: the report does not say).
        min_efficiency: compute-bound GEMMs keeping fewer of the SMs busy than this are flagged.

    Returns:
        A `ShapeAdvice`: `gemms`, `alignment` findings (see GAIN_MODEL) and `waves` findings (see WAVE_MODEL).
    """
    tm, tn = tile
    if tm < 1 or tn < 1:
        raise ValueError(f"tile must be two positive sizes, got {tile!r}")
    spec = report.spec
    gathered = _gather(report, tf32)
    aligned = tuple(f for f in (_alignment_finding(g, s, spec, tf32) for g, s in gathered) if f is not None)
    waves = tuple(f for f in (_wave_finding(g, s, spec, tf32, tile) for g, s in gathered)
                  if f is not None and f.efficiency < min_efficiency)
    return ShapeAdvice(spec.name, spec.display_name, spec.sm_count, (tm, tn), report.dtype,
                       tuple(g for g, _ in gathered), aligned, waves, min_efficiency)


def _alignment_finding(g: Gemm, site: _Site, spec: DeviceSpec, tf32: bool) -> AlignmentFinding | None:
    unaligned = g.unaligned
    if "N" not in unaligned and "K" not in unaligned:
        return None      # an unaligned M alone is not priced (see _M_NOTE); the GEMM table marks it
    model = "weight" if site.dims.weight else "operands"
    dims = tuple(Dim(name, size, padded(size), "run time" if name == "M" else model, name != "M")
                 for name, size in (("N", g.N), ("K", g.K), ("M", g.M)) if name in unaligned)
    n = padded(g.N) if "N" in unaligned else g.N
    k = padded(g.K) if "K" in unaligned else g.K
    # The record itself is priced as the report prices it (its bias included); padding adds what it adds to
    # a plain mm / bmm of these operands, priced by the same cost registry.
    cost = cost_of(site.record)
    before, after = (cost_of(_plain_gemm(site, g.M, cols, depth)) for cols, depth in ((g.N, g.K), (n, k)))
    pad = OpCost(cost.flops + after.flops - before.flops, cost.bytes_read + after.bytes_read - before.bytes_read,
                 cost.bytes_written + after.bytes_written - before.bytes_written)
    slow = _op_time(cost, site.dtype, spec, tf32, matmul=False)
    fast = _op_time(pad, site.dtype, spec, tf32, matmul=True)
    return AlignmentFinding(g, dims, slow.seconds, slow.bound, fast.seconds, fast.bound, pad.flops, pad.bytes,
                            slow.seconds / fast.seconds, (slow.seconds - fast.seconds) * g.count)


def _plain_gemm(site: _Site, m: int, n: int, k: int) -> OpRecord:
    """The record of a plain mm (bmm when batched) of this GEMM's operand dtypes, at M x N x K."""
    d, out = site.dims, site.record.outputs[0].dtype
    lead = (d.batch,) if d.batch > 1 else ()
    a, b, c = (_contiguous(lead + shape, dtype) for shape, dtype in (((m, k), d.a.dtype), ((k, n), d.b.dtype),
                                                                     ((m, n), out)))
    return OpRecord(aten.bmm.default if lead else aten.mm.default, (a, b), {}, (c,))


def _contiguous(shape: tuple[int, ...], dtype: torch.dtype) -> TensorMeta:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return TensorMeta(shape, dtype, tuple(reversed(stride)))


def _tiling(g: Gemm, sm_count: int, tile: tuple[int, int]) -> tuple[int, int, int, float]:
    """(tile rows, tiles, waves, wave efficiency) of `g`."""
    rows, cols = -(-g.M // tile[0]), -(-g.N // tile[1])
    tiles = g.batch * rows * cols
    waves = -(-tiles // sm_count)
    return rows, tiles, waves, tiles / (waves * sm_count)


def _whole_waves(units: int, at_least: int, sm_count: int) -> int:
    """The smallest n >= at_least with units x n a multiple of sm_count."""
    step = sm_count // math.gcd(sm_count, units)
    return -(-at_least // step) * step


def _wave_finding(g: Gemm, site: _Site, spec: DeviceSpec, tf32: bool, tile: tuple[int, int]) -> WaveFinding | None:
    if g.bound != "compute":
        return None
    tm, tn = tile
    sm = spec.sm_count
    rows, tiles, waves, efficiency = _tiling(g, sm, tile)
    cols = -(-g.N // tn)
    peak = _peak(site.dtype, spec, tf32)
    ideal = g.flops / peak
    quantized = waves * 2 * tm * tn * g.K / (peak / sm)
    fill_m = _whole_waves(g.batch * cols, rows, sm) * tm
    fill_batch = _whole_waves(rows * cols, g.batch, sm) if g.batch > 1 else None
    return WaveFinding(g, tiles, waves, efficiency, g.batch * g.M * g.N / (tiles * tm * tn), ideal, quantized,
                       (quantized - ideal) * g.count, fill_m, fill_batch)


# ---------------------------------------------------------------------------------------------- rendering

def _render(a: ShapeAdvice, width: int) -> Group:
    # the Report's terminal helpers: the same columns, layouts and number formats as every other table
    from .output import terminal as t
    sm = f"{a.sm_count} SMs"
    parts: list = [Text.assemble(("GEMM shapes ", "bold"), f"on {a.device} ({sm})"
                                 + (f" as {a.dtype}" if a.dtype else ""))]
    if not a.gemms:
        parts.append(Text("No GEMMs (mm, addmm, bmm, linear, matmul) in this model.", style="dim"))
        return Group(*parts)
    tiling = [_tiling(g, a.sm_count, a.tile) for g in a.gemms]

    def dim(g: Gemm, name: str, size: int) -> str:
        return f"{size}*" if name in g.unaligned else str(size)

    batched = any(g.batch > 1 for g in a.gemms)
    columns = [
        _where(t, [g.where for g in a.gemms]),
        t._Column("op", [g.op.removeprefix("aten.") for g in a.gemms], justify="left", shorten=t._shorten_end,
                  cap=16, floor=4),
        _calls(t, [g.count for g in a.gemms]),
        *([t._numbers("batch", [str(g.batch) for g in a.gemms])] if batched else []),
        t._numbers("M", [dim(g, "M", g.M) for g in a.gemms]),
        t._numbers("N", [dim(g, "N", g.N) for g in a.gemms]),
        t._numbers("K", [dim(g, "K", g.K) for g in a.gemms]),
        t._Column("dtype", [g.dtype for g in a.gemms], justify="left", drop=1),
        t._numbers("FLOPs", [fmt_flops(g.flops, unit=False) for g in a.gemms], drop=3),
        t._numbers("bytes", [fmt_bytes(g.bytes) for g in a.gemms], drop=4),
        t._bound_column([g.bound for g in a.gemms]),
        t._numbers("time", [fmt_seconds(g.total_seconds) for g in a.gemms]),
        t._numbers("waves", [f"{w} ({e:.0%})" for _, _, w, e in tiling], drop=2),
    ]
    title = f"GEMMs ({len(a.gemms)} distinct, {sum(g.count for g in a.gemms):,} calls; FLOPs and bytes per call)"
    parts += t._fit(title, "GEMMs", columns, width)
    if any(g.unaligned for g in a.gemms):
        parts.append(Text(f"* not a multiple of the dtype's 16-byte alignment. {_M_NOTE}", style="dim"))
    parts += _alignment_table(t, a, width)
    parts += _wave_table(t, a, width)
    return Group(*parts)


def _where(t, cells: list[str]):
    return t._Column("module", cells, justify="left", shorten=t._shorten_path, cap=36, floor=8)


def _calls(t, counts: list[int]):
    return t._numbers("calls", [f"x{c}" if c > 1 else "1" for c in counts])


def _alignment_table(t, a: ShapeAdvice, width: int) -> list:
    rows = a.alignment
    if not rows:
        return [Text("Tensor-core alignment: every N and K is a multiple of 16 bytes of its elements.", style="dim")]
    columns = [
        _where(t, [f.gemm.where for f in rows]),
        _calls(t, [f.gemm.count for f in rows]),
        t._Column("pad", [", ".join(f"{d.name} {d.size}->{d.padded}" for d in f.dims if d.priced) for f in rows],
                  justify="left"),
        t._numbers("align", [str(f.gemm.alignment) for f in rows], drop=1),
        t._bound_column([f.unaligned_bound for f in rows]),
        t._numbers("unaligned", [fmt_seconds(f.unaligned_seconds) for f in rows], tight_header="unal."),
        t._numbers("padded", [fmt_seconds(f.padded_seconds) for f in rows]),
        t._Column("padded bound", [f.padded_bound for f in rows], justify="left", drop=2, tight_header="pb"),
        t._numbers("gain", [f"{f.gain:.3g}x" for f in rows]),
        t._numbers("saved", [fmt_seconds(max(f.saved_seconds, 0.0)) if f.gain > 1 else "none" for f in rows]),
    ]
    title = "Tensor-core alignment: N or K not a multiple of 16 bytes (per call; saved: all calls)"
    return [*t._fit(title, "Tensor-core alignment", columns, width),
            Text(f"gain model: {GAIN_MODEL}", style="dim")]


def _wave_table(t, a: ShapeAdvice, width: int) -> list:
    rows = a.waves
    tile = f"{a.tile[0]}x{a.tile[1]}"
    if not rows:
        return [Text(f"Wave quantization ({tile} tiles, {a.sm_count} SMs): no compute-bound GEMM keeps fewer than "
                     f"{a.min_efficiency:.0%} of the SMs busy.", style="dim")]
    batched = any(f.fill_batch is not None for f in rows)
    columns = [
        _where(t, [f.gemm.where for f in rows]),
        _calls(t, [f.gemm.count for f in rows]),
        *([t._numbers("batch", [str(f.gemm.batch) for f in rows])] if batched else []),
        t._numbers("M", [str(f.gemm.M) for f in rows]),
        t._numbers("N", [str(f.gemm.N) for f in rows]),
        t._numbers("tiles", [str(f.tiles) for f in rows]),
        t._numbers("waves", [str(f.waves) for f in rows]),
        t._numbers("busy", [f"{f.efficiency:.0%}" for f in rows]),
        t._numbers("ideal", [fmt_seconds(f.ideal_seconds) for f in rows], drop=1),
        t._numbers("quantized", [fmt_seconds(f.quantized_seconds) for f in rows], tight_header="quant."),
        t._numbers("lost", [fmt_seconds(f.lost_seconds) for f in rows]),
        t._numbers("fill M", [str(f.fill_m) for f in rows]),
        *([t._numbers("fill batch", [str(f.fill_batch or "-") for f in rows])] if batched else []),
    ]
    title = (f"Wave quantization ({tile} tiles, {a.sm_count} SMs): compute-bound GEMMs under "
             f"{a.min_efficiency:.0%} busy (per call; lost: all calls)")
    return [*t._fit(title, f"Wave quantization ({tile} tiles, {a.sm_count} SMs)", columns, width),
            Text(f"fill M: the smallest M from this one up giving whole waves of whole tiles. {WAVE_MODEL}",
                 style="dim")]
