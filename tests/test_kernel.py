"""The fused Triton kernel against the reference path and torch.optim.Adadelta.

Without a GPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_kernel
from helpers import assert_close_rel, bf16_ulp, make_params, random_grads, resync_reference, set_grads

from triton_adadelta import Adadelta

pytestmark = needs_kernel

SIZES = [(1,), (7,), (8,), (9,), (1023,), (65537,), (0,), (5, 3)]
# (parameter dtype, gradient dtype, state dtype)
COMBOS = [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
]
GROUPS = [dict(lr=0.5), dict(lr=0.9, rho=0.7, weight_decay=0.05, maximize=True), dict(lr=0.2, eps=1e-3)]


def _groups(params):
    third = len(params) // 3
    parts = [params[:third], params[third: 2 * third], params[2 * third:]]
    return [dict(params=ps, **hp) for ps, hp in zip(parts, GROUPS)]


def _tolerance_check(pdtype, sdtype, actual, expected, what):
    """Tolerances by dtype: fp32 1e-5 relative; 16-bit values within one ulp of the reference rounding."""
    if actual.dtype == torch.bfloat16:
        ulp = bf16_ulp(expected)
        assert bool(((actual.float() - expected.float()).abs() <= ulp).all()), f"{what}: more than one bf16 ulp"
    elif actual.dtype == torch.float16:
        e = expected.float()
        ulp = (torch.nextafter(e.abs().half(), torch.tensor(float("inf"), dtype=torch.half)).float() - e.abs())
        assert bool(((actual.float() - e).abs() <= ulp.abs() + 1e-12).all()), f"{what}: more than one fp16 ulp"
    else:
        assert_close_rel(actual, expected, rtol=1e-5, what=what)


@pytest.mark.parametrize("pdtype, gdtype, sdtype", COMBOS, ids=lambda d: str(d).replace("torch.", ""))
def test_kernel_matches_reference_each_step(pdtype, gdtype, sdtype):
    """Each step starts both paths from the kernel's own values, so 16-bit roundings don't compound."""
    params = make_params(SIZES, pdtype, KERNEL_DEVICE, seed=1)
    fused = Adadelta(_groups(params), fused=True, state_dtype=sdtype)
    ref_params = [p.detach().cpu().clone() for p in params]
    ref = Adadelta(_groups(ref_params), fused=False, state_dtype=sdtype)
    for step in range(3):
        grads = random_grads(params, seed=10 + step, grad_dtype=gdtype)
        set_grads(params, grads)
        set_grads(ref_params, [g.cpu() for g in grads])
        resync_reference(fused, ref, params, ref_params)
        fused.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            _tolerance_check(pdtype, sdtype, p.cpu(), q, f"step {step} param {i}")
            for name in ("square_avg", "acc_delta"):
                _tolerance_check(pdtype, sdtype, fused.state[p][name].cpu(), ref.state[q][name], f"{name} {i}")
            assert float(fused.state[p]["step"]) == step + 1


def test_fp32_kernel_matches_torch_over_steps():
    shapes = SIZES + [(17,)] * 100 + [(3, 4, 5)]
    params = make_params(shapes, torch.float32, KERNEL_DEVICE, seed=2)
    params.append(make_params([(6,)], torch.complex64, KERNEL_DEVICE, seed=3)[0])
    theirs = [p.detach().cpu().clone() for p in params]
    fused = Adadelta(_groups(params), fused=True)
    torch_opt = torch.optim.Adadelta(_groups(theirs))
    for step in range(4):
        grads = random_grads(params, seed=100 + step)
        set_grads(params, grads)
        set_grads(theirs, [g.cpu() for g in grads])
        fused.step()
        torch_opt.step()
    for i, (p, q) in enumerate(zip(params, theirs)):
        assert_close_rel(p.cpu(), q, rtol=1e-5, what=f"param {i}")
        for name in ("square_avg", "acc_delta"):
            assert_close_rel(fused.state[p][name].cpu(), torch_opt.state[q][name], rtol=1e-5, what=name)


def test_bf16_params_within_one_ulp_of_fp32_result():
    """bf16 parameters + fp32 state vs an fp32 run of the same math, rounded to bf16, per step."""
    params = make_params([(4097,), (33,)], torch.bfloat16, KERNEL_DEVICE, seed=4)
    fused = Adadelta(params, fused=True, lr=0.7, weight_decay=0.01)
    for step in range(3):
        grads = random_grads(params, seed=200 + step)
        fp32 = [p.detach().float().cpu().clone() for p in params]
        oracle = torch.optim.Adadelta(fp32, lr=0.7, weight_decay=0.01)
        oracle.load_state_dict(copy.deepcopy(fused.state_dict()))  # a copy: torch would alias live views
        for q in fp32:  # torch casts loaded state to the parameter dtype: fp32 here, so nothing is lost
            assert step == 0 or oracle.state[q]["square_avg"].dtype == torch.float32
        set_grads(fp32, [g.float().cpu() for g in grads])
        set_grads(params, grads)
        fused.step()
        oracle.step()
        for p, q in zip(params, fp32):
            diff = (p.float().cpu() - q.to(torch.bfloat16).float()).abs()
            assert bool((diff <= bf16_ulp(q)).all())


def test_none_grads_and_new_params_later():
    params = make_params([(10,), (11,), (12,)], torch.float32, KERNEL_DEVICE, seed=5)
    theirs = [p.detach().cpu().clone() for p in params]
    fused, torch_opt = Adadelta(params, fused=True), torch.optim.Adadelta(theirs)
    for step in range(4):
        grads = random_grads(params, seed=300 + step)
        has = [True, step % 2 == 0, step >= 2]
        for p, q, g, h in zip(params, theirs, grads, has):
            p.grad = g.clone() if h else None
            q.grad = g.cpu().clone() if h else None
        fused.step()
        torch_opt.step()
    for p, q in zip(params, theirs):
        assert_close_rel(p.cpu(), q, rtol=1e-5)
        assert float(fused.state[p]["step"]) == float(torch_opt.state[q]["step"])


def test_noncontiguous_params_and_grads_are_correct():
    base = make_params([(8, 10)], torch.float32, KERNEL_DEVICE, seed=6)[0]
    params = [base[:, ::3], make_params([(9,)], torch.float32, KERNEL_DEVICE, seed=7)[0]]
    theirs = [params[0].detach().cpu().clone(), params[1].detach().cpu().clone()]
    fused, torch_opt = Adadelta(params, fused=True), torch.optim.Adadelta(theirs)
    for step in range(3):
        grads = random_grads(params, seed=400 + step)
        params[0].grad = grads[0]
        params[1].grad = torch.stack([grads[1], grads[1]], 1)[:, 0]  # non-contiguous gradient
        for q, g in zip(theirs, grads):
            q.grad = g.cpu().clone()
        fused.step()
        torch_opt.step()
    for p, q in zip(params, theirs):
        assert_close_rel(p.cpu(), q, rtol=1e-5)


def _count_launches(monkeypatch):
    counter = {"n": 0}
    if KERNEL_DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run

        def counting(self, *args, **kwargs):
            counter["n"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counting)
    else:
        from triton.runtime.jit import JITFunction

        original = JITFunction.run

        def counting(self, *args, **kwargs):
            counter["n"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(JITFunction, "run", counting)
    return counter


def test_one_launch_per_bucket_per_step(monkeypatch):
    counter = _count_launches(monkeypatch)
    fp32 = make_params([(7,)] * 150 + [(1025,)], torch.float32, KERNEL_DEVICE, seed=8)
    bf16 = make_params([(9,)] * 20, torch.bfloat16, KERNEL_DEVICE, seed=9)
    params = fp32 + bf16
    opt = Adadelta(_groups(params), fused=True)  # three groups with different hyperparameters
    for step in range(3):
        set_grads(params, random_grads(params, seed=step))
        before = counter["n"]
        opt.step()
        assert counter["n"] - before == 2, "one launch for the fp32 bucket and one for the bf16 bucket"


def test_many_tensors_in_one_bucket(monkeypatch):
    counter = _count_launches(monkeypatch)
    params = [torch.randn(3, device=KERNEL_DEVICE) for _ in range(10_001)]
    theirs = [p.detach().cpu().clone() for p in params]
    opt, torch_opt = Adadelta(params, fused=True, lr=0.5), torch.optim.Adadelta(theirs, lr=0.5, foreach=True)
    grads = [torch.randn(3) for _ in params]
    for p, q, g in zip(params, theirs, grads):
        p.grad, q.grad = g.to(KERNEL_DEVICE), g.clone()
    opt.step()
    torch_opt.step()
    assert counter["n"] == 1
    torch.testing.assert_close(torch.stack(params).cpu(), torch.stack(theirs), rtol=1e-5, atol=1e-7)


def test_bf16_subnormal_state_matches_reference():
    """Squares of tiny gradients are float32 subnormals; bf16 state must keep them as the reference does
    (the interpreter's float -> bf16 conversion flushes them, so the kernel writes the bits itself)."""
    grads = torch.tensor([1e-20, -3e-21, 2e-19, 7e-23, 1.0], dtype=torch.bfloat16)
    params = [torch.randn(5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(KERNEL_DEVICE)]
    ref_params = [params[0].detach().cpu().clone()]
    fused = Adadelta(params, fused=True, rho=0.5, state_dtype=torch.bfloat16)
    ref = Adadelta(ref_params, fused=False, rho=0.5, state_dtype=torch.bfloat16)
    for _ in range(2):
        params[0].grad = grads.to(KERNEL_DEVICE)
        ref_params[0].grad = grads.clone()
        fused.step()
        ref.step()
    sq = ref.state[ref_params[0]]["square_avg"]
    assert bool(((sq.float() > 0) & (sq.float() < torch.finfo(torch.float32).tiny)).any()), "no subnormal reached"
    for name in ("square_avg", "acc_delta"):
        assert torch.equal(fused.state[params[0]][name].cpu(), ref.state[ref_params[0]][name]), name
    assert torch.equal(params[0].cpu(), ref_params[0])
