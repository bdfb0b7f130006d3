"""Property-based tests: the optimizer against the plain-PyTorch reference on generated cases.

Hypothesis draws the shapes (empty, 0-d, odd sizes), dtypes, state dtypes, hyperparameters
(including the ends of their ranges), several param groups, and gradients with zeros, tiny and
huge values. Profiles: ``ci`` (the default: 30 examples a test, no deadline) and ``thorough``
(300), chosen with ``HYPOTHESIS_PROFILE=thorough``. The fused-path tests enumerate every dtype,
rounding and master-weights combination explicitly (66 for the kernel, 11 for the fused CPU path)
and draw 3 examples of each in CI (30 when thorough); every kernel problem has a tensor longer than
two kernel blocks.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import KERNEL_DEVICE, fused_cpu_library, needs_kernel
from helpers import bf16_ulp, resync_reference, set_grads
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from triton_adadelta import Adadelta, adadelta_update_, cpu_fused
from triton_adadelta import optimizer as optimizer_module
from triton_adadelta.reference import join_remainder

# CI runs a fixed set of examples (derandomize) so that its verdict is reproducible; the "thorough"
# profile draws fresh examples for exploring.
settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# The fused-path tests enumerate their dtype / rounding / master combinations with parametrize (every
# one reached in CI) and let Hypothesis draw the rest: a few examples per combination in CI.
CASE_PROFILE = settings(PROFILE, max_examples=max(3, PROFILE.max_examples // 10))

# Gradient magnitudes: zero, subnormal-ish, tiny, ordinary, huge (squares overflow float32), beyond fp16.
SCALES = [0.0, 1e-40, 1e-20, 1e-6, 1.0, 1e3, 1e20, 1e30]
LOW = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------ strategies

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@st.composite
def hyperparameters(draw):
    return dict(
        lr=draw(st.sampled_from([0.0, 1e-8, 1.0, 10.0]) | st.floats(0.0, 5.0)),
        rho=draw(st.sampled_from([0.0, 1.0, 0.9]) | st.floats(0.0, 1.0)),
        eps=draw(st.sampled_from([1e-6, 1e-10, 0.5]) | st.floats(1e-12, 1.0)),
        weight_decay=draw(st.sampled_from([0.0, 0.0, 1e-4]) | st.floats(0.0, 1.0)),
        maximize=draw(st.booleans()),
    )


@st.composite
def problems(draw, dtypes, max_groups=3, max_tensors=3):
    """Param groups of (shape, dtype) tensors, their hyperparameters, and gradient recipes per step."""
    groups = []
    for _ in range(draw(st.integers(1, max_groups))):
        tensors = [(draw(shapes), draw(st.sampled_from(dtypes))) for _ in range(draw(st.integers(1, max_tensors)))]
        groups.append((tensors, draw(hyperparameters())))
    n = sum(len(t) for t, _ in groups)
    steps = draw(st.integers(1, 3))
    # Per step and tensor: (scale, fraction of zeros, seed); a tensor may also have no gradient this step.
    recipe = [[(draw(st.sampled_from(SCALES)), draw(st.sampled_from([0.0, 0.5, 1.0])), draw(st.integers(0, 2**16)),
                draw(st.booleans())) for _ in range(n)] for step in range(steps)]
    return groups, recipe


def _build_params(groups, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for tensors, _ in groups:
        ps = []
        for shape, dtype in tensors:
            t = torch.randn((*shape, 2) if dtype.is_complex else shape, generator=gen, dtype=torch.float64)
            t = torch.view_as_complex(t) if dtype.is_complex else t
            ps.append(t.to(dtype).to(device))
        out.append(ps)
    return out


def _gradient(p: torch.Tensor, scale: float, zeros: float, seed: int, dtype=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    real_shape = (*p.shape, 2) if p.is_complex() else p.shape
    g = torch.randn(real_shape, generator=gen, dtype=torch.float64) * scale
    g = g * (torch.rand(real_shape, generator=gen, dtype=torch.float64) >= zeros)
    g = torch.view_as_complex(g) if p.is_complex() else g
    return g.to(dtype or p.dtype).to(p.device)


def _state_dtype(p: torch.Tensor, state_dtype):
    """The documented rule: float32 by default, the parameter's own dtype for None, and float64 and
    complex parameters always in their own precision."""
    if p.is_complex() or p.dtype == torch.float64 or state_dtype is None:
        return p.dtype
    return state_dtype


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    return t.view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str, scale: float = 0.0,
           subnormal_atol: float = 0.0) -> None:
    """Non-finite values must match exactly; finite ones within ``rtol`` of the tensor's finite scale
    (float32) or one unit in the last place of the expected value (bfloat16/float16 outputs).

    ``scale`` raises the float32 scale: for a parameter ``p - lr * d`` that nearly cancels, an
    operand's rounding error is relative to the operands (the old parameter), not to the result.

    ``subnormal_atol``: expected values below it in magnitude may differ by up to it (see INTERPRETER_SUBNORMALS)."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_complex():
        a, e = torch.view_as_real(a), torch.view_as_real(e)
        # A documented difference: torch ends with a complex multiply, param += (-lr) * delta, which spreads
        # a non-finite component of delta into the other component as NaN; we update the two real
        # components independently. So an element torch turned NaN only has to be non-finite somewhere in
        # ours; every other element must match exactly as below.
        spread = torch.isnan(e).any(-1) & (torch.isnan(a) != torch.isnan(e)).any(-1)
        assert bool((~torch.isfinite(a[spread])).any(-1).all()), f"{what}: a NaN element of torch is finite in ours"
        a, e = a[~spread], e[~spread]
    assert a.dtype == e.dtype and a.shape == e.shape, what
    a64, e64 = a.double(), e.double()
    fin = torch.isfinite(e64)
    assert torch.equal(torch.isnan(a64), torch.isnan(e64)), f"{what}: NaN positions differ"
    assert torch.equal(a64[~fin & ~torch.isnan(e64)], e64[~fin & ~torch.isnan(e64)]), f"{what}: Inf differs"
    if not bool(fin.any()):
        return
    diff = (a64[fin] - e64[fin]).abs()
    if a.dtype == torch.bfloat16:
        ok = diff <= bf16_ulp(e[fin]).double()
    elif a.dtype == torch.float16:
        ef = e[fin]
        up = torch.nextafter(ef.abs(), torch.tensor(float("inf"), dtype=torch.float16)).double() - ef.abs().double()
        ok = diff <= up
    else:
        ok = diff <= rtol * max(float(e64[fin].abs().max()), scale) + 1e-37
    if subnormal_atol:
        ok = ok | ((e64[fin].abs() < subnormal_atol) & (diff <= subnormal_atol))
    assert bool(ok.all()), f"{what}: max difference {float(diff.max())}"


