"""Bad input changes nothing; non-finite gradients; skip_nonfinite.

Every bad call is made on an optimizer that has already taken steps (so there is state to
corrupt), the error type and message are checked, and then everything the optimizer and the model
hold is compared bit for bit with a snapshot taken before the call. After the error the run goes on
and must equal a twin run that never saw the bad call: that catches damage to hidden caches too.
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_gpu, needs_kernel
from helpers import make_params, random_grads, set_grads

from triton_adadelta import Adadelta

# ------------------------------------------------------------------------------------------ snapshots


def _bits(t: torch.Tensor) -> tuple:
    """dtype, shape and the raw bytes of a tensor: equal bits, NaN payloads included."""
    t = t.detach()
    if t.device.type == "meta":  # no bits to compare
        return (t.dtype, tuple(t.shape), "meta")
    if t.layout != torch.strided:
        t = t.to_dense()
    if hasattr(t, "to_local"):
        t = t.to_local()
    flat = t.cpu().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    return (t.dtype, tuple(t.shape), str(t.device), flat.view(torch.uint8).clone())


def _freeze(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", _bits(x))
    if isinstance(x, dict):
        return ("dict", tuple((repr(k), _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return ("seq", tuple(_freeze(v) for v in x))
    return ("value", repr(x))


def snapshot(opt: Adadelta, params: list[torch.Tensor]) -> tuple:
    """Everything a failed call could have damaged: parameters, gradients, state, flat buffers, groups."""
    groups = [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()} for g in opt.param_groups]
    index = {id(p): i for i, p in enumerate(params)}
    state = [(index.get(id(p), repr(p)), st) for p, st in opt.state.items()]
    flats = [(k, f.square_avg, f.acc_delta, f.steps, f.master, [id(p) for p in f.params], list(f.offsets))
             for k, f in opt._store.flats.items()]
    return (
        [_freeze(p) for p in params],
        [_freeze(p.grad) if p.grad is not None else None for p in params],
        _freeze(groups),
        _freeze(state),
        _freeze(flats),
        _freeze(opt._skipped_steps),
    )


def assert_same(before: tuple, after: tuple, ignore: tuple = ()) -> None:
    names = ["parameters", "gradients", "param_groups", "state", "flat buffers", "skipped_steps"]
    for name, a, b in zip(names, before, after):
        if name not in ignore:
            assert _equal(a, b), f"the call changed the {name}"


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------------------ set-up

PATHS = [pytest.param(False, id="reference"), pytest.param(True, id="fused", marks=needs_kernel)]


def _cases(cases, fused_cases):
    """Every case on the reference path; on the fused path (slow in the interpreter) the cases in
    ``fused_cases``: the checks run before any path is chosen, the fused runs show its state is kept too."""
    out = [pytest.param(False, c, id=f"{c}-reference") for c in cases]
    out += [pytest.param(True, c, id=f"{c}-fused", marks=needs_kernel) for c in cases if c in fused_cases]
    return out
SHAPES = [(7,), (3, 5), (), (40,)]


def _device(fused: bool) -> str:
    return KERNEL_DEVICE if fused else "cpu"


def _make(fused: bool, dtype=torch.float32, **kw):
    """Two optimizers on identical copies (the second is the twin that never sees bad input), 2 steps taken."""
    dev = _device(fused)
    params = make_params(SHAPES, dtype, dev, seed=5)
    twin_params = [p.clone() for p in params]

    def build(ps):
        return Adadelta([dict(params=ps[:2], lr=0.7), dict(params=ps[2:], rho=0.8, weight_decay=0.01)],
                        fused=fused, **kw)

    opt, twin = build(params), build(twin_params)
    for step in range(2):
        grads = random_grads(params, seed=step)
        set_grads(params, grads)
        set_grads(twin_params, grads)
        opt.step()
        twin.step()
    grads = random_grads(params, seed=99)
    set_grads(params, grads)
    set_grads(twin_params, grads)
    return opt, params, twin, twin_params


def _continue_equal(opt, params, twin, twin_params, steps: int = 2) -> None:
    """After the failed call both optimizers take the same steps and must stay bit-identical."""
    for step in range(steps):
        grads = random_grads(params, seed=200 + step)
        set_grads(params, grads)
        set_grads(twin_params, grads)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(_bits(p)[3], _bits(q)[3])
        for name in ("square_avg", "acc_delta", "step"):
            assert torch.equal(_bits(opt.state[p][name])[3], _bits(twin.state[q][name])[3]), name


# ------------------------------------------------------------------------------------------ constructor

@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
        (dict(lr=float("inf")), ValueError, "Invalid learning rate: inf"),
        (dict(lr=torch.tensor(float("nan"))), ValueError, "Invalid learning rate: nan"),
        (dict(rho=float("nan")), ValueError, "Invalid rho value: nan"),
        (dict(eps=float("nan")), ValueError, "Invalid epsilon value: nan"),
        (dict(eps=float("inf")), ValueError, "Invalid epsilon value: inf"),
        (dict(weight_decay=float("nan")), ValueError, "Invalid weight_decay value: nan"),
        (dict(weight_decay=float("inf")), ValueError, "Invalid weight_decay value: inf"),
        (dict(lr="0.1"), TypeError, "lr must be a real number, got str"),
        (dict(lr=True), TypeError, "lr must be a real number, got bool"),
        (dict(rho=None), TypeError, "rho must be a real number, got NoneType"),
        (dict(lr=torch.tensor(0.1 + 0j)), TypeError, "lr must be a real number, got a tensor of dtype"),
        (dict(maximize="False"), TypeError, "maximize must be a bool, got str"),
        (dict(fused="yes"), TypeError, "fused must be a bool or None, got str"),
        (dict(skip_nonfinite=1), TypeError, "skip_nonfinite must be a bool, got int"),
        (dict(stochastic_rounding=None), TypeError, "stochastic_rounding must be a bool"),
        (dict(state_dtype=torch.int32), TypeError, "state_dtype must be a floating point dtype or None"),
        (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, exc, message):
    params = make_params([(4,)], torch.float32)
    before = _bits(params[0])
    with pytest.raises(exc, match=re.escape(message)):
        Adadelta(params, **kwargs)
    assert _bits(params[0])[3].equal(before[3])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_constructor_rejects_integer_and_bool_parameters(dtype):
    good = torch.randn(3)
    bad = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"parameter 1 of the group has dtype {dtype}: Adadelta updates floating"):
        Adadelta([good, bad])


def test_constructor_rejects_duplicate_parameter():
    p = torch.randn(3)
    # torch only warns; with flat state the kernel would update the same tensor twice in one launch.
    with pytest.raises(ValueError, match="parameter 1 of the group is the same tensor as parameter 0"):
        Adadelta([p, p])


# ------------------------------------------------------------------------------------------ add_param_group

def _bad_groups(params):
    p0 = params[0]
    return [
        (dict(params=[p0]), ValueError, "some parameters appear in more than one parameter group"),
        (dict(params=[torch.randn(2), torch.zeros(2, dtype=torch.long)]), TypeError, "has dtype torch.int64"),
        (dict(params=[torch.ones(2, dtype=torch.bool)]), TypeError, "has dtype torch.bool"),
        (dict(params=[torch.randn(2), 3.0]), TypeError, "optimizer can only optimize Tensors"),
        (dict(params={torch.randn(2)}), TypeError, "ordered collections"),
        (dict(params=[torch.randn(2)], lr=float("nan")), ValueError, "Invalid learning rate: nan"),
        (dict(params=[torch.randn(2)], rho=2.0), ValueError, "Invalid rho value: 2.0"),
        (dict(params=[torch.randn(2)], maximize=1), TypeError, "maximize must be a bool"),
        (dict(params=[torch.randn(2)], state_dtype=torch.int8), TypeError, "state_dtype must be a floating"),
        (dict(params=[(torch.randn(2, requires_grad=True) * 2)]), ValueError, "can't optimize a non-leaf Tensor"),
        (dict(lr=0.1), ValueError, "param_group has no 'params' entry"),
        ([torch.randn(2)], TypeError, "param_group must be a dict"),
    ]


@pytest.mark.parametrize("fused, case", _cases(range(12), {0, 1, 5}))
def test_add_param_group_rejects_and_changes_nothing(fused, case):
    opt, params, twin, twin_params = _make(fused)
    group, exc, message = _bad_groups(params)[case]
    before = snapshot(opt, params)
    with pytest.raises(exc, match=re.escape(message)):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 2
    assert_same(before, snapshot(opt, params))
    _continue_equal(opt, params, twin, twin_params)


def test_add_param_group_fused_on_unsupported_device_is_not_added(monkeypatch):
    from triton_adadelta import cpu_fused

    opt, params, twin, twin_params = _make(False)
    before = snapshot(opt, params)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(cpu_fused, "ENABLED", False)  # no fused CPU path either: no fused path for CPU tensors
    with pytest.raises(RuntimeError, match="`fused=True` requires CUDA tensors or CPU tensors with the fused CPU "
                                           "path; got a parameter on cpu: the fused CPU path is switched off"):
        opt.add_param_group(dict(params=[torch.randn(3)], fused=True))
    monkeypatch.undo()
    assert len(opt.param_groups) == 2, "a group that failed its check must not stay in the optimizer"
    assert_same(before, snapshot(opt, params))


# ------------------------------------------------------------------------------------------ step

def _set_data(t: torch.Tensor, new: torch.Tensor) -> None:
    # autograd refuses to assign a mismatched .grad; swapping .data gets one past it, as a bug in user code can.
    t.data = new


def _corrupt(kind: str, params: list[torch.Tensor], opt: Adadelta):
    """Make the last parameter's gradient (or the optimizer's settings) bad in one way; return (exc, message)."""
    p = params[-1]
    if kind == "shape":
        _set_data(p.grad, torch.randn(p.numel() + 1, dtype=p.dtype, device=p.device))
        return RuntimeError, r"the gradient of parameter 1 of group 1 has shape \(41,\), but the parameter has shape"
    if kind == "int-dtype":
        _set_data(p.grad, torch.ones(p.shape, dtype=torch.int64, device=p.device))
        return TypeError, "the gradient of parameter 1 of group 1 has dtype torch.int64; expected torch.float32"
    if kind == "float64-dtype":
        _set_data(p.grad, torch.randn(p.shape, dtype=torch.float64, device=p.device))
        return TypeError, "has dtype torch.float64; expected torch.float32"
    if kind == "complex-dtype":
        _set_data(p.grad, torch.randn(p.shape, dtype=torch.complex64, device=p.device))
        return TypeError, "has dtype torch.complex64; expected torch.float32"
    if kind == "sparse":
        p.grad = torch.randn(p.shape, dtype=p.dtype, device=p.device).to_sparse()
        return RuntimeError, "Adadelta does not support sparse gradients"
    if kind == "nan-lr":
        opt.param_groups[1]["lr"] = float("nan")
        return ValueError, "Invalid learning rate: nan"
    if kind == "negative-eps":
        opt.param_groups[0]["eps"] = -1e-3
        return ValueError, "Invalid epsilon value: -0.001"
    if kind == "string-flag":
        opt.param_groups[0]["maximize"] = "no"
        return TypeError, "maximize must be a bool, got str"
    if kind == "two-groups":
        opt.param_groups[1]["params"].append(params[0])
        return ValueError, "parameter 2 of group 1 is also parameter 0 of group 0"
    if kind == "resized":
        n = p.numel() + 3
        _set_data(p, torch.randn(n, dtype=p.dtype, device=p.device))
        p.grad = torch.randn(n, dtype=p.dtype, device=p.device)
        return RuntimeError, r"the state of parameter 1 of group 1 has shape \(40,\) .* now has shape \(43,\)"
    # Settings of the LAST group that a step could only trip over after the first group's update.
    if kind == "tensor-rho":
        opt.param_groups[1]["rho"] = torch.tensor([0.5, 0.9])
        return ValueError, "Tensor rho must be 1-element"
    if kind == "meta-lr":
        opt.param_groups[1]["lr"] = torch.tensor(0.5, device="meta")
        return ValueError, "Tensor lr is on the meta device"
    if kind == "negative-decay":
        opt.param_groups[1]["decay"] = -1.0
        return ValueError, r"Expected decay >= 0, received: -1.0"
    if kind == "string-decay":
        opt.param_groups[1]["decay"] = "0.1"
        return TypeError, "decay must be a number, got str"
    if kind == "non-tensor-param":
        opt.param_groups[1]["params"].append(3.0)
        return TypeError, "parameter 2 of group 1 is a float: optimizer can only optimize Tensors"
    # State replaced by the user with something unusable (the step would copy it into the flat buffers).
    if kind == "replaced-wrong-shape":
        opt.state[p]["acc_delta"] = torch.zeros(7, device=p.device)
        return RuntimeError, r"the state 'acc_delta' of parameter 1 of group 1 was replaced by a tensor of shape \(7,\)"
    if kind == "replaced-string-step":
        opt.state[p]["step"] = "abc"
        return TypeError, "the state of parameter 1 of group 1: 'step' must be a one-element real tensor"
    if kind == "replaced-meta":
        opt.state[p]["acc_delta"] = torch.zeros(p.shape, device="meta")
        return TypeError, "the state 'acc_delta' of parameter 1 of group 1 was replaced by a .* tensor on meta"
    raise AssertionError(kind)


def _undo(kind: str, params, opt, saved) -> None:
    p = params[-1]
    if kind in ("nan-lr",):
        opt.param_groups[1]["lr"] = saved["lr1"]
    elif kind == "negative-eps":
        opt.param_groups[0]["eps"] = saved["eps0"]
    elif kind == "string-flag":
        opt.param_groups[0]["maximize"] = False
    elif kind == "two-groups":
        opt.param_groups[1]["params"].pop()
    elif kind == "resized":
        _set_data(p, saved["data"])
    elif kind in ("tensor-rho", "meta-lr", "negative-decay", "string-decay"):
        opt.param_groups[1].update(saved["group1"])
    elif kind == "non-tensor-param":
        opt.param_groups[1]["params"].pop()
    elif kind.startswith("replaced"):
        opt.state[p].update(saved["state"])
    p.grad = saved["grad"].clone()


STEP_CASES = ["shape", "int-dtype", "float64-dtype", "complex-dtype", "sparse", "nan-lr",
              "negative-eps", "string-flag", "two-groups", "resized", "tensor-rho", "meta-lr", "negative-decay",
              "string-decay", "non-tensor-param", "replaced-wrong-shape", "replaced-string-step", "replaced-meta"]


@pytest.mark.parametrize("fused, kind", _cases(STEP_CASES, {"shape", "int-dtype", "sparse", "nan-lr", "two-groups",
                                                           "resized", "tensor-rho", "replaced-wrong-shape"}))
def test_step_rejects_bad_input_and_changes_nothing(fused, kind):
    opt, params, twin, twin_params = _make(fused)
    saved = dict(lr1=opt.param_groups[1]["lr"], eps0=opt.param_groups[0]["eps"], data=params[-1].data,
                 grad=params[-1].grad.clone(), group1={k: v for k, v in opt.param_groups[1].items() if k != "params"},
                 state=dict(opt.state[params[-1]]))
    exc, message = _corrupt(kind, params, opt)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=message):
        opt.step()
    assert_same(before, snapshot(opt, params))
    _undo(kind, params, opt, saved)
    # The twin never saw the bad call: both take this step and two more and must agree bit for bit.
    opt.step()
    twin.step()
    _continue_equal(opt, params, twin, twin_params)


class _GradElsewhere(torch.Tensor):
    """A tensor subclass whose .grad is on another device: torch's .grad setter refuses to build one."""

    other = None

    @property
    def grad(self):
        return self.other


