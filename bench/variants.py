"""Every kernel variant the public class can launch, checked against the PyTorch path on the same device.

A variant is a choice of :class:`triton_adadelta.Adadelta` options (parameter, gradient and state
dtype, stochastic rounding, master weights, clipping) and of GradScaler's arguments to ``step()``:
each picks another specialisation of the fused kernel. The variants are built through the class,
never by calling the kernel, so a change of the kernel's signature does not touch them.

:func:`check` runs ``Adadelta(fused=True, **options)`` and ``Adadelta(fused=False, **options)`` (the
PyTorch path, :mod:`triton_adadelta.reference`) on the same device from the same parameters and
state, on fresh random inputs of odd sizes, and reports how far apart the results are: float32 as a
relative error (against the largest magnitude of the tensor), 16-bit values in units in the last
place of the reference's value. A GradScaler variant also takes a step with ``found_inf`` set,
which must change nothing, bit for bit.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, NamedTuple, Optional, Union

import torch

from triton_adadelta import Adadelta
from triton_adadelta.reference import join_remainder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import make_params, random_grads, resync_reference, set_grads  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {v: k for k, v in DTYPES.items()}
CLIPS = {"none": {}, "clipnorm": dict(clipnorm=0.5), "global_clipnorm": dict(global_clipnorm=1.0),
         "clipvalue": dict(clipvalue=0.3)}
# Odd sizes (vector tails), an empty tensor and a matrix; on a GPU a few blocks' worth.
SHAPES = {"cuda": [(1,), (7,), (4097,), (0,), (5, 3), (1023, 1025), (65537,)],
          "cpu": [(1,), (7,), (300,), (0,), (5, 3)]}
FP32_RTOL = 1e-5  # the last-bit differences of two float32 computations of the same formula
SCALE = 1024.0  # GradScaler's scale in the scaler variants


class Variant(NamedTuple):
    """One kernel specialisation, named by the options that select it."""

    param: torch.dtype
    grad: torch.dtype
    state: torch.dtype
    stochastic: bool = False
    master: Union[bool, str] = False
    clip: str = "none"
    scaler: bool = False

    @property
    def name(self) -> str:
        parts = [_NAMES[self.param], "g" + _NAMES[self.grad], "s" + _NAMES[self.state]]
        parts += ["sr"] * self.stochastic + [{True: "master", "remainder": "remainder"}.get(self.master, "")]
        parts += [self.clip if self.clip != "none" else "", "scaler" if self.scaler else ""]
        return "-".join(p for p in parts if p)

    def options(self) -> dict[str, Any]:
        """The constructor arguments of :class:`Adadelta` that select this variant."""
        return dict(state_dtype=self.state, stochastic_rounding=self.stochastic, master_weights=self.master,
                    **CLIPS[self.clip])


def _launchable(v: Variant) -> bool:
    """The class takes these options for these dtypes, and each option does something.

    Probed on the PyTorch path with a three-element parameter: options it refuses (``remainder``
    with float16 parameters) are no variant. Master weights of float32 parameters keep no copy and
    stochastic rounding with nothing 16-bit rounds nothing: the same kernel as without, so left out.
    """
    if v.stochastic and torch.float32 == v.param == v.state:
        return False
    p = torch.ones(3, dtype=v.param)
    try:
        opt = Adadelta([p], fused=False, **v.options())
        set_grads([p], [torch.ones(3, dtype=v.grad)])
        opt.step()
    except (ValueError, TypeError, RuntimeError):
        return False
    return not (v.master and "master" not in opt.state[p])


def all_variants() -> list[Variant]:
    """Every launchable combination of the options (the product of the axes, refused ones left out)."""
    out = []
    for pd, sd, sr, master, clip, scaler in itertools.product(
            DTYPES.values(), DTYPES.values(), (False, True), (False, True, "remainder"), CLIPS, (False, True)):
        for gd in dict.fromkeys((pd, torch.float32)):
            v = Variant(pd, gd, sd, sr, master, clip, scaler)
            if _launchable(v):
                out.append(v)
    return out


def covering_variants() -> list[Variant]:
    """The variants checked first: every (parameter, gradient, state) dtype triple without options, then
    every option alone on every parameter dtype (float32 state, and 16-bit state of the parameter's
    dtype), then all options at once. Every kernel specialisation flag is on in some variant and off in
    another, for every dtype; :func:`all_variants` less these is what remains of the product."""
    f32 = torch.float32
    out = [Variant(pd, gd, sd) for pd in DTYPES.values() for gd in dict.fromkeys((pd, f32)) for sd in DTYPES.values()]
    options: list[dict[str, Any]] = [dict(stochastic=True), dict(master=True), dict(master="remainder")]
    options += [dict(clip=c) for c in CLIPS if c != "none"] + [dict(scaler=True)]
    for kw in options:
        for pd in DTYPES.values():
            for sd in dict.fromkeys((f32, pd if pd != f32 else torch.bfloat16)):
                out.append(Variant(pd, pd, sd, **kw))
    for pd in (torch.bfloat16, torch.float16):
        out.append(Variant(pd, pd, pd, True, True, "global_clipnorm", True))
        out.append(Variant(pd, f32, f32, True, "remainder" if pd == torch.bfloat16 else True, "clipnorm", True))
    seen, chosen = set(), []
    for v in out:
        if v not in seen and _launchable(v):
            seen.add(v)
            chosen.append(v)
    return chosen


def _ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units of the 16-bit dtype's spacing at |expected| (NaN where both are NaN: 0)."""
    e = expected.abs()
    # The next value away from zero: one more in the bit pattern of a finite non-negative value.
    ulp = (e.view(torch.int16) + 1).view(e.dtype).double() - e.double()
    diff = (actual.double() - expected.double()).abs()
    both_nan = actual.isnan() & expected.isnan()
    same = (actual == expected) | both_nan
    return torch.where(same, 0.0, diff / ulp)