def _finite_max(t: torch.Tensor) -> float:
    """The largest finite magnitude in ``t`` (0 when there is none)."""
    r = (torch.view_as_real(t) if t.is_complex() else t).detach().double()
    r = r[torch.isfinite(r)]
    return float(r.abs().max()) if r.numel() else 0.0


# ------------------------------------------------------------------------------------------ properties

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]


@PROFILE
@given(problem=problems(ALL_DTYPES), state_dtype=st.sampled_from([torch.float32, None, torch.bfloat16]),
       master=st.booleans())
def test_default_path_equals_reference_function(problem, state_dtype, master):
    """The CPU path of the optimizer (groups, flat state, dtype rules, step counts) is, bit for bit,
    adadelta_update_ applied tensor by tensor to state kept by the test."""
    groups, recipe = problem
    params = _build_params(groups, "cpu")
    opt = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(params, groups)], fused=False,
                   state_dtype=state_dtype, master_weights=master)
    flat_params = [p for ps in params for p in ps]
    hps = [hp for ps, (_, hp) in zip(params, groups) for _ in ps]
    mine = [p.clone() for p in flat_params]
    state = [None] * len(mine)
    for row in recipe:
        for p, (scale, zeros, seed, has_grad) in zip(flat_params, row):
            p.grad = _gradient(p, scale, zeros, seed) if has_grad else None
        opt.step()
        for i, (q, (scale, zeros, seed, has_grad)) in enumerate(zip(mine, row)):
            if not has_grad:
                continue
            if state[i] is None:
                sdt = _state_dtype(q, state_dtype)
                m = q.float().clone() if master and q.dtype in LOW else None
                state[i] = [torch.zeros_like(q, dtype=sdt), torch.zeros_like(q, dtype=sdt), m, 0]
            v, u, m, n = state[i]
            adadelta_update_(q, _gradient(q, scale, zeros, seed), v, u, master=m, **hps[i])
            state[i][3] = n + 1
    for i, (p, q) in enumerate(zip(flat_params, mine)):
        assert _same_bits(p, q), f"parameter {i} ({p.dtype}, {tuple(p.shape)})"
        if state[i] is None:
            assert len(opt.state[p]) == 0
            continue
        st_ = opt.state[p]
        assert _same_bits(st_["square_avg"], state[i][0]), f"square_avg {i}"
        assert _same_bits(st_["acc_delta"], state[i][1]), f"acc_delta {i}"
        assert float(st_["step"]) == state[i][3]
        if state[i][2] is not None:
            assert _same_bits(st_["master"], state[i][2]), f"master {i}"


