"""The cached route of step(): what changes between two steps is noticed, and the result stays torch's.

step() checks and routes the tensors (kernel bucket or PyTorch path, missing state) only when the
step's signature changes: per parameter, whether it has a gradient, and the type, dtype, shape,
device and contiguity of both; plus the groups' options and the state dict. Each test here takes
warm-up steps (so a route is cached), changes one thing, and steps on, against torch.optim.Adadelta
and counting kernel launches.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_kernel, use_path
from helpers import assert_close_rel, bf16_ulp, make_params
from test_kernel import _count_launches

from triton_adadelta import Adadelta
from triton_adadelta.reference import join_remainder

pytestmark = needs_kernel

# Sizes that are no multiple of 4: every tensor takes the kernel's unaligned specialisation, so a
# bucket is one launch (a bucket mixing aligned and unaligned tensors is two: tests/test_codegen.py).
SHAPES = [(33,), (7, 5), (129,), (6,), (1,)]


def _setup():
    ours = make_params(SHAPES, torch.float32, KERNEL_DEVICE, seed=21)
    theirs = [p.detach().cpu().clone().requires_grad_() for p in ours]
    groups = lambda ps: [dict(params=ps[:3]), dict(params=ps[3:], lr=0.5, weight_decay=0.1)]  # noqa: E731
    return ours, theirs, Adadelta(groups(ours)), torch.optim.Adadelta(groups(theirs), foreach=False)


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _step(opt, ref, ours, theirs, seed, counter, skip=()):
    for i, (p, q, g) in enumerate(zip(ours, theirs, _grads(theirs, seed))):
        if i in skip:
            p.grad = q.grad = None
        else:
            p.grad, q.grad = g.to(p.device), g.clone()
    before = counter["n"]
    opt.step()
    ref.step()
    return counter["n"] - before


def _assert_matches(opt, ref, ours, theirs, what, was_16bit=()):
    """Against torch; a parameter that is or was bf16 within 1e-2 (torch adds weight decay to a
    16-bit gradient in 16 bits, we in float32)."""
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert p.dtype == q.dtype
        tol = 1e-5 if p.dtype == torch.float32 and i not in was_16bit else 1e-2
        assert_close_rel(p.detach().cpu().float(), q.detach().float(), rtol=tol, atol=tol, what=f"{what}: param {i}")
        if q in ref.state:
            assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]), f"{what}: step of param {i}"
            assert_close_rel(opt.state[p]["square_avg"].cpu(), ref.state[q]["square_avg"].float(), rtol=tol,
                             atol=1e-7, what=f"{what}: square_avg of param {i}")
            # acc_delta is ~1e-6 after a few steps: relative to its own scale only.
            assert_close_rel(opt.state[p]["acc_delta"].cpu(), ref.state[q]["acc_delta"].float(), rtol=tol,
                             what=f"{what}: acc_delta of param {i}")


def _assert_within_rounding(actual, expected, what):
    """float32: within 1e-5 of the tensor's scale; bfloat16: within one ulp of each expected value (both
    paths round nearly the same float32 value to nearest)."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype, what
    if e.dtype == torch.bfloat16:
        diff = (a.float() - e.float()).abs()
        assert bool((diff <= bf16_ulp(e.float())).all()), f"{what}: more than one bf16 ulp ({float(diff.max())})"
    else:
        assert_close_rel(a, e, rtol=1e-5, what=what)


def _moved_ulps(now, start) -> float:
    """The largest movement from ``start``, in bf16 ulps of the start values."""
    now, start = now.detach().cpu().float(), start.detach().cpu().float()
    return float(((now - start).abs() / bf16_ulp(start)).max())


def _warm(monkeypatch):
    counter = _count_launches(monkeypatch)
    ours, theirs, opt, ref = _setup()
    for s in range(2):
        assert _step(opt, ref, ours, theirs, s, counter) == 1
    assert opt._route is not None and opt._route.signature is not None, "a route is cached"
    return counter, ours, theirs, opt, ref


