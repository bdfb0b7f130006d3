"""One optimizer step on a parameter set, timed: ours, torch's foreach and compiled Adadelta, a copy of the
same bytes, the host time of a step, and the CUDA-graph replay of ours. Used by bench/run.py.

Timing: on CUDA, CUDA events around each call with the L2 cache flushed before it (a 256 MB buffer is
zeroed, as ``triton.testing.do_bench`` does), the median after warm-up calls; the sets timed on CUDA
(GPT-2 small and larger) move gigabytes a step, far beyond L2, so each step reads its inputs from
memory. On CPU, the wall clock of each call, the median after warm-up. Host time: ``step()`` alone on
the host clock, the device queue drained before each call and new gradient tensors every step (as
after ``zero_grad()`` and ``backward()``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any, Callable, Optional

import torch
from sets import MODES, SETS, numel, roofline_bytes, state_dtype_of

from triton_adadelta import Adadelta

L2_FLUSH_BYTES = 256 << 20


def _reps(device: torch.device, n: int) -> tuple[int, int]:
    """(warm-up calls, timed calls): fewer for the sets whose steps take long on a CPU."""
    if device.type == "cuda":
        return 3, 20
    return (1, 5) if n >= 20_000_000 else (2, 10)


def _make(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, dtype=dtype, device=device, generator=gen) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=dtype, device=device, generator=gen)
    return params


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` calls (see the module docstring)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _changed(params: list[torch.Tensor], before: torch.Tensor) -> bool:
    after = params[0].detach().flatten()[: before.numel()]
    return not torch.equal(after, before) and bool(torch.isfinite(after).all())


def measure(set_name: str, mode: str, impl: str, device: torch.device) -> dict[str, Any]:
    """Time one case; returns the median seconds and what the report needs (params, bytes, GB/s...).

    impl: ``ours``, ``torch-foreach``, ``torch-compiled`` (TorchDynamo reset first, so every case is a
    fresh compilation: past dynamo's recompile limit of 8 per code object a later case would run
    eagerly under this label), ``copy`` (a device copy moving as many bytes as our step's minimum
    traffic, half read and half written), ``host-ours`` / ``host-foreach`` (host time of a step) and
    ``graph-ours`` (replay of a CUDA graph that holds our step, ``capturable=True``).
    """
    shapes = SETS[set_name]
    dtype = MODES[mode]
    n = numel(shapes)
    warmup, reps = _reps(device, n)
    extra: dict[str, Any] = {}
    gc.collect()
    if impl == "copy":
        total = roofline_bytes(dtype, torch.float32) * n
        src = torch.empty(total // 2, dtype=torch.uint8, device=device).random_(0, 255)
        dst = torch.empty_like(src)
        times = time_calls(lambda: dst.copy_(src), device, warmup, reps)
        moved = 2 * src.numel()
        assert torch.equal(dst[:4096], src[:4096])
        del src, dst
        return _result(set_name, mode, impl, n, len(shapes), times, moved, extra)

    params = _make(shapes, dtype, device)
    before = params[0].detach().flatten()[:1024].clone()
    base = impl.split("-", 1)[1] if impl.startswith(("host-", "graph-")) else impl
    if base == "ours":
        opt: torch.optim.Optimizer = Adadelta(params, capturable=impl.startswith("graph-"))
    else:
        opt = torch.optim.Adadelta(params, foreach=True)
    step: Callable[[], Any] = opt.step
    if impl == "torch-compiled":
        import torch._dynamo as dynamo

        dynamo.reset()
        dynamo.utils.counters.clear()
        eager_step = opt.step

        @torch.compile(fullgraph=False)  # PyTorch's recipe for a compiled optimizer step
        def step() -> None:
            eager_step()

        t0 = time.perf_counter()
        step()
        _sync(device)
        extra["compile_s"] = time.perf_counter() - t0
        extra["graphs"] = int(dynamo.utils.counters["stats"]["unique_graphs"])
    if impl.startswith("host-"):
        grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2)]
        step()
        times = []
        for i in range(warmup + reps):
            for p, g in zip(params, grad_sets[i % 2]):
                p.grad = g
            _sync(device)
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        _sync(device)
        times = times[warmup:]
        moved = 0
    elif impl.startswith("graph-"):
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream: state and launch tables, as capture requires
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        times = time_calls(graph.replay, device, warmup, reps)
        moved = roofline_bytes(dtype, state_dtype_of("ours", dtype)) * n
        del graph
    else:
        times = time_calls(step, device, warmup, reps)
        moved = roofline_bytes(dtype, state_dtype_of(base, dtype)) * n
    _sync(device)
    assert _changed(params, before), f"{impl}: the step changed nothing or made non-finite values"
    if device.type == "cuda":
        extra["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    del opt, step, params
    return _result(set_name, mode, impl, n, len(shapes), times, moved, extra)


def _result(set_name: str, mode: str, impl: str, n: int, tensors: int, times: list[float], moved: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    median = statistics.median(times)
    out = dict(set=set_name, mode=mode, impl=impl, params=n, tensors=tensors, median_s=median, min_s=min(times),
               calls=len(times), bytes=moved, **extra)
    if moved:
        out["gbps"] = moved / median / 1e9
    return out


def release(device: torch.device) -> None:
    """Give memory back between cases (the largest sets fill a good part of the card)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: Optional[list[str]] = None) -> None:
    """One case in a process of its own, its result as one JSON line (bench/run.py runs the compiled cases
    so: a fresh TorchDynamo, and a compilation that overruns the budget can be stopped)."""
    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--set", required=True, choices=sorted(SETS))
    ap.add_argument("--mode", required=True, choices=sorted(MODES))
    ap.add_argument("--impl", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.set, args.mode, args.impl, torch.device(args.device))))


if __name__ == "__main__":
    main()
