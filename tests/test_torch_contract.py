"""What code written against torch.optim.Adadelta relies on beyond the numbers, on every CPU-testable path.

Each test runs on the reference path (``fused=False``), the fused CPU path and the Triton kernel
(in the interpreter on CPU), and compares with torch.optim.Adadelta where torch has an answer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import CPU_PATHS, path_taken, use_path
from helpers import make_params, random_grads, set_grads

from triton_adadelta import Adadelta

PATHS = CPU_PATHS


def _pair(shapes, device, fused, seed=0, **kw):
    """Our optimizer and torch's on identical parameters."""
    ours = [p.requires_grad_() for p in make_params(shapes, torch.float32, device, seed=seed)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return Adadelta(ours, fused=fused, **kw), ours, torch.optim.Adadelta(theirs, **kw), theirs


def _steps_both(opt, ours, ref, theirs, seeds) -> None:
    """One step of each optimizer per seed, on the same random gradients."""
    for seed in seeds:
        grads = random_grads(ours, seed=seed)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()


def _close(a, b):
    torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-9)  # atol << acc_delta (~2e-6)


@pytest.mark.parametrize("path", PATHS)
def test_step_bumps_the_parameters_version_like_an_in_place_op(path, monkeypatch):
    """A graph that saved a parameter before the step refuses a backward after it, as with torch."""
    device, fused = use_path(path, monkeypatch)
    for cls, kw in ((torch.optim.Adadelta, {}), (Adadelta, {"fused": fused})):
        w = torch.randn(6, device=device, requires_grad=True)
        x = torch.randn(6, device=device, requires_grad=True)
        opt = cls([w], **kw)
        w.grad = torch.randn(6, device=device)
        loss = (w * x).sum()  # saves w for x's gradient
        before = w._version
        opt.step()
        assert w._version > before, cls
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("path", PATHS)
def test_lazily_negated_gradients_and_parameters_are_read_as_their_values(path, monkeypatch):
    device, fused = use_path(path, monkeypatch)
    opt, ours, ref, theirs = _pair([(9,), (4, 5)], device, fused, lr=0.5, weight_decay=0.1)
    for step in range(3):
        grads = random_grads(ours, seed=step)
        for p, q, g in zip(ours, theirs, grads):
            p.grad = (-g)._neg_view()  # holds -g in memory, reads as g
            assert p.grad.is_neg()
            q.grad = g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        _close(p, q)
    # A parameter that is itself a negated view: updated through it, as torch's in-place ops do.
    base = torch.randn(7, device=device)
    p = base._neg_view().requires_grad_()
    q = p.detach().clone().requires_grad_()
    assert p.is_neg() and p.is_leaf
    opt, ref = Adadelta([p], fused=fused), torch.optim.Adadelta([q])
    for _ in range(2):
        g = torch.randn(7, device=device)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    _close(p, q)
    _close(opt.state[p]["acc_delta"], ref.state[q]["acc_delta"])


@pytest.mark.parametrize("path", PATHS)
def test_a_group_appended_to_param_groups_trains_like_torch(path, monkeypatch):
    """torch's own keys are enough for a group put straight into ``param_groups``; ours get the defaults."""
    device, fused = use_path(path, monkeypatch)
    opt, ours, ref, theirs = _pair([(5,), (3,)], device, fused, seed=3)
    del opt.param_groups[0]["params"][1], ref.param_groups[0]["params"][1]
    extra = dict(lr=0.3, rho=0.8, eps=1e-6, weight_decay=0.01, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None)
    opt.param_groups.append(dict(params=[ours[1]], **extra))
    ref.param_groups.append(dict(params=[theirs[1]], **extra))
    _steps_both(opt, ours, ref, theirs, seeds=range(10, 13))
    for p, q in zip(ours, theirs):
        _close(p, q)
    assert opt.param_groups[1]["state_dtype"] == torch.float32  # the constructor's defaults filled in


