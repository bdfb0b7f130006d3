"""The compiled CPU path (triton_adadelta.cpu_fused) against the reference path and torch.optim.Adadelta.

Each supported dtype pair compiles once per process (seconds; cached on disk across processes), so
the sizes are small and the threshold is lowered to 0 here. conftest.py turns the Triton
interpreter on, which would route CPU tensors to the kernel: these tests turn it off again so that
CPU tensors take the PyTorch path and its compiled fast path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close_rel, bf16_ulp, make_params, random_grads, set_grads

from triton_adadelta import Adadelta, cpu_fused

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="torch.compile is not supported here")

# 9 tensors of 2 or more elements: two compiled calls of cpu_fused.GROUP (4) tensors and one single call.
SIZES = [(2,), (7,), (9,), (1023,), (65537,), (33, 17), (5, 3, 2), (1,), (0,), (8,), (3,)]
GROUPS = [dict(lr=0.5), dict(lr=0.9, rho=0.7, weight_decay=0.05, maximize=True), dict(lr=0.2, eps=1e-3)]
# (parameter dtype, state dtype): every pair in cpu_fused.SUPPORTED, complex64 riding on float32.
PAIRS = [(torch.float32, torch.float32), (torch.complex64, torch.float32),
         (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(cpu_fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(cpu_fused, "_failed", False)


@pytest.fixture
def calls(monkeypatch):
    """Records the number of tensors each fused_update_ call received (proof that the path ran)."""
    seen: list[int] = []
    real = cpu_fused.fused_update_

    def spy(slots, hyper):
        seen.append(len(slots))
        return real(slots, hyper)

    monkeypatch.setattr(cpu_fused, "fused_update_", spy)
    return seen


def _groups(params):
    third = len(params) // 3
    parts = [params[:third], params[third: 2 * third], params[2 * third:]]
    return [dict(params=ps, **hp) for ps, hp in zip(parts, GROUPS)]


def _check(actual, expected, what):
    if actual.dtype == torch.bfloat16:
        # Both round the same float32 value to nearest; allow one ulp for a contracted a*b+c upstream.
        ulp = bf16_ulp(expected)
        assert bool(((actual.float() - expected.float()).abs() <= ulp).all()), f"{what}: more than one bf16 ulp"
    else:
        assert_close_rel(actual, expected, rtol=1e-5, what=what)


@pytest.mark.parametrize("pdtype, sdtype", PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_matches_reference_each_step(pdtype, sdtype, calls):
    """Every step starts both paths from the fused path's values, so 16-bit roundings don't compound."""
    params = make_params(SIZES, pdtype, seed=3)
    ref_params = [p.clone() for p in params]
    fast = Adadelta(_groups(params), state_dtype=sdtype)
    ref = Adadelta(_groups(ref_params), state_dtype=sdtype, fused=False)
    for step in range(3):
        grads = random_grads(params, seed=100 + step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        fast.step()
        ref.step()
        for i, (a, b) in enumerate(zip(params, ref_params)):
            _check(a, b, f"step {step} param {i}")
            for name in ("square_avg", "acc_delta"):
                _check(fast.state[a][name], ref.state[b][name], f"step {step} {name} {i}")
            assert float(fast.state[a]["step"]) == float(ref.state[b]["step"]) == step + 1
            with torch.no_grad():  # resynchronise
                b.copy_(a)
                ref.state[b]["square_avg"].copy_(fast.state[a]["square_avg"])
                ref.state[b]["acc_delta"].copy_(fast.state[a]["acc_delta"])
    # Every tensor of 2 or more elements went through the compiled path, the rest through the reference.
    assert sum(calls) == 3 * sum(1 for p in params if p.numel() >= 2)
    assert any(float(p.abs().max()) > 0 for p in params)


def test_float32_matches_torch_optim_over_steps(calls):
    params = make_params(SIZES, torch.float32, seed=5)
    theirs = [p.clone() for p in params]
    ours = Adadelta(_groups(params))
    torch_opt = torch.optim.Adadelta(_groups(theirs), foreach=True)
    sched = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    torch_sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=2, gamma=0.5)
    for step in range(6):
        grads = random_grads(params, seed=7 + step)
        set_grads(params, grads)
        set_grads(theirs, grads)
        ours.step()
        torch_opt.step()
        sched.step()
        torch_sched.step()
    for i, (a, b) in enumerate(zip(params, theirs)):
        assert_close_rel(a, b, rtol=1e-5, what=f"param {i}")
        assert_close_rel(ours.state[a]["acc_delta"], torch_opt.state[b]["acc_delta"], rtol=1e-5, what="acc_delta")
    assert calls


def test_grad_scale_and_clip_coefficients(calls, monkeypatch):
    """GradScaler's scale divides and a per-tensor clip coefficient multiplies the gradient, as the reference."""
    from triton_adadelta.clipping import GradientTransform

    params = make_params([(9,), (1023,)], torch.float32, seed=8)
    ref_params = [p.clone() for p in params]
    cpu = torch.device("cpu")
    coefs = GradientTransform(None, {cpu: torch.tensor([0.25, 3.0])}, [(cpu, 0), (cpu, 1)])
    fast, ref = Adadelta(params), Adadelta(ref_params, fused=False)
    for opt in (fast, ref):
        monkeypatch.setattr(opt, "_grad_transforms", lambda entries, grad_scale: coefs)
    scale = torch.tensor(1024.0)
    grads = [g * 1024.0 for g in random_grads(params, seed=9)]
    set_grads(params, grads)
    set_grads(ref_params, grads)
    fast.step(grad_scale=scale)
    ref.step(grad_scale=scale)
    assert calls == [2]
    for a, b in zip(params, ref_params):
        assert_close_rel(a, b, rtol=1e-6, what="param")
        assert_close_rel(fast.state[a]["square_avg"], ref.state[b]["square_avg"], rtol=1e-6, what="square_avg")


