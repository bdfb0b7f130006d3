"""Checks that need a CUDA GPU: no host synchronisation in step(), and larger parity runs on the device.

Skipped on machines without a GPU (CI); the kernel's numbers are covered there by the interpreter tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_gpu
from helpers import assert_close_rel, make_params, random_grads, set_grads

from triton_adadelta import Adadelta

pytestmark = needs_gpu


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_has_no_host_sync(pdtype):
    params = make_params([(1 << 20,), (4097,), (3, 5)], pdtype, "cuda", seed=0)
    groups = [dict(params=params[:1], lr=0.5), dict(params=params[1:], lr=torch.tensor(0.3, device="cuda"))]
    opt = Adadelta(groups)
    set_grads(params, random_grads(params, seed=1))
    opt.step()  # the first step builds plans and state; the steady state must not synchronise
    torch.cuda.synchronize()
    set_grads(params, random_grads(params, seed=2))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_rerouting_a_step_has_no_host_sync():
    """A step whose route is rebuilt (a parameter changing dtype, a new group) still never waits for the GPU."""
    params = make_params([(4097,), (3, 5), (1 << 16,)], torch.float32, "cuda", seed=4)
    opt = Adadelta(params[:2])
    set_grads(params[:2], random_grads(params[:2], seed=5))
    opt.step()
    grads6 = random_grads(params[:2], seed=6)  # made before the guard: a copy from pageable host memory waits
    grads6[0] = grads6[0].to(torch.bfloat16)
    grads7 = random_grads(params, seed=7)
    grads7[0] = grads7[0].to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        params[0].data = params[0].data.to(torch.bfloat16)
        set_grads(params[:2], grads6)
        opt.step()
        opt.add_param_group(dict(params=params[2:], lr=0.5))
        set_grads(params, grads7)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
    assert [float(opt.state[p]["step"]) for p in params] == [3.0, 3.0, 1.0]


def test_large_fp32_matches_torch_on_gpu():
    params = make_params([(1 << 22,), (1023, 1025), (7,)], torch.float32, "cuda", seed=3)
    theirs = [p.clone() for p in params]
    ours, torch_opt = Adadelta(params, weight_decay=0.01), torch.optim.Adadelta(theirs, weight_decay=0.01)
    for step in range(5):
        grads = random_grads(params, seed=10 + step)
        set_grads(params, grads)
        set_grads(theirs, grads)
        ours.step()
        torch_opt.step()
    for p, q in zip(params, theirs):
        assert_close_rel(p, q, rtol=1e-5)