@pytest.mark.parametrize("path", PATHS)
def test_replaced_state_is_kept_when_another_parameter_gets_state_in_the_same_step(path, monkeypatch):
    """New state elsewhere reallocates the flat buffers; a tensor the user put in state[p] is still read."""
    device, fused = use_path(path, monkeypatch)
    opt, ours, ref, theirs = _pair([(3,), (4,), (5,)], device, fused, seed=4)
    for o, ps in ((opt, ours), (ref, theirs)):
        ps[0].grad = torch.full((3,), 0.5, device=device)
        o.step()
    value = torch.full((3,), 4.6, device=device)
    opt.state[ours[0]]["square_avg"] = value.clone()
    ref.state[theirs[0]]["square_avg"] = value.clone()
    _steps_both(opt, ours, ref, theirs, seeds=(20, 21))  # the first gives parameters 1 and 2 their first state
    for p, q in zip(ours, theirs):
        _close(p, q)
        _close(opt.state[p]["square_avg"], ref.state[q]["square_avg"])


def test_state_dict_post_hooks_see_and_may_drop_our_entries():
    w = torch.randn(3, requires_grad=True)
    opt = Adadelta([w], skip_nonfinite=True)
    w.grad = torch.ones(3)
    opt.step()
    seen = []

    def trim(optimizer, sd):
        seen.append(sorted(sd))
        return {k: sd[k] for k in ("state", "param_groups")}

    opt.register_state_dict_post_hook(trim)
    assert sorted(opt.state_dict()) == ["param_groups", "state"]
    assert seen == [["keras", "param_groups", "skipped_steps", "state"]]


@pytest.mark.parametrize("path", PATHS)
def test_torch_state_dict_with_a_one_element_step_shape_loads(path, monkeypatch):
    device, fused = use_path(path, monkeypatch)
    opt, ours, ref, theirs = _pair([(6,), (2, 3)], device, fused, seed=5)
    for step in range(2):
        set_grads(theirs, random_grads(theirs, seed=30 + step))
        ref.step()
    sd = copy.deepcopy(ref.state_dict())
    for st in sd["state"].values():
        st["step"] = st["step"].reshape(1)  # torch.optim loads and steps with this shape
    ref.load_state_dict(sd)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    opt.load_state_dict(sd)
    assert float(opt.state[ours[0]]["step"]) == 2.0
    _steps_both(opt, ours, ref, theirs, seeds=(40,))
    for p, q in zip(ours, theirs):
        _close(p, q)