class Distance(NamedTuple):
    """How far the fused results lie from the PyTorch path's: worst float32 relative error, worst 16-bit
    distance in ulps, and how many 16-bit elements differ at all out of how many compared."""

    fp32_rel: float
    ulps16: float
    differ16: int
    total16: int


def _distance(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Distance:
    rel, ulps, differ, total = 0.0, 0.0, 0, 0
    for actual, expected in pairs:
        a, e = actual.detach(), expected.detach()
        if a.numel() == 0:
            continue
        if a.dtype in (torch.bfloat16, torch.float16):
            u = _ulps(a, e)
            ulps = max(ulps, float(u.max()))
            differ += int((u > 0).sum())
            total += a.numel()
        else:
            a64, e64 = a.double(), e.double()
            scale = float(e64.abs().max())
            err = (a64 - e64).abs()
            err = torch.where(a64.isnan() & e64.isnan(), 0.0, err)
            rel = max(rel, float(err.max()) / scale if scale > 0 else float(err.max()))
    return Distance(rel, ulps, differ, total)


def _groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    # Two groups with other hyperparameters: the per-group table is read right.
    return [dict(params=params[:2], lr=0.5), dict(params=params[2:], lr=0.2, rho=0.8, weight_decay=0.01,
                                                 maximize=True)]


def _snapshot(opt: Adadelta, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params] + [
        t.detach().clone() for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return all(x.dtype == y.dtype and torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()]))
               for x, y in zip(a, b))


def check(v: Variant, device: Union[str, torch.device], seed: Optional[int] = None, steps: int = 2) -> dict[str, Any]:
    """Run ``steps`` steps of the fused path and of the PyTorch path from the same values; returns the
    distance of the results and whether they agree.

    Agreement: float32 within a relative 1e-5; 16-bit values within one ulp of the reference's (the
    float32 arithmetic of the two paths may differ in the last bit, which moves a rounding), and with
    stochastic rounding (both paths draw the same Philox words) at most one element in a thousand
    rounded differently. Each step starts both from the fused path's values, so 16-bit roundings do
    not compound. GradScaler variants: gradients scaled by 1024 and unscaled in the step, then a step
    with ``found_inf`` set that must leave parameters and state bit for bit as they were.
    """
    device = torch.device(device)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    params = make_params(SHAPES[device.type], v.param, device, seed=seed)
    ref_params = [p.detach().clone() for p in params]  # the PyTorch path runs on the same device
    fused = Adadelta(_groups(params), fused=True, **v.options())
    ref = Adadelta(_groups(ref_params), fused=False, **v.options())
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step in range(steps):
        grads = random_grads(params, seed=seed + 1 + step, grad_dtype=v.grad)
        if v.scaler:
            grads = [(g.double() * SCALE).to(g.dtype) for g in grads]
        set_grads(params, grads)
        set_grads(ref_params, grads)
        if step:
            resync_reference(fused, ref, params, ref_params)
        kw = {}
        if v.scaler:
            kw = dict(grad_scale=torch.full((1,), SCALE, device=device), found_inf=torch.zeros(1, device=device))
        fused.step(**kw)
        ref.step(**kw)
        for p, q in zip(params, ref_params):
            now = [(p, q)] + [(fused.state[p][n], ref.state[q][n]) for n in ("square_avg", "acc_delta")]
            if "master" in fused.state[p]:
                m, mr = fused.state[p]["master"], ref.state[q]["master"]
                if m.dtype == torch.int16:  # remainder: the float32 values the pairs make
                    m, mr = join_remainder(p, m), join_remainder(q, mr)
                now.append((m, mr))
            pairs += [(a.detach().clone(), b.detach().clone()) for a, b in now]  # the next step writes them
    counts_ok = all(float(fused.state[p]["step"]) == float(ref.state[q]["step"]) == steps
                    for p, q in zip(params, ref_params))
    skip_ok = True
    if v.scaler:
        before = _snapshot(fused, params)
        set_grads(params, random_grads(params, seed=seed + 99, grad_dtype=v.grad))
        fused.step(grad_scale=torch.full((1,), SCALE, device=device), found_inf=torch.ones(1, device=device))
        skip_ok = _bitwise_equal(before, _snapshot(fused, params))
    d = _distance(pairs)
    rounded_apart = d.differ16 <= max(2, d.total16 // 1000) if v.stochastic else True
    ok = d.fp32_rel <= FP32_RTOL and d.ulps16 <= 1.0 and rounded_apart and counts_ok and skip_ok
    return dict(ok=bool(ok), seed=seed, steps=steps, fp32_rel=d.fp32_rel, ulps16=d.ulps16, differ16=d.differ16,
                total16=d.total16, step_counts_ok=counts_ok, found_inf_skip_ok=skip_ok,
                elements=sum(p.numel() for p in params))
