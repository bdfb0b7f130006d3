"""Mixed precision: stochastic rounding, master weights, 16-bit state and GradScaler.

Every test runs on the PyTorch path and, where it says fused, on the Triton kernel (the
interpreter on CPU). Random draws come from fixed seeds, so every statistical bound below is
checked against one fixed sample and the tests are deterministic.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_gpu, needs_kernel
from helpers import (
    assert_close_rel,
    make_params,
    random_grads,
    regression,
    resync_reference,
    set_grads,
    train_regression,
)

from triton_adadelta import Adadelta
from triton_adadelta.reference import (
    PhiloxStream,
    adadelta_update_,
    join_remainder,
    philox4x32,
    philox_bits,
    round_stochastic,
    split_remainder,
)

try:  # a module global, where a @triton.jit test kernel finds it
    from triton_adadelta.kernels.adadelta import _noise
except ImportError:  # no triton: the kernel tests skip
    _noise = None

LOW = [torch.bfloat16, torch.float16]
PATHS = [pytest.param(False, id="torch"), pytest.param(True, id="fused", marks=needs_kernel)]


def _device(fused: bool) -> str:
    return KERNEL_DEVICE if fused else "cpu"


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of ``dtype`` just below and just above float32 ``x`` (equal when x is exact), in float64."""
    x64 = x.double()
    r = x.to(dtype)
    down = torch.nextafter(r, torch.full_like(r, -math.inf))
    lo = torch.where(r.double() > x64, down, r)
    up = torch.nextafter(lo, torch.full_like(lo, math.inf))
    hi = torch.where(lo.double() == x64, lo, up)
    return lo.double(), hi.double()


def _ulp16(x: torch.Tensor) -> torch.Tensor:
    """The gap between the two 16-bit neighbours of ``x`` (its dtype's), float64."""
    x = x.cpu()
    up = torch.nextafter(x, torch.full_like(x, math.inf)).double()
    down = torch.nextafter(x, torch.full_like(x, -math.inf)).double()
    return torch.maximum(up - x.double(), x.double() - down)


def _assert_unbiased(rounded: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Each element is a neighbour of its float32 value ``x``, and the mean matches ``x`` within 5 sigma."""
    lo, hi = _neighbours(x.cpu(), dtype)
    r = rounded.cpu().double()
    assert bool(((r == lo) | (r == hi)).all()), f"{what}: a value that is not a neighbour"
    gap = hi - lo
    frac = torch.where(gap > 0, (x.cpu().double() - lo) / gap, torch.zeros_like(gap))
    n = r.numel()
    got = float(torch.where(gap > 0, (r - lo) / gap, torch.zeros_like(gap)).mean())
    want = float(frac.mean())
    sigma = math.sqrt(max(float((frac * (1 - frac)).mean()), 1e-12) / n)
    assert abs(got - want) < 5 * sigma + 1e-6, f"{what}: mean fraction {got} vs {want} (sigma {sigma})"


# ------------------------------------------------------------------------------------- the rounding itself
def test_philox_known_answers_and_lanes():
    """Philox-4x32-10 known-answer vectors (Random123's kat_vectors)."""
    def run(ctr, key):
        c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
        return [int(t) for t in philox4x32(key[0], key[1], *c)]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    # A tensor key (a step count on the device) gives the same words as the integer.
    a = philox_bits(PhiloxStream(7, 5, 1 << 33), 10, "cpu")
    b = philox_bits(PhiloxStream(torch.tensor(7), 5, 1 << 33), 10, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])


@needs_kernel
def test_philox_matches_triton():
    """The kernel's noise (one Philox call per eight elements and write) is reference.philox_bits'."""
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out, seed, first, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out + i, _noise(seed, first, 0, N).to(tl.int64) & 0xFFFFFFFF)
        tl.store(out + N + i, _noise(seed, first, 1, N).to(tl.int64) & 0xFFFFFFFF)
        tl.store(out + 2 * N + i, _noise(seed, first, 2, N).to(tl.int64) & 0xFFFFFFFF)

    # Flat-state positions (multiples of 64, as segments start) around 0, across the 32-bit counter
    # wrap (8 * 2^32) and far out.
    for key1, key0, base in [(0, 0, 0), (5 * 64 + 3, 17, 8 * ((1 << 32) - 4)),
                             ((1 << 30) - 1, (1 << 24) - 1, 64 * 1929012345)]:
        out = torch.zeros(3 * 64, dtype=torch.int64, device=KERNEL_DEVICE)
        draw[(1,)](out, (key1 << 32) | key0, base, N=64)
        want = torch.cat(philox_bits(PhiloxStream(key0, key1, base), 64, "cpu"))
        assert torch.equal(out.cpu(), want)
        assert int(want.max()) < 1 << 16 and int(want.max()) > 1 << 15  # 16-bit values, all of them used


def test_philox_bits_serve_eight_elements_per_call_and_any_offset():
    """Lane q of element e is half e % 2 of word (e % 8) // 2 of the call with counter (e // 8, q):
    any window of the stream equals the same window of a longer draw."""
    key = PhiloxStream(3, 9, 0)
    whole = philox_bits(key, 200, "cpu")
    c = torch.tensor([5], dtype=torch.int64)  # the call that serves elements 40..47
    words = philox4x32(3, 9, c, c * 0, c * 0 + 2, c * 0)
    expected = [int(w) >> (16 * h) & 0xFFFF for w in words for h in (0, 1)]
    assert whole[2][40:48].tolist() == expected
    for offset, n in [(13, 50), (64, 7), (1, 1)]:
        part = philox_bits(PhiloxStream(3, 9, offset), n, "cpu", lanes=(1,))
        assert part[0] is None and part[2] is None
        assert torch.equal(part[1], whole[1][offset: offset + n])