def test_failed_load_keeps_the_pending_master_refresh(monkeypatch):
    """After a torch.optim state_dict, master weights are re-read from the parameter at the next step;
    a later load that fails (and rolls back) must leave that pending."""
    import triton_adadelta.state as state_module

    tp = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    topt = torch.optim.Adadelta([tp])
    tp.grad = torch.ones(8, dtype=torch.bfloat16)
    topt.step()
    torch_sd = topt.state_dict()
    new_weights = torch.randn(8).to(torch.bfloat16)
    results = []
    for failed_load in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
        opt = Adadelta([p], master_weights=True, fused=False)
        p.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
        opt.load_state_dict(copy.deepcopy(torch_sd))
        with torch.no_grad():
            p.copy_(new_weights)  # the model checkpoint, loaded after the optimizer's
        if failed_load:
            own = copy.deepcopy(opt.state_dict())

            def failing_copy(dst, src, name):
                raise RuntimeError("injected copy failure")

            monkeypatch.setattr(state_module, "copy_state", failing_copy)
            with pytest.raises(RuntimeError, match="injected"):
                opt.load_state_dict(own)  # our own state_dict: it has a master, so it queues no refresh
            monkeypatch.undo()
        p.grad = torch.full((8,), 0.1, dtype=torch.bfloat16)
        opt.step()
        results.append((p.detach().clone(), opt.state[p]["master"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("route", ["dtype-change", "group-edit", "load_state_dict"])
def test_remainder_master_weights_refuse_float16_by_every_route(route):
    """The constructor refuses float16 with master_weights='remainder'; so does every later way in."""
    p = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    if route == "dtype-change":
        opt = Adadelta([p], master_weights="remainder")
        p.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
        p.data = p.data.half()
        p.grad = torch.ones(8, dtype=torch.float16)
    else:
        p.data = p.data.half()
        opt = Adadelta([p])
        p.grad = torch.ones(8, dtype=torch.float16)
        opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    if route == "load_state_dict":
        sd = copy.deepcopy(opt.state_dict())
        sd["param_groups"][0]["master_weights"] = "remainder"
        with pytest.raises(ValueError, match="parameter 0 of group 0 is float16: master_weights='remainder'"):
            opt.load_state_dict(sd)
    else:
        if route == "group-edit":
            opt.param_groups[0]["master_weights"] = "remainder"
        with pytest.raises(ValueError, match="parameter 0 of group 0 is float16: master_weights='remainder'"):
            opt.step()
    assert torch.equal(p.detach(), before[0])
    for k, v in before[1].items():
        assert torch.equal(opt.state[p][k], v), k


def test_differentiable_with_leaf_parameters_fails_before_writing_state():
    """torch fails in the update itself (after writing state); ours names the same error before."""
    p = torch.randn(4, requires_grad=True)
    opt = Adadelta([p], differentiable=True)
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        opt.step()
    assert not opt.state[p]
    q = torch.randn(4, requires_grad=True)
    ref = torch.optim.Adadelta([q], differentiable=True)
    q.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        ref.step()


def test_differentiable_set_on_a_group_later_follows_torch():
    """torch turns autograd on from the constructor's flag only: a group edited later still steps."""
    a, b = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt = Adadelta([{"params": [a]}, {"params": [b]}], fused=False)
    ref = torch.optim.Adadelta([{"params": [a2]}, {"params": [b2]}])
    opt.param_groups[1]["differentiable"] = ref.param_groups[1]["differentiable"] = True
    for p, q in ((a, a2), (b, b2)):
        p.grad = torch.ones(p.shape)
        q.grad = torch.ones(q.shape)
    opt.step()
    ref.step()
    _close(a, a2)
    _close(b, b2)


def test_a_state_entry_must_be_a_dict():
    p = torch.randn(3, requires_grad=True)
    opt = Adadelta([p])
    with pytest.raises(TypeError, match="the state of a parameter must be a dict, got str"):
        opt.state[p] = "garbage"
    assert p not in opt.state


def test_tensor_lr_that_requires_grad_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Adadelta([torch.randn(3, requires_grad=True)], lr=torch.tensor(0.5, requires_grad=True))


def _reset_and_realloc(opt, p, q, r, trigger):
    """q's state is reset and q takes no part in the next step, which reallocates the flat buffers."""
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    opt.state[q] = {}
    q.grad = None
    if trigger == "another-reset":
        opt.state[p] = {}
    elif trigger == "add_param_group":
        opt.add_param_group({"params": [r]})
    r.grad = torch.ones_like(r)
    opt.step()


@pytest.mark.parametrize("trigger", ["first-state-elsewhere", "another-reset", "add_param_group"])
@pytest.mark.parametrize("path", PATHS)
def test_a_reset_state_stays_empty_when_buffers_move(path, trigger, monkeypatch):
    """torch keeps a reset parameter's state empty until its next gradient; so must a reallocation."""
    device, fused = use_path(path, monkeypatch)
    results = []
    for cls, kw in ((torch.optim.Adadelta, {}), (Adadelta, {"fused": fused})):
        p, q, r = (torch.ones(n, device=device, requires_grad=True) for n in (3, 2, 4))
        opt = cls([p, q] if trigger == "add_param_group" else [p, q, r], **kw)
        _reset_and_realloc(opt, p, q, r, trigger)
        assert not opt.state.get(q), cls  # still empty
        q.grad = torch.full_like(q, 0.5)
        opt.step()
        results.append((float(opt.state[q]["step"]), q.detach().clone()))
    assert results[0][0] == results[1][0] == 1.0  # started again from zero
    _close(results[1][1], results[0][1])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("path", PATHS)
def test_copies_keep_resets_and_replaced_state(path, how, monkeypatch):
    """A copy made between a state edit and the next step holds the edit, as torch's copy does."""
    import pickle

    device, fused = use_path(path, monkeypatch)

    def copied(opt):
        return copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))

    for cls, kw in ((torch.optim.Adadelta, {}), (Adadelta, {"fused": fused})):
        p, q = torch.ones(3, device=device, requires_grad=True), torch.ones(2, device=device, requires_grad=True)
        opt = cls([p, q], **kw)
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.step()
        opt.state[q] = {}
        opt.state[p]["square_avg"] = torch.full((3,), 4.5, device=device)
        twin = copied(opt)
        tp, tq = twin.param_groups[0]["params"]
        assert not twin.state.get(tq), cls
        assert torch.equal(twin.state[tp]["square_avg"], torch.full((3,), 4.5, device=device)), cls
        tp.grad, tq.grad = torch.ones_like(tp), torch.ones_like(tq)
        twin.step()
        assert float(twin.state[tq]["step"]) == 1.0 and float(twin.state[tp]["step"]) == 2.0, cls
        assert torch.allclose(twin.state[tp]["square_avg"], torch.full((3,), 0.9 * 4.5 + 0.1, device=device)), cls


@pytest.mark.parametrize("path", PATHS)
def test_state_given_before_the_first_step_is_stepped_from(path, monkeypatch):
    """opt.state[p] = {...} for a parameter that never had state: torch steps from it; so do we."""
    device, fused = use_path(path, monkeypatch)
    opt, ours, ref, theirs = _pair([(5,), (3,)], device, fused, seed=6)
    given = {"step": torch.tensor(4.0), "square_avg": torch.full((5,), 0.3, device=device),
             "acc_delta": torch.full((5,), 0.02, device=device)}
    opt.state[ours[0]] = {k: v.clone() for k, v in given.items()}
    ref.state[theirs[0]] = {k: v.clone() for k, v in given.items()}
    _steps_both(opt, ours, ref, theirs, seeds=(50, 51))
    for p, q in zip(ours, theirs):
        _close(p, q)
        _close(opt.state[p]["square_avg"], ref.state[q]["square_avg"])
    assert float(opt.state[ours[0]]["step"]) == 6.0
    # A given tensor of the wrong shape is refused before anything changes.
    (fresh,) = make_params([(4,)], torch.float32, device, seed=7)
    fresh.requires_grad_()
    opt.add_param_group({"params": [fresh]})
    opt.state[fresh] = {"step": torch.tensor(1.0), "square_avg": torch.zeros(4, device=device),
                        "acc_delta": torch.zeros(9, device=device)}
    fresh.grad = torch.ones(4, device=device)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(RuntimeError, match=r"'acc_delta' of parameter 0 of group 1 .* shape \(9,\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before))


def test_a_group_appended_directly_survives_a_state_dict_round_trip_before_its_first_step():
    opt, ours, ref, theirs = _pair([(5,), (3,)], "cpu", False, seed=8)
    for o, ps in ((opt, ours), (ref, theirs)):
        del o.param_groups[0]["params"][1]
        o.param_groups.append(dict(params=[ps[1]], lr=0.5, rho=0.9, eps=1e-6, weight_decay=0.0, foreach=None,
                                   maximize=False, capturable=False, differentiable=False, fused=None))
        o.load_state_dict(copy.deepcopy(o.state_dict()))
    _steps_both(opt, ours, ref, theirs, seeds=(60, 61))
    for p, q in zip(ours, theirs):
        _close(p, q)


@pytest.mark.parametrize("path", PATHS)
def test_empty_complex_parameter_pickles(path, monkeypatch):
    """A 0-element parameter's state views have no address; they are views all the same."""
    import io

    device, fused = use_path(path, monkeypatch)
    p = torch.zeros(0, dtype=torch.complex64, device=device, requires_grad=True)
    q = torch.randn(5, device=device, requires_grad=True)
    opt = Adadelta([p, q], fused=fused)
    p.grad, q.grad = torch.zeros_like(p), torch.ones_like(q)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    _close(again.state[again.param_groups[0]["params"][1]]["square_avg"], opt.state[q]["square_avg"])


# ----------------------------------------------------------------------------- issue 16
def _differentiable_fused(path, monkeypatch):
    """(device, fused) for a differentiable optimizer on ``path``: differentiable refuses fused=True (as
    torch's fused optimizers do), so the kernel and fused CPU paths are asked for by fused=None."""
    device, fused = use_path(path, monkeypatch)
    return device, (None if fused else fused)


def _two_differentiable_steps(cls, lr, p0, grads, state0, **kw):
    """The loss after two differentiable steps from ``p0`` (and initial state ``state0``), and the optimizer."""
    p = p0.clone()
    opt = cls([p], lr=lr, differentiable=True, **kw)
    if state0 is not None:
        opt.state[p].update({k: v.clone() for k, v in state0.items()})
    for g in grads:
        p.grad = g
        opt.step()
    weights = torch.linspace(0.5, 2.0, p.numel(), dtype=p.real.dtype, device=p.device).reshape(p.shape)
    return (weights * p.abs().square()).sum(), opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "maximize": True, "rho": 0.8}], ids=["default", "wd-max"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "given-state"])