def test_a_gradient_set_to_none_skips_that_parameter(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    frozen = ours[1].detach().clone()
    assert _step(opt, ref, ours, theirs, 5, counter, skip={1}) == 1
    assert torch.equal(ours[1].detach(), frozen)
    assert _step(opt, ref, ours, theirs, 6, counter) == 1  # and back
    _assert_matches(opt, ref, ours, theirs, "grad None")


def test_a_non_contiguous_gradient_takes_the_pytorch_path(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    for s in (5, 6):
        grads = _grads(theirs, s)
        for i, (p, q, g) in enumerate(zip(ours, theirs, grads)):
            q.grad = g.clone()
            p.grad = g.to(p.device) if i != 1 else torch.stack([g, g], -1)[..., 0].to(p.device)
        assert not ours[1].grad.is_contiguous()
        before = counter["n"]
        opt.step()
        ref.step()
        assert counter["n"] - before == 1
    _assert_matches(opt, ref, ours, theirs, "non-contiguous gradient")


def test_a_parameter_changing_dtype_gets_its_own_launch(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    for p in (ours[2], theirs[2]):
        p.data = p.data.to(torch.bfloat16)
    assert _step(opt, ref, ours, theirs, 5, counter) == 2, "an fp32 and a bf16 launch"
    assert _step(opt, ref, ours, theirs, 6, counter) == 2
    _assert_matches(opt, ref, ours, theirs, "dtype change")


def test_a_parameter_changing_dtype_under_float32_gradients_changes_bucket(monkeypatch):
    """bf16 parameters may take float32 gradients: a dtype change then shows in the parameter alone."""
    from helpers import set_grads

    counter = _count_launches(monkeypatch)
    ours = make_params([(33,), (65,)], torch.bfloat16, KERNEL_DEVICE, seed=24)
    reference = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref = Adadelta(ours), Adadelta(reference, fused=False)
    for step in range(4):
        if step == 2:
            for p in (ours[1], reference[1]):
                p.data = p.data.to(torch.float32)
        grads = [g.float() for g in _grads(ours, step)]
        set_grads(ours, grads)
        set_grads(reference, grads)
        before = counter["n"]
        opt.step()
        ref.step()
        assert counter["n"] - before == (1 if step < 2 else 2)
        for i, (p, q) in enumerate(zip(ours, reference)):
            assert p.dtype == q.dtype
            _assert_within_rounding(p, q, f"step {step}, {i}")
            _assert_within_rounding(opt.state[p]["acc_delta"], ref.state[q]["acc_delta"], f"step {step}, acc_delta {i}")
    start = make_params([(33,), (65,)], torch.bfloat16, "cpu", seed=24)
    # The tolerance is far below the movement: a kernel that did not move the parameters would fail.
    assert all(_moved_ulps(q, s) >= 5 for q, s in zip(reference, start))


def test_a_group_switched_to_fused_false_leaves_the_kernel(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    opt.param_groups[1]["fused"] = False
    assert _step(opt, ref, ours, theirs, 5, counter) == 1  # group 0 only
    opt.param_groups[0]["fused"] = False
    assert _step(opt, ref, ours, theirs, 6, counter) == 0
    _assert_matches(opt, ref, ours, theirs, "fused=False")


def test_a_new_param_group_joins_the_launch(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    extra = make_params([(17,), (3, 3)], torch.float32, KERNEL_DEVICE, seed=22)
    extra_ref = [p.detach().cpu().clone().requires_grad_() for p in extra]
    opt.add_param_group(dict(params=extra, lr=0.25))
    ref.add_param_group(dict(params=extra_ref, lr=0.25))
    ours, theirs = ours + extra, theirs + extra_ref
    assert _step(opt, ref, ours, theirs, 5, counter) == 1
    assert _step(opt, ref, ours, theirs, 6, counter) == 1
    _assert_matches(opt, ref, ours, theirs, "new group")


def test_a_resized_parameter_after_cached_steps_raises_and_changes_nothing(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    kept = ours[3].data
    ours[3].data = torch.randn(9, device=KERNEL_DEVICE)  # the state has 8 elements
    ours[3].grad = torch.randn(9, device=KERNEL_DEVICE)
    before = [p.detach().clone() for p in ours]
    state = {k: v.clone() for k, v in opt.state[ours[0]].items()}
    with pytest.raises(RuntimeError, match="state of parameter 0 of group 1 has shape"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours))
    assert all(torch.equal(v, opt.state[ours[0]][k]) for k, v in state.items())
    ours[3].grad = None
    ours[3].data = kept
    assert _step(opt, ref, ours, theirs, 5, counter) == 1  # a good step afterwards
    _assert_matches(opt, ref, ours, theirs, "after an error")


@pytest.mark.parametrize("how", ["assign", "clear", "del"])
def test_a_reset_state_starts_again_from_zero_like_torch(how, monkeypatch):
    """``opt.state[p] = {}`` (or clear, or del) between cached steps: p's state starts from zero, as in torch."""
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    sizes = [f.size for f in opt._store.flats.values()]
    for o, p in ((opt, ours[1]), (ref, theirs[1])):
        if how == "assign":
            o.state[p] = {}
        elif how == "clear":
            o.state[p].clear()
        else:
            del o.state[p]
    assert _step(opt, ref, ours, theirs, 5, counter) == 1
    assert float(opt.state[ours[1]]["step"]) == 1.0
    assert _step(opt, ref, ours, theirs, 6, counter) == 1
    _assert_matches(opt, ref, ours, theirs, f"reset ({how})")
    assert [f.size for f in opt._store.flats.values()] == sizes, \
        "the old segment was dropped, not kept beside the new one"


@pytest.mark.parametrize("path", ["kernel", "cpu_fused", "reference"])
def test_replaced_state_tensors_are_taken_up_like_torch(path, monkeypatch):
    """``opt.state[p]["square_avg"] = new_tensor`` (not an in-place copy) and a replaced step count:
    torch updates whatever opt.state holds, so the next step starts from those values here too."""
    if path == "cpu_fused" and KERNEL_DEVICE != "cpu":
        pytest.skip("CPU tensors only")
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    if path == "cpu_fused":
        use_path("cpu-fused", monkeypatch)  # the C update must build and run
    if path == "reference":
        for g in opt.param_groups:
            g["fused"] = False
    for o, p in ((opt, ours[0]), (ref, theirs[0])):
        o.state[p]["square_avg"] = torch.full(p.shape, 0.25, device=p.device)
        o.state[p]["acc_delta"] = torch.full(p.shape, 2.0, device=p.device)
        o.state[p]["step"] = torch.tensor(10.0)
    assert _step(opt, ref, ours, theirs, 5, counter) == (1 if path == "kernel" else 0)
    assert float(opt.state[ours[0]]["step"]) == 11.0
    flat = next(iter(opt._store.flats.values()))
    assert not flat.replaced(ours[0], opt.state[ours[0]]), "the views are handed out again"
    assert _step(opt, ref, ours, theirs, 6, counter) == (1 if path == "kernel" else 0)
    _assert_matches(opt, ref, ours, theirs, f"replaced state ({path})")


@pytest.mark.parametrize("name, shape, message", [
    # square_avg is checked with the parameter's shape by the step's input checks; any entry when it is taken up
    ("square_avg", (3,), "state of parameter 2 of group 0 has shape"),
    ("acc_delta", (1,), "'acc_delta' of parameter 2 of group 0 was replaced by a tensor of shape"),
])
def test_a_replaced_state_tensor_of_the_wrong_shape_is_an_error_that_changes_nothing(name, shape, message,
                                                                                      monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    opt.state[ours[2]][name] = torch.zeros(shape, device=KERNEL_DEVICE)
    before = [p.detach().clone() for p in ours]
    for p, g in zip(ours, _grads(ours, 5)):
        p.grad = g
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours))


def test_opt_state_is_torchs_defaultdict_and_keeps_counting_after_copies(monkeypatch):
    import copy
    import pickle
    from collections import defaultdict

    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    assert isinstance(opt.state, defaultdict) and opt.state.default_factory is dict
    fresh = torch.zeros(2)
    assert opt.state[fresh] == {} and fresh in opt.state  # a missing key gets an empty entry, as in torch
    del opt.state[fresh]
    for other in (pickle.loads(pickle.dumps(opt)).state, copy.deepcopy(opt).state, opt.state.copy()):
        assert type(other) is type(opt.state) and len(other) == len(opt.state)
        v = other.version
        next(iter(other.values())).clear()
        assert other.version > v


def test_a_loaded_state_dict_is_used_by_the_next_step(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    # Load torch's state after one more torch-only step: ours must continue from it, not from its own.
    for q, g in zip(theirs, _grads(theirs, 9)):
        q.grad = g
    ref.step()
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q.to(p.device))
    opt.load_state_dict(ref.state_dict())
    assert _step(opt, ref, ours, theirs, 5, counter) == 1
    _assert_matches(opt, ref, ours, theirs, "loaded state")


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="switches the interpreter off: CPU tensors only")
def test_switching_the_interpreter_off_moves_cpu_tensors_to_the_fused_cpu_path(monkeypatch):
    counter, ours, theirs, opt, ref = _warm(monkeypatch)
    use_path("cpu-fused", monkeypatch)  # the interpreter off; the C update must build and run
    assert _step(opt, ref, ours, theirs, 5, counter) == 0
    _assert_matches(opt, ref, ours, theirs, "interpreter off")


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone (gloo) and its 1-device CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if KERNEL_DEVICE != "cpu":
        pytest.skip("a CPU mesh: CPU tensors only")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_parameters_keep_a_cached_route_until_a_placement_changes(monkeypatch, one_rank):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    counter = _count_launches(monkeypatch)
    plain = make_params(SHAPES, torch.float32, "cpu", seed=23)
    theirs = [p.detach().clone().requires_grad_() for p in plain]
    ours = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), one_rank, [Shard(0)])) for p in plain]
    opt, ref = Adadelta(ours, lr=0.5), torch.optim.Adadelta(theirs, lr=0.5, foreach=False)
    routes = []
    for step in range(5):
        placement = Shard(0) if step < 3 else Replicate()
        for p, q, g in zip(ours, theirs, _grads(theirs, step)):
            q.grad = g.clone()
            p.grad = distribute_tensor(g.clone(), one_rank, [placement])
        before = counter["n"]
        opt.step()
        ref.step()
        assert counter["n"] - before == 1
        routes.append(opt._route)
    assert routes[1] is routes[2], "same DTensor metadata: the route is reused"
    assert routes[3] is not routes[2], "another gradient placement: routed afresh"
    assert routes[4] is routes[3]
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_close_rel(p.to_local().detach(), q.detach(), rtol=1e-5, atol=1e-5, what=f"param {i}")


