"""The default path against torch.optim.Adadelta: numbers, state_dict, schedulers, errors."""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch
from conftest import use_path
from helpers import assert_close_rel, make_params, random_grads, set_grads

from triton_adadelta import Adadelta

SHAPES = [(0,), (1,), (), (7,), (3, 5), (33, 17), (4, 0, 3), (129,)]
DTYPES = [torch.float32, torch.float64, torch.complex64]
RTOL = {torch.float32: 1e-5, torch.complex64: 1e-5, torch.float64: 1e-12}


def _random_hparams(rng: random.Random) -> dict:
    return dict(
        lr=rng.choice([1.0, 0.1, rng.uniform(0.01, 2.0)]),
        rho=rng.choice([0.0, 1.0, 0.9, rng.uniform(0.0, 1.0)]),
        eps=rng.choice([1e-6, 1e-8, rng.uniform(1e-8, 1e-2)]),
        weight_decay=rng.choice([0.0, rng.uniform(0.0, 0.1)]),
        maximize=rng.choice([False, True]),
    )


def _noncontiguous(shape_params):
    # A column slice of a bigger tensor: a non-contiguous view used directly as a parameter.
    base = torch.randn(6, 10, dtype=shape_params.dtype) if not shape_params.is_complex() else torch.randn(
        6, 10, dtype=shape_params.dtype)
    return base[:, ::3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(6))
def test_matches_torch_over_steps(dtype, seed):
    rng = random.Random(seed)
    params = make_params(SHAPES, dtype, seed=seed)
    params.append(_noncontiguous(params[0]))
    theirs = [p.clone() if p.is_contiguous() else p.clone().t().contiguous().t()[:, :] for p in params]
    # Split into three groups with their own hyperparameters.
    cut1, cut2 = 3, 6
    hp = [_random_hparams(rng) for _ in range(3)]
    ours_opt = Adadelta([dict(params=params[:cut1], **hp[0]), dict(params=params[cut1:cut2], **hp[1]),
                         dict(params=params[cut2:], **hp[2])])
    torch_opt = torch.optim.Adadelta([dict(params=theirs[:cut1], **hp[0]),
                                      dict(params=theirs[cut1:cut2], **hp[1]),
                                      dict(params=theirs[cut2:], **hp[2])])
    for step in range(12):
        grads = random_grads(params, seed=1000 * seed + step)
        set_grads(params, grads)
        set_grads(theirs, grads)
        ours_opt.step()
        torch_opt.step()
    for i, (a, b) in enumerate(zip(params, theirs)):
        assert_close_rel(a, b, rtol=RTOL[dtype], atol=RTOL[dtype], what=f"param {i}")
        sa, sb = ours_opt.state[a], torch_opt.state[b]
        assert float(sa["step"]) == float(sb["step"]) == 12
        assert_close_rel(sa["square_avg"], sb["square_avg"], rtol=RTOL[dtype], atol=1e-12, what="square_avg")
        assert_close_rel(sa["acc_delta"], sb["acc_delta"], rtol=RTOL[dtype], atol=1e-12, what="acc_delta")