@pytest.mark.parametrize("fused", PATHS)
def test_step_rejects_gradient_on_another_device(fused):
    opt, params, twin, twin_params = _make(fused)
    odd = torch.Tensor._make_subclass(_GradElsewhere, torch.randn(4, device=_device(fused)))
    odd.other = torch.empty(4, device="meta")
    opt.add_param_group(dict(params=[odd]))
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="the gradient of parameter 0 of group 2 is on meta, but the parameter is"):
        opt.step()
    assert_same(before, snapshot(opt, params))
    odd.other = None
    opt.step()
    twin.step()
    _continue_equal(opt, params, twin, twin_params)


@pytest.mark.parametrize(
    "kw, exc, message",
    [
        (dict(grad_scale=torch.ones(2)), ValueError, r"grad_scale must have one element, got shape \(2,\)"),
        (dict(found_inf=torch.zeros(1, dtype=torch.int32)), TypeError, "found_inf must be a floating point tensor"),
        (dict(found_inf=0.0), TypeError, "found_inf must be a tensor or None, got float"),
    ],
)
def test_step_rejects_bad_scaler_inputs(kw, exc, message):
    opt, params, _, _ = _make(False)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=message):
        opt.step(**kw)
    assert_same(before, snapshot(opt, params))


def test_step_accepts_fp32_gradients_for_bf16_parameters():
    # The documented mixed-precision case must stay allowed by the dtype check.
    p = [torch.randn(9).bfloat16()]
    opt = Adadelta(p)
    set_grads(p, random_grads(p, 0, grad_dtype=torch.float32))
    opt.step()
    assert float(opt.state[p[0]]["step"]) == 1