def _random_change(rng, opt, ref, ours, theirs, was_16bit):
    """One change of the kind a training script makes between steps, to both optimizers alike."""
    kind = rng.choice(["none", "grad_none", "noncontiguous", "strided_param", "dtype", "fused", "lr", "group", "load",
                       "reset"])
    if kind == "reset":
        i = rng.randrange(len(ours))
        opt.state[ours[i]] = {}
        ref.state[theirs[i]] = {}
    elif kind == "load":  # torch's state into ours (the values agree already: this tests the reload itself)
        fused = [g["fused"] for g in opt.param_groups]
        opt.load_state_dict(ref.state_dict())
        for g, f in zip(opt.param_groups, fused):
            g["fused"] = f  # torch's groups carry fused=None
    elif kind == "strided_param":  # same shape and values, column-major storage (then back)
        for p in (ours[1], theirs[1]):
            p.data = p.data.t().contiguous().t() if p.is_contiguous() else p.data.contiguous()
    elif kind == "dtype":
        i = rng.randrange(len(ours))
        dtype = rng.choice([torch.float32, torch.bfloat16])
        if dtype == torch.bfloat16:
            was_16bit.add(i)
        for p in (ours[i], theirs[i]):
            p.data = p.data.to(dtype)
    elif kind == "fused":
        gi = rng.randrange(len(opt.param_groups))
        opt.param_groups[gi]["fused"] = rng.choice([None, False])
    elif kind == "lr":
        gi = rng.randrange(len(opt.param_groups))
        opt.param_groups[gi]["lr"] = ref.param_groups[gi]["lr"] = rng.choice([0.1, 1.0, 2.0])
    elif kind == "group":
        new = make_params([(rng.randrange(1, 40),)], torch.float32, KERNEL_DEVICE, seed=rng.randrange(1000))
        new_ref = [p.detach().cpu().clone().requires_grad_() for p in new]
        opt.add_param_group(dict(params=new, lr=0.3))
        ref.add_param_group(dict(params=new_ref, lr=0.3))
        ours.extend(new)
        theirs.extend(new_ref)
    return kind