@PROFILE
@given(problem=problems([torch.float32, torch.float64, torch.complex64]))
def test_default_path_matches_torch(problem):
    """torch.optim.Adadelta computes in the parameter's dtype; ours too with state_dtype=None."""
    groups, recipe = problem
    params = _build_params(groups, "cpu")
    theirs = [[p.clone() for p in ps] for ps in params]
    opt = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(params, groups)], fused=False, state_dtype=None)
    ref = torch.optim.Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(theirs, groups)])
    flat, flat_theirs = [p for ps in params for p in ps], [p for ps in theirs for p in ps]
    for row in recipe:
        for p, q, (scale, zeros, seed, has_grad) in zip(flat, flat_theirs, row):
            g = _gradient(p, scale, zeros, seed) if has_grad else None
            p.grad, q.grad = g, (g.clone() if g is not None else None)
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(flat, flat_theirs)):
        # float64 is bit-exact; float32 may differ by the fused multiply-adds of torch's vectorised CPU loops.
        _close(p, q, 1e-12 if p.dtype == torch.float64 else 2e-6, f"parameter {i}")
        if len(ref.state[q]):
            _close(opt.state[p]["square_avg"], ref.state[q]["square_avg"], 2e-6, f"square_avg {i}")
            _close(opt.state[p]["acc_delta"], ref.state[q]["acc_delta"], 2e-6, f"acc_delta {i}")


def _reference_twin(opt: Adadelta, params, groups, options):
    """A reference-path optimizer on CPU copies of ``params``, with ``opt``'s state (and steps) so far."""
    ref_params = [[p.detach().cpu().clone() for p in ps] for ps in params]
    ref = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(ref_params, groups)], fused=False, **options)
    flat_ref = [p for ps in ref_params for p in ps]
    if opt.state:
        resync_reference(opt, ref, [p for ps in params for p in ps], flat_ref)
    return ref, flat_ref


# The Triton interpreter (3.9) converts a subnormal bfloat16 to float32 wrongly (its _convert_float
# renormalises the mantissa and then clamps the exponent), so a kernel that loads bfloat16 state or
# parameters with .to(tl.float32) reads values below 2^-126 wrongly there; a GPU converts exactly.
# Under the interpreter such values are compared to within 2^-126; everything else as on a GPU.
INTERPRETER_SUBNORMALS = 2.0**-126 if KERNEL_DEVICE == "cpu" else 0.0