def test_none_grads_are_skipped_like_torch():
    params = make_params([(5,), (6,)], torch.float32)
    theirs = [p.clone() for p in params]
    ours_opt, torch_opt = Adadelta(params, lr=0.5), torch.optim.Adadelta(theirs, lr=0.5)
    for step in range(3):
        grads = random_grads(params, seed=step)
        params[0].grad, theirs[0].grad = grads[0].clone(), grads[0].clone()
        params[1].grad = theirs[1].grad = None
        ours_opt.step()
        torch_opt.step()
    assert len(ours_opt.state[params[1]]) == 0 and len(torch_opt.state[theirs[1]]) == 0
    torch.testing.assert_close(params[0], theirs[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(params[1], theirs[1], rtol=0, atol=0)


def test_tensor_lr_and_closure():
    params = make_params([(9,)], torch.float32)
    theirs = [p.clone() for p in params]
    ours_opt = Adadelta(params, lr=torch.tensor(0.7))
    torch_opt = torch.optim.Adadelta(theirs, lr=torch.tensor(0.7))
    for step in range(4):
        grads = random_grads(params, seed=step)

        def closure(ps=params, gs=grads, t=step):
            set_grads(ps, gs)
            return torch.tensor(float(t))

        assert float(ours_opt.step(closure)) == step
        set_grads(theirs, grads)
        torch_opt.step()
    torch.testing.assert_close(params[0], theirs[0], rtol=1e-6, atol=0)


def _train(opt_params, opt, steps, seed0):
    for step in range(steps):
        set_grads(opt_params, random_grads(opt_params, seed=seed0 + step))
        opt.step()


def test_state_dict_ours_to_torch_and_back():
    shapes = [(4, 3), (11,), ()]
    a = make_params(shapes, torch.float32)
    ours_opt = Adadelta([dict(params=a[:2]), dict(params=a[2:], lr=0.3)], rho=0.8)
    _train(a, ours_opt, 5, 0)
    sd = ours_opt.state_dict()
    assert set(sd["state"][0]) >= {"step", "square_avg", "acc_delta"}

    b = [p.clone() for p in a]
    torch_opt = torch.optim.Adadelta([dict(params=b[:2]), dict(params=b[2:], lr=0.3)], rho=0.8)
    torch_opt.load_state_dict(copy.deepcopy(sd))
    c = [p.clone() for p in a]
    ours2 = Adadelta([dict(params=c[:2]), dict(params=c[2:], lr=0.3)], rho=0.8)
    ours2.load_state_dict(torch_opt.state_dict())
    # The loaded state went into flat buffers.
    flat = next(iter(ours2._store.flats.values()))
    assert ours2.state[c[0]]["square_avg"].untyped_storage().data_ptr() == flat.square_avg.untyped_storage().data_ptr()

    _train(a, ours_opt, 5, 100)
    _train(b, torch_opt, 5, 100)
    _train(c, ours2, 5, 100)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x, z, rtol=0, atol=0)
    assert float(ours2.state[c[0]]["step"]) == 10


def test_torch_state_dict_into_ours_with_bf16_keeps_fp32_state():
    torch_p = [torch.randn(10, dtype=torch.float32)]
    torch_opt = torch.optim.Adadelta(torch_p)
    _train(torch_p, torch_opt, 3, 0)
    ours_p = [torch_p[0].detach().clone()]
    ours_opt = Adadelta(ours_p)
    ours_opt.load_state_dict(torch_opt.state_dict())
    assert ours_opt.state[ours_p[0]]["square_avg"].dtype == torch.float32
    torch.testing.assert_close(ours_opt.state[ours_p[0]]["square_avg"], torch_opt.state[torch_p[0]]["square_avg"])


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10, cycle_momentum=False),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + 0.3 * t)),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    ],
    ids=["step", "cosine", "onecycle", "lambda", "plateau"],
)
def test_lr_schedulers_take_effect(make_sched):
    a = make_params([(8,), (3, 3)], torch.float32)
    b = [p.clone() for p in a]
    ours_opt, torch_opt = Adadelta(a), torch.optim.Adadelta(b)
    s1, s2 = make_sched(ours_opt), make_sched(torch_opt)
    lrs = []
    for step in range(6):
        grads = random_grads(a, seed=step)
        set_grads(a, grads)
        set_grads(b, grads)
        ours_opt.step()
        torch_opt.step()
        if isinstance(s1, torch.optim.lr_scheduler.ReduceLROnPlateau):
            s1.step(1.0)
            s2.step(1.0)
        else:
            s1.step()
            s2.step()
        lrs.append(ours_opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, "the scheduler never changed the learning rate"
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(rho=1.5), "Invalid rho value: 1.5"),
        (dict(rho=-0.1), "Invalid rho value: -0.1"),
        (dict(eps=-1e-3), "Invalid epsilon value: -0.001"),
        (dict(weight_decay=-0.5), "Invalid weight_decay value: -0.5"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    ],
)
def test_bad_hyperparameters_raise_torchs_errors(kwargs, message):
    p = [torch.randn(3)]
    with pytest.raises(ValueError) as ours:
        Adadelta(p, **kwargs)
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adadelta(p, **kwargs)
    assert str(ours.value) == str(theirs.value) == message


def test_add_param_group_zero_grad_hooks_deepcopy_pickle():
    a = make_params([(5,)], torch.float32)
    opt = Adadelta(a, lr=0.5)
    extra = make_params([(7,)], torch.float32, seed=3)
    opt.add_param_group({"params": extra, "lr": 0.1})
    calls = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))
    _train(a + extra, opt, 2, 0)
    assert calls == ["pre", "post"] * 2
    opt.zero_grad()
    assert all(p.grad is None for p in a + extra)

    for copier in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        clone = copier(opt)
        cparams = [p for g in clone.param_groups for p in g["params"]]
        orig = [p.clone() for p in a + extra]
        clone_orig = [p.clone() for p in cparams]
        _train(cparams, clone, 3, 50)
        _train(a + extra, opt, 3, 50)
        # The copy has its own flat state: both continue identically from the same point.
        for p, q, o1, o2 in zip(a + extra, cparams, orig, clone_orig):
            torch.testing.assert_close(o1, o2, rtol=0, atol=0)
            torch.testing.assert_close(p, q, rtol=0, atol=0)
            assert q.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
        flat = next(iter(clone._store.flats.values()))
        st = clone.state[cparams[0]]["square_avg"]
        assert st.untyped_storage().data_ptr() == flat.square_avg.untyped_storage().data_ptr()


