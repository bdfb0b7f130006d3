"""16-bit writes round to nearest even, bit for bit, on the fused paths (the Triton kernel and the C update).

The oracle is torch's float32 -> bfloat16/float16 conversion, which rounds to nearest even. A "within
one ulp" comparison cannot tell rounding from truncation; these tests compare bits:

* engineered values: each parameter becomes exactly ``p + c`` in float32, with ``c`` just below, at
  and just above half a 16-bit ulp (and more), on parameters with an even and an odd last bit;
* random values: a 16-bit run against a float32 run of the same path from the same start, one step:
  each 16-bit result (parameters, square_avg, acc_delta) is the rounding of the float32 one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_PATHS, fused_cpu_library, use_path
from helpers import make_params, random_grads, set_grads

from triton_adadelta import Adadelta

FUSED_PATHS = [p for p in CPU_PATHS if p != "reference"]  # the reference rounds with torch's own copy_
LOW = [torch.bfloat16, torch.float16]
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}  # stored mantissa bits: an ulp in [1, 2) is 2^-MANTISSA


def _path_supports(path: str, key: tuple) -> bool:
    """Does the fused CPU path have this (param, grad, state) variant (float16 needs _Float16)?"""
    return path != "cpu-fused" or key in fused_cpu_library().functions


def _offsets(dtype: torch.dtype) -> list[float]:
    """Fractions ``c`` of a 16-bit ulp in [1, 2), exact in float32 (multiples of 2^-23)."""
    ulp, tiny = 2.0 ** -MANTISSA[dtype], 2.0 ** -23
    half = ulp / 2
    return [tiny, ulp / 4, half - tiny, half, half + tiny, 3 * ulp / 4, ulp - tiny]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a 16- or 32-bit float tensor."""
    return t.detach().cpu().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


# eps = 0: the interpreter computes 0 / 0 in the masked-off lanes of a block (never stored).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_parameter_writes_round_half_ulp_offsets_to_nearest_even(path, dtype, monkeypatch):
    """A step that makes every parameter exactly ``p + c``: the written value is torch's rounding of it.

    With rho = 0, eps = 0, acc_delta = 1, maximize and a gradient of 1, the update is exactly
    ``d = -1`` and ``p - lr * d = p + lr``; one param group per offset ``c`` (its lr)."""
    if not _path_supports(path, (dtype, dtype, torch.float32)):
        pytest.skip("float16 on the fused CPU path needs a compiler with _Float16")
    device, fused = use_path(path, monkeypatch)
    ulp = 2.0 ** -MANTISSA[dtype]
    # 1 + k ulp for k = 0..63: both parities of the last bit (ties go to the even one).
    base = (1.0 + ulp * torch.arange(64, dtype=torch.float64)).to(dtype)
    offsets = _offsets(dtype)
    params = [base.clone().to(device).requires_grad_() for _ in offsets]
    opt = Adadelta([dict(params=[p], lr=0.0) for p in params], fused=fused, eps=1e-6)
    set_grads(params, [torch.ones_like(p) for p in params])
    opt.step()  # lr 0: creates the state, moves nothing
    assert all(torch.equal(p.detach().cpu(), base) for p in params)
    for p, c, group in zip(params, offsets, opt.param_groups):
        opt.state[p]["acc_delta"].fill_(1.0)
        group.update(lr=c, rho=0.0, eps=0.0, maximize=True)
    set_grads(params, [torch.ones_like(p) for p in params])
    opt.step()
    for p, c in zip(params, offsets):
        exact = base.float() + c  # exact in float32: c is a multiple of 2^-23 below one 16-bit ulp
        assert torch.equal((exact - base.float()), torch.full_like(exact, c))
        expected = exact.to(dtype)  # torch: round to nearest even
        assert torch.equal(_bits(p), _bits(expected)), (
            f"offset {c / ulp:.6f} ulp: {int((_bits(p) != _bits(expected)).sum())} of 64 not rounded to nearest even")
    # The offsets above half an ulp move every value up, the tie moves odd ones only: a truncating
    # conversion would leave these unchanged, so the comparison above can tell.
    above = offsets.index(2.0 ** -MANTISSA[dtype] / 2 + 2.0 ** -23)
    assert not bool((params[above].detach().cpu() == base).any())


def _combos(path: str):
    for p in LOW:
        fp16_state = (torch.float16,) if path == "kernel" and p == torch.float16 else ()
        for s in (torch.float32, torch.bfloat16, *fp16_state):
            yield p, s


@pytest.mark.parametrize("path", FUSED_PATHS)
def test_random_16bit_results_are_the_float32_results_rounded_to_nearest_even(path, monkeypatch):
    """One step of a 16-bit run and of a float32 run of the same path, same start and gradients: the
    float32 arithmetic is the same, so every 16-bit value must be torch's rounding of the float32 one."""
    device, fused = use_path(path, monkeypatch)
    shapes = [(4099,), (33, 17), (5,)]
    tested = 0
    for pdtype, sdtype in _combos(path):
        if not _path_supports(path, (pdtype, pdtype, sdtype)):
            continue
        masters = [False, True] if path == "kernel" and pdtype == torch.bfloat16 else [False]
        for master in masters:
            params = [p.requires_grad_() for p in make_params(shapes, pdtype, device, seed=5)]
            twins = [p.detach().float().requires_grad_() for p in params]
            ours = Adadelta(params, fused=fused, lr=0.7, weight_decay=0.01, state_dtype=sdtype,
                            master_weights=master)
            theirs = Adadelta(twins, fused=fused, lr=0.7, weight_decay=0.01)
            grads = random_grads(params, seed=6)
            set_grads(params, grads)
            set_grads(twins, [g.float() for g in grads])
            ours.step()
            theirs.step()
            for i, (p, q) in enumerate(zip(params, twins)):
                what = f"{pdtype} params, {sdtype} state, master={master}, tensor {i}"
                assert torch.equal(_bits(p), _bits(q.detach().to(pdtype))), f"{what}: parameter"
                if master:  # the float32 master holds what the float32 run's parameter holds
                    assert torch.equal(_bits(ours.state[p]["master"]), _bits(q)), f"{what}: master"
                for name in ("square_avg", "acc_delta"):
                    expected = theirs.state[q][name].to(sdtype)
                    assert torch.equal(_bits(ours.state[p][name]), _bits(expected)), f"{what}: {name}"
                # The float32 results are not 16-bit values: the rounding was exercised.
                assert not torch.equal(q.detach().to(pdtype).float(), q.detach())
            tested += 1
    assert tested >= (3 if path == "cpu-fused" else 6)