# ------------------------------------------------------------------------------------------ load_state_dict

def _trained_sd(fused: bool, **kw):
    opt, params, twin, twin_params = _make(fused, **kw)
    return opt.state_dict(), opt, params, twin, twin_params


def _sd_cases():
    def drop(key):
        return lambda sd, params: sd.pop(key)

    def set_state(index, name, fn):
        def edit(sd, params):
            sd["state"][index][name] = fn(sd["state"][index][name])
        return edit

    def edit_group(index, key, value):
        def edit(sd, params):
            sd["param_groups"][index][key] = value
        return edit

    return {
        "missing-state": (drop("state"), ValueError, "loaded state dict has no 'state' entry"),
        "missing-groups": (drop("param_groups"), ValueError, "loaded state dict has no 'param_groups' entry"),
        "unknown-top-key": (lambda sd, ps: sd.update(extra=1), ValueError, r"unknown keys \['extra'\]"),
        "group-count": (lambda sd, ps: sd["param_groups"].pop(), ValueError,
                        "loaded state dict has a different number of parameter groups"),
        "group-size": (lambda sd, ps: sd["param_groups"][1]["params"].pop(), ValueError,
                       "doesn't match the size of optimizer's group"),
        "unknown-index": (lambda sd, ps: sd["state"].update({17: sd["state"][0]}), ValueError,
                          "state for an unknown parameter index 17"),
        "duplicate-index": (lambda sd, ps: sd["param_groups"][1]["params"].__setitem__(0, 0), ValueError,
                            "lists parameter index 0 twice"),
        "unknown-state-key": (lambda sd, ps: sd["state"][1].update(momentum_buffer=torch.zeros(3, 5)), ValueError,
                              r"parameter 1: unknown state keys \['momentum_buffer'\]"),
        "missing-state-key": (lambda sd, ps: sd["state"][2].pop("acc_delta"), ValueError,
                              r"parameter 2: missing state keys \['acc_delta'\]"),
        "wrong-shape": (set_state(0, "square_avg", lambda t: t[:-1].clone()), ValueError,
                        r"parameter 0: 'square_avg' has shape \(6,\), but the parameter has shape \(7,\)"),
        "transposed": (set_state(1, "acc_delta", lambda t: t.t().clone()), ValueError,
                       r"'acc_delta' has shape \(5, 3\), but the parameter has shape \(3, 5\)"),
        "int-dtype": (set_state(3, "square_avg", lambda t: t.to(torch.int32)), TypeError,
                      "'square_avg' has dtype torch.int32; expected a floating point dtype"),
        "not-a-tensor": (set_state(3, "acc_delta", lambda t: t.tolist()), TypeError,
                         "'acc_delta' must be a tensor, got list"),
        "negative-step": (set_state(0, "step", lambda t: t - 5), ValueError,
                          "'step' must be a non-negative whole number, got -3.0"),
        "nan-step": (set_state(0, "step", lambda t: t * float("nan")), ValueError, "whole number, got nan"),
        "fractional-step": (set_state(0, "step", lambda t: t + 0.5), ValueError, "whole number, got 2.5"),
        "vector-step": (set_state(0, "step", lambda t: torch.stack([t, t])), TypeError,
                        "'step' must be a one-element real tensor"),
        "nan-lr": (edit_group(0, "lr", float("nan")), ValueError, "Invalid learning rate: nan"),
        "bad-rho": (edit_group(1, "rho", 1.5), ValueError, "Invalid rho value: 1.5"),
        "bad-flag": (edit_group(1, "maximize", "yes"), TypeError, "maximize must be a bool"),
        "bad-state-dtype": (edit_group(0, "state_dtype", torch.int64), TypeError, "state_dtype must be a floating"),
        "master-without-master-weights": (lambda sd, ps: sd["state"][0].update(master=torch.zeros(7)), ValueError,
                                          r"unknown state keys \['master'\]"),
        "negative-skipped-steps": (lambda sd, ps: sd.update(skipped_steps=torch.tensor(-1)), ValueError,
                                   "skipped_steps: 'step' must be a non-negative whole number"),
        "state-not-dict": (lambda sd, ps: sd.update(state=[1, 2]), TypeError, "'state' must be a dict"),
    }


