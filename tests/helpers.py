"""Shared test utilities: building matched parameter sets and comparing results."""

from __future__ import annotations

import copy
import faulthandler
import os
import sys

import torch


def make_params(shapes, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if dtype.is_complex:
            t = torch.randn((*shape, 2), generator=g, dtype=torch.float64)
            t = torch.view_as_complex(t).to(dtype)
        else:
            t = torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)
        out.append(t.to(device))
    return out


def random_grads(params, seed, grad_dtype=None):
    g = torch.Generator().manual_seed(seed)
    grads = []
    for p in params:
        dtype = grad_dtype or p.dtype
        if p.is_complex():
            t = torch.view_as_complex(torch.randn((*p.shape, 2), generator=g, dtype=torch.float64))
        else:
            t = torch.randn(p.shape, generator=g, dtype=torch.float64)
        grads.append(t.to(dtype).to(p.device))
    return grads


def set_grads(params, grads):
    for p, g in zip(params, grads):
        if g.dtype != p.dtype and hasattr(p, "grad_dtype"):
            p.grad_dtype = None  # torch >= 2.10 checks grad dtypes unless told otherwise
        p.grad = g.clone()


def assert_close_rel(actual, expected, rtol, atol=0.0, what=""):
    """Relative closeness; elements far below the tensor's scale are judged against rtol * max|expected|."""
    a = torch.view_as_real(actual) if actual.is_complex() else actual
    e = torch.view_as_real(expected) if expected.is_complex() else expected
    a = a.detach().to("cpu", torch.float64)
    e = e.detach().to("cpu", torch.float64)
    if e.numel():
        atol = max(atol, rtol * float(e.abs().max()))
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The gap from |x|, rounded to bfloat16, to the next bfloat16 value away from zero."""
    x = x.to(torch.bfloat16).float().abs()
    return (x.view(torch.int32) + (1 << 16)).view(torch.float32) - x


def regression(seed: int = 0):
    """Noisy linear regression started near the solution: the fine-tuning regime, where updates are small.

    Returns ``(x, y, w0)``: 512 x 65 inputs (a bias column included), targets, and start weights of
    magnitude ~2 (a bf16 ulp of 2^-6) within 0.1 of the solution.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(512, 64, generator=g), torch.ones(512, 1)], 1)
    w_star = torch.randn(65, 1, generator=g) * 2
    y = x @ w_star + 0.5 * torch.randn(512, 1, generator=g)
    w0 = w_star + 0.1 * torch.randn(65, 1, generator=g)
    return x, y, w0


def train_regression(make_opt, dtype, device, steps=100, seed=0) -> float:
    """The final mean squared error of ``steps`` full-batch steps on :func:`regression` with weights in ``dtype``."""
    x, y, w0 = regression(seed)
    x, y = x.to(device), y.to(device)
    w = w0.to(device, dtype).requires_grad_()
    opt = make_opt([w])
    for _ in range(steps):
        opt.zero_grad()
        ((x @ w.float() - y) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        return float(((x @ w.float() - y) ** 2).mean())


def resync_reference(fused, ref, params, ref_params) -> None:
    """Give the reference-path optimizer ``ref`` the fused optimizer's state and parameter values, so that
    a comparison of one step starts both from the same point (16-bit roundings don't compound).

    Loading a state_dict takes every group option from it, ``fused`` too, as torch's does: it is set
    back to False, or ``ref`` would run the fused path and the comparison would compare it with itself.
    """
    ref.load_state_dict(copy.deepcopy(fused.state_dict()))
    for group in ref.param_groups:
        group["fused"] = False
    with torch.no_grad():
        for p, q in zip(params, ref_params):
            q.copy_(p.cpu())


def watch_rank(seconds: float) -> None:
    """A rank process that is still running after ``seconds`` prints every thread's stack and exits,
    so a hang fails its test with the place rather than a silent wait."""
    faulthandler.dump_traceback_later(seconds, exit=True)


def leave_rank() -> None:
    """End a rank process at once with exit status 0, without destructors or interpreter finalisation.

    Call it only once the rank's checks have passed and its results are recorded. Objects that still
    hold a destroyed gloo group (DDP models, DTensors, device meshes) can deadlock or abort
    ("terminate called without an active exception") inside torch 2.13's gloo teardown when they are
    freed: a gloo worker thread that still owns Python objects waits for the GIL the freeing thread
    holds (pytorch/pytorch#190489 reports the abort). Here 8 runs of test_distributed.py in 30 hung
    so, and dist_skip_worker.py aborted in 3 of 25.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
