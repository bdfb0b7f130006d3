"""Host time of a step, measured without a GPU.

    python bench/kernel_host_time.py [--steps 300] [--rounds 5] [--path kernel|cpu] [--dtensor]

``--path kernel`` (default): under TRITON_INTERPRET=1 CPU tensors take the kernel path; the kernel
launch itself is replaced by a no-op, so what is timed is everything ``step()`` does on the host
before and around the launch (input checks, routing, buckets, the pointer table, the clip and
hyperparameter tables). On a GPU the launch adds Triton's own launcher time. Sets: the GPT-2 small
tensor list (148 tensors, first dimension divided by 4096: host work does not depend on sizes, and
the competitors' arithmetic on the CPU stays small) and 300 tensors of 64 elements.

``--path cpu``: the fused CPU path with one thread, its C call included: 148 tensors of 64 elements
(almost all host work) and 64 tensors of 16,384 (1M parameters).

``--dtensor``: the parameters and gradients are DTensors sharded on a one-process gloo mesh (what
FSDP2 hands the optimizer), on the kernel path.

"same" gradients: the gradient tensors stay (zero_grad(set_to_none=False)); "new" gradients: every
step sees other gradient tensors, as after zero_grad() and backward(), so the addresses change.

Beside ours, on the same tensors and gradients in the same run: ``torch.optim.Adam(fused=True)`` and
``torch.optim.Adadelta(foreach=True)``. Theirs compute on the CPU too (ours does not: its launch is a
no-op); the sets are small enough that this is a small part of their times. The optimizers take turns
(``--rounds`` rounds of ``--steps`` steps each, interleaved, so that load from other jobs falls on all
alike); printed are the best step and the median of the rounds' median steps, in µs, with the CPU,
date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _optimizers(params: list) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    from triton_adadelta import Adadelta

    return {"ours": lambda: Adadelta(params),
            "Adam fused": lambda: torch.optim.Adam(params, fused=True),
            "Adadelta foreach": lambda: torch.optim.Adadelta(params, foreach=True)}


def _time_steps(opt: torch.optim.Optimizer, params, grad_sets, steps: int, mode: str) -> list[float]:
    times = []
    for i in range(steps):
        if mode == "new":
            for p, g in zip(params, grad_sets[i % 2]):
                p.grad = g
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def _compare(params, grad_sets, steps: int, rounds: int, mode: str, competitors: bool) -> dict[str, tuple]:
    """Per optimizer (best, median of the rounds' medians) in µs, the optimizers taking turns."""
    makers = _optimizers(params)
    if not competitors:
        makers = {"ours": makers["ours"]}
    opts = {}
    for name, make in makers.items():
        for p, g in zip(params, grad_sets[0]):
            p.grad = g
        opts[name] = make()
        opts[name].step()  # state made, route cached
    best = {name: math.inf for name in opts}
    medians: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            for p, g in zip(params, grad_sets[0]):
                p.grad = g
            times = _time_steps(opt, params, grad_sets, steps, mode)
            best[name] = min(best[name], min(times))
            medians[name].append(statistics.median(times))
    return {name: (1e6 * best[name], 1e6 * statistics.median(medians[name])) for name in opts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--path", choices=["kernel", "cpu"], default="kernel")
    ap.add_argument("--dtensor", action="store_true")
    args = ap.parse_args()
    from triton_adadelta import _triton
    from triton_adadelta.compare import _cpu_name

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from conftest import gpt2_small  # noqa: E402  (bench/conftest.py sets TRITON_INTERPRET=0 on import)

    # One intra-op thread on every path: host work is one thread's anyway, and on a shared machine the
    # competitors' OpenMP workers waiting for a core would time the machine's load, not the optimizer.
    torch.set_num_threads(1)
    if args.path == "kernel":
        os.environ["TRITON_INTERPRET"] = "1"

        class _NoLaunch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None

        _triton.adadelta_kernel = lambda: _NoLaunch()
        sets = {
            "GPT-2 small (148)": [(max(1, s[0] // 4096),) + tuple(s[1:]) for s in gpt2_small()],
            "300 x 64": [(64,)] * 300,
        }
    else:
        os.environ["TRITON_INTERPRET"] = "0"
        sets = {"148 x 64": [(64,)] * 148, "64 x 16384": [(16384,)] * 64}

    make = torch.randn
    if args.dtensor:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))

        def make(*shape):
            return distribute_tensor(torch.randn(*shape), mesh, [Shard(0)])

    import triton

    print(f"{_cpu_name()}, torch {torch.__version__}, triton {triton.__version__}, path {args.path}"
          f"{', DTensor parameters' if args.dtensor else ''}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    competitors = not args.dtensor  # torch's fused Adam and foreach Adadelta take no DTensors on one CPU mesh
    names = ["ours"] + (["Adam fused", "Adadelta foreach"] if competitors else [])
    print("| tensors | gradients | " + " | ".join(f"{n} best | {n} median" for n in names) + " |")
    print("|---|---|" + "---:|---:|" * len(names))
    for name, shapes in sets.items():
        params = [torch.nn.Parameter(make(*s)) for s in shapes]
        grad_sets = [[make(*s) for s in shapes] for _ in range(2)]  # made once: no allocation timed
        for mode in ("same", "new"):
            res = _compare(params, grad_sets, args.steps, args.rounds, mode, competitors)
            cells = " | ".join(f"{res[n][0]:.0f} | {res[n][1]:.0f}" for n in names)
            print(f"| {name} | {mode} | {cells} |", flush=True)
    if args.dtensor:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
