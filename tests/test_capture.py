"""capturable=True: lr and step on the device, no host read of a tensor in step(), CUDA-graph capture.

On CPU the promise is checked by running step() under a dispatch mode that fails on every operation
that hands a tensor's value to the host (``.item()``, ``float(t)``, ``bool(t)``, ``nonzero``, ...).
On a GPU that is exactly what would synchronise the host with the device or break a CUDA graph. The
Triton launch itself is exempt: under the interpreter it copies tensors to numpy, which on a GPU is
an ordinary asynchronous kernel launch. A control test shows the detector does catch the host reads
of the non-capturable path, so a pass is not vacuous.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import needs_gpu
from helpers import make_params, random_grads, set_grads
from torch.utils._python_dispatch import TorchDispatchMode

from triton_adadelta import Adadelta, _triton

# The host-read guard watches CPU tensors and exempts the interpreter's launch; on a GPU machine the
# GPU tests below check the real thing instead.
needs_interpreter = pytest.mark.skipif(
    not (_triton.HAS_TRITON and _triton.interpreting()), reason="needs the Triton interpreter (TRITON_INTERPRET=1)"
)

# Operators whose result is a tensor's value on the host (or whose output size depends on values,
# which needs one): each is a device-to-host synchronisation on a GPU.
_HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
}


class HostRead(AssertionError):
    pass


class _HostReadGuard(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = func._schema.name
            if name in _HOST_READS:
                raise HostRead(f"step() read a tensor on the host: {name}")
            if name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None
            ):
                raise HostRead(f"step() indexed with a boolean mask (a hidden nonzero): {name}")
            if name == "aten::repeat_interleave" and kwargs.get("output_size") is None and any(
                isinstance(a, torch.Tensor) for a in args[:2]
            ):
                raise HostRead("step() called repeat_interleave without output_size (its size is read on the host)")
        return func(*args, **kwargs)


class _NoHostArrays(torch.overrides.TorchFunctionMode):
    """tolist() and numpy() read a tensor without going through an operator."""

    def __init__(self, guard: _HostReadGuard) -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.guard.paused and name in ("tolist", "numpy", "__array__"):
            raise HostRead(f"step() read a tensor on the host: Tensor.{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Fail on any host read of a tensor inside the block; count the Triton launches (exempt) it makes."""
    from triton.runtime.interpreter import InterpretedFunction

    guard = _HostReadGuard()
    launches = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        guard.paused = True
        try:
            launches.append(self.__name__)
            return original(self, *args, **kwargs)
        finally:
            guard.paused = False

    monkeypatch.setattr(InterpretedFunction, "run", run)
    with _NoHostArrays(guard), guard:
        yield launches
    monkeypatch.setattr(InterpretedFunction, "run", original)


def _model_params(seed):
    """Parameters that take both paths: kernel (fp32, bf16, complex64) and PyTorch (fp64, a strided view)."""
    fp32 = make_params([(33, 17), (9,)], torch.float32, seed=seed)
    bf16 = make_params([(129,)], torch.bfloat16, seed=seed + 1)
    cplx = make_params([(5,)], torch.complex64, seed=seed + 2)
    fp64 = make_params([(7, 3)], torch.float64, seed=seed + 3)
    strided = make_params([(6, 10)], torch.float32, seed=seed + 4)[0][:, ::3]
    return fp32 + bf16 + cplx + fp64 + [strided]


def _groups(params, lr):
    return [dict(params=params[:3], lr=lr), dict(params=params[3:], lr=lr, rho=0.8, weight_decay=0.01, maximize=True)]


def _clone(params):
    return [p.detach().clone() if p.is_contiguous() else p.detach().clone().t().contiguous().t() for p in params]


@needs_interpreter
@pytest.mark.parametrize("clip", [{}, dict(global_clipnorm=0.5), dict(clipnorm=0.3, clipvalue=0.8)],
                         ids=["noclip", "global_clipnorm", "clipnorm+clipvalue"])
def test_capturable_step_reads_nothing_on_the_host_and_matches_the_eager_path(monkeypatch, clip):
    ours_p = _model_params(0)
    twin_p = _clone(ours_p)
    ours = Adadelta(_groups(ours_p, 0.7), capturable=True, **clip)
    twin = Adadelta(_groups(twin_p, 0.7), **clip)
    lrs = [g["lr"] for g in ours.param_groups]
    assert all(isinstance(lr, torch.Tensor) and lr.device == p.device for lr, p in zip(lrs, ours_p))
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + 0.4 * t)) for o in (ours, twin)]
    scale = torch.tensor(4.0)

    def grads(step):
        return [g * 4 for g in random_grads(ours_p, seed=100 + step)]

    # Warm-up (as before a CUDA-graph capture): the first step creates state and launch tables.
    set_grads(ours_p, grads(0))
    set_grads(twin_p, grads(0))
    ours.step(grad_scale=scale, found_inf=torch.tensor(0.0))
    twin.step(grad_scale=scale, found_inf=torch.tensor(0.0))
    for s in sched:
        s.step()

    initial = [p.clone() for p in ours_p]
    for step in range(1, 6):
        g = grads(step)
        set_grads(ours_p, g)
        set_grads(twin_p, g)
        inf = torch.tensor(1.0 if step == 3 else 0.0)  # step 3 is skipped, as GradScaler would
        with no_host_reads(monkeypatch) as launches:
            ours.step(grad_scale=scale, found_inf=inf)
        assert launches, "the fused kernel did not run inside the guarded step"
        twin.step(grad_scale=scale, found_inf=inf)
        for s in sched:
            s.step()

    # The scheduler wrote into the same device tensors, and the kernel read them.
    assert [g["lr"] for g in ours.param_groups] == lrs
    for g_ours, g_twin in zip(ours.param_groups, twin.param_groups):
        assert float(g_ours["lr"]) == pytest.approx(g_twin["lr"], rel=1e-7)
    for i, (a, b) in enumerate(zip(ours_p, twin_p)):
        assert not torch.equal(a, initial[i]), f"param {i} never changed in the guarded steps"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=i: f"param {i}: {m}")
        sa, sb = ours.state[a], twin.state[b]
        assert float(sa["step"]) == float(sb["step"]) == 5  # 6 steps, one skipped
        for name in ("square_avg", "acc_delta"):
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0)