def _assert_same_step(opt: Adadelta, ref: Adadelta, flat, flat_ref, before, steps: int,
                      subnormal_atol: float = 0.0) -> None:
    """Parameters and state of ``opt`` and its reference twin agree after one more step of each."""
    for i, (p, q) in enumerate(zip(flat, flat_ref)):
        _close(p, q, 1e-5, f"parameter {i}", scale=before[i], subnormal_atol=subnormal_atol)
        for name in ("square_avg", "acc_delta"):
            _close(opt.state[p][name], ref.state[q][name], 1e-5, f"{name} {i}", subnormal_atol=subnormal_atol)
        assert float(opt.state[p]["step"]) == steps


def _kernel_cases():
    """Every (parameter, gradient, state) dtype combination the kernel has, with and without stochastic
    rounding, under every master-weights mode the parameter dtype allows."""
    for p in (torch.float32, torch.bfloat16, torch.float16):
        for g in dict.fromkeys((p, torch.float32)):
            for s in (torch.float32, torch.bfloat16, torch.float16):
                masters = {torch.float32: [False], torch.bfloat16: [False, True, "remainder"],
                           torch.float16: [False, True]}[p]
                for stochastic in (False, True):
                    for master in masters:
                        yield pytest.param((p, g, s), stochastic, master, id="-".join(
                            [_short(p), _short(g), _short(s), "sr" if stochastic else "rn", f"master={master}"]))


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]


KERNEL_CASES = list(_kernel_cases())
# One tensor of every kernel problem spans more than two blocks of the kernel (BLOCK elements each).
MULTI_BLOCK = max(2 * 2048, 2 * optimizer_module._BLOCK) + 1


@st.composite
def kernel_problems(draw):
    """problems() of float32 tensors, the first of them longer than two kernel blocks."""
    groups, recipe = draw(problems([torch.float32], max_groups=2, max_tensors=2))
    (first, *rest), hp = groups[0]
    long = (draw(st.integers(MULTI_BLOCK, MULTI_BLOCK + 3000)),)
    return [([(long, first[1]), *rest], hp), *groups[1:]], recipe


@needs_kernel
@pytest.mark.parametrize("combo, stochastic, master", KERNEL_CASES)
@CASE_PROFILE
@given(problem=kernel_problems(), warmup=st.integers(0, 2))
def test_fused_kernel_matches_reference_path(combo, stochastic, master, problem, warmup):
    """One fused step against one reference-path step from the same parameters and state."""
    groups, recipe = problem
    pdtype, gdtype, sdtype = combo
    groups = [([(shape, pdtype) for shape, _ in ts], hp) for ts, hp in groups]
    params = _build_params(groups, KERNEL_DEVICE)
    options = dict(state_dtype=sdtype, stochastic_rounding=stochastic, master_weights=master)
    fused = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(params, groups)], fused=True, **options)
    flat = [p for ps in params for p in ps]
    assert flat[0].numel() >= MULTI_BLOCK
    row = recipe[0]

    def grads(step):
        return [_gradient(p, scale, zeros, seed + step, gdtype) for p, (scale, zeros, seed, _) in zip(flat, row)]

    for step in range(warmup):
        set_grads(flat, grads(step))
        fused.step()
    ref, flat_ref = _reference_twin(fused, params, groups, options)
    g = grads(warmup)
    set_grads(flat, g)
    set_grads(flat_ref, [x.cpu() for x in g])
    before = [_finite_max(q) for q in flat_ref]
    fused.step()
    ref.step()
    _assert_same_step(fused, ref, flat, flat_ref, before, warmup + 1, subnormal_atol=INTERPRETER_SUBNORMALS)
    if master:
        for i, (p, q) in enumerate(zip(flat, flat_ref)):
            m, mr = fused.state[p]["master"], ref.state[q]["master"]
            assert m.dtype == mr.dtype == (torch.int16 if master == "remainder" else torch.float32)
            if master == "remainder":
                m, mr = join_remainder(p.detach(), m), join_remainder(q.detach(), mr)
            _close(m, mr, 1e-5, f"master {i}", scale=before[i])


@PROFILE
@given(problem=problems([torch.float32, torch.bfloat16, torch.complex64], max_groups=2),
       poison=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]), where=st.integers(0, 10**6))
