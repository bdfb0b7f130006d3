"""torch's own optimizer test data as an oracle for the contract, with our class in place of torch's.

torch ships, with the wheel, the ``OptimizerInfo`` of Adadelta (``torch.testing._internal.common_optimizers``):
the configurations its tests run (``optim_inputs_func``), the bad inputs with the error type and message
each must raise (``optim_error_inputs_func``), the implementation flags it supports (``supported_impls``)
and the LR schedulers it is tested with (``scheduler_inputs``). Every configuration here runs on our class
against torch.optim.Adadelta, on fresh random inputs, on the three CPU-testable paths; every error input
must raise torch's error type with a message matching torch's pattern.

Importing the module needs ``expecttest`` (in the ``test`` extras), as torch's test suite does.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from conftest import CPU_PATHS, KERNEL_DEVICE, path_taken, use_path
from helpers import make_params, random_grads, set_grads
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from triton_adadelta import Adadelta

INFO = next(info for info in optim_db if info.optim_cls is torch.optim.Adadelta)

# OptimizerInfo cases that cannot apply to ours, by their ``desc``, with the documented reason.
NOT_APPLICABLE = {
    "a param group cannot have duplicate parameters":
        "torch warns (UserWarning) and announces an error; ours raises ValueError at once: flat state cannot "
        "update one tensor twice in a launch (docs/api.md, 'Stricter validation')",
}


def _error_inputs():
    return INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)


def _configs():
    # The device's own configurations, as torch's tests take them (CUDA adds capturable ones).
    return {c.desc: c for c in INFO.optim_inputs_func(device=KERNEL_DEVICE)}


def test_the_oracle_is_torchs_adadelta_info():
    """The data is there and is what the tests below assume (a torch upgrade that changes it shows here)."""
    assert INFO.name == "Adadelta" and INFO.supports_complex and INFO.supports_param_groups
    assert set(INFO.supported_impls) == {"foreach", "differentiable"} and INFO.supports_fused_on == ()
    assert len(_error_inputs()) >= 6 and len(_configs()) >= 6
    assert set(NOT_APPLICABLE) <= {e.optimizer_error_input.desc for e in _error_inputs()}


def _raises_like_torch(cls, error_input):
    """Construct (or step) ``cls`` on the error input; assert torch's error type and message pattern."""
    optim_input = error_input.optimizer_error_input
    params, kwargs = copy.copy(optim_input.params), optim_input.kwargs
    expected, regex = error_input.error_type, error_input.error_regex

    def act():
        opt = cls(params, **kwargs)
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(expected, Warning):
        with pytest.warns(expected, match=regex):
            act()
    else:
        with pytest.raises(expected, match=regex):
            act()


@pytest.mark.parametrize("desc", [e.optimizer_error_input.desc for e in _error_inputs()])
def test_error_inputs_raise_torchs_error(desc):
    error_input = next(e for e in _error_inputs() if e.optimizer_error_input.desc == desc)
    _raises_like_torch(torch.optim.Adadelta, error_input)  # the oracle holds for torch's own class
    if desc in NOT_APPLICABLE:
        pytest.skip(NOT_APPLICABLE[desc])
    _raises_like_torch(Adadelta, error_input)


def test_duplicate_parameters_in_a_group_stay_an_error():
    """The one error input that cannot apply (NOT_APPLICABLE): ours refuses what torch warns about."""
    error_input = next(e for e in _error_inputs() if e.optimizer_error_input.desc in NOT_APPLICABLE)
    params = error_input.optimizer_error_input.params
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=re.escape("is the same tensor as parameter 0")):
            Adadelta(params)


SHAPES = [(7,), (3, 5), (129,), (1,)]