@needs_interpreter
def test_the_guard_catches_the_host_reads_of_the_non_capturable_path(monkeypatch):
    """Control: without capturable a CPU tensor lr is read with float(), and found_inf with bool()."""
    params = _model_params(1)
    opt = Adadelta(_groups(params, torch.tensor(0.5)))
    set_grads(params, random_grads(params, seed=0))
    opt.step()
    before = [p.clone() for p in params]
    with pytest.raises(HostRead, match="_local_scalar_dense"):
        with no_host_reads(monkeypatch):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)), "the failed step wrote something"

    opt2 = Adadelta(_model_params(2)[4:])  # the PyTorch path only: its found_inf skip is a host read
    ps = [p for g in opt2.param_groups for p in g["params"]]
    set_grads(ps, random_grads(ps, seed=0))
    opt2.step()
    with pytest.raises(HostRead):
        with no_host_reads(monkeypatch):
            opt2.step(found_inf=torch.tensor(0.0))


def test_capturable_keeps_lr_a_device_tensor():
    p64 = make_params([(4,)], torch.float64)
    p32 = make_params([(4,)], torch.float32)
    opt = Adadelta([dict(params=p64), dict(params=p32, lr=0.25)], lr=0.5, capturable=True)
    lr64, lr32 = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
    assert lr64.dtype == torch.float64 and float(lr64) == 0.5  # float64 parameters: lr is not rounded
    assert lr32.dtype == torch.float32 and float(lr32) == 0.25
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    set_grads(p64 + p32, random_grads(p64 + p32, seed=0))
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] is lr32 and float(lr32) == 0.125  # updated in place

    # An lr replaced by a number (a loaded state_dict, an assignment) becomes a device tensor again.
    sd = opt.state_dict()
    sd["param_groups"][1]["lr"] = 0.3
    opt.load_state_dict(sd)
    opt.param_groups[0]["lr"] = 0.2
    set_grads(p64 + p32, random_grads(p64 + p32, seed=1))
    opt.step()
    for group, value, dtype in zip(opt.param_groups, (0.2, 0.3), (torch.float64, torch.float32)):
        assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == dtype
        assert float(group["lr"]) == pytest.approx(value)


# ------------------------------------------------------------------------------------------------ GPU
def _mlp(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 33)
    ).to("cuda", dtype)


def _train_iter(model, opt, x, y):
    opt.zero_grad(set_to_none=False)  # gradients stay where they are: the graph reads fixed addresses
    loss = torch.nn.functional.mse_loss(model(x).float(), y)
    loss.backward()
    opt.step()
    return loss


@needs_gpu
def test_cuda_graph_replay_equals_eager_steps():
    dtype = torch.float32
    graphed, eager = _mlp(0, dtype), _mlp(0, dtype)
    opt_g = Adadelta(graphed.parameters(), lr=1.0, capturable=True)
    opt_e = Adadelta(eager.parameters(), lr=1.0, capturable=True)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda t: 1.0 / (1 + 0.5 * t))
    sched_e = torch.optim.lr_scheduler.LambdaLR(opt_e, lambda t: 1.0 / (1 + 0.5 * t))
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = [(torch.randn(16, 64, device="cuda", generator=gen).to(dtype),
             torch.randn(16, 33, device="cuda", generator=gen)) for _ in range(9)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:  # warm-up: state, launch tables and gradients are created here
            static_x.copy_(x)
            static_y.copy_(y)
            _train_iter(graphed, opt_g, static_x, static_y)
            sched_g.step()
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        _train_iter(eager, opt_e, x, y)
        sched_e.step()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_iter(graphed, opt_g, static_x, static_y)

    for x, y in data[3:]:  # the scheduler writes the device lr that the replayed launch reads
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        sched_g.step()
    for x, y in data[3:]:
        _train_iter(eager, opt_e, x, y)
        sched_e.step()
    torch.cuda.synchronize()

    # A replay that missed the schedule (a stale lr) would be off by 1e-3 or more after these steps.
    for (name, a), b in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        sa, sb = opt_g.state[a], opt_e.state[b]
        assert float(sa["step"]) == float(sb["step"]) == 9
        torch.testing.assert_close(sa["square_avg"], sb["square_avg"], rtol=1e-5, atol=1e-9)
    assert float(opt_g.param_groups[0]["lr"]) == pytest.approx(1.0 / (1 + 0.5 * 9))


@needs_gpu
def test_capture_with_reallocated_gradients_says_what_to_do():
    model = _mlp(1)
    opt = Adadelta(model.parameters(), capturable=True)
    x, y = torch.randn(8, 64, device="cuda"), torch.randn(8, 33, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _train_iter(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)  # backward inside the capture allocates new gradients
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            _train_iter(model, opt, x, y)
