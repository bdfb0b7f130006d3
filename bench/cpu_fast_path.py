"""The fused CPU path against torch.optim.Adadelta(foreach=True): steady state and first-step cost.

    python bench/cpu_fast_path.py [--params 24400000] [--tensors 145] [--steps 15] [--dtype fp32|bf16]

1. Steady state, in one process: ours and torch's foreach step alternate on identical parameter
   sets (same shapes, same gradients), so a change in machine load hits both; medians after warm-up.
2. First-step cost: a fresh process with an empty build cache (cold: the C compiler builds the
   CPU update), then a second process with that cache (warm: what every later process pays).

Prints a Markdown block with the CPU, date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_FIRST_STEP = """
import time, torch, sys
from triton_adadelta import Adadelta
dtype = getattr(torch, sys.argv[1])
ps = [torch.randn(n, dtype=dtype) for n in (400_000, 300_001, 300_000, 77)]
for p in ps:
    p.grad = torch.randn_like(p)
opt = Adadelta(ps)
t0 = time.perf_counter(); opt.step(); t1 = time.perf_counter(); opt.step(); t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.6f}")
"""


def _shapes(total: int, count: int) -> list[int]:
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def steady_state(total: int, count: int, steps: int, dtype: torch.dtype) -> dict[str, float]:
    from triton_adadelta import Adadelta, cpu_fused

    gen = torch.Generator().manual_seed(0)
    sizes = _shapes(total, count)
    ours_p = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    theirs_p = [p.clone() for p in ours_p]
    for a, b in zip(ours_p, theirs_p):
        a.grad = torch.randn(a.shape, generator=gen).to(dtype)
        b.grad = a.grad.clone()
    ours, theirs = Adadelta(ours_p), torch.optim.Adadelta(theirs_p, foreach=True)
    t0 = time.perf_counter()
    ours.step()
    first = time.perf_counter() - t0
    theirs.step()
    a, b = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        ours.step()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs.step()
        b.append(time.perf_counter() - t0)
    used = cpu_fused._library is not None
    err = max(float((x.float() - y.float()).abs().max()) for x, y in zip(ours_p, theirs_p))
    return {"ours_ms": 1e3 * statistics.median(a), "foreach_ms": 1e3 * statistics.median(b),
            "first_s": first, "compiled": used, "max_abs_diff": err}


def first_step(dtype: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_ADADELTA_CACHE_DIR=cache, TRITON_ADADELTA_CPU_COMPILE_MIN_NUMEL="0",
                   OMP_NUM_THREADS=str(torch.get_num_threads()))
        env.pop("TRITON_INTERPRET", None)
        times = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _FIRST_STEP, dtype], env=env, cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            times.append(float(out.stdout.split()[0]))
    return times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=24_400_000)
    ap.add_argument("--tensors", type=int, default=145)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--skip-first-step", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.pop("TRITON_INTERPRET", None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    from triton_adadelta.compare import _cpu_name

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    print(f"{_cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads; torch "
          f"{torch.__version__}, triton {tv}, Python {platform.python_version()}; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    r = steady_state(args.params, args.tensors, args.steps, dtype)
    print(f"\n{args.params:,} {args.dtype} parameters in {args.tensors} tensors, median of {args.steps} "
          "alternating steps:\n")
    print("| torch foreach ms | ours ms | ours / foreach | ours first step s | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {r['foreach_ms']:.1f} | {r['ours_ms']:.1f} | {r['ours_ms'] / r['foreach_ms']:.3f} | "
          f"{r['first_s']:.1f} | {r['max_abs_diff']:.2e} |")
    if not r["compiled"]:
        print("\n(the fused CPU path did not run: below the threshold or no C compiler)")
    if not args.skip_first_step:
        dname = "float32" if args.dtype == "fp32" else "bfloat16"
        cold, warm = first_step(dname)
        print(f"\nFirst step of a fresh process, 1M {args.dtype} parameters: cold (empty build cache) "
              f"{cold:.2f} s, warm (cache from the previous process) {warm:.2f} s.")


if __name__ == "__main__":
    main()