@pytest.mark.parametrize("path", PATHS)
def test_differentiable_gradients_through_two_steps_equal_torch(path, dtype, kw, with_state, monkeypatch):
    """torch.autograd.grad of a loss after two steps, with respect to the initial parameters, the gradients
    and the initial state (given requiring grad), equals torch's; state that requires grad keeps it."""
    device, fused = _differentiable_fused(path, monkeypatch)
    g = torch.Generator().manual_seed(16)

    def leaf(shape):
        real = torch.rand(*shape, 2, generator=g, dtype=torch.float64) if dtype.is_complex else \
            torch.rand(*shape, generator=g, dtype=torch.float64)
        t = torch.view_as_complex(real) if dtype.is_complex else real
        return t.to(dtype).to(device).requires_grad_()

    p0 = leaf((5, 3))
    grads = [leaf((5, 3)) for _ in range(2)]
    state0 = ({"step": torch.tensor(4.0), "square_avg": leaf((5, 3)),  # rand: positive entries
               "acc_delta": leaf((5, 3))} if with_state else None)
    inputs = [p0, *grads] + ([state0["square_avg"], state0["acc_delta"]] if with_state else [])
    theirs, ref = _two_differentiable_steps(torch.optim.Adadelta, 0.7, p0, grads, state0, **kw)
    ours, opt = _two_differentiable_steps(Adadelta, 0.7, p0, grads, state0, fused=fused, **kw)
    assert path_taken(opt) == "reference"  # differentiable goes by the PyTorch path only
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(theirs, inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in ("square_avg", "acc_delta"):
        st_ours, st_theirs = opt.state[opt.param_groups[0]["params"][0]], ref.state[ref.param_groups[0]["params"][0]]
        assert st_ours[name].requires_grad and st_theirs[name].requires_grad
        assert st_ours[name].grad_fn is not None
    assert float(st_ours["step"]) == float(st_theirs["step"]) == (6.0 if with_state else 2.0)


@pytest.mark.parametrize("path", PATHS)
def test_differentiable_gradient_with_respect_to_a_tensor_lr(path, monkeypatch):
    """A learnt lr (a tensor that requires grad): torch refuses it in the update (add_'s alpha must be a
    number); ours tracks it. Oracle: the central difference of torch's loss in float64, and the other
    gradients equal torch's with the same lr as a number."""
    device, fused = _differentiable_fused(path, monkeypatch)
    g = torch.Generator().manual_seed(7)
    p0 = torch.rand(4, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    grads = [torch.randn(4, 6, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    lr = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    kw = {"weight_decay": 0.05}
    ours, _ = _two_differentiable_steps(Adadelta, lr, p0, grads, None, fused=fused, **kw)
    d_lr, d_p0 = torch.autograd.grad(ours, [lr, p0])
    h = 1e-5
    with torch.no_grad():
        plus = _two_differentiable_steps(torch.optim.Adadelta, 0.6 + h, p0.detach(), grads, None, **kw)[0]
        minus = _two_differentiable_steps(torch.optim.Adadelta, 0.6 - h, p0.detach(), grads, None, **kw)[0]
    torch.testing.assert_close(d_lr, (plus - minus) / (2 * h), rtol=1e-7, atol=1e-9)
    theirs, _ = _two_differentiable_steps(torch.optim.Adadelta, 0.6, p0, grads, None, **kw)
    torch.testing.assert_close(d_p0, torch.autograd.grad(theirs, p0)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="argument 'alpha' must be Number, not Tensor"):
        _two_differentiable_steps(torch.optim.Adadelta, lr, p0, grads, None, **kw)


def test_differentiable_step_passes_torchs_gradcheck():
    """torch's own differentiable-optimizer check (TestDifferentiableOptimizer): gradcheck of one step
    with respect to the parameter, its gradient and state given requiring grad."""
    g = torch.Generator().manual_seed(3)
    p, grad = (torch.rand(10, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sq, acc = (torch.rand(10, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def one_step(p, grad, sq, acc):
        p = p.clone()
        p.grad = grad
        opt = Adadelta([p], lr=0.9, weight_decay=0.1, differentiable=True)
        opt.state[p].update(step=torch.tensor(10.0), square_avg=sq.clone(), acc_delta=acc.clone())
        opt.step()
        return p, opt.state[p]["square_avg"], opt.state[p]["acc_delta"]

    assert torch.autograd.gradcheck(one_step, (p, grad, sq, acc))


def test_issue_16_differentiable_example_steps():
    p = torch.rand(3, requires_grad=True).clone()
    p.grad = torch.rand(3, requires_grad=True)
    before = p.detach().clone()
    Adadelta([p], differentiable=True).step()
    assert p.grad_fn is not None and not torch.equal(p.detach(), before)


def _flags(opt, value):
    """Non-parameter state as torch's state_dict hooks and users keep it."""
    opt.state["flag"] = value
    opt.state[("hook", 2)] = {"calls": 3, "seen": torch.arange(4.0)}


@pytest.mark.parametrize("path", PATHS)
def test_non_parameter_state_keys_behave_like_torchs(path, monkeypatch):
    """Any key, any value: state_dict() hands them out as they are, load_state_dict() gives them back
    (the same objects, as torch), deepcopy and pickle copy them; steps go on matching torch, and a reset
    of a real parameter's state after setting a flag is still noticed."""
    import pickle

    device, fused = use_path(path, monkeypatch)
    opt, ours, ref, theirs = _pair([(9,), (4, 5)], device, fused)
    _steps_both(opt, ours, ref, theirs, [1])
    value = [1, 2]
    for o in (opt, ref):
        _flags(o, value)
    sd_ours, sd_theirs = opt.state_dict(), ref.state_dict()
    assert list(sd_ours["state"]) == list(sd_theirs["state"]) == [0, 1, "flag", ("hook", 2)]
    assert sd_ours["state"]["flag"] is value and sd_theirs["state"]["flag"] is value
    assert sd_ours["state"][("hook", 2)] is opt.state[("hook", 2)]
    assert sd_theirs["state"][("hook", 2)] is ref.state[("hook", 2)]

    fresh, fresh_ref = Adadelta(ours, fused=fused), torch.optim.Adadelta(theirs)
    fresh.load_state_dict(sd_ours)
    fresh_ref.load_state_dict(sd_theirs)
    assert fresh.state["flag"] is value and fresh_ref.state["flag"] is value
    assert fresh.state[("hook", 2)] is sd_ours["state"][("hook", 2)]
    assert fresh_ref.state[("hook", 2)] is sd_theirs["state"][("hook", 2)]
    assert list(fresh.state)[2:] == list(fresh_ref.state)[2:] == ["flag", ("hook", 2)]

    for copy_of in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        c, c_ref = copy_of(opt), copy_of(ref)
        for o in (c, c_ref):
            assert o.state["flag"] == value and o.state["flag"] is not value
            assert o.state[("hook", 2)]["calls"] == 3
            torch.testing.assert_close(o.state[("hook", 2)]["seen"], torch.arange(4.0))
        cp, cq = c.param_groups[0]["params"], c_ref.param_groups[0]["params"]
        _steps_both(c, cp, c_ref, cq, [2])
        for a, b in zip(cp, cq):
            _close(a, b)

    # A flag set between steps, then a real parameter's state reset: torch starts it again from zero.
    for o, ps in ((opt, ours), (ref, theirs)):
        o.state["flag"] = 3
        o.state[ps[1]] = {}
    _steps_both(opt, ours, ref, theirs, [3, 4])
    for a, b in zip(ours, theirs):
        _close(a, b)
    assert float(opt.state[ours[1]]["step"]) == float(ref.state[theirs[1]]["step"]) == 2.0
    assert opt.state_dict()["state"]["flag"] == 3


def test_an_unknown_index_holding_a_parameters_state_is_still_an_error():
    """A key that is no parameter's index but holds a parameter's state is a checkpoint that does not fit
    (ours refuses it, changing nothing); any other such key is a flag (kept, as torch keeps it)."""
    p = torch.randn(3, requires_grad=True)
    opt = Adadelta([p])
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    sd["state"][5] = {"note": "not a parameter's state"}
    opt.load_state_dict(sd)
    assert opt.state[5] == {"note": "not a parameter's state"}
    sd["state"][7] = dict(sd["state"][0])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="state for an unknown parameter index 7"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    torch.testing.assert_close(after["state"][0]["square_avg"], before["state"][0]["square_avg"], rtol=0, atol=0)


def _meta_model():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


@pytest.mark.parametrize("path", ["cpu-fused", pytest.param("kernel", marks=CPU_PATHS[2].marks)])
def test_fused_optimizer_of_a_meta_model_trains_after_to_empty(path, monkeypatch):
    """A model built on the meta device, the optimizer made with fused=True (accepted, as torch's fused
    optimizers accept it), then to_empty() (swapping the parameters' contents, so that the optimizer's
    Parameter objects are the model's) and initialised: it trains as torch.optim.Adadelta."""
    device, _ = use_path(path, monkeypatch)
    model = _meta_model()
    torch.optim.Adam(model.parameters(), fused=True)  # torch's fused optimizers accept meta parameters
    opt = Adadelta(model.parameters(), fused=True, lr=0.8, weight_decay=0.01)
    params = list(model.parameters())
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    model.to_empty(device=device)
    assert all(a is b for a, b in zip(params, model.parameters())) and params[0].device.type == device
    torch.manual_seed(16)
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    twin = copy.deepcopy(model)
    ref = torch.optim.Adadelta(twin.parameters(), lr=0.8, weight_decay=0.01)
    for step in range(3):
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(step)).to(device)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        _close(a, b)
    assert path_taken(opt) == path and not (path == "kernel" and opt._route.torch)


def test_fused_meta_parameters_are_refused_when_a_step_needs_them():
    """Parameters still on meta at a step (to_empty without swapping made new ones): fused=True names the
    device then, as torch's fused Adam does at its step, and changes nothing."""
    model = _meta_model()
    opt = Adadelta(model.parameters(), fused=True)
    ref = torch.optim.Adam(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires .* meta"):
        ref.step()
    with pytest.raises(RuntimeError, match="`fused=True` requires CUDA tensors or CPU tensors .* on meta"):
        opt.step()
    assert not any(opt.state.values())


def test_a_flag_in_the_state_is_no_parameters_state():
    """Keras' slot names and the state's byte count (compare.py) look at parameters' state only."""
    from triton_adadelta.compare import state_bytes

    p = torch.randn(5, requires_grad=True)
    opt = Adadelta([p])
    opt.state["flag"] = {"a": torch.zeros(1000)}
    assert opt.get_slot_names() == [] and state_bytes(opt) == 0
    p.grad = torch.randn(5)
    opt.step()
    assert opt.get_slot_names() == ["accum_grad", "accum_var"] and state_bytes(opt) > 0
