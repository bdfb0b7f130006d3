"""Final losses of a small bf16/fp16 training run in every precision mode, as a markdown table.

The problem is the tests' (tests/helpers.py: regression): noisy linear regression (512 x 64, weights of magnitude ~2)
started near its solution, the regime where Adadelta's steps are smaller than half a bf16 ulp.
Usage: python bench/precision_training.py [--fused]   (--fused: the Triton kernel; on a machine
without a GPU set TRITON_INTERPRET=1 and expect minutes).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from triton_adadelta import Adadelta

# The problem and its training loop are the tests' (tests/helpers.py), so the table and the tests agree.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import train_regression as train  # noqa: E402

MODES = [
    ("round to nearest", {}),
    ("stochastic rounding", dict(stochastic_rounding=True)),
    ("stochastic rounding, 16-bit state", "s16"),
    ("master_weights=True", dict(master_weights=True)),
    ("master_weights='remainder'", dict(master_weights="remainder")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"{'fused' if args.fused else 'PyTorch'} path\n")
    print("| dtype | mode | " + " | ".join(f"loss / fp32 loss, {s} steps" for s in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    base = {s: train(lambda ps: torch.optim.Adadelta(ps), torch.float32, "cpu", s) for s in args.steps}
    print("| float32 | torch.optim.Adadelta | " + " | ".join(f"{base[s]:.4f} (1.000)" for s in args.steps) + " |")
    for dtype in (torch.bfloat16, torch.float16):
        for name, kw in MODES:
            if kw == "s16":
                kw = dict(stochastic_rounding=True, state_dtype=dtype)
            if dtype == torch.float16 and kw.get("master_weights") == "remainder":
                continue  # bf16 only
            cells = []
            for s in args.steps:
                loss = train(lambda ps, kw=kw: Adadelta(ps, fused=args.fused, **kw), dtype, device, s)
                cells.append(f"{loss:.4f} ({loss / base[s]:.3f})")
            print(f"| {str(dtype).replace('torch.', '')} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
