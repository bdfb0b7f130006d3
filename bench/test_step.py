"""One optimizer step: torch.optim.Adadelta (for-loop, foreach, torch.compile'd) against ours.

Every benchmark records in ``extra_info`` what the report needs: parameters, tensors, the minimum
bytes its update must move per parameter (the roofline: read p, g and both state tensors, write p
and the state), the effective GB/s that gives, and the peak extra memory of one step. The
device-to-device copy of the same number of bytes is benchmarked in the same run
(``test_copy``), so bench/run.py can state each result as a percentage of copy bandwidth.

Timing (pytest-benchmark, warm-up rounds first, so torch.compile's and our compilation are not
timed): on CPU the wall clock of one ``step()``. On CUDA a round is ``STEPS_PER_ROUND`` steps back to
back and one device synchronisation, reported per step (``extra_info["steps_per_round"]``): as in a
training loop, the host prepares the next step while the GPU runs the previous one, so a step costs
the larger of its host time and its GPU time, not their sum. The copy is timed the same way.
``test_host_overhead`` times ``step()`` alone for 300 small tensors: on CUDA that is the host's work
to launch a step.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import pytest
import torch
from conftest import DEVICE, QUICK, SETS, numel, selected_sets
from sets import MODES, roofline_bytes, state_dtype_of

from triton_adadelta import Adadelta

IMPLS = ["torch-forloop", "torch-foreach", "torch-compiled", "ours"]
ON_CPU = DEVICE.startswith("cpu")
# torch.compile of torch's step: every set is its own compilation (minutes on a small CPU); timed up to 200M there.
CPU_COMPILED_MAX = 200_000_000
# Steps per timed round on CUDA, synchronised once at the end (see the module docstring).
STEPS_PER_ROUND = 1 if ON_CPU or QUICK else 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make(shapes, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, dtype=dtype, device=device, generator=gen) for s in shapes]
    grads = [torch.randn(s, dtype=dtype, device=device, generator=gen) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def make_step(impl: str, params: list[torch.Tensor]) -> tuple[torch.optim.Optimizer, Callable[[], Any]]:
    """The optimizer and its step function for one implementation under test."""
    if impl == "torch-forloop":
        opt = torch.optim.Adadelta(params, foreach=False)
        return opt, opt.step
    if impl == "torch-foreach":
        opt = torch.optim.Adadelta(params, foreach=True)
        return opt, opt.step
    if impl == "torch-compiled":
        opt = torch.optim.Adadelta(params, foreach=True)
        # A fresh compilation per case: every case compiles the same code object, and past dynamo's
        # recompile limit (8) later cases would silently time the eager step under this label.
        torch._dynamo.reset()

        # PyTorch's recipe for a compiled optimizer step.
        @torch.compile(fullgraph=False)
        def compiled_step():
            opt.step()

        return opt, compiled_step
    if impl == "ours":
        opt = Adadelta(params)
        return opt, opt.step
    raise ValueError(impl)


def peak_extra_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Memory a step allocates above the resting level.

    CUDA: the caching allocator's peak during one step, minus what was allocated before it. CPU: the
    bytes allocated by the step's operations, from torch.profiler's memory records; the temporaries of
    these optimizers live until the step ends, so this is their peak. (The resident-set peak is no
    measure on CPU: the C allocator keeps freed blocks resident and reuses them.)
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return int(sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages()))


def _rounds(n: int) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) for a set of ``n`` parameters."""
    if QUICK:
        return 1, 1
    if ON_CPU:
        return (1, 5) if n >= 50_000_000 else (2, 10)
    return (2, 5) if n >= 500_000_000 else (3, 10)  # rounds of STEPS_PER_ROUND steps each


def _cases():
    for name in selected_sets():
        for mode in MODES:
            for impl in IMPLS:
                marks = []
                n = numel(SETS[name])
                if impl == "torch-compiled" and ON_CPU and n > CPU_COMPILED_MAX:
                    why = f"torch.compile of torch's step: timed up to {CPU_COMPILED_MAX:,} parameters on CPU"
                    marks.append(pytest.mark.skip(reason=why))
                if impl == "torch-compiled" and QUICK and mode != "fp32":
                    marks.append(pytest.mark.skip(reason="quick run: one compiled torch step is enough"))
                yield pytest.param(name, mode, impl, id=f"{name}-{mode}-{impl}", marks=marks)


