"""Host time of a step on the fused-kernel path, measured without a GPU.

    python bench/kernel_host_time.py [--steps 200]

Under TRITON_INTERPRET=1 CPU tensors take the kernel path; the kernel launch itself is replaced by
a no-op, so what is timed is everything ``step()`` does on the host before and around the launch
(input checks, routing, buckets, the pointer table, the clip and hyperparameter tables). On a GPU
the launch adds Triton's own launcher time. Prints the best and the median wall time per step for
the GPT-2 small tensor list (148 tensors, sizes divided by 64 to keep memory small: host work does
not depend on sizes) and for 300 tensors of 4096 elements, with the CPU, date and versions. "same
gradients": the gradient tensors stay (zero_grad(set_to_none=False)); "new gradients": every step
sees other gradient tensors, as after zero_grad() and backward(), so the pointer table is rebuilt.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    from triton_adadelta import Adadelta, _triton
    from triton_adadelta.compare import _cpu_name

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from conftest import gpt2_small  # noqa: E402  (bench/conftest.py sets TRITON_INTERPRET=0 on import)

    os.environ["TRITON_INTERPRET"] = "1"

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    _triton.adadelta_kernel = lambda: _NoLaunch()
    import triton

    print(f"{_cpu_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print("| tensors | gradients | best µs per step | median µs per step |")
    print("|---|---|---:|---:|")
    sets = {
        "GPT-2 small (148)": [(max(1, s[0] // 64),) + tuple(s[1:]) for s in gpt2_small()],
        "300 x 4096": [(4096,)] * 300,
    }
    for name, shapes in sets.items():
        params = [torch.randn(s) for s in shapes]
        grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2)]  # made once: no allocation timed
        for p, g in zip(params, grad_sets[0]):
            p.grad = g
        opt = Adadelta(params)
        opt.step()
        for mode in ("same", "new"):
            times = []
            for i in range(args.steps):
                if mode == "new":
                    for p, g in zip(params, grad_sets[i % 2]):
                        p.grad = g
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            print(f"| {name} | {mode} | {1e6 * min(times):.0f} | {1e6 * statistics.median(times):.0f} |")

if __name__ == "__main__":
    main()
