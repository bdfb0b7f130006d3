"""The host path of a cached step: the bulk check of the signature (route.Watch, torch's C++ tensor
guard), the pointer table, and the group checks that skip unchanged groups.

Each test changes, between cached steps, one thing that only this path could miss, and steps on
against torch.optim.Adadelta (or expects the error that the full checks raise, with nothing changed).
Where it matters, a test runs twice: with torch's tensor guard, and with the Python signature that
serves where the guard is absent.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_kernel
from helpers import assert_close_rel, make_params
from test_kernel import _count_launches

from triton_adadelta import Adadelta
from triton_adadelta import route as routing
from triton_adadelta.backends.tables import PointerTable

pytestmark = needs_kernel

# A square parameter (a transpose keeps its shape and address) and one with a size-1 dimension (two
# strides of it are contiguous). No numel is a multiple of 4: every tensor takes the unaligned kernel, one launch.
SHAPES = [(33,), (5, 5), (129,), (3, 1), (1,)]


@pytest.fixture(params=["tensor guard", "python signature"])
def check(request, monkeypatch) -> str:
    if request.param == "python signature":
        monkeypatch.setattr(routing, "_TENSOR_GUARDS", None)
    elif routing._tensor_guards() is None:
        pytest.skip("torch's TensorGuards is absent or does not tell changes apart here")
    return request.param


def _setup(seed: int = 31):
    ours = make_params(SHAPES, torch.float32, KERNEL_DEVICE, seed=seed)
    theirs = [p.detach().cpu().clone().requires_grad_() for p in ours]
    groups = lambda ps: [dict(params=ps[:3]), dict(params=ps[3:], lr=0.5, weight_decay=0.1)]  # noqa: E731
    return ours, theirs, Adadelta(groups(ours)), torch.optim.Adadelta(groups(theirs), foreach=False)


def _set_grads(ours, theirs, seed):
    gen = torch.Generator().manual_seed(seed)
    for p, q in zip(ours, theirs):
        g = torch.randn(q.shape, generator=gen)
        p.grad, q.grad = g.to(p.device), g.clone()


def _both_step(opt, ref, counter) -> int:
    before = counter["n"]
    opt.step()
    ref.step()
    return counter["n"] - before


def _assert_matches(ours, theirs, what):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert p.shape == q.shape and p.stride() == q.stride(), f"{what}: param {i} layout"
        assert_close_rel(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6, what=f"{what}: param {i}")


def _warm(monkeypatch, same_grads=False):
    counter = _count_launches(monkeypatch)
    ours, theirs, opt, ref = _setup()
    _set_grads(ours, theirs, 0)
    for s in range(2):
        if not same_grads:
            _set_grads(ours, theirs, s)
        assert _both_step(opt, ref, counter) == 1
    return counter, ours, theirs, opt, ref


def test_cached_steps_take_the_bulk_check_not_the_python_signature(monkeypatch):
    if routing._tensor_guards() is None:
        pytest.skip("torch's TensorGuards is absent or does not tell changes apart here")
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    route = opt._route
    assert route.watch is not None
    read = []
    signature = routing.signature
    monkeypatch.setattr(routing, "signature", lambda groups: read.append(1) or signature(groups))
    for s in (5, 6):
        _set_grads(ours, theirs, s)
        assert _both_step(opt, ref, counter) == 1
    assert read == [] and opt._route is route
    _assert_matches(ours, theirs, "cached steps")


def test_a_guard_that_misses_a_change_is_not_used():
    class Blind:  # passes everything
        def __init__(self, *tensors, **kwargs):
            pass

        def check(self, *tensors):
            return True

    class Fussy(Blind):  # passes nothing, not even the same metadata
        def check(self, *tensors):
            return False

    assert not routing._guards_tell_apart(Blind)
    assert not routing._guards_tell_apart(Fussy)
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return
    assert routing._guards_tell_apart(TensorGuards)


def _move_param(ours, theirs):
    for p in (ours[0], theirs[0]):
        p.data = p.data.clone()  # same metadata, another address: the pointer table must follow


def _transpose_square_param(ours, theirs):
    for p in (ours[1], theirs[1]):
        p.data = p.data.t()  # same shape and address, column-major: the PyTorch path


def _replace_param_in_group(ours, theirs, opt, ref):
    new = make_params([SHAPES[2]], torch.float32, KERNEL_DEVICE, seed=77)[0]
    new_ref = new.detach().cpu().clone().requires_grad_()
    opt.param_groups[0]["params"][2] = ours[2] = new
    ref.param_groups[0]["params"][2] = theirs[2] = new_ref


@pytest.mark.parametrize("change", [_move_param, _transpose_square_param, _replace_param_in_group])
def test_a_changed_parameter_is_followed_like_torch(change, check, monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    if change is _replace_param_in_group:
        change(ours, theirs, opt, ref)
    else:
        change(ours, theirs)
    for s in (5, 6):
        _set_grads(ours, theirs, s)
        assert _both_step(opt, ref, counter) == 1
        _assert_matches(ours, theirs, f"{change.__name__}, step {s}")


@pytest.mark.parametrize("how", ["transposed in place", "negated view"])
def test_a_gradient_changed_in_place_is_noticed(how, check, monkeypatch):
    """The same gradient objects at every step (zero_grad(set_to_none=False)), one of them changed."""
    counter, ours, theirs, opt, ref = _warm(monkeypatch, same_grads=True)
    if how == "transposed in place":
        for p in (ours[1], theirs[1]):
            p.grad.t_()  # a square gradient, transposed: column-major now
        assert not ours[1].grad.is_contiguous()
    else:
        for p in (ours[1], theirs[1]):
            p.grad = torch._neg_view(-p.grad)  # same values, memory negated: torch's ops only
        assert ours[1].grad.is_neg()
    for s in (5, 6):
        assert _both_step(opt, ref, counter) == 1
        _assert_matches(ours, theirs, f"gradient {how}, step {s}")


@pytest.mark.parametrize("how, message", [
    ("dtype", "gradient"),
    ("shape", "gradient"),
])
def test_a_gradients_data_replaced_is_an_error_that_changes_nothing(how, message, check, monkeypatch):
    """``p.grad.data = ...`` changes a gradient without a new object or a version bump."""
    counter, ours, theirs, opt, ref = _warm(monkeypatch, same_grads=True)
    g = ours[2].grad
    g.data = g.data.double() if how == "dtype" else torch.randn(7, device=g.device)
    before = [p.detach().clone() for p in ours]
    state = {k: v.clone() for k, v in opt.state[ours[2]].items()}
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, ours))
    assert all(torch.equal(v, opt.state[ours[2]][k]) for k, v in state.items())


def test_another_stride_of_the_same_contiguity_keeps_the_route(check, monkeypatch):
    """A (3, 1) gradient with strides (1, 3) is as contiguous as one with (1, 1): the guard (which reads
    strides) misses, the signature holds, so the route and its launch plans stay and a new watch is taken."""
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    buckets = opt._route.buckets
    for s in (5, 6, 7):
        _set_grads(ours, theirs, s)
        if s == 5:
            ours[3].grad = ours[3].grad.reshape(1, 3).t()  # the same values
            assert ours[3].grad.stride() == (1, 3) and ours[3].grad.is_contiguous()
        assert _both_step(opt, ref, counter) == 1
        assert opt._route.buckets is buckets
        _assert_matches(ours, theirs, f"strides, step {s}")


@pytest.mark.parametrize("name, value, error, message", [
    ("rho", 1.5, ValueError, "Invalid rho value"),
    ("eps", -1.0, ValueError, "Invalid epsilon value"),
    ("maximize", "yes", TypeError, "maximize must be a bool"),
    ("seed", -3, ValueError, "seed must be an integer"),
])
def test_a_group_value_made_invalid_after_cached_steps_raises_and_changes_nothing(name, value, error, message,
                                                                                    monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    kept = opt.param_groups[1][name]
    opt.param_groups[1][name] = value
    _set_grads(ours, theirs, 5)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(error, match=message):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, ours))
    opt.param_groups[1][name] = kept
    assert _both_step(opt, ref, counter) == 1
    _assert_matches(ours, theirs, f"after an invalid {name}")


def test_a_tensor_lr_is_checked_at_every_step(monkeypatch):
    """A tensor can change shape in place with the same object in the group: it is never taken as checked."""
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    lr = torch.tensor(1.0)
    opt.param_groups[0]["lr"] = lr
    _set_grads(ours, theirs, 5)
    assert _both_step(opt, ref, counter) == 1
    _assert_matches(ours, theirs, "tensor lr")
    lr.resize_(2)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(ValueError, match="1-element"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, ours))


def test_the_pointer_table_flags_misaligned_tensors_and_uploads_only_changes():
    cpu = torch.device("cpu")
    table = PointerTable(cpu, [True, True, False])  # the third tensor's size is not a whole vector
    first = table.refresh([16, 32, 48], [64, 72, 96])
    assert first.tolist() == [16, 32, 48, 64, 72, 96, 1, 0, 0]
    assert table.refresh([16, 32, 48], [64, 72, 96]) is first, "same addresses: no new table"
    assert table.refresh([16, 32, 48], [64, 80, 96]).tolist()[-3:] == [1, 1, 0]
    assert PointerTable(cpu, [True, True]).refresh([4096, 4100]).tolist() == [4096, 4100, 1, 0]
    assert PointerTable(cpu, []).refresh([], []).numel() == 0


def test_misaligned_parameters_and_gradients_match_torch(monkeypatch):
    """Tensors at 4-byte offsets into a buffer (no 16-byte alignment): launched on the unaligned
    specialisation only, and updated right."""
    counter = _count_launches(monkeypatch)
    sizes = [33, 64, 9]
    gen = torch.Generator().manual_seed(41)
    base = torch.randn(sum(sizes) + len(sizes), generator=gen).to(KERNEL_DEVICE)
    ours, start = [], 1
    for n in sizes:
        ours.append(torch.nn.Parameter(base[start:start + n]))
        start += n + 1
    theirs = [p.detach().cpu().clone().requires_grad_() for p in ours]
    opt, ref = Adadelta(ours, lr=0.5), torch.optim.Adadelta(theirs, lr=0.5, foreach=False)
    for s in range(3):
        grads = torch.randn(sum(sizes) + 1, generator=gen)
        offset = 1
        for p, q in zip(ours, theirs):
            g = grads[offset:offset + p.numel()]
            offset += p.numel()
            p.grad, q.grad = g.to(KERNEL_DEVICE), g.clone()
        assert _both_step(opt, ref, counter) == 1
        _assert_matches(ours, theirs, f"misaligned, step {s}")
    assert [launch.aligned for launch in opt._route.buckets[0].plan.launches] == [False]