SD_CASES = list(_sd_cases())


@pytest.mark.parametrize("fused, case", _cases(SD_CASES, {"wrong-shape", "unknown-state-key", "nan-step",
                                                          "group-size"}))
def test_load_state_dict_rejects_and_changes_nothing(fused, case):
    sd, opt, params, twin, twin_params = _trained_sd(fused)
    # Load into the trained optimizer itself: a failed load must leave its live state alone.
    edit, exc, message = _sd_cases()[case]
    bad = copy.deepcopy(sd)
    edit(bad, params)
    bad_frozen = _freeze(bad)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=message):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(opt, params))
    assert _equal(bad_frozen, _freeze(bad)), "load_state_dict changed the dict it was given"
    _continue_equal(opt, params, twin, twin_params)


def test_load_state_dict_complex_parameter_needs_complex_state():
    p = make_params([(4,)], torch.complex64)
    opt = Adadelta(p)
    set_grads(p, random_grads(p, 0))
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["square_avg"] = sd["state"][0]["square_avg"].real.clone()
    before = snapshot(opt, p)
    with pytest.raises(TypeError, match="'square_avg' has dtype torch.float32, but the parameter is complex"):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, p))


def test_load_state_dict_not_a_dict():
    opt, params, _, _ = _make(False)
    before = snapshot(opt, params)
    with pytest.raises(TypeError, match="state_dict must be a dict, got list"):
        opt.load_state_dict([("state", {})])
    assert_same(before, snapshot(opt, params))


