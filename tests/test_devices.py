"""Device, stream and host-read discipline of a step, checked on CPU with stand-ins (issue 15, items 1-2).

- Every Triton launch (the update and the norms) runs inside the device guard of its tensors' device.
- Tables and flat buffers a launch reads are recorded once per stream they are used on (record_stream),
  and again after they are reallocated, so the caching allocator cannot reuse them under a queued launch.
- ``found_inf`` is never read on the host on the kernel or the PyTorch path, mixed routes included: a
  flag that raises on any host read drives whole steps.

The same on real GPUs (cuda:1 with cuda:0 current, set_sync_debug_mode("error")) is in tests/test_gpu.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import needs_kernel
from helpers import assert_close_rel, make_params, random_grads, set_grads

from triton_adadelta import Adadelta, _triton, clipping
from triton_adadelta.backends import tables


class _Spy:
    """Wraps a Triton kernel: records the guarded device at each launch, then launches for real."""

    def __init__(self, kind, kernel, guard_stack, launches):
        self.kind, self.kernel, self.stack, self.launches = kind, kernel, guard_stack, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            self.launches.append((self.kind, self.stack[-1] if self.stack else None, devices))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def guarded(monkeypatch):
    """(launches, records, streams): Triton launches with the device guard current at each, and the
    (data_ptr, stream) pairs passed to record_stream; ``streams[0]`` is the stream current now."""
    from triton_adadelta.kernels.adadelta import adadelta_kernel
    from triton_adadelta.kernels.norms import sqnorm_kernel

    stack, launches, records, streams = [], [], [], ["stream A"]

    @contextlib.contextmanager
    def guard(device):
        stack.append(device)
        try:
            yield
        finally:
            stack.pop()

    monkeypatch.setattr(tables, "device_guard", guard)
    monkeypatch.setattr(tables, "current_stream", lambda device: streams[0])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: records.append((t.data_ptr(), s)), raising=False)
    monkeypatch.setattr(_triton, "adadelta_kernel", lambda: _Spy("update", adadelta_kernel, stack, launches))
    monkeypatch.setattr(clipping, "_norm_kernel", lambda: _Spy("norms", sqnorm_kernel, stack, launches))
    return launches, records, streams


@needs_kernel
def test_every_launch_runs_on_its_tensors_device(guarded):
    launches, _, _ = guarded
    fp32 = make_params([(9,), (33, 5)], torch.float32, "cpu", seed=1)
    bf16 = make_params([(17,)], torch.bfloat16, "cpu", seed=2)
    opt = Adadelta([{"params": fp32}, {"params": bf16}], fused=True, clipnorm=0.5)
    for step in range(2):
        set_grads(fp32 + bf16, random_grads(fp32 + bf16, seed=3 + step))
        opt.step()
    kinds = [k for k, _, _ in launches]
    assert kinds.count("update") == 4 and kinds.count("norms") == 2, kinds  # two buckets and one norm launch a step
    for kind, guard, devices in launches:
        assert guard is not None, f"a {kind} launch outside any device guard"
        assert devices == {guard}, f"a {kind} launch under {guard} reads tensors on {devices}"


@needs_kernel
def test_buffers_are_recorded_once_per_stream_and_again_when_reallocated(guarded):
    _, records, streams = guarded
    params = make_params([(9,), (2049,)], torch.float32, "cpu", seed=4)
    opt = Adadelta(params, fused=True, clipnorm=1.0)
    set_grads(params, random_grads(params, seed=5))
    opt.step()
    flat = next(iter(opt._store.flats.values()))
    bucket = opt._route.buckets[0]
    needed = {t.data_ptr() for t in flat.buffers() + bucket.plan.tables() if t is not None}
    assert needed <= {ptr for ptr, s in records if s == "stream A"}, "a buffer of the launch was not recorded"
    count = len(records)
    set_grads(params, random_grads(params, seed=6))
    opt.step()
    assert len(records) == count, "recorded again on a stream it was already recorded on"
    streams[0] = "stream B"  # the next step runs on another stream
    set_grads(params, random_grads(params, seed=7))
    opt.step()
    assert needed <= {ptr for ptr, s in records if s == "stream B"}
    # A new parameter reallocates the flat buffers: the new buffers are recorded on the stream that uses them.
    extra = make_params([(5,)], torch.float32, "cpu", seed=8)
    opt.add_param_group({"params": extra})
    set_grads(params + extra, random_grads(params + extra, seed=9))
    opt.step()
    flat = next(iter(opt._store.flats.values()))
    assert {t.data_ptr() for t in flat.buffers() if t is not None} <= {p for p, s in records if s == "stream B"}


class _NoHostRead(torch.Tensor):
    """A flag whose value (and that of anything computed from it) the host must not read."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("step() read a device flag on the host")

    __bool__ = __float__ = __int__ = __index__ = item = tolist = numpy = _refuse


def _flag(value: float) -> torch.Tensor:
    return torch.Tensor._make_subclass(_NoHostRead, torch.tensor(value))


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_kernel), False], ids=["mixed-route", "reference"])
@pytest.mark.parametrize("clip", [{}, {"clipnorm": 0.5}], ids=["noclip", "clipnorm"])
def test_found_inf_is_never_read_on_the_host(fused, clip):
    """GradScaler's found_inf on the kernel path, on the PyTorch path and on both in one step (a float64
    parameter takes the PyTorch path beside the kernel's float32 ones): set, the step changes nothing;
    clear, it is an ordinary step; never is the flag read on the host."""
    fp32 = make_params([(9,), (33,)], torch.float32, "cpu", seed=10)
    fp64 = make_params([(7,)], torch.float64, "cpu", seed=11)
    params = fp32 + fp64
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = Adadelta([{"params": fp32, "fused": None if fused else False}, {"params": fp64}], lr=0.7, **clip)
    ref = Adadelta([{"params": ref_params[:2], "fused": False}, {"params": ref_params[2:]}], lr=0.7, **clip)
    for step, inf in enumerate((0.0, 1.0, 0.0)):
        grads = random_grads(params, seed=12 + step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        before = [p.detach().clone() for p in params]
        opt.step(grad_scale=_flag(2.0), found_inf=_flag(inf))
        if inf:
            for p, b in zip(params, before):
                assert torch.equal(p.detach(), b), "a flagged step changed a parameter"
            assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
            continue
        ref.step(grad_scale=torch.tensor(2.0))
        for p, q in zip(params, ref_params):
            assert_close_rel(p, q, rtol=1e-6, what="param")
    assert int(opt.iterations) == 2
    if fused:
        assert set(opt.path_counts()) == {"kernel", "torch"}, "both paths in one step"