@pytest.mark.parametrize("path", ["kernel", "cpu_fused"])
@pytest.mark.parametrize("seed", range(6))
def test_random_changes_between_steps_match_torch(path, seed, monkeypatch):
    """Random sequences of the changes above, several per run: the route must follow every one."""
    import random

    if path == "cpu_fused":
        if KERNEL_DEVICE != "cpu":
            pytest.skip("CPU tensors only")
        use_path("cpu-fused", monkeypatch)  # the C update must build and run
    rng = random.Random(seed)
    ours, theirs, opt, ref = _setup()
    was_16bit: set[int] = set()
    for step in range(10):
        kind = _random_change(rng, opt, ref, ours, theirs, was_16bit)
        skip = {rng.randrange(len(ours))} if kind == "grad_none" else set()
        grads = _grads(theirs, 100 * seed + step)
        for i, (p, q, g) in enumerate(zip(ours, theirs, grads)):
            if i in skip:
                p.grad = q.grad = None
                continue
            q.grad = g.clone()
            if kind == "noncontiguous" and i == 0:
                p.grad = torch.stack([g, g], -1)[..., 0].to(p.device)
            else:
                p.grad = g.to(p.device)
        opt.step()
        ref.step()
        _assert_matches(opt, ref, ours, theirs, f"seed {seed}, step {step} after '{kind}'", was_16bit)


