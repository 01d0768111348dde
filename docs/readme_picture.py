"""Makes docs/llama3-8b-one-token.svg, the README's picture: python docs/readme_picture.py

A Llama-3-8B forward over one token per sequence (batch 8) with no KV cache, in bf16 on an A100, analysed on the
meta device. It is not a decode step: a decode step also reads the cache (a later analysis).
"""
import sys
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shapeprof  # noqa: E402
from examples.llama import LlamaConfig, Transformer  # noqa: E402


def main() -> None:
    with torch.device("meta"):
        model = Transformer(LlamaConfig.llama3_8b())
    report = shapeprof.analyze(model, shapeprof.InputShape((8, 1), torch.long), dtype=torch.bfloat16)
    console = Console(record=True, width=120, file=open("/dev/null", "w"), force_terminal=True)
    console.print(report)
    out = ROOT / "docs" / "llama3-8b-one-token.svg"
    console.save_svg(str(out), title="shapeprof: Llama-3-8B, one token per sequence (batch 8, no KV cache), A100, bf16")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
