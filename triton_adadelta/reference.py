"""The Adadelta update written once in plain PyTorch.

This module is both the PyTorch path of :class:`triton_adadelta.Adadelta` (on CPU, for what the
fused CPU path does not take) and the oracle that every test compares the fused paths against.
For one tensor and its gradient ``g``::

    g  = clip_coef * clamp(g / grad_scale, -clip_value, clip_value)   (each optional)
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

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "real_view",
    "adadelta_update_",
    "round_stochastic",
    "philox4x32",
    "philox_bits",
    "PhiloxStream",
    "join_remainder",
    "split_remainder",
]


def real_view(t: Tensor) -> Tensor:
    """``torch.view_as_real`` for complex tensors, the tensor itself otherwise."""
    return torch.view_as_real(t) if t.is_complex() else t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for a parameter dtype: float64 stays float64, everything else float32."""
    if dtype in (torch.float64, torch.complex128):
        return torch.float64
    return torch.float32


_U32 = 0xFFFFFFFF
# Philox-4x32-10 (Salmon et al., SC'11): the multipliers and Weyl key increments of the standard.
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_FP16_MAX = 65504.0
_PHILOX_CHUNK = 1 << 14


class PhiloxStream(NamedTuple):
    """Where the random bits for one tensor come from: Philox key (key0, key1) and first counter.

    ``key0`` may be a 0-d integer tensor (a step count kept on the device), so that building the
    stream needs no host read.
    """

    key0: Union[int, Tensor]
    key1: int
    offset: int


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # 32 x 32 -> 64-bit product in int64 arithmetic: split b in 16-bit halves so nothing overflows.
    lo_part = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (lo_part >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32(
    key0: Union[int, Tensor], key1: Union[int, Tensor], c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 on int64 tensors that hold unsigned 32-bit values: four random words per counter.

    The same function as Triton's ``tl.philox(seed, c0, c1, c2, c3)`` with 32-bit counters and
    ``seed = key1 << 32 | key0``, so the PyTorch path draws the very bits the kernel draws.
    Each round: ``(c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))``,
    then the key grows by the Weyl constants.
    """
    k0, k1 = key0, key1
    for _ in range(10):
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _U32
        k1 = (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


def philox_bits(
    stream: PhiloxStream, numel: int, device: Union[str, torch.device], lanes: tuple[int, ...] = (0, 1, 2)
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """16-bit uniform noise (int64 in [0, 2^16)) for ``numel`` elements, for each write that rounds:
    lane 0 the parameter, 1 square_avg, 2 acc_delta; only the ``lanes`` asked for are drawn (None else).

    Element ``i`` is number ``e = stream.offset + i`` of its flat state. One Philox-4x32-10 call
    serves eight elements: lane ``q`` of element ``e`` is half ``e % 2`` (low 16 bits, then high) of
    word ``(e % 8) // 2`` of the call with counter ``(e // 8 mod 2^32, e // 8 >> 32, q, 0)``, exactly
    as the kernel's ``_noise`` draws it.
    """
    key0 = stream.key0.to(device=device, dtype=torch.int64) if isinstance(stream.key0, Tensor) else stream.key0
    out: list[Optional[Tensor]] = [None, None, None]
    if numel == 0:
        return tuple(torch.zeros(0, dtype=torch.int64, device=device) if q in lanes else None for q in range(3))
    first, last = stream.offset // 8, (stream.offset + numel - 1) // 8
    skip = stream.offset - 8 * first
    # Philox is ~250 elementwise int64 passes: in chunks that stay in the CPU's cache it runs ~5x faster.
    chunk = _PHILOX_CHUNK // 8 if torch.device(device).type == "cpu" else last - first + 1
    for q in lanes:
        parts = []
        for start in range(first, last + 1, chunk):
            calls = torch.arange(start, min(start + chunk, last + 1), dtype=torch.int64, device=device)
            words = torch.stack(philox4x32(key0, stream.key1, calls & _U32, calls >> 32,
                                           torch.full_like(calls, q), torch.zeros_like(calls)), 1)
            parts.append(torch.stack((words & 0xFFFF, words >> 16), 2).reshape(-1))  # element order
        out[q] = torch.cat(parts)[skip: skip + numel]
    return out[0], out[1], out[2]


def _float_from_u32(bits: Tensor) -> Tensor:
    """float32 whose bit pattern is the unsigned 32-bit value held in int64 ``bits``."""
    return torch.where(bits >= (1 << 31), bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def round_stochastic(
    x: Tensor, dtype: torch.dtype, bits: Optional[Tensor] = None, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Round ``x`` (computed in float32) to ``dtype`` so that the result is ``x`` on average.

    With ``lo <= |x| < hi`` the two neighbouring values of ``dtype``, ``|x|`` becomes ``hi`` with
    probability ``(|x| - lo) / (hi - lo)`` and ``lo`` otherwise, so ``E[round(x)] = x``.
    ``bits`` holds one uniform 16-bit value per element (int64; e.g. from :func:`philox_bits`; only
    its low 16 bits are used), drawn from ``generator`` when None.

    bfloat16: the 16 bits are added to the float32 bit pattern, then the low 16 bits are cleared.
    float16: the same on the bit pattern of ``|x| * 2^-112``, which holds float16's bits above 13
    bits of fraction: its top 13 noise bits are added there and the top bits kept. In float16's
    normal range the product is exact (``|x|`` with the exponent rebiased), so the odds are exact;
    below 2^-14 it is a float32 subnormal, ``|x|`` rounded to nearest in steps of 2^-13 float16
    ulp before the draw (a bias below 2^-14 ulp, 2^-38 in value). NaN stays NaN (float16's quiet
    NaN, sign kept) and +-Inf stay as they are; a finite value
    is never rounded up into Inf (it saturates at the largest finite value), but float16 overflow
    (|x| >= 65536, outside every float16 binade) is +-Inf as in a plain cast. Signed zeros keep
    their sign. Other dtypes: a plain cast.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    x = x.to(torch.float32)
    if bits is None:
        bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int64, device=x.device, generator=generator)
    bits = bits & 0xFFFF
    xb = x.view(torch.int32).to(torch.int64) & _U32
    sign = xb & 0x80000000
    finite = x.isfinite()
    if dtype == torch.bfloat16:
        rounded = (xb + (bits & 0xFFFF)) & 0xFFFF0000
        # A carry out of the largest finite bf16 would give Inf: saturate instead.
        rounded = torch.where((rounded & 0x7FFFFFFF) > 0x7F7F0000, sign | 0x7F7F0000, rounded)
        out = _float_from_u32(rounded)
    else:
        # |x| * 2^-112: float16's exponent range on float32's lowest binades (exact in float16's normal
        # range, float32 subnormals in steps of 2^-13 float16 ulp below it); 13 noise bits below
        # float16's mantissa, then the top bits are the float16 bit pattern (the kernel's _round_stochastic_fp16).
        mag = x.abs()
        mag = torch.where(mag >= 65536.0, 65536.0, mag.clamp(max=_FP16_MAX))  # NaN stays NaN
        shifted = (mag * 2.0**-112).view(torch.int32).to(torch.int64) & _U32
        half = ((shifted + (bits >> 3)) >> 13).clamp(max=0x7E00) | ((xb >> 16) & 0x8000)  # above Inf: NaN
        return torch.where(half >= 0x8000, half - 0x10000, half).to(torch.int16).view(torch.float16)
    return torch.where(finite, out, x).to(dtype)  # every finite ``out`` is exact in ``dtype``


def join_remainder(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 value held as a bfloat16 ``param`` plus its int16 ``remainder``.

    ``bits(x) = (bits(param) << 16) + remainder`` (integer arithmetic modulo 2^32): the inverse of
    :func:`split_remainder`, exact for every float32 ``x`` (NaN payloads aside).
    """
    hi = param.view(torch.int16).to(torch.int64) & 0xFFFF
    bits = ((hi << 16) + remainder.to(torch.int64)) & _U32
    return _float_from_u32(bits)


def split_remainder(x: Tensor) -> tuple[Tensor, Tensor]:
    """float32 ``x`` as (bfloat16 parameter, int16 remainder), TransformerEngine's store_param_remainders idea.

    The parameter is ``x`` rounded to nearest with ties away from zero: the top 16 bits of ``x``,
    plus one when the low 16 bits are 0x8000 or more, which leaves a remainder in [-2^15, 2^15).
    The pair holds ``x`` exactly in 4 bytes: exact float32 master weights for 2 extra bytes a
    parameter. NaN becomes the canonical NaN (so rounding up never carries out of the exponent).
    """
    x = x.to(torch.float32)
    bits = x.view(torch.int32).to(torch.int64) & _U32
    bits = torch.where(x.isnan(), 0x7FC00000, bits)
    lo = bits & 0xFFFF
    up = lo >> 15
    hi = (bits >> 16) + up
    remainder = (lo - (up << 16)).to(torch.int16)
    param = _float_from_u32((hi << 16) & _U32).to(torch.bfloat16)  # exact: the low half is zero
    return param, remainder


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
    remainder: Optional[Tensor] = None,
    stochastic_rounding: bool = False,
    rng: Optional[PhiloxStream] = None,
    clip_value: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Apply one Adadelta step to ``param`` in place (the equations in the module docstring).

    ``square_avg``/``acc_delta`` have the parameter's shape (complex parameters: complex state or its
    real view) in any floating dtype. ``grad_scale`` divides the gradient (GradScaler's scale) and
    ``clip_coef`` multiplies it, both 0-d tensors; ``clip_value`` clamps it in between (Keras'
    clipvalue; NaN stays NaN). ``master`` is an optional float32 copy of a
    low-precision parameter: it is read and written instead of ``param``, and ``param`` receives it
    rounded to nearest. ``remainder`` (bfloat16 parameters only) is the int16 low half of the float32
    value whose high half is ``param`` (:func:`join_remainder`): the update reads and writes that
    float32 value exactly, through both tensors (:func:`split_remainder`).
    ``stochastic_rounding`` rounds every bfloat16/float16 write (the parameter unless ``master``
    or ``remainder`` is given, and 16-bit state) with :func:`round_stochastic`; the random words
    come from ``rng`` (:func:`philox_bits`: the kernel's stream) or else from ``generator``.
    """
    p = real_view(param)
    g = real_view(grad)
    v_store = real_view(square_avg)
    u_store = real_view(acc_delta)
    cdt = compute_dtype(param.dtype)

    if remainder is not None:
        p32 = join_remainder(p, remainder)
    else:
        p32 = (real_view(master) if master is not None else p).to(cdt)
    g32 = g.to(cdt)
    if grad_scale is not None:
        g32 = g32 / grad_scale.to(cdt)
    if clip_value is not None:
        g32 = g32.clamp(-clip_value, clip_value)
    if clip_coef is not None:
        g32 = g32 * clip_coef.to(cdt)
    if maximize:
        g32 = -g32
    if weight_decay != 0:
        g32 = g32 + weight_decay * p32

    # torch's order of operations (addcmul is (value * t1) * t2). torch's vectorised CPU addcmul fuses
    # the last multiply-add; these separate operations round it twice, as the kernels do (docs/api.md).
    v = v_store.to(cdt) * rho + ((1 - rho) * g32) * g32
    std = (v + eps).sqrt()
    delta = (u_store.to(cdt) + eps).sqrt() / std * g32
    u = u_store.to(cdt) * rho + ((1 - rho) * delta) * delta
    new_p = p32 - lr * delta

    lanes: tuple = (None, None, None)
    sixteen = (torch.bfloat16, torch.float16)
    exact = master is not None or remainder is not None
    rounds = (p.dtype in sixteen and not exact) or v_store.dtype in sixteen or u_store.dtype in sixteen
    if stochastic_rounding and rng is not None and rounds:
        # Only the writes that round draw (as in the kernel): the parameter without master weights, 16-bit state.
        drawn = tuple(q for q, t in enumerate((p, v_store, u_store)) if t.dtype in sixteen and not (q == 0 and exact))
        lanes = philox_bits(rng, p.numel(), p.device, drawn)

    def store(dst: Tensor, value: Tensor, lane: int) -> None:
        if stochastic_rounding and dst.dtype in (torch.bfloat16, torch.float16):
            bits = lanes[lane]
            bits = None if bits is None else bits.view(dst.shape)
            dst.copy_(round_stochastic(value, dst.dtype, bits, generator))
        else:
            dst.copy_(value)

    store(v_store, v, 1)
    store(u_store, u, 2)
    if remainder is not None:
        high, low = split_remainder(new_p)
        p.copy_(high)
        remainder.copy_(low)
    elif master is not None:
        real_view(master).copy_(new_p)
        p.copy_(new_p)
    else:
        store(p, new_p, 0)