@pytest.mark.parametrize("master_weights", [True, "remainder"])
@pytest.mark.parametrize("fused", [None, False])
def test_master_weights_follow_a_dtype_change_and_back(master_weights, fused):
    """bf16 -> float32 drops the master (a float32 parameter is its own); back to bf16 starts a new one
    from the parameter. The run stays close to a float32 torch run, and its state_dict loads."""
    gen = torch.Generator().manual_seed(25)
    ours = [torch.nn.Parameter(torch.randn(n, generator=gen).bfloat16().to(KERNEL_DEVICE)) for n in (100, 37)]
    theirs = [torch.nn.Parameter(p.detach().cpu().float()) for p in ours]
    start = [q.detach().clone() for q in theirs]
    opt = Adadelta(ours, lr=0.5, master_weights=master_weights, fused=fused)
    ref = torch.optim.Adadelta(theirs, lr=0.5)
    for step in range(6):
        if step in (2, 4):
            # float32 -> the parameter, the bf16 rounding of the master; bf16 -> a bf16 rounding too:
            # torch's float32 run gets the same rounding, so the runs stay float32-close.
            with torch.no_grad():
                theirs[0].copy_(theirs[0].bfloat16().float())
            ours[0].data = ours[0].data.float() if step == 2 else ours[0].data.bfloat16()
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, q.grad = g.to(p.device), g.float()
        opt.step()
        ref.step()
        assert ("master" in opt.state[ours[0]]) == (ours[0].dtype == torch.bfloat16)
        for i, (p, q) in enumerate(zip(ours, theirs)):
            st = opt.state[p]
            if p.dtype == torch.bfloat16:  # the master against torch's float32 weights, the parameter its rounding
                m = st["master"] if master_weights is True else join_remainder(p.detach(), st["master"])
                assert_close_rel(m.cpu(), q.detach(), rtol=1e-5, what=f"step {step}, master {i}")
                _assert_within_rounding(p, q.detach().bfloat16(), f"step {step}, param {i}")
            else:
                assert_close_rel(p.detach().cpu(), q.detach(), rtol=1e-5, what=f"step {step}, param {i}")
            assert_close_rel(st["acc_delta"].cpu(), ref.state[q]["acc_delta"], rtol=1e-5,
                             what=f"step {step}, acc_delta {i}")
            assert float(st["step"]) == step + 1
    # The tolerance (1e-5 of the weights) is far below the movement: 6 steps move them by many bf16 ulps.
    assert all(_moved_ulps(q, s) >= 5 for q, s in zip(theirs, start))
    again = Adadelta(ours, lr=0.5, master_weights=master_weights, fused=fused)
    again.load_state_dict(opt.state_dict())
    for p in ours:
        for k, v in opt.state[p].items():
            assert torch.equal(again.state[p][k], v), k