@pytest.mark.parametrize("set_name, mode, impl", list(_cases()))
def test_step(benchmark, device, set_name, mode, impl):
    shapes = SETS[set_name]
    dtype = MODES[mode]
    params = _make(shapes, dtype, device)
    first_before = params[0].detach().flatten()[:1024].clone()
    opt, step = make_step(impl, params)
    warmup, rounds = _rounds(numel(shapes))

    def timed():
        for _ in range(STEPS_PER_ROUND):
            step()
        _sync(device)

    for _ in range(warmup):  # compilation (ours on CPU, torch.compile) and first-touch happen here
        timed()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    peak = peak_extra_bytes(timed, device)

    n = numel(shapes)
    per_param = roofline_bytes(dtype, state_dtype_of(impl, dtype))
    benchmark.extra_info.update(
        kind="step", set=set_name, mode=mode, impl=impl, params=n, tensors=len(shapes),
        bytes_per_param=per_param, peak_extra_bytes=peak, device=_device_name(device),
        threads=torch.get_num_threads(), steps_per_round=STEPS_PER_ROUND,
    )
    if benchmark.stats is not None and not benchmark.disabled:
        benchmark.extra_info["gbps"] = per_param * n * STEPS_PER_ROUND / benchmark.stats.stats.median / 1e9
    # The step really updated the parameters and kept them finite.
    after = params[0].detach().flatten()[:1024]
    assert not torch.equal(after, first_before), "the step changed nothing"
    assert bool(torch.isfinite(after).all()) and bool(torch.isfinite(params[-1]).all())
    assert all(len(opt.state[p]) > 0 for p in params)


@pytest.mark.parametrize("set_name, mode", [(s, m) for s in selected_sets() for m in MODES],
                         ids=lambda v: str(v))
def test_copy(benchmark, device, set_name, mode):
    """The ceiling: a device-to-device copy moving as many bytes as our fused step (half read, half written)."""
    n = numel(SETS[set_name])
    dtype = MODES[mode]
    total = roofline_bytes(dtype, torch.float32) * n
    src = torch.empty(total // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    warmup, rounds = _rounds(n)

    def timed():
        for _ in range(STEPS_PER_ROUND):
            dst.copy_(src)
        _sync(device)

    for _ in range(warmup):
        timed()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(kind="copy", set=set_name, mode=mode, params=n, bytes=2 * src.numel(),
                                device=_device_name(device), threads=torch.get_num_threads(),
                                steps_per_round=STEPS_PER_ROUND)
    if benchmark.stats is not None and not benchmark.disabled:
        benchmark.extra_info["gbps"] = 2 * src.numel() * STEPS_PER_ROUND / benchmark.stats.stats.median / 1e9
    assert torch.equal(dst[:4096], src[:4096])


@pytest.mark.parametrize("impl", ["torch-forloop", "torch-foreach", "ours"])
def test_host_overhead(benchmark, device, impl):
    """300 tensors of 4096 elements: the cost of a step that is nearly all overhead.

    On CUDA the timed call is ``step()`` without a synchronisation (the queue is drained before each
    round): the host's time to launch one step. On CPU it is the whole step.
    """
    count = 30 if QUICK else 300
    params = _make([(4096,)] * count, torch.float32, device)
    opt, step = make_step(impl, params)
    for _ in range(1 if QUICK else 5):
        step()
    _sync(device)
    benchmark.pedantic(step, setup=lambda: _sync(device), rounds=1 if QUICK else 100, iterations=1,
                       warmup_rounds=0)
    _sync(device)
    benchmark.extra_info.update(kind="host", impl=impl, tensors=count, params=4096 * count,
                                device=_device_name(device), threads=torch.get_num_threads())
    assert bool(torch.isfinite(params[0]).all()) and float(opt.state[params[0]]["step"]) >= 2


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from triton_adadelta.compare import _cpu_name

    return _cpu_name()


@pytest.fixture(autouse=True)
def _release(device):
    """After each benchmark (its tensors gone with its frame), give the memory back before the next."""
    yield
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