def test_load_state_dict_failure_while_copying_rolls_back(monkeypatch):
    """A failure after the checks (here: injected into the copy of the third tensor) restores everything."""
    import triton_adadelta.state as state_module

    sd, opt, params, twin, twin_params = _trained_sd(False)
    sd = copy.deepcopy(sd)
    for st in sd["state"].values():  # make the load a real change, so a half-done one would show
        st["square_avg"] = st["square_avg"] * 2 + 1
    real_copy = state_module.copy_state
    calls = []

    def failing_copy(dst, src, name):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("injected copy failure")
        real_copy(dst, src, name)

    monkeypatch.setattr(state_module, "copy_state", failing_copy)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="injected copy failure"):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, params))
    monkeypatch.undo()
    _continue_equal(opt, params, twin, twin_params)


def test_load_state_dict_accepts_python_number_step():
    # Older torch versions saved 'step' as a Python number.
    sd, opt, params, _, _ = _trained_sd(False)
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    fresh_params = [p.clone() for p in params]
    fresh = Adadelta([dict(params=fresh_params[:2], lr=0.7), dict(params=fresh_params[2:], rho=0.8)])
    fresh.load_state_dict(sd)
    assert float(fresh.state[fresh_params[0]]["step"]) == 2


def test_load_state_dict_restores_flat_layout_in_saved_order():
    """State created in a different order than the parameters' keeps its flat offsets through a reload.

    The stochastic-rounding streams follow the flat offsets, so a reload that reordered the
    segments would make a resumed run differ from an uninterrupted one.
    """
    params = make_params([(5,), (70,), (3,)], torch.float32)
    opt = Adadelta(params)
    params[2].grad = torch.randn(3)  # the last parameter gets state first, then the first two
    opt.step()
    set_grads(params, random_grads(params, 1))
    opt.step()
    flat = next(iter(opt._store.flats.values()))
    order = [[id(q) for q in params].index(id(p)) for p in flat.params]
    assert order == [2, 0, 1]
    fresh_params = [p.clone() for p in params]
    fresh = Adadelta(fresh_params)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    fresh_flat = next(iter(fresh._store.flats.values()))
    assert [[id(q) for q in fresh_params].index(id(p)) for p in fresh_flat.params] == order
    assert fresh_flat.offsets == flat.offsets
    assert torch.equal(fresh_flat.square_avg, flat.square_avg)