def test_state_dtype_none_follows_param_and_default_is_fp32():
    p16 = [torch.randn(10).to(torch.bfloat16)]
    opt = Adadelta(p16, state_dtype=None)
    set_grads(p16, random_grads(p16, 0))
    opt.step()
    assert opt.state[p16[0]]["square_avg"].dtype == torch.bfloat16
    q16 = [torch.randn(10).to(torch.bfloat16)]
    opt2 = Adadelta(q16)
    set_grads(q16, random_grads(q16, 0))
    opt2.step()
    assert opt2.state[q16[0]]["square_avg"].dtype == torch.float32
    assert opt2.state[q16[0]]["step"].dtype == torch.float32


def test_fused_true_on_cpu_without_a_fused_cpu_path_says_why(monkeypatch, tmp_path):
    """fused=True on CPU (no interpreter) needs the fused CPU path; without it the error says why."""
    from triton_adadelta import cpu_fused

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(cpu_fused, "ENABLED", False)
    with pytest.raises(RuntimeError, match="fused CPU path is switched off"):
        Adadelta([torch.randn(3)], fused=True)
    monkeypatch.setattr(cpu_fused, "ENABLED", True)
    monkeypatch.setattr(cpu_fused, "_library", None)
    monkeypatch.setenv("TRITON_ADADELTA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="fused CPU path cannot be built: cannot run the C compiler"):
        Adadelta([torch.randn(3)], fused=True)


def test_fused_with_differentiable_is_an_error():
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        Adadelta([torch.randn(3)], fused=True, differentiable=True)


def test_differentiable_matches_torch():
    w = torch.randn(4, requires_grad=True)
    p = [w.detach().clone()]
    q = [w.detach().clone()]
    ours_opt = Adadelta(p, differentiable=True)
    torch_opt = torch.optim.Adadelta(q, differentiable=True)
    for step in range(3):
        g = random_grads(p, step)
        set_grads(p, g)
        set_grads(q, g)
        ours_opt.step()
        torch_opt.step()
    torch.testing.assert_close(p[0], q[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", ["kernel", "cpu_fused", "reference"])
def test_parameter_dtype_change_keeps_its_state_like_torch(path, monkeypatch):
    """``p.data = p.data.to(dtype)`` (model.to(dtype)) after steps: the state follows the parameter, as in torch.

    The flat state is keyed by parameter dtype; before this was handled, the kernel read a bf16
    parameter as float32 (NaN, and writes past the end of its storage).
    """
    if path == "cpu_fused":
        use_path("cpu-fused", monkeypatch)  # the C update must build and run
    fused = {"kernel": None, "cpu_fused": True, "reference": False}[path]
    shapes = [(1000,), (7, 9), (129,), (64,)]
    ours = make_params(shapes, torch.float32, seed=3)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = Adadelta([dict(params=ours[:2]), dict(params=ours[2:], lr=0.5, weight_decay=0.1)], fused=fused)
    ref = torch.optim.Adadelta([dict(params=theirs[:2]), dict(params=theirs[2:], lr=0.5, weight_decay=0.1)])
    changes = {2: {0: torch.bfloat16, 2: torch.float16}, 4: {0: torch.float32}}  # step -> {param: new dtype}
    for step in range(7):
        for i, dtype in changes.get(step, {}).items():
            for p in (ours[i], theirs[i]):
                p.data = p.data.to(dtype)
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)).to(p.dtype)
                 for i, p in enumerate(ours)]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert a.dtype == b.dtype
            tol = 1e-5 if a.dtype == torch.float32 else 1e-2
            assert_close_rel(a.float(), b.float(), rtol=tol, atol=tol, what=f"step {step}, param {i}")
            for name in ("square_avg", "acc_delta"):
                assert opt.state[a][name].dtype == torch.float32
                # (torch adds weight decay to a 16-bit gradient in 16 bits; we do it in float32)
                assert_close_rel(opt.state[a][name], ref.state[b][name].float(), rtol=tol, atol=1e-7,
                                 what=f"step {step}, param {i} {name}")
            assert float(opt.state[a]["step"]) == float(ref.state[b]["step"]) == step + 1
    sd = opt.state_dict()
    assert [sd["state"][i]["square_avg"].dtype for i in range(4)] == [torch.float32] * 4