def test_skip_nonfinite_skips_exactly_the_bad_steps(problem, poison, where):
    """A step changes nothing iff some gradient is non-finite, and the counter counts those steps."""
    groups, recipe = problem
    params = _build_params(groups, "cpu")
    flat = [p for ps in params for p in ps]
    sizes = [p.numel() for p in flat]
    assume(poison is None or sum(sizes) > 0)
    opt = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(params, groups)], fused=False, skip_nonfinite=True)
    for p in flat:
        p.grad = _gradient(p, 1.0, 0.0, 1)
    opt.step()
    before = [p.clone() for p in flat]
    state_before = {i: (opt.state[p]["square_avg"].clone(), float(opt.state[p]["step"])) for i, p in enumerate(flat)}
    for p, (scale, zeros, seed, _) in zip(flat, recipe[0]):
        # Huge but finite (float32): must not count as non-finite. bf16/complex parts follow the dtype.
        p.grad = _gradient(p, min(scale, 1e30), zeros, seed)
    expect_skip = poison is not None
    if expect_skip:
        k = where % sum(sizes)
        for p in flat:
            if k < p.numel():
                p.grad.view(-1)[k] = poison
                break
            k -= p.numel()
    # Gradients that are non-finite by themselves (1e30 in bfloat16 is finite; check anyway).
    natural = any(not bool(torch.isfinite(torch.view_as_real(p.grad) if p.is_complex() else p.grad).all())
                  for p in flat)
    expect_skip = expect_skip or natural
    opt.step()
    assert int(opt.skipped_steps) == int(expect_skip)
    for i, p in enumerate(flat):
        if expect_skip:
            assert _same_bits(p, before[i]) and _same_bits(opt.state[p]["square_avg"], state_before[i][0])
            assert float(opt.state[p]["step"]) == state_before[i][1]
        else:
            assert float(opt.state[p]["step"]) == state_before[i][1] + 1


@PROFILE
@given(problem=problems([torch.float32, torch.float64, torch.bfloat16, torch.complex64], max_groups=2),
       split=st.integers(0, 3), state_dtype=st.sampled_from([torch.float32, None, torch.bfloat16]),
       stochastic=st.booleans())
def test_state_dict_round_trip_continues_identically(problem, split, state_dtype, stochastic):
    """Save after ``split`` steps, load into a fresh optimizer on copies, continue: bit-identical."""
    groups, recipe = problem
    recipe = recipe + recipe  # a longer run
    split = min(split, len(recipe))
    params = _build_params(groups, "cpu")
    options = dict(fused=False, state_dtype=state_dtype, stochastic_rounding=stochastic)
    opt = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(params, groups)], **options)
    flat = [p for ps in params for p in ps]

    def run(optimizer, ps, rows):
        for row in rows:
            for p, (scale, zeros, seed, has_grad) in zip(ps, row):
                p.grad = _gradient(p, scale, zeros, seed) if has_grad else None
            optimizer.step()

    run(opt, flat, recipe[:split])
    sd = copy.deepcopy(opt.state_dict())
    copies = [[p.detach().clone() for p in ps] for ps in params]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(split + 1)  # another default seed: the loaded one must win
        fresh = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(copies, groups)], **options)
    fresh.load_state_dict(sd)
    flat_copies = [p for ps in copies for p in ps]
    run(opt, flat, recipe[split:])
    run(fresh, flat_copies, recipe[split:])
    for i, (p, q) in enumerate(zip(flat, flat_copies)):
        assert _same_bits(p, q), f"parameter {i}"
        if len(opt.state[p]):
            for name in ("square_avg", "acc_delta", "step"):
                assert _same_bits(opt.state[p][name], fresh.state[q][name]), f"{name} {i}"


bad_values = st.sampled_from([float("nan"), float("inf"), -1.0, -1e-9])


@PROFILE
@given(name=st.sampled_from(["lr", "rho", "eps", "weight_decay"]), value=bad_values | st.floats(1.0001, 1e9),
       where=st.sampled_from(["init", "add_param_group", "step", "load_state_dict"]))