# ------------------------------------------------------------------------------------------ non-finite gradients

def _nonfinite_run(fused, bad_steps, dtype=torch.float32, skip=True, shapes=((7,), (3, 5), (), (0,), (40,)),
                   poison=float("nan"), poison_at=(1, 0), omit=False, **kw):
    """Train 5 steps; at ``bad_steps`` one element gets ``poison``. With ``omit`` those steps are left out."""
    dev = _device(fused)
    params = make_params(shapes, dtype, dev, seed=3)
    opt = Adadelta([dict(params=params[:2], lr=0.6), dict(params=params[2:], weight_decay=0.02, maximize=True)],
                   fused=fused, skip_nonfinite=skip, **kw)
    history = []
    for step in range(5):
        grads = random_grads(params, seed=50 + step)
        if step in bad_steps:
            if omit:
                continue
            t, i = poison_at
            grads[t].view(-1)[i] = poison
        set_grads(params, grads)
        before = snapshot(opt, params)
        opt.step()
        history.append((step, before, snapshot(opt, params)))
    return opt, params, history


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64], ids=str)
def test_skip_nonfinite_skips_the_whole_step(fused, poison, dtype):
    opt, params, history = _nonfinite_run(fused, {1, 3}, dtype=dtype, poison=poison, poison_at=(4, 39))
    for step, before, after in history:
        if step in (1, 3):
            # Parameters, state and step counts: all as before (the gradients are the only thing set).
            assert_same(before, after, ignore=("gradients", "skipped_steps"))
        else:
            assert not _equal(before[0], after[0]), f"step {step} changed nothing"
    assert int(opt.skipped_steps) == 2
    assert opt.skipped_steps.device == params[0].device
    assert float(opt.state[params[0]]["step"]) == 3
    # The same run with the bad steps left out entirely: bit-identical.
    _, ref_params, _ = _nonfinite_run(fused, {1, 3}, dtype=dtype, omit=True)
    for p, q in zip(params, ref_params):
        assert torch.equal(_bits(p)[3], _bits(q)[3])
    for p in params:
        assert bool(torch.isfinite(torch.view_as_real(p) if p.is_complex() else p).all())


@pytest.mark.parametrize("n", [1, 1000, 65536, 70001], ids=lambda n: f"n{n}")  # both sides of the CPU size split
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64],
                         ids=str)