def _values(dtype: torch.dtype) -> torch.Tensor:
    """float32 values between neighbours of ``dtype`` across its range, both signs, subnormals included."""
    tiny = torch.finfo(dtype).smallest_normal
    base = [1 + 2**-10, 1 - 2**-12, 3.0 + 2**-9 + 2**-13, 1e-3, 7.7e4 if dtype == torch.bfloat16 else 6.1e4,
            tiny * 1.37, tiny * 0.3, tiny * 2**-9 * 0.6, 1e-38 * 0.37, 2.0**-126 * 0.2]
    v = torch.tensor(base, dtype=torch.float32)
    return torch.cat([v, -v])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("source", ["philox", "generator"])
def test_round_stochastic_is_unbiased(dtype, source):
    n = 1 << 15
    for x0 in _values(dtype):
        x = x0.expand(n).contiguous()
        if source == "philox":
            bits = philox_bits(PhiloxStream(3, 11, 0), n, "cpu")[0]
            r = round_stochastic(x, dtype, bits)
        else:
            r = round_stochastic(x, dtype, generator=torch.Generator().manual_seed(5))
        assert r.dtype == dtype
        _assert_unbiased(r, x, dtype, f"{dtype} x={float(x0)!r}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_round_to_nearest_would_fail_the_unbiasedness_check(dtype):
    """The check above is sharp enough to reject a rounding that is not stochastic."""
    x = torch.full((1 << 15,), 1 + 2**-10, dtype=torch.float32) if dtype == torch.bfloat16 else \
        torch.full((1 << 15,), 1 + 2**-13, dtype=torch.float32)
    with pytest.raises(AssertionError, match="mean fraction"):
        _assert_unbiased(x.to(dtype), x, dtype, "round to nearest")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_round_stochastic_special_values(dtype):
    fmax = torch.finfo(dtype).max
    above = fmax * (1 + 2**-9) if dtype == torch.bfloat16 else 65520.0  # past fmax, inside its binade
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, fmax, -fmax, 1.0, -2.5, above, -above],
                     dtype=torch.float32)
    if dtype == torch.float16:
        x = torch.cat([x, torch.tensor([65535.0, -65535.0, 65536.0, -1e6], dtype=torch.float32)])
    for bits_value in (0, 0xFFFFFFFF, 0x80008000):  # the lower, the upper and a middle draw
        r = round_stochastic(x, dtype, torch.full(x.shape, bits_value, dtype=torch.int64))
        assert bool(torch.isnan(r[0]))
        assert r[1].item() == math.inf and r[2].item() == -math.inf
        assert r[3].item() == 0.0 and not math.copysign(1.0, r[3].item()) < 0
        assert r[4].item() == 0.0 and math.copysign(1.0, r[4].item()) < 0
        assert r[5].item() == fmax and r[6].item() == -fmax
        assert r[7].item() == 1.0 and r[8].item() == -2.5
        # Finite values above the largest finite one saturate instead of rounding up into Inf.
        assert r[9].item() == fmax and r[10].item() == -fmax
        if dtype == torch.float16:
            assert r[11].item() == fmax and r[12].item() == -fmax
            assert r[13].item() == math.inf and r[14].item() == -math.inf  # |x| >= 65536: overflow, as a cast


# ------------------------------------------------------------------------------------- the optimizer, both paths
def _sr_optimizer(params, fused, **kw):
    kw.setdefault("stochastic_rounding", True)
    return Adadelta(params, fused=fused, **kw)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_optimizer_rounding_is_unbiased(fused, dtype):
    """Many elements with one value and one gradient: the rounded results average to the float32 result.

    Two groups: one near 1.0 (normal range) and one at 0 with a tiny step (float16 subnormals).
    The square_avg of a float32-parameter optimizer with 16-bit state is checked the same way.
    """
    dev = _device(fused)
    n = 4096
    params = [torch.full((n,), 1.0, dtype=dtype, device=dev), torch.zeros(n, dtype=dtype, device=dev)]
    groups = [dict(params=[params[0]], lr=1.0), dict(params=[params[1]], lr=1e-5)]
    exact = [p.detach().float().cpu() for p in params]
    exact_opt = Adadelta([dict(params=[exact[0]], lr=1.0), dict(params=[exact[1]], lr=1e-5)], fused=False)
    results = {}
    for sr in (True, False):
        ps = [p.clone() for p in params]
        opt = _sr_optimizer([dict(g, params=[q]) for g, q in zip(groups, ps)], fused, stochastic_rounding=sr)
        for q in ps:
            q.grad = torch.ones_like(q)
        opt.step()
        results[sr] = ps
    for q in exact:
        q.grad = torch.ones_like(q)
    exact_opt.step()
    for i, (q, x) in enumerate(zip(results[True], exact)):
        assert len(set(x.tolist())) == 1
        _assert_unbiased(q, x, dtype, f"param group {i}")
        with pytest.raises(AssertionError, match="mean fraction|not a neighbour"):
            _assert_unbiased(results[False][i], x, dtype, "round to nearest")

    state = torch.full((n,), 0.75, device=dev)
    opt = _sr_optimizer([state], fused, state_dtype=dtype)
    state.grad = torch.full_like(state, 1.0 + 2**-12)
    opt.step()
    g = torch.tensor(1.0 + 2**-12)
    want = (0.0 * 0.9 + ((1 - 0.9) * g) * g).expand(n)  # torch's float32 square_avg after one step
    _assert_unbiased(opt.state[state]["square_avg"], want, dtype, "square_avg")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on purpose
