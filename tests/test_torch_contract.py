"""What code written against torch.optim.Adadelta relies on beyond the numbers, on every CPU-testable path.

Each test runs on the reference path (``fused=False``), the fused CPU path and the Triton kernel
(in the interpreter on CPU), and compares with torch.optim.Adadelta where torch has an answer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import CPU_PATHS, use_path
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
    import triton_adadelta.optimizer as optimizer_module

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

            monkeypatch.setattr(optimizer_module, "_copy_state", failing_copy)
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