def test_nonfinite_flag_is_exact(n, dtype):
    """NaN, +Inf, -Inf anywhere flag; the largest finite values of the dtype do not."""
    from triton_adadelta.validation import nonfinite_flag

    real = torch.float32 if dtype == torch.complex64 else dtype
    biggest = torch.finfo(real).max
    gen = torch.Generator().manual_seed(n)
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        for where in (0, n // 2, n - 1):
            x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
            huge = torch.full((3,), biggest, dtype=real).to(dtype)
            huge[1] = -biggest
            if bad is not None:
                x[where] = bad
            flag = nonfinite_flag([huge, torch.zeros(0, dtype=dtype), x], torch.device("cpu"))
            assert flag.dtype == torch.bool and flag.shape == ()
            assert bool(flag) == (bad is not None), (bad, where)


@pytest.mark.parametrize("fused", PATHS)
def test_skip_nonfinite_keeps_huge_finite_gradients(fused):
    """Gradients near the float32 maximum are finite: a 2-norm check would overflow and wrongly skip."""
    dev = _device(fused)
    params = make_params([(6,), (5,)], torch.float32, dev, seed=1)
    opt = Adadelta(params, fused=fused, skip_nonfinite=True)
    for step in range(3):
        grads = random_grads(params, seed=step)
        grads[0].div_(grads[0].abs().max()).mul_(3e38)
        grads[1][0] = torch.finfo(torch.float32).max
        set_grads(params, grads)
        opt.step()
    assert int(opt.skipped_steps) == 0
    assert float(opt.state[params[0]]["step"]) == 3


@pytest.mark.parametrize("fused", PATHS)
def test_skip_nonfinite_combines_with_found_inf(fused):
    dev = _device(fused)
    params = make_params([(6,)], torch.float32, dev, seed=1)
    opt = Adadelta(params, fused=fused, skip_nonfinite=True)
    set_grads(params, random_grads(params, 0))
    opt.step()
    set_grads(params, random_grads(params, 1))
    before = snapshot(opt, params)
    opt.step(grad_scale=torch.full((1,), 4.0, device=dev), found_inf=torch.ones((1,), device=dev))
    assert_same(before, snapshot(opt, params), ignore=("skipped_steps",))
    assert int(opt.skipped_steps) == 1
    opt.step(grad_scale=torch.full((1,), 4.0, device=dev), found_inf=torch.zeros((1,), device=dev))
    assert int(opt.skipped_steps) == 1 and float(opt.state[params[0]]["step"]) == 2


def test_skip_nonfinite_differentiable_path():
    params = make_params([(5,)], torch.float32, seed=2)
    opt = Adadelta(params, differentiable=True, skip_nonfinite=True)
    set_grads(params, random_grads(params, 0))
    opt.step()
    g = random_grads(params, 1)
    g[0][2] = float("nan")
    set_grads(params, g)
    before = snapshot(opt, params)
    opt.step()
    assert_same(before, snapshot(opt, params), ignore=("skipped_steps",))
    assert int(opt.skipped_steps) == 1


@pytest.mark.parametrize("fused", PATHS)
def test_nonfinite_gradients_by_default_behave_like_torch(fused):
    """Without skip_nonfinite a NaN gradient reaches the update as in torch.optim.Adadelta."""
    dev = _device(fused)
    params = make_params([(9,), (4,)], torch.float32, dev, seed=4)
    theirs = [p.detach().cpu().clone() for p in params]
    ours_opt, torch_opt = Adadelta(params, fused=fused), torch.optim.Adadelta(theirs)
    for step in range(3):
        grads = random_grads(params, seed=step)
        if step == 1:
            grads[0][3] = float("nan")
            grads[1][0] = float("inf")
        set_grads(params, grads)
        set_grads(theirs, [g.cpu() for g in grads])
        ours_opt.step()
        torch_opt.step()
    assert int(ours_opt.skipped_steps) == 0
    for p, q in zip(params, theirs):
        assert torch.equal(p.cpu().isnan(), q.isnan()) and bool(p.cpu().isnan().any())
        torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_skipped_steps_survive_state_dict_deepcopy_and_pickle():
    opt, params, _ = _nonfinite_run(False, {0, 2})
    assert int(opt.skipped_steps) == 2
    sd = opt.state_dict()
    assert int(sd["skipped_steps"]) == 2
    fresh_params = [p.clone() for p in params]
    fresh = Adadelta([dict(params=fresh_params[:2]), dict(params=fresh_params[2:])], skip_nonfinite=True)
    fresh.load_state_dict(sd)
    assert int(fresh.skipped_steps) == 2
    sd["skipped_steps"].add_(5)  # the loaded counter is a copy, not the caller's tensor
    assert int(fresh.skipped_steps) == 2
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert int(clone.skipped_steps) == 2
    # A torch.optim.Adadelta state_dict (no counter) loads and the counter starts from zero.
    assert "skipped_steps" not in Adadelta([torch.randn(2)]).state_dict()


@needs_gpu
def test_skip_nonfinite_step_has_no_host_sync_on_gpu():
    params = make_params([(1000,), (33, 7)], torch.bfloat16, "cuda", seed=0)
    opt = Adadelta(params, skip_nonfinite=True)
    set_grads(params, random_grads(params, 0))
    opt.step()  # first step: state and tables are created
    grads = random_grads(params, 1)
    grads[1][0, 0] = float("nan")
    set_grads(params, grads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        set_grads(params, random_grads(params, 2))
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(opt.skipped_steps) == 1 and float(opt.state[params[0]]["step"]) == 2



# ------------------------------------------------------------------------------------------ Keras entry points
# The Keras layer (triton_adadelta/keras.py) validates these itself; here each bad call is made on a
# trained optimizer and everything, iterations included, must be as it was.

def _keras_cases(params):
    v0, v1 = params[0], params[-1]
    g0 = torch.randn(v0.shape, device=v0.device)
    return {
        "not-iterable": (lambda: 3, TypeError, "grads_and_vars must be an iterable"),
        "not-a-pair": (lambda: [(g0,)], ValueError, "item 0 is tuple of length 1"),
        "variable-not-tensor": (lambda: [(g0, "v")], TypeError, "item 0: optimizer can only optimize Tensors"),
        "variable-twice": (lambda: [(g0, v0), (g0, v0)], ValueError, "item 1: the variable also appears as item 0"),
        "gradient-not-tensor": (lambda: [(g0.tolist(), v0)], TypeError, "item 0: the gradient must be a tensor"),
        "shape": (lambda: [(torch.randn(v1.numel() + 1, device=v1.device), v1)], ValueError,
                  r"item 0: gradient shape \(41,\) does not match variable shape \(40,\)"),
        "device": (lambda: [(torch.empty(v1.shape, device="meta"), v1)], ValueError, "item 0: the gradient is on meta"),
        "int-gradient": (lambda: [(torch.ones(v1.shape, dtype=torch.int64, device=v1.device), v1)], TypeError,
                         "item 0: gradient dtype torch.int64 does not fit variable dtype torch.float32"),
        "complex-gradient": (lambda: [(torch.ones(v1.shape, dtype=torch.complex64, device=v1.device), v1)],
                             TypeError, "gradient dtype torch.complex64 does not fit"),
        "sparse": (lambda: [(torch.randn(v1.shape, device=v1.device).to_sparse(), v1)], RuntimeError,
                   "Adadelta does not support sparse gradients"),
        "all-none": (lambda: [(None, v0), (None, v1)], ValueError, "No gradients provided for any variable"),
        "new-int-variable": (lambda: [(g0, v0), (torch.ones(3, device=v0.device), torch.zeros(3, dtype=torch.int64,
                                                                                                device=v0.device))],
                             TypeError, "has dtype torch.int64"),
        # A new variable passes the pair checks; the step then refuses a later group's setting. The
        # variable must not stay adopted.
        "new-variable-then-bad-group": (lambda: _with_bad_lr(params, [(g0, v0), (torch.ones(3, device=v0.device),
                                                                                torch.zeros(3, device=v0.device))]),
                                        ValueError, "Invalid learning rate: -1.0"),
    }


def _with_bad_lr(params, pairs):
    params[-1]._opt.param_groups[1]["lr"] = -1.0
    return pairs


KERAS_CASES = list(_keras_cases([torch.zeros(7), torch.zeros(40)]))


@pytest.mark.parametrize("fused, case", _cases(KERAS_CASES, {"shape", "new-int-variable"}))
def test_apply_gradients_rejects_and_changes_nothing(fused, case):
    opt, params, twin, twin_params = _make(fused)
    make, exc, message = _keras_cases(params)[case]
    params[-1]._opt = opt
    lr1 = opt.param_groups[1]["lr"]
    before, iterations = snapshot(opt, params), int(opt.iterations)
    with pytest.raises(exc, match=message):
        opt.apply_gradients(make())
    opt.param_groups[1]["lr"] = lr1
    assert_same(before, snapshot(opt, params))
    assert int(opt.iterations) == iterations
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    _continue_equal(opt, params, twin, twin_params)


@pytest.mark.parametrize("case", ["short", "long", "shape", "complex", "negative-iterations", "fractional-iterations",
                                  "meta-last"])
def test_set_weights_rejects_and_changes_nothing(case):
    opt, params, twin, twin_params = _make(False)
    weights = opt.get_weights()
    n = len(weights)
    if case == "short":
        bad, exc, message = weights[:-2], ValueError, f"with a weight list of length {n - 2}, but the optimizer was"
    elif case == "long":
        bad, exc, message = weights + [weights[-1]], ValueError, f"with a weight list of length {n + 1}"
    elif case == "shape":
        bad = list(weights)
        bad[-1] = bad[-1].reshape(-1)[:-1]  # the last weight one element short
        exc, message = ValueError, "Optimizer weight shape .* not compatible with provided weight shape"
    elif case == "complex":
        bad = [w.astype("complex64") if i == 2 else w for i, w in enumerate(weights)]
        exc, message = TypeError, "a complex weight for a real optimizer weight"
    elif case == "meta-last":
        bad = list(weights)
        exc, message = TypeError, f"weight {n - 1} is a tensor on the meta device"
    else:
        bad = list(weights)
        bad[0] = bad[0] * 0 - 3 if case == "negative-iterations" else bad[0] + 0.5
        exc, message = ValueError, "iterations"
    # A real change in every other weight, so a half-applied call would show.
    bad = [w if i == 0 else w * 2 + 1 for i, w in enumerate(bad)]
    if case == "meta-last":  # shape and dtype pass; only copying it could fail, after the others were written
        bad[-1] = torch.empty(bad[-1].shape, device="meta")
    before, iterations = snapshot(opt, params), int(opt.iterations)
    with pytest.raises(exc, match=message):
        opt.set_weights(bad)
    assert_same(before, snapshot(opt, params))
    assert int(opt.iterations) == iterations
    opt.step()
    twin.step()
    _continue_equal(opt, params, twin, twin_params)