@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_nan_inf_and_saturation(fused, dtype):
    dev = _device(fused)
    fmax = torch.finfo(dtype).max
    special = torch.tensor([math.nan, math.inf, -math.inf] + [fmax] * 64, dtype=dtype, device=dev)
    normal = make_params([(61,)], dtype, dev, seed=3)[0]
    # A step big enough to push fmax a good fraction of an ulp upwards: it must saturate, not overflow.
    lr = 1e38 if dtype == torch.bfloat16 else 6000.0
    opt = _sr_optimizer([dict(params=[special], lr=lr), dict(params=[normal])], fused, state_dtype=dtype)
    special.grad = torch.full_like(special, -1.0)
    normal.grad = random_grads([normal], seed=4)[0]
    normal.grad[5] = math.nan
    opt.step()
    s = special.cpu().float()
    assert math.isnan(s[0]) and s[1] == math.inf and s[2] == -math.inf
    assert bool((s[3:] == fmax).all()), "a finite parameter rounded into Inf"
    assert math.isnan(normal[5].float()) and math.isnan(opt.state[normal]["square_avg"][5].float())
    finite = torch.ones(61, dtype=torch.bool)
    finite[5] = False
    assert bool(normal.float().cpu()[finite].isfinite().all())
    assert bool(opt.state[normal]["acc_delta"].float().cpu()[finite].isfinite().all())


# (parameter dtype, state dtype, master weights)
SR_COMBOS = [
    (torch.bfloat16, torch.float32, False),
    (torch.float16, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.float16, torch.float16, False),
    (torch.float32, torch.float16, False),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.bfloat16, torch.bfloat16, "remainder"),
]


def _combo_id(c):
    return "-".join(str(x).replace("torch.", "") for x in c[:2]) + {False: "", True: "-master"}.get(c[2], "-remainder")