def test_found_inf_changes_nothing(calls):
    params = make_params([(9,), (1023,)], torch.float32, seed=10)
    before = [p.clone() for p in params]
    opt = Adadelta(params)
    set_grads(params, random_grads(params, seed=11))
    opt.step(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0))
    assert calls == []
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    assert all(float(opt.state[p]["step"]) == 0 for p in params)


def test_not_used_below_threshold_or_when_not_eligible(calls, monkeypatch):
    params = make_params([(9,), (1023,)], torch.float32, seed=12)
    monkeypatch.setattr(cpu_fused, "MIN_NUMEL", 10_000)
    opt = Adadelta(params)
    set_grads(params, random_grads(params, seed=13))
    opt.step()
    assert calls == []
    monkeypatch.setattr(cpu_fused, "MIN_NUMEL", 0)
    for kwargs in (dict(fused=False), dict(stochastic_rounding=True, state_dtype=torch.bfloat16)):
        ps = make_params([(9,), (1023,)], torch.bfloat16 if "stochastic_rounding" in kwargs else torch.float32)
        o = Adadelta(ps, **kwargs)
        set_grads(ps, random_grads(ps, seed=14))
        o.step()
        assert calls == [], kwargs
        assert all(float(o.state[p]["step"]) == 1 for p in ps)
    # float16 and float64 are not compiled for: the reference path updates them.
    for dtype in (torch.float16, torch.float64):
        ps = make_params([(9,), (1023,)], dtype, seed=15)
        before = [p.clone() for p in ps]
        o = Adadelta(ps)
        set_grads(ps, random_grads(ps, seed=16))
        o.step()
        assert calls == [], dtype
        assert not any(torch.equal(a, b) for a, b in zip(ps, before))


def test_new_sizes_and_new_lr_do_not_recompile(calls):
    """Dynamic shapes: another model (other sizes, another count) and a changed lr reuse the compiled code."""
    from torch._dynamo.utils import counters

    def run(shapes, lr, seed):
        ps = make_params(shapes, torch.float32, seed=seed)
        o = Adadelta(ps, lr=lr)
        set_grads(ps, random_grads(ps, seed=seed))
        o.step()
        o.param_groups[0]["lr"] = lr * 0.5
        o.param_groups[0]["weight_decay"] = 0.1
        set_grads(ps, random_grads(ps, seed=seed + 1))
        o.step()

    run([(3,), (70,), (4, 4), (8,), (6,)], 1.0, 20)  # warms both float32 variants (a group of 4, then 1)
    graphs = counters["stats"]["unique_graphs"]
    run([(11,), (700,), (2, 3, 5), (12,), (13,), (4097,), (2,), (9, 9), (31,)], 0.3, 21)
    run([(5000,)], 2.0, 22)
    run([(n,) for n in range(2, 40, 2)], 0.7, 23)
    assert counters["stats"]["unique_graphs"] == graphs
    assert calls == [5, 5, 9, 9, 1, 1, 19, 19]


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    """A compiler failure: the step runs on the reference path, with one warning, and the path stays off."""

    def broken(key, width):
        def fn(*args):
            raise RuntimeError("no C++ compiler")
        return fn

    monkeypatch.setattr(cpu_fused, "_compiled_for", broken)
    params = make_params([(9,), (1023,)], torch.float32, seed=30)
    ref_params = [p.clone() for p in params]
    opt, ref = Adadelta(params), Adadelta(ref_params, fused=False)
    grads = random_grads(params, seed=31)
    set_grads(params, grads)
    set_grads(ref_params, grads)
    with pytest.warns(RuntimeWarning, match="compiled CPU path is disabled"):
        opt.step()
    ref.step()
    for a, b in zip(params, ref_params):
        assert_close_rel(a, b, rtol=1e-6, what="param")
        assert float(opt.state[a]["step"]) == 1
    assert not cpu_fused.available()
    set_grads(params, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # disabled now: no second warning, the reference path runs
    assert float(opt.state[params[0]]["step"]) == 2