def _run_both(path, desc, impl, dtype, monkeypatch, groups=False, steps=3):
    """Our optimizer and torch's on the same fresh random parameters and gradients, ``steps`` steps of the
    configuration ``desc`` with the implementation flag ``impl``; the parameters of both, and the optimizers."""
    device, fused = use_path(path, monkeypatch)
    kwargs = dict(_configs()[desc].kwargs)
    if impl is not None:
        kwargs[impl] = True
        # torch's "cliquey" flags refuse fused=True (as in torch's fused optimizers); fused=None still
        # picks the kernel (foreach) or routes differentiable to the PyTorch path.
        fused = None if fused else fused
    ours = make_params(SHAPES, dtype, device, seed=hash((desc, str(dtype))) % 1000)
    if impl != "differentiable":
        ours = [p.requires_grad_() for p in ours]
    theirs = [p.detach().clone().requires_grad_(p.requires_grad) for p in ours]

    def params(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.35, "weight_decay": 0.02}] if groups else ps

    opt = Adadelta(params(ours), fused=fused, **kwargs)
    ref = torch.optim.Adadelta(params(theirs), **kwargs)
    for step in range(steps):
        grads = random_grads(ours, seed=100 + step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    return ours, theirs, opt, ref


def _close(ours, theirs, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype in (torch.float64, torch.complex128) else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), **tol)


@pytest.mark.parametrize("impl", [None, *INFO.supported_impls])
@pytest.mark.parametrize("desc", list(_configs()))
@pytest.mark.parametrize("path", CPU_PATHS)
def test_configurations_match_torch(path, desc, impl, monkeypatch):
    """Each of torch's configurations, with each implementation flag torch supports: the same parameters
    and state as torch.optim.Adadelta over three steps (float32; the kernel and fused CPU path, or the
    PyTorch path with differentiable)."""
    ours, theirs, opt, ref = _run_both(path, desc, impl, torch.float32, monkeypatch)
    _close(ours, theirs, torch.float32)
    assert path_taken(opt) == ("reference" if impl == "differentiable" else path)
    for p, q in zip(ours, theirs):
        for name in ("square_avg", "acc_delta"):
            torch.testing.assert_close(opt.state[p][name].detach().cpu(), ref.state[q][name].detach().cpu(),
                                       rtol=1e-5, atol=1e-6)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 3.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
@pytest.mark.parametrize("desc", list(_configs()))
@pytest.mark.parametrize("path", CPU_PATHS)
def test_configurations_match_torch_in_other_dtypes_and_groups(path, desc, dtype, monkeypatch):
    """torch's configurations for float64 and complex parameters (supports_complex), in two param groups
    (supports_param_groups: the second overrides lr and weight_decay)."""
    ours, theirs, opt, _ = _run_both(path, desc, None, dtype, monkeypatch, groups=True)
    _close(ours, theirs, dtype)
    assert path_taken(opt) == (path if dtype.is_complex else "reference")  # float64: the PyTorch path


@pytest.mark.parametrize("schedulers", range(len(INFO.scheduler_inputs)))
@pytest.mark.parametrize("path", CPU_PATHS)
def test_scheduler_inputs_drive_ours_like_torch(path, schedulers, monkeypatch):
    """torch's scheduler inputs (StepLR and ReduceLROnPlateau together) drive both optimizers alike."""
    device, fused = use_path(path, monkeypatch)
    ours = [p.requires_grad_() for p in make_params(SHAPES, torch.float32, device, seed=5)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref = Adadelta(ours, fused=fused, lr=0.5), torch.optim.Adadelta(theirs, lr=0.5)
    makers = INFO.scheduler_inputs[schedulers]
    ours_s, theirs_s = [m(opt) for m in makers], [m(ref) for m in makers]
    for step in range(12):
        grads = random_grads(ours, seed=step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
        loss = float(sum(g.square().sum() for g in grads))
        for s_ours, s_theirs in zip(ours_s, theirs_s):
            if isinstance(s_ours, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s_ours.step(loss)
                s_theirs.step(loss)
            else:
                s_ours.step()
                s_theirs.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    _close(ours, theirs, torch.float32)