def test_invalid_hyperparameters_are_rejected_everywhere(name, value, where):
    """Out-of-range values are refused at every entry point; nothing changes."""
    if name != "rho" and value > 0 and value != float("inf"):
        value = -value  # only rho has an upper bound among finite values
    p = [torch.randn(4)]
    if where == "init":
        with pytest.raises(ValueError, match="Invalid"):
            Adadelta(p, **{name: value})
        return
    opt = Adadelta(p)
    p[0].grad = torch.randn(4)
    opt.step()
    snap = (p[0].clone(), opt.state[p[0]]["square_avg"].clone(), [dict(g) for g in opt.param_groups])
    with pytest.raises(ValueError, match="Invalid"):
        if where == "add_param_group":
            opt.add_param_group({"params": [torch.randn(2)], name: value})
        elif where == "step":
            opt.param_groups[0][name] = value
            opt.step()
        else:
            sd = copy.deepcopy(opt.state_dict())
            sd["param_groups"][0][name] = value
            opt.load_state_dict(sd)
    if where == "step":
        opt.param_groups[0][name] = snap[2][0][name]
    assert _same_bits(p[0], snap[0]) and _same_bits(opt.state[p[0]]["square_avg"], snap[1])
    assert len(opt.param_groups) == 1 and opt.param_groups[0] == snap[2][0]


CPU_COMBOS = [(torch.complex64, torch.complex64, torch.float32)] + list(cpu_fused.SUPPORTED)


@pytest.mark.parametrize("combo", CPU_COMBOS, ids=lambda key: "-".join(str(d).replace("torch.", "") for d in key))
@CASE_PROFILE
@given(problem=problems([torch.float32], max_groups=3, max_tensors=3),
       clip_value=st.sampled_from([None, 0.5, 1e3]), grad_scale=st.sampled_from([None, 1.0, 1024.0, 3.0]),
       warmup=st.integers(0, 2))
def test_fused_cpu_path_matches_reference_path(combo, problem, clip_value, grad_scale, warmup):
    """The fused CPU path (cpu_fused, the C update) against the reference path, one step from the same state."""
    functions = fused_cpu_library().functions  # fails where a C compiler exists but the source does not build
    groups, recipe = problem
    pdtype, gdtype, sdtype = combo
    real = torch.float32 if pdtype.is_complex else pdtype
    assume((real, torch.float32 if gdtype.is_complex else gdtype, sdtype) in functions)  # float16 needs _Float16
    groups = [([(shape, pdtype) for shape, _ in ts], hp) for ts, hp in groups]
    options = dict(state_dtype=sdtype, clipvalue=clip_value)
    scale = None if grad_scale is None else torch.tensor(grad_scale)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # CPU tensors take the PyTorch path and its fused CPU path
        mp.setattr(cpu_fused, "MIN_NUMEL", 0)
        calls = []
        call = cpu_fused._call
        mp.setattr(cpu_fused, "_call",
                   lambda fn, table, *a, **k: (calls.append(table.shape[0]), call(fn, table, *a, **k)))
        params = _build_params(groups, "cpu")
        fast = Adadelta([dict(params=ps, **hp) for ps, (_, hp) in zip(params, groups)], **options)
        flat = [p for ps in params for p in ps]
        row = recipe[0]

        def grads(step):
            dtype = None if gdtype == pdtype else gdtype
            return [_gradient(p, scale_, zeros, seed + step, dtype) for p, (scale_, zeros, seed, _) in zip(flat, row)]

        for step in range(warmup):
            set_grads(flat, grads(step))
            fast.step(grad_scale=scale)
        ref, flat_ref = _reference_twin(fast, params, groups, options)
        g = grads(warmup)
        set_grads(flat, g)
        set_grads(flat_ref, g)
        before = [_finite_max(q) for q in flat_ref]
        fast.step(grad_scale=scale)
        ref.step(grad_scale=scale)
    assert len(calls) == warmup + 1  # every step went through the fused CPU path
    _assert_same_step(fast, ref, flat, flat_ref, before, warmup + 1)
