"""torch.compile: a compiled training step that calls Adadelta.step() compiles once and matches eager.

Adadelta.step() is a clean graph break (``torch.compiler.disable``): Dynamo compiles the forward and
backward around it and runs the step eagerly, with its one fused launch per bucket. On CPU the
compiler is the ``aot_eager`` backend (Dynamo and AOTAutograd, no C++ build); the GPU test uses
Inductor.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_gpu, needs_kernel
from torch._dynamo.utils import counters

from triton_adadelta import Adadelta


def _model(seed, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5)).to(device)


def _data(n, device="cpu"):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(6, 12, generator=g).to(device), torch.randn(6, 5, generator=g).to(device)) for _ in range(n)]


def _make_step(model, opt):
    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return train_step


def _recompiles() -> int:
    return sum(counters["recompiles"].values())


def _run(fused, backend, device, steps=8, rtol=1e-6, atol=0.0):
    torch._dynamo.reset()
    counters.clear()
    compiled_model, eager_model = _model(0, device), _model(0, device)
    opts = [Adadelta(m.parameters(), lr=1.0, fused=fused) for m in (compiled_model, eager_model)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    compiled = torch.compile(_make_step(compiled_model, opts[0]), backend=backend)
    eager = _make_step(eager_model, opts[1])
    graphs_after_first = None
    for i, (x, y) in enumerate(_data(steps, device)):
        loss_c = compiled(x, y)
        loss_e = eager(x, y)
        for s in scheds:
            s.step()  # the float lr changes every other step: it must not be baked into a graph
        torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
        if i == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first >= 1, "nothing was compiled"
    assert counters["stats"]["unique_graphs"] == graphs_after_first, "a later step compiled new graphs"
    assert _recompiles() == 0, dict(counters["recompiles"])
    for (name, a), b in zip(compiled_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        assert float(opts[0].state[a]["step"]) == steps
    return opts[0]


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_kernel)], ids=["pytorch", "fused"])
def test_compiled_train_step_compiles_once_and_matches_eager(fused):
    opt = _run(fused, "aot_eager", KERNEL_DEVICE if fused else "cpu")
    assert bool(opt._plans) == fused  # the fused run did go through the kernel


def test_compiling_step_alone_runs_it_eagerly():
    torch._dynamo.reset()
    counters.clear()
    a = [torch.randn(10, requires_grad=True)]
    b = [a[0].detach().clone().requires_grad_()]
    ours, ref = Adadelta(a, lr=0.5), Adadelta(b, lr=0.5)
    step = torch.compile(ours.step, backend="aot_eager")
    for i in range(4):
        g = torch.randn(10, generator=torch.Generator().manual_seed(i))
        a[0].grad, b[0].grad = g.clone(), g.clone()
        step()
        ref.step()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert counters["stats"].get("unique_graphs", 0) == 0  # nothing of step() was traced


@needs_gpu
def test_inductor_train_step_on_gpu_compiles_once():
    _run(None, "inductor", "cuda", steps=10, rtol=1e-5, atol=1e-5)
