"""Host time of a step, measured without a GPU.

    python bench/kernel_host_time.py [--steps 300] [--path kernel|cpu] [--dtensor]

``--path kernel`` (default): under TRITON_INTERPRET=1 CPU tensors take the kernel path; the kernel
launch itself is replaced by a no-op, so what is timed is everything ``step()`` does on the host
before and around the launch (input checks, routing, buckets, the pointer table, the clip and
hyperparameter tables). On a GPU the launch adds Triton's own launcher time. Sets: the GPT-2 small
tensor list (148 tensors, sizes divided by 64 to keep memory small: host work does not depend on
sizes) and 300 tensors of 4096 elements.

``--path cpu``: the fused CPU path with one thread, its C call included: 148 tensors of 64 elements
(almost all host work) and 64 tensors of 16,384 (1M parameters).

``--dtensor``: the parameters and gradients are DTensors sharded on a one-process gloo mesh (what
FSDP2 hands the optimizer), on the kernel path.

"same" gradients: the gradient tensors stay (zero_grad(set_to_none=False)); "new" gradients: every
step sees other gradient tensors, as after zero_grad() and backward(), so the addresses change.
Prints the best and the median wall time per step, with the CPU, date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _time_steps(params, grad_sets, steps: int, mode: str) -> list[float]:
    from triton_adadelta import Adadelta

    for p, g in zip(params, grad_sets[0]):
        p.grad = g
    opt = Adadelta(params)
    opt.step()
    times = []
    for i in range(steps):
        if mode == "new":
            for p, g in zip(params, grad_sets[i % 2]):
                p.grad = g
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--path", choices=["kernel", "cpu"], default="kernel")
    ap.add_argument("--dtensor", action="store_true")
    args = ap.parse_args()
    from triton_adadelta import _triton
    from triton_adadelta.compare import _cpu_name

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from conftest import gpt2_small  # noqa: E402  (bench/conftest.py sets TRITON_INTERPRET=0 on import)

    if args.path == "kernel":
        os.environ["TRITON_INTERPRET"] = "1"

        class _NoLaunch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None

        _triton.adadelta_kernel = lambda: _NoLaunch()
        sets = {
            "GPT-2 small (148)": [(max(1, s[0] // 64),) + tuple(s[1:]) for s in gpt2_small()],
            "300 x 4096": [(4096,)] * 300,
        }
    else:
        os.environ["TRITON_INTERPRET"] = "0"
        torch.set_num_threads(1)
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
    print("| tensors | gradients | best µs per step | median µs per step |")
    print("|---|---|---:|---:|")
    for name, shapes in sets.items():
        params = [torch.nn.Parameter(make(*s)) for s in shapes]
        grad_sets = [[make(*s) for s in shapes] for _ in range(2)]  # made once: no allocation timed
        for mode in ("same", "new"):
            times = _time_steps(params, grad_sets, args.steps, mode)
            print(f"| {name} | {mode} | {1e6 * min(times):.0f} | {1e6 * statistics.median(times):.0f} |")
    if args.dtensor:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