def _check_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor, what: str) -> int:
    """16-bit elements may differ by one step of their dtype (returns how many differ); float32 by 1e-5."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype, what
    same = (a == e) | (a.isnan() & e.isnan())
    if a.dtype in (torch.bfloat16, torch.float16):
        close = (a.double() - e.double()).abs() <= _ulp16(e)
        assert bool((same | close).all()), f"{what}: more than one ulp apart"
        return int((~same).sum())
    assert_close_rel(a, e, rtol=1e-5, what=what)  # float32: the last-bit differences of the two paths
    return 0


@needs_kernel
@pytest.mark.parametrize("combo", SR_COMBOS, ids=_combo_id)
def test_kernel_rounds_like_the_reference(combo):
    """Both paths draw the same Philox words, so from the same inputs they round the same way.

    Each step starts both from the kernel's values (as test_kernel does). The float32 arithmetic of
    the two paths may differ in the last bit, which moves a stochastic rounding only when the draw
    falls in that sliver: almost every element is identical, none is more than one ulp away.
    """
    pdtype, sdtype, master = combo
    shapes = [(1,), (7,), (1500,), (0,), (5, 3)]
    params = make_params(shapes, pdtype, KERNEL_DEVICE, seed=1)
    kw = dict(stochastic_rounding=True, state_dtype=sdtype, master_weights=master, weight_decay=0.01)
    fused = Adadelta([dict(params=params[:2], lr=0.5), dict(params=params[2:], lr=0.2, rho=0.8)], fused=True, **kw)
    ref_params = [p.detach().cpu().clone() for p in params]
    ref = Adadelta([dict(params=ref_params[:2], lr=0.5), dict(params=ref_params[2:], lr=0.2, rho=0.8)],
                   fused=False, **kw)
    differ = total = 0
    for step in range(2):
        grads = random_grads(params, seed=10 + step)
        set_grads(params, grads)
        set_grads(ref_params, [g.cpu() for g in grads])
        resync_reference(fused, ref, params, ref_params)
        fused.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            pairs = [(p, q, "param")] + [(fused.state[p][n], ref.state[q][n], n) for n in ("square_avg", "acc_delta")]
            if "master" in fused.state[p]:
                m, mr = fused.state[p]["master"], ref.state[q]["master"]
                if m.dtype == torch.int16:  # remainder mode: compare the float32 values they make
                    m, mr = join_remainder(p.cpu(), m.cpu()), join_remainder(q, mr)
                pairs.append((m, mr, "master"))
            for actual, expected, what in pairs:
                differ += _check_within_one_ulp(actual, expected, f"step {step} tensor {i} {what}")
                total += expected.numel()
            assert float(fused.state[p]["step"]) == float(ref.state[q]["step"]) == step + 1
    assert differ <= max(2, total // 1000), f"{differ} of {total} elements rounded differently"


def _run(fused, seed, steps=3, save_at=None, **kw):
    """A small bf16/fp16 run; returns the parameters and the state (optionally through a state_dict)."""
    dev = _device(fused)
    torch.manual_seed(seed)
    params = make_params([(300,), (7, 5)], torch.bfloat16, dev, seed=0) + make_params([(65,)], torch.float16, dev,
                                                                                          seed=1)
    opt = Adadelta(params, fused=fused, stochastic_rounding=True, lr=0.3, **kw)
    for step in range(steps):
        if step == save_at:
            sd = copy.deepcopy(opt.state_dict())
            params = [p.detach().clone() for p in params]
            opt = Adadelta(params, fused=fused, stochastic_rounding=True, lr=0.3, **kw)
            opt.load_state_dict(sd)
        set_grads(params, random_grads(params, seed=50 + step))
        opt.step()
    return [p.detach().cpu().clone() for p in params] + [
        opt.state[p][n].detach().cpu().clone() for p in params for n in ("square_avg", "acc_delta")]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _bitwise_equal(a: list, b: list) -> bool:
    """Same dtypes and the same bits (NaN payloads and the signs of zeros included)."""
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("fused", PATHS)
def test_reruns_are_bit_identical_and_seeded_by_torch(fused):
    kw = dict(state_dtype=torch.bfloat16)
    first = _run(fused, seed=123, **kw)
    again = _run(fused, seed=123, **kw)
    assert _bitwise_equal(first, again)
    # torch.manual_seed picks the stream: another seed rounds differently somewhere.
    other = _run(fused, seed=124, **kw)
    assert not _bitwise_equal(first, other)
    # Saving and loading mid-run (the seed is in the param groups, the step counts in the state) changes nothing.
    resumed = _run(fused, seed=123, save_at=2, **kw)
    assert _bitwise_equal(first, resumed)


def test_seed_comes_from_torch_and_is_saved():
    torch.manual_seed(7)
    a = Adadelta([torch.zeros(3)], stochastic_rounding=True)
    torch.manual_seed(7)
    b = Adadelta([torch.zeros(3)], stochastic_rounding=True)
    torch.manual_seed(8)
    c = Adadelta([torch.zeros(3)], stochastic_rounding=True)
    assert a.param_groups[0]["seed"] == b.param_groups[0]["seed"] != c.param_groups[0]["seed"]
    assert a.state_dict()["param_groups"][0]["seed"] == a.param_groups[0]["seed"]
    # Building an optimizer draws nothing from torch's generator: the user's random stream is untouched.
    torch.manual_seed(9)
    want = torch.rand(3)
    torch.manual_seed(9)
    Adadelta([torch.zeros(3)], stochastic_rounding=True)
    assert torch.equal(torch.rand(3), want)


# ------------------------------------------------------------------------------------- 16-bit state
@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_16bit_state_keeps_small_contributions(fused, dtype):
    """Each step moves the accumulators by (1 - rho) of their gap, less than half an ulp of a 16-bit value
    at 0.5 (rho = 0.999 for bf16, 0.9999 for fp16). Round to nearest never moves them; stochastic rounding
    follows the float32 state on average (every element has the same history, so they are i.i.d.)."""
    dev = _device(fused)
    n, steps = 2048, 24
    rho = 0.999 if dtype == torch.bfloat16 else 0.9999
    p = torch.zeros(n, device=dev)
    finals = {}
    for mode in ("fp32", "sr", "rn"):
        q = p.clone()
        # The float32 baseline runs on the PyTorch path (the fused float32 path matches it: test_kernel.py).
        opt = Adadelta([q], fused=fused and mode != "fp32", rho=rho, stochastic_rounding=mode == "sr",
                       state_dtype=torch.float32 if mode == "fp32" else dtype)
        q.grad = torch.ones_like(q)
        opt.step()  # creates the state; then both accumulators start from 0.5
        with torch.no_grad():
            opt.state[q]["square_avg"].fill_(0.5)
            opt.state[q]["acc_delta"].fill_(0.5)
        for _ in range(steps):
            opt.step()
        finals[mode] = [opt.state[q][k].detach().cpu().double() for k in ("square_avg", "acc_delta")]
    for k, name in enumerate(("square_avg", "acc_delta")):
        exact = float(finals["fp32"][k].mean())
        moved = exact - 0.5
        assert moved > 1e-3, (name, moved)
        sr = finals["sr"][k]
        stderr = float(sr.std()) / math.sqrt(n)
        assert abs(float(sr.mean()) - exact) < 5 * stderr + 1e-7, (name, float(sr.mean()), exact, stderr)
        assert abs(float(finals["rn"][k].mean()) - exact) > 0.5 * moved, (name, finals["rn"][k].mean(), exact)


# ------------------------------------------------------------------------------------- master weights
@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_master_weights_follow_the_fp32_run(fused, dtype):
    """The master copy is the float32 trajectory of torch.optim.Adadelta; the parameter is it rounded to nearest."""
    dev = _device(fused)
    params = make_params([(257,), (4, 6)], dtype, dev, seed=2)
    fp32 = [p.detach().float().cpu().clone() for p in params]
    ours = Adadelta(params, fused=fused, master_weights=True, lr=0.5, weight_decay=0.01)
    theirs = torch.optim.Adadelta(fp32, lr=0.5, weight_decay=0.01)
    for step in range(4):
        grads = random_grads(params, seed=20 + step)
        set_grads(params, grads)
        set_grads(fp32, [g.float().cpu() for g in grads])
        ours.step()
        theirs.step()
    for p, q in zip(params, fp32):
        master = ours.state[p]["master"]
        assert master.dtype == torch.float32 and master.shape == p.shape
        assert_close_rel(master.cpu(), q, rtol=1e-5, what="master")
        assert torch.equal(p.cpu(), master.cpu().to(dtype))
    sd = ours.state_dict()
    assert all(sd["state"][i]["master"].dtype == torch.float32 for i in range(2))


def test_master_weights_state_dict_round_trips_with_torch():
    params = make_params([(33,), (3, 3)], torch.bfloat16, seed=5)
    ours = Adadelta(params, master_weights=True, lr=0.5)
    for step in range(3):
        set_grads(params, random_grads(params, seed=30 + step))
        ours.step()
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "square_avg", "acc_delta", "master"}

    # Into torch.optim.Adadelta: the extra entry is carried along unused, and training goes on.
    theirs_params = [p.detach().clone() for p in params]
    theirs = torch.optim.Adadelta(theirs_params, lr=0.5)
    theirs.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(params, theirs_params):
        torch.testing.assert_close(theirs.state[q]["square_avg"].float(), ours.state[p]["square_avg"],
                                   rtol=1e-2, atol=0)
    set_grads(theirs_params, random_grads(theirs_params, seed=40))
    theirs.step()
    assert all(bool(q.isfinite().all()) for q in theirs_params)

    # A torch state_dict into ours: torch carried our master along, cast to bf16 and not updated by its
    # step; it is not used: the master copy starts from the parameter, read at the next step, so loading
    # the optimizer before the model works too.
    assert theirs.state_dict()["state"][0]["master"].dtype == torch.bfloat16
    fresh = [torch.zeros_like(p) for p in theirs_params]
    again = Adadelta(fresh, master_weights=True, lr=0.5)
    again.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        for p, q in zip(fresh, theirs_params):
            p.copy_(q)  # the model checkpoint, loaded after the optimizer's
    check = [p.detach().float().clone() for p in theirs_params]
    check_opt = torch.optim.Adadelta(check, lr=0.5)
    check_opt.load_state_dict(theirs.state_dict())
    grads = random_grads(fresh, seed=41)
    set_grads(fresh, grads)
    set_grads(check, [g.float() for g in grads])
    again.step()
    check_opt.step()
    for p, q in zip(fresh, check):
        assert float(again.state[p]["step"]) == 5
        assert_close_rel(again.state[p]["master"], q, rtol=1e-5, what="master after a torch state_dict")
    # Our own state_dict restores the master copy exactly (not re-derived from the rounded parameter).
    restored = [p.detach().clone() for p in params]
    back = Adadelta(restored, master_weights=True, lr=0.5)
    back.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(params, restored):
        assert torch.equal(back.state[q]["master"], ours.state[p]["master"])
        assert not torch.equal(back.state[q]["master"], q.float())


def test_split_and_join_remainder_are_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 16, generator=g) * torch.logspace(-40, 38, 1 << 16)
    bits = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x00008000, 0x80008000, 0x00000001, 0xFF7FFFFF, 0x3F808000,
                         0x3F818000, 0x7F800000, 0xFF800000, 0x80000000, 0], dtype=torch.int64)
    x = torch.cat([x, torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)])
    param, rem = split_remainder(x)
    assert param.dtype == torch.bfloat16 and rem.dtype == torch.int16
    assert torch.equal(join_remainder(param, rem).view(torch.int32), x.view(torch.int32))
    # The parameter is x rounded to nearest; only exact ties may go the other way (away from zero).
    rn = x.to(torch.bfloat16)
    differ = param.float() != rn.float()
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert bool((~differ | tie).all())
    assert bool((param.float().abs() >= rn.float().abs())[differ].all())
    nan_p, nan_r = split_remainder(torch.tensor([math.nan]))
    assert math.isnan(join_remainder(nan_p, nan_r).item()) and math.isnan(nan_p.float().item())


@pytest.mark.parametrize("fused", PATHS)
def test_remainder_mode_is_exact_float32(fused):
    """master_weights='remainder' holds the same float32 values as master_weights=True, in 2 bytes a parameter."""
    dev = _device(fused)
    params = make_params([(257,), (4, 6)], torch.bfloat16, dev, seed=2)
    twins = [p.clone() for p in params]
    fp32 = [p.detach().float().cpu().clone() for p in params]
    rem_opt = Adadelta(params, fused=fused, master_weights="remainder", lr=0.5, weight_decay=0.01)
    master_opt = Adadelta(twins, fused=fused, master_weights=True, lr=0.5, weight_decay=0.01)
    theirs = torch.optim.Adadelta(fp32, lr=0.5, weight_decay=0.01)
    for step in range(4):
        grads = random_grads(params, seed=20 + step)
        set_grads(params, grads)
        set_grads(twins, grads)
        set_grads(fp32, [g.float().cpu() for g in grads])
        rem_opt.step()
        master_opt.step()
        theirs.step()
    for p, t, q in zip(params, twins, fp32):
        rem = rem_opt.state[p]["master"]
        assert rem.dtype == torch.int16 and rem.shape == p.shape
        value = join_remainder(p, rem)
        assert torch.equal(value, master_opt.state[t]["master"])
        assert_close_rel(value.cpu(), q, rtol=1e-5, what="remainder mode vs torch fp32")
        assert torch.equal(p, split_remainder(value)[0])
    assert rem_opt.state_dict()["state"][0]["master"].dtype == torch.int16


def test_remainder_mode_state_dict_and_bad_dtype():
    params = make_params([(33,)], torch.bfloat16, seed=6)
    opt = Adadelta(params, master_weights="remainder", lr=0.5)
    for step in range(2):
        set_grads(params, random_grads(params, seed=step))
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    # Our own state_dict: the remainders come back exactly.
    restored = [p.detach().clone() for p in params]
    back = Adadelta(restored, master_weights="remainder", lr=0.5)
    back.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(back.state[restored[0]]["master"], opt.state[params[0]]["master"])
    # Through torch.optim.Adadelta (which casts the int16 entry to bf16 and never updates it) and back:
    # the stale entry is not used; the remainder restarts from zero (the parameter's own value).
    theirs_params = [p.detach().clone() for p in params]
    theirs = torch.optim.Adadelta(theirs_params, lr=0.5)
    theirs.load_state_dict(copy.deepcopy(sd))
    set_grads(theirs_params, random_grads(theirs_params, seed=9))
    theirs.step()
    again_params = [p.detach().clone() for p in theirs_params]
    again = Adadelta(again_params, master_weights="remainder", lr=0.5)
    again.load_state_dict(theirs.state_dict())
    set_grads(again_params, random_grads(again_params, seed=10))
    before = again_params[0].detach().float().clone()
    again.step()
    assert float(again.state[again_params[0]]["step"]) == 4
    assert bool((again_params[0].float() - before).abs().max() < 0.1)
    # float16 cannot be the high half of a float32: refused before anything changes.
    half = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="remainder"):
        Adadelta([half], master_weights="remainder")
    with pytest.raises(ValueError, match="remainder"):
        opt.add_param_group(dict(params=[half], master_weights="remainder"))
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="master_weights"):
        Adadelta(params, master_weights="fp32")


# ------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("fused", PATHS)
def test_bf16_training_reaches_the_fp32_loss(fused):
    """bf16 weights of magnitude ~2 (ulp 2^-6) with Adadelta steps of ~3e-3: round to nearest drops most
    updates, stochastic rounding and master weights land within a few percent of the float32 run."""
    dev = _device(fused)
    fp32 = train_regression(lambda ps: torch.optim.Adadelta(ps), torch.float32, "cpu")
    x, y, w0 = regression()
    assert fp32 < 0.5 * float(((x @ w0 - y) ** 2).mean())  # the float32 run itself learns
    losses = {
        name: train_regression(lambda ps, kw=kw: Adadelta(ps, fused=fused, **kw), torch.bfloat16, dev)
        for name, kw in [("nearest", {}), ("stochastic", dict(stochastic_rounding=True)),
                         ("master", dict(master_weights=True))]
        # Remainders hold the same float32 values as master weights (test_remainder_mode_is_exact_float32):
        # trained here on the PyTorch path only, to keep the interpreter's time down.
        + ([] if fused else [("remainder", dict(master_weights="remainder"))])
    }
    assert losses["stochastic"] < 1.05 * fp32, (fp32, losses)
    assert losses["master"] < 1.05 * fp32, (fp32, losses)
    if "remainder" in losses:
        assert losses["remainder"] < 1.05 * fp32, (fp32, losses)
    assert losses["nearest"] > 1.5 * fp32, (fp32, losses)


def test_fp16_training_reaches_the_fp32_loss():
    fp32 = train_regression(lambda ps: torch.optim.Adadelta(ps), torch.float32, "cpu")
    for kw in (dict(stochastic_rounding=True), dict(master_weights=True),
               dict(stochastic_rounding=True, state_dtype=torch.float16)):
        loss = train_regression(lambda ps, kw=kw: Adadelta(ps, fused=False, **kw), torch.float16, "cpu")
        assert loss < 1.05 * fp32, (kw, fp32, loss)


# ------------------------------------------------------------------------------------- GradScaler
def _snapshot(opt, params):
    return [p.detach().clone() for p in params] + [
        t.detach().clone() for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]


def _count_reference_updates(monkeypatch) -> list[int]:
    """Records the size of every tensor the reference path updates (reference.adadelta_update_ as the
    optimizer calls it): proof that an oracle ran the reference path and not the kernel."""
    from triton_adadelta.backends import torch as torch_backend

    seen: list[int] = []
    real = torch_backend.adadelta_update_

    def spy(p, *args, **kwargs):
        seen.append(p.numel())
        return real(p, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "adadelta_update_", spy)
    return seen


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("mode", ["plain", "stochastic", "master"])
def test_grad_scaler_loop_with_fp16_params(fused, mode, monkeypatch):
    """torch.amp.GradScaler with fp16 parameters and fp16 gradients.

    The first steps overflow by themselves (scale 2^16), one later step gets an injected Inf: those
    steps change nothing (parameters, state, step counts) and the scale backs off. Every other step
    equals a reference-path step fed the unscaled gradient.
    """
    dev = _device(fused)
    kw = dict(stochastic_rounding=mode == "stochastic", master_weights=mode == "master", lr=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g).to(dev)
    y = torch.randn(64, 1, generator=g).to(dev)
    w = (torch.randn(33, 1, generator=g) * 2).to(dev, torch.float16).requires_grad_()
    opt = Adadelta([w], fused=fused, **kw)
    oracle_w = w.detach().cpu().clone()
    oracle = Adadelta([oracle_w], fused=False, **kw)
    scaler = torch.amp.GradScaler(torch.device(dev).type, init_scale=2.0**16, growth_interval=3)
    reference_updates = _count_reference_updates(monkeypatch)
    skipped = taken = 0
    for step in range(12):
        opt.zero_grad()
        scaler.scale(((x @ w.float() - y) ** 2).mean()).backward()
        if step == 8:
            assert bool(w.grad.isfinite().all()), "the injected Inf must replace a step that would be taken"
            w.grad[3] = math.inf
        scaled = w.grad.detach().clone()
        scale = scaler.get_scale()
        before = _snapshot(opt, [w]) if w in opt.state else None
        w_before, sd_before = w.detach().cpu().clone(), copy.deepcopy(opt.state_dict())
        scaler.step(opt)
        scaler.update()
        if not bool(scaled.isfinite().all()):
            skipped += 1
            assert scaler.get_scale() == scale / 2
            if before is not None:
                assert _bitwise_equal(before, _snapshot(opt, [w])), f"step {step} changed something"
            else:
                assert float(opt.state[w]["step"]) == 0
            continue
        taken += 1
        # The oracle: our PyTorch path with the unscaled float32 gradient, from the same state.
        if sd_before["state"]:
            oracle.load_state_dict(sd_before)
            oracle.param_groups[0]["fused"] = False  # the loaded group says fused=True
        with torch.no_grad():
            oracle_w.copy_(w_before)
        set_grads([oracle_w], [scaled.cpu().float() / scale])
        before_oracle = len(reference_updates)
        oracle.step()
        assert reference_updates[before_oracle:] == [oracle_w.numel()], "the oracle step ran the reference update"
        _check_within_one_ulp(w, oracle_w, f"step {step} param")
        assert float(opt.state[w]["step"]) == float(oracle.state[oracle_w]["step"]) == taken
    assert skipped >= 2 and taken >= 5, (skipped, taken)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype, kw", [
    (torch.float16, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(master_weights="remainder")),
], ids=["fp16-sr-bf16state", "bf16-remainder"])
def test_step_with_found_inf_changes_nothing(fused, dtype, kw):
    dev = _device(fused)
    params = make_params([(100,), (3, 4)], dtype, dev, seed=9)
    opt = Adadelta(params, fused=fused, **kw)
    set_grads(params, random_grads(params, seed=1))
    opt.step()
    before = _snapshot(opt, params)
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    set_grads(params, random_grads(params, seed=2))
    scale = torch.full((1,), 1024.0, device=dev)
    opt.step(grad_scale=scale, found_inf=torch.ones(1, device=dev))
    assert _bitwise_equal(before, _snapshot(opt, params))
    opt.step(grad_scale=scale, found_inf=torch.zeros(1, device=dev))
    assert all(float(opt.state[p]["step"]) == 2 for p in params)
    # The taken step moved the state (its tiny scaled-down update may leave a bf16 parameter as it was).
    moved = [not torch.equal(old[name], opt.state[p][name]) for p, old in zip(params, states)
             for name in ("square_avg", "acc_delta")]
    assert all(moved), moved


@needs_kernel
def test_fused_step_with_scaler_reads_no_tensor_on_the_host(monkeypatch):
    """The host side of a fused step with grad_scale/found_inf never reads the value of a tensor that
    would live on the GPU: parameters, gradients, state, the scale and the inf flag.

    The launch itself is recorded instead of run (the interpreter reads everything), and every way to
    turn one of those tensors into a Python value raises. On a GPU, test_step_with_scaler_has_no_host_sync
    checks the whole step with torch's sync debug mode.
    """
    from triton_adadelta import _triton

    params = make_params([(100,), (7,)], torch.float16, KERNEL_DEVICE, seed=1)
    opt = Adadelta(params, fused=True, stochastic_rounding=True, master_weights=True, state_dtype=torch.bfloat16)
    set_grads(params, random_grads(params, seed=2))
    scale, found = torch.full((1,), 8.0, device=KERNEL_DEVICE), torch.zeros(1, device=KERNEL_DEVICE)
    opt.step(grad_scale=scale, found_inf=found)  # the first step builds state and launch plans

    watched = [scale, found] + params + [p.grad for p in params]
    for flat in opt._store.flats.values():
        watched += [flat.square_avg, flat.acc_delta, flat.steps, flat.master]
    storages = {t.untyped_storage().data_ptr() for t in watched}
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(_triton, "adadelta_kernel", lambda: Recorder())
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__"):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            if self.untyped_storage().data_ptr() in storages:
                raise AssertionError(f"step() read a device tensor on the host (Tensor.{_name})")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    opt.step(grad_scale=scale, found_inf=found)
    monkeypatch.undo()
    assert len(launches) == 1
    kwargs = launches[0][2]
    assert kwargs["HAS_SCALER"] and kwargs["STOCHASTIC"] and kwargs["MASTER"]
    assert float(opt.state[params[0]]["step"]) == 2  # the step counts still moved, on the device


@needs_gpu
def test_step_with_scaler_has_no_host_sync():
    params = make_params([(1 << 16,), (4097,)], torch.float16, "cuda", seed=0)
    opt = Adadelta(params, stochastic_rounding=True, state_dtype=torch.bfloat16)
    set_grads(params, random_grads(params, seed=1))
    scale, found = torch.full((1,), 1024.0, device="cuda"), torch.zeros(1, device="cuda")
    opt.step(grad_scale=scale, found_inf=found)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(grad_scale=scale, found_inf=found)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("fused", PATHS)
def test_remainder_and_master_share_the_stochastic_rounding_stream(fused):
    """With stochastic rounding of bf16 state, both master modes still follow one float32 trajectory."""
    dev = _device(fused)
    params = make_params([(257,), (4, 6)], torch.bfloat16, dev, seed=3)
    twins = [p.clone() for p in params]
    kw = dict(fused=fused, lr=0.5, stochastic_rounding=True, state_dtype=torch.bfloat16)
    rem_opt = Adadelta(params, master_weights="remainder", **kw)
    master_opt = Adadelta(twins, master_weights=True, **kw)
    master_opt.param_groups[0]["seed"] = rem_opt.param_groups[0]["seed"]
    for step in range(3):
        grads = random_grads(params, seed=40 + step)
        set_grads(params, grads)
        set_grads(twins, grads)
        rem_opt.step()
        master_opt.step()
    for p, t in zip(params, twins):
        assert torch.equal(join_remainder(p, rem_opt.state[p]["master"]), master_opt.state[t]["master"])
        assert torch.equal(rem_opt.state[p]["square_avg"], master_opt.state[t]["square_avg"])


def _switch_run(fused, dev, before: dict, after: dict, drop_master: bool):
    """Steps with ``before`` settings, then the group edited to ``after``; and the same with a state_dict
    round trip into an optimizer built with ``after`` instead of the edit. Both must agree bit for bit."""
    params = make_params([(33,), (5, 3)], torch.bfloat16, dev, seed=8)
    twins = [p.clone() for p in params]
    edited = Adadelta(params, fused=fused, lr=0.01, **before)
    first = Adadelta(twins, fused=fused, lr=0.01, **before)
    for step in range(6):
        grads = random_grads(params, seed=60 + step)
        if step == 3:
            edited.param_groups[0].update(after)
            sd = copy.deepcopy(first.state_dict())
            if drop_master:
                for st in sd["state"].values():
                    st.pop("master", None)
            sd["param_groups"][0].update(after)  # a load takes the saved groups' settings
            first = Adadelta(twins, fused=fused, lr=0.01, **after)
            first.load_state_dict(sd)
        set_grads(params, grads)
        set_grads(twins, grads)
        edited.step()
        first.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)
        assert set(edited.state[p]) == set(first.state[t])
        for k in edited.state[p]:
            assert torch.equal(edited.state[p][k], first.state[t][k]), k
    return edited, params


@pytest.mark.parametrize("fused", PATHS)
def test_master_weights_and_state_dtype_edited_between_steps_take_effect(fused):
    dev = _device(fused)
    opt, params = _switch_run(fused, dev, {}, {"master_weights": True}, drop_master=False)
    assert opt.state[params[0]]["master"].dtype == torch.float32
    opt, params = _switch_run(fused, dev, {"master_weights": True}, {"master_weights": False}, drop_master=True)
    assert "master" not in opt.state[params[0]]
    opt.load_state_dict(opt.state_dict())  # its own state_dict loads (no stale master entry)
    opt, params = _switch_run(fused, dev, {}, {"state_dtype": torch.bfloat16}, drop_master=False)
    assert opt.state[params[0]]["square_avg"].dtype == torch.bfloat16


def _pending_master_opt():
    """master_weights=True loaded from a torch.optim.Adadelta state_dict, then the model loaded."""
    tp = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    topt = torch.optim.Adadelta([tp])
    tp.grad = torch.ones(8, dtype=torch.bfloat16)
    topt.step()
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))  # a fresh init, unlike the checkpoint
    opt = Adadelta([p], master_weights=True, fused=False)
    opt.load_state_dict(topt.state_dict())
    with torch.no_grad():
        p.copy_(tp)  # the model checkpoint, loaded after the optimizer's
    return opt, p, tp.detach().clone()


@pytest.mark.parametrize("fused", PATHS)
def test_remainder_mode_loading_a_torch_state_dict_keeps_no_stale_remainder(fused):
    """Our remainder-mode state_dict through torch.optim.Adadelta and back: torch carries our int16
    remainders along cast to bfloat16 and never updates them. Loaded back (with the model's weights),
    the weights are the bfloat16 parameters exactly (remainder 0), and the next step is a reference
    step from them (master_weights=True taken from the same parameters)."""
    dev = _device(fused)
    params = make_params([(300,), (7, 5)], torch.bfloat16, dev, seed=21)
    ours = Adadelta(params, master_weights="remainder", fused=fused, lr=0.5)
    for step in range(3):
        set_grads(params, random_grads(params, seed=90 + step))
        ours.step()
    assert all(bool((ours.state[p]["master"] != 0).any()) for p in params)  # remainders to go stale
    torch_params = [p.detach().cpu().clone() for p in params]
    theirs = torch.optim.Adadelta(torch_params, lr=0.5)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert theirs.state[torch_params[0]]["master"].dtype == torch.bfloat16  # carried along, cast
    for step in range(2):
        set_grads(torch_params, random_grads(torch_params, seed=95 + step))
        theirs.step()
    sd = theirs.state_dict()

    ours.load_state_dict(copy.deepcopy(sd))
    with torch.no_grad():  # the model checkpoint, loaded after the optimizer's
        for p, t in zip(params, torch_params):
            p.copy_(t)
    for p, t in zip(params, torch_params):
        assert torch.equal(join_remainder(p, ours.state[p]["master"]).cpu(), t.float()), "a stale remainder"
        assert torch.equal(ours.state[p]["square_avg"].cpu(), theirs.state[t]["square_avg"].float())
    grads = random_grads(torch_params, seed=99)
    set_grads(params, [g.to(dev) for g in grads])
    ours.step()
    for i, (p, t) in enumerate(zip(params, torch_params)):
        # The oracle: the reference function on float32 copies of the loaded weights and state.
        weights = t.float()
        adadelta_update_(weights, grads[i].float(), theirs.state[t]["square_avg"].float(),
                         theirs.state[t]["acc_delta"].float(), lr=0.5, rho=0.9, eps=1e-6)
        ours_weights = join_remainder(p, ours.state[p]["master"]).cpu()
        if fused:  # the kernel's float32 arithmetic against torch's CPU ops: within their rounding
            assert_close_rel(ours_weights, weights, rtol=1e-6, what=f"weights {i}")
        else:
            assert torch.equal(ours_weights, weights), f"weights {i}"
        assert not torch.equal(ours_weights, t.float())  # it moved
        assert float(ours.state[p]["step"]) == float(theirs.state[t]["step"]) + 1 == 6


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_a_master_due_from_the_parameter_survives_checkpoints_and_copies(how):
    opt, p, weights = _pending_master_opt()
    if how == "state_dict":
        sd = opt.state_dict()
        assert "master" not in sd["state"][0]  # not a value yet: taken from the parameter after loading
        q = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
        opt = Adadelta([q], master_weights=True, fused=False)
        opt.load_state_dict(copy.deepcopy(sd))
        with torch.no_grad():
            q.copy_(weights)
        p = q
    else:
        opt = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
        p = opt.param_groups[0]["params"][0]
    p.grad = torch.zeros(8, dtype=torch.bfloat16)
    opt.step()  # a zero gradient: the weights stay the loaded ones
    assert torch.equal(p.detach(), weights)
    assert torch.equal(opt.state[p]["master"], weights.float())


@pytest.mark.parametrize("fused", PATHS)
def test_stochastic_rounding_resumes_exactly_after_a_state_reset(fused):
    """A reset parameter's state is created anew at the end of its flat state, and listed last by
    state_dict(), so a load lays the segments out as they were (the random words follow offsets)."""
    dev = _device(fused)

    def run(resume: bool):
        params = make_params([(64,), (64,), (64,)], torch.bfloat16, dev, seed=9)
        opt = Adadelta(params, fused=fused, stochastic_rounding=True, lr=0.5)
        opt.param_groups[0]["seed"] = 1234
        for step in range(5):
            if step == 2:
                opt.state[params[0]] = {}
            if step == 3 and resume:
                sd = copy.deepcopy(opt.state_dict())
                params = [p.detach().clone().requires_grad_() for p in params]
                opt = Adadelta(params, fused=fused, stochastic_rounding=True, lr=0.5)
                opt.load_state_dict(sd)
            set_grads(params, random_grads(params, seed=70 + step))
            opt.step()
        return params

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
