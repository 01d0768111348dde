"""Precision: the number format an analysis prices a model in, from a dtype or a name ("bf16", "int8").

Most formats mean what they say: analyse as if parameters, buffers and floating inputs were in that dtype
(bytes and peaks follow). Eight-bit formats do not: nobody runs a LayerNorm or a softmax in int8 or fp8. A model
"in int8" or "in fp8" is a quantised one, W8A8 as TensorRT-LLM, vLLM and SmoothQuant run it: every matmul-class
op (Linear, conv, mm, bmm) reads 8-bit weights and activations and runs at the spec's 8-bit tensor-core peak,
writing bf16; everything else (norms, softmax, activations, attention) computes in bf16.

    >>> resolve("bf16")
    Precision(name='bf16', dtype=torch.bfloat16, matmul_dtype=None, tf32=False)
    >>> p = resolve("int8"); p.dtype, p.matmul_dtype
    (torch.bfloat16, torch.int8)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .records import OpRecord, TensorMeta

#: Names accepted wherever a dtype is (``analyze(dtype="bf16")``, ``--dtype bf16``) -> (dtype, tf32).
#: "tf32" is fp32 whose matmuls run on TF32 tensor cores.
DTYPES: dict[str, tuple[torch.dtype, bool]] = {
    "bf16": (torch.bfloat16, False), "bfloat16": (torch.bfloat16, False),
    "fp16": (torch.float16, False), "float16": (torch.float16, False), "half": (torch.float16, False),
    "fp32": (torch.float32, False), "float32": (torch.float32, False), "float": (torch.float32, False),
    "tf32": (torch.float32, True),
    "fp64": (torch.float64, False), "float64": (torch.float64, False), "double": (torch.float64, False),
    "fp8": (torch.float8_e4m3fn, False), "fp8e4m3": (torch.float8_e4m3fn, False),
    "float8_e4m3fn": (torch.float8_e4m3fn, False),
    "fp8e5m2": (torch.float8_e5m2, False), "float8_e5m2": (torch.float8_e5m2, False),
    "int8": (torch.int8, False),
}

_EIGHT_BIT = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
              torch.float8_e5m2fnuz)
#: what the non-matmul ops of an 8-bit (W8A8) model compute in
QUANTISED_REST = torch.bfloat16


@dataclass(frozen=True)
class Precision:
    """How a model is priced.

    Attributes:
        name: as the report shows it: 'bf16', 'int8 (W8A8)'.
        dtype: what parameters, buffers and floating inputs are cast to for capture (None: as given).
        matmul_dtype: for 8-bit formats, the dtype matmul-class ops read their operands in; None otherwise.
        tf32: fp32 matmuls run on TF32 tensor cores.
    """

    name: str
    dtype: torch.dtype | None
    matmul_dtype: torch.dtype | None = None
    tf32: bool = False

    @property
    def note(self) -> str:
        """What this precision means for the numbers, for the report ('' when it means the obvious)."""
        if self.matmul_dtype is None:
            return ""
        short = self.name.split()[0]
        return (f"{short}: priced as a W8A8 model: matmul-class ops (Linear, conv, mm, bmm) read {short} weights "
                f"and activations at the spec's {short} tensor-core peak and write bf16; norms, softmax, "
                f"activations and attention compute in bf16")


def resolve(dtype: torch.dtype | str | None, tf32: bool = False) -> Precision:
    """A Precision from a torch dtype, a name (`DTYPES`) or None (the model's own dtypes).

    Raises:
        ValueError: an unknown name or something that is not a dtype (one line, listing the names).
    """
    if dtype is None:
        return Precision("as given", None, None, tf32)
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        dtype, named_tf32 = DTYPES[key]
        tf32 = tf32 or named_tf32
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype in _EIGHT_BIT:
        return Precision(f"{_short(dtype)} (W8A8)", QUANTISED_REST, dtype, tf32)
    if not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"dtype {dtype} cannot hold a model's weights; use a float type or an 8-bit one "
                         f"(int8, fp8: priced as a W8A8 quantised model)")
    return Precision(_short(dtype) + ("/tf32" if tf32 and dtype == torch.float32 else ""), dtype, None, tf32)


def quantise(record: OpRecord, matmul_dtype: torch.dtype) -> OpRecord:
    """The record of a matmul-class op as a W8A8 kernel runs it: floating operands in `matmul_dtype`."""
    seen: dict[int, TensorMeta] = {}   # one operand read twice stays one tensor (bytes count it once)

    def cast(x):
        if isinstance(x, TensorMeta) and x.dtype.is_floating_point:
            if id(x) not in seen:
                seen[id(x)] = replace(x, dtype=matmul_dtype)
            return seen[id(x)]
        if isinstance(x, (list, tuple)):
            return type(x)(cast(v) for v in x)
        return x
    return OpRecord(record.op, cast(record.args), {k: cast(v) for k, v in record.kwargs.items()}, record.outputs)


def _short(dtype: torch.dtype) -> str:
    for name, (d, tf32) in DTYPES.items():
        if d == dtype and not tf32:
            return name
    return str(dtype).removeprefix("torch.")
