"""The Adadelta update written once in plain PyTorch.

This module is both the CPU path of :class:`triton_adadelta.Adadelta` and the oracle that every
test compares the fused Triton kernel against. For one tensor and its gradient ``g``::

    g  = clip_coef * (g / grad_scale)          (both optional, 1 when absent)
    g  = -g if maximize
    g  = g + weight_decay * p                   (coupled weight decay, only when weight_decay != 0)
    v  = rho * v + (1 - rho) * g * g            (square_avg,  Keras: accum_grad)
    d  = sqrt(u + eps) / sqrt(v + eps) * g
    u  = rho * u + (1 - rho) * d * d            (acc_delta,   Keras: accum_var)
    p  = p - lr * d

Arithmetic is float32 for float32/bfloat16/float16 parameters and float64 for float64 ones,
whatever the storage dtypes of the state are. Complex tensors are updated as real views.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "real_view",
    "adadelta_update_",
    "round_stochastic",
]


def real_view(t: Tensor) -> Tensor:
    """``torch.view_as_real`` for complex tensors, the tensor itself otherwise."""
    return torch.view_as_real(t) if t.is_complex() else t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for a parameter dtype: float64 stays float64, everything else float32."""
    if dtype in (torch.float64, torch.complex128):
        return torch.float64
    return torch.float32


def round_stochastic(x: Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None) -> Tensor:
    """Round float32 ``x`` to ``dtype`` (bfloat16 or float16) without bias.

    bfloat16: add a uniform 16-bit integer to the float32 bit pattern and clear the low 16 bits,
    so ``x`` rounds up with probability equal to its distance from the lower neighbour.
    float16: the same idea in float64 arithmetic, between the two neighbouring float16 values.
    NaN and Inf pass through unchanged. Anything else is a plain cast.
    """
    if dtype == torch.bfloat16:
        x = x.to(torch.float32)
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
        bits = x.view(torch.int32)
        rounded = ((bits + noise) & -65536).view(torch.float32)
        # Adding noise to a value just below the largest finite bf16 may carry into Inf; clamp it back.
        big = torch.finfo(torch.bfloat16).max
        rounded = torch.where(rounded.isinf() & x.isfinite(), rounded.sign() * big, rounded)
        return torch.where(x.isfinite(), rounded, x).to(dtype)
    if dtype == torch.float16:
        x64 = x.to(torch.float64)
        low = x64.to(torch.float16)
        low = torch.where(low.to(torch.float64) > x64, torch.nextafter(low, torch.full_like(low, -float("inf"))), low)
        high = torch.nextafter(low, torch.full_like(low, float("inf")))
        gap = high.to(torch.float64) - low.to(torch.float64)
        frac = torch.where(gap > 0, (x64 - low.to(torch.float64)) / gap, torch.zeros_like(x64))
        u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
        out = torch.where(u < frac, high, low)
        return torch.where(x64.isfinite() & high.isfinite(), out, x64.to(torch.float16))
    return x.to(dtype)


def adadelta_update_(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    clip_coef: Optional[Tensor] = None,
    master: Optional[Tensor] = None,
    stochastic_rounding: bool = False,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Apply one Adadelta step to ``param`` in place (the equations in the module docstring).

    ``square_avg``/``acc_delta`` have the parameter's shape (complex parameters: complex state or its
    real view) in any floating dtype. ``grad_scale`` divides the gradient (GradScaler's scale) and
    ``clip_coef`` multiplies it, both 0-d tensors. ``master`` is an optional float32 copy of a
    low-precision parameter: it is read and written instead of ``param``, and ``param`` receives it
    rounded to nearest. ``stochastic_rounding`` rounds the new parameter (and low-precision state)
    stochastically with ``generator``.
    """
    p = real_view(param)
    g = real_view(grad)
    v_store = real_view(square_avg)
    u_store = real_view(acc_delta)
    cdt = compute_dtype(param.dtype)

    source = real_view(master) if master is not None else p
    p32 = source.to(cdt)
    g32 = g.to(cdt)
    if grad_scale is not None:
        g32 = g32 / grad_scale.to(cdt)
    if clip_coef is not None:
        g32 = g32 * clip_coef.to(cdt)
    if maximize:
        g32 = -g32
    if weight_decay != 0:
        g32 = g32 + weight_decay * p32

    # torch's order of operations (addcmul is (value * t1) * t2), so float32 matches it bit for bit.
    v = v_store.to(cdt) * rho + ((1 - rho) * g32) * g32
    std = (v + eps).sqrt()
    delta = (u_store.to(cdt) + eps).sqrt() / std * g32
    u = u_store.to(cdt) * rho + ((1 - rho) * delta) * delta
    new_p = p32 - lr * delta

    def store(dst: Tensor, value: Tensor) -> None:
        if stochastic_rounding and dst.dtype in (torch.bfloat16, torch.float16):
            dst.copy_(round_stochastic(value, dst.dtype, generator))
        else:
            dst.copy_(value)

    store(v_store, v)
    store(u_store, u)
    if master is not None:
        real_view(master).copy_(new_p)
        p.copy_(new_p)
    else:
        store(p, new_p)
