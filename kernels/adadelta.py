"""The fused multi-tensor Adadelta update.

One launch updates every tensor of a bucket. Program ``pid`` handles one block of ``BLOCK``
elements of one tensor: ``chunk_tensor[pid]`` names the tensor and ``chunk_block[pid]`` the
block inside it. Parameter and gradient addresses come from int64 pointer tables (the pattern of
Triton's grouped-GEMM tutorial); the optimizer state lives in two flat buffers addressed by
the state-offset column of ``tensor_meta``. Hyperparameters are read per tensor from a small table indexed by its param
group, so param groups never split a launch.

Every element is read once (p, g, square_avg, acc_delta) and written once (p, square_avg,
acc_delta); the arithmetic is float32 in registers.

Tensors whose parameter and gradient are 16-byte aligned with a size a multiple of VEC take the
ALIGNED specialisation (128-bit accesses); the others another compilation of the same kernel, in
their own launch, so the common launch never carries the scalar path's registers. Offsets inside
a block are 32-bit; the 64-bit part (the block's start) is added to the pointers once.
"""

import triton
import triton.language as tl

# Columns of the hyperparameter table, one row per param group.
# OMR is 1 - rho rounded once from float64, as torch does; SEED is the group's stochastic-rounding
# seed, an integer below 2**24 (exact in float32).
HYPER_LR, HYPER_RHO, HYPER_OMR, HYPER_EPS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
HYPER_WD, HYPER_SIGN, HYPER_SEED = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6)
# CLIP is Keras' clipvalue (+inf without one), read only when HAS_CLIP.
HYPER_CLIP = tl.constexpr(7)
HYPER_COLS = tl.constexpr(8)
# Columns of the per-tensor table.
META_OFFSET, META_NUMEL, META_STEP, META_GROUP = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
META_COLS = tl.constexpr(4)


@triton.jit
def _bf16_from_bits(bits, x):
    """bfloat16 from float32 bits whose low 16 bits are already cleared; NaN stays NaN.

    The cast itself is then exact, so results do not depend on how a backend rounds: the Triton
    interpreter truncates float32 -> bfloat16 while GPUs round to nearest.
    """
    canonical_nan = 0x7FC00000
    bits = tl.where(x != x, canonical_nan, bits)
    # A bit cast of the high half, not a float conversion: the interpreter's conversion flushes subnormals.
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_nearest_bf16(x):
    """float32 -> bfloat16, round to nearest even (torch's rounding)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return _bf16_from_bits(bits, x)


@triton.jit
def _round_stochastic_bf16(x, rnd):
    """float32 -> bfloat16 without bias: add the 16-bit noise ``rnd`` below the bf16 mantissa, truncate.

    ``x`` rounds away from zero with probability equal to its distance from the value below, in
    bf16 ulps. Inf stays Inf and a finite value never rounds up into Inf (it saturates).
    """
    noise = rnd & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True)
    finite = tl.abs(x) <= 3.4028234663852886e38
    rounded = (bits + noise) & 0xFFFF0000
    max_bf16 = 0x7F7F0000
    sign = bits & 0x80000000
    rounded = tl.where(finite & ((rounded & 0x7FFFFFFF) > max_bf16), sign | max_bf16, rounded)
    rounded = tl.where(finite, rounded, bits & 0xFFFF0000)
    return _bf16_from_bits(rounded, x)


@triton.jit
def _round_stochastic_fp16(x, rnd):
    """float32 -> float16 without bias, on the bit pattern: reference.round_stochastic's float16 branch.

    ``|x| * 2^-112`` moves float16's exponent range onto float32's lowest binades: in the float16
    normal range it is exact and its bit pattern is ``|x|``'s with the exponent rebiased from 127 to
    15; below 2^-14 it is a float32 subnormal, in steps of 2^-13 float16 subnormal steps (one
    rounding to nearest, both paths alike). Either way float16's 10 mantissa bits sit above 13 bits
    of fraction: add 13 bits of noise there and keep the top, ``(bits + noise) >> 13`` is the float16
    bit pattern, a carry rounding up into the next binade. ``|x|`` is first clamped to 65504 so that
    a finite value never rounds up into Inf, and set to 65536 (whose pattern becomes float16's Inf)
    from 65536 on, as a cast overflows; NaN passes the clamp and ends as the quiet NaN 0x7E00. The
    sign is kept. The result is assembled bit by bit, so no backend conversion mode is involved.
    """
    mag = tl.abs(x)
    mag = tl.where(mag >= 65536.0, 65536.0, tl.minimum(mag, 65504.0, propagate_nan=tl.PropagateNan.ALL))
    shifted = (mag * 1.925929944387236e-34).to(tl.uint32, bitcast=True)  # 2^-112
    h = tl.minimum((shifted + ((rnd & 0xFFFF) >> 3)) >> 13, 0x7E00)  # only a NaN's pattern lies above 0x7C00
    h = h | ((x.to(tl.uint32, bitcast=True) >> 16) & 0x8000)
    return h.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _join_remainder(high, low):
    """float32 from a bfloat16 parameter (its high half) and the int16 remainder: bits = high << 16 + low."""
    hi = high.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    return (hi.to(tl.int32, bitcast=True) + low.to(tl.int32)).to(tl.float32, bitcast=True)


@triton.jit
def _split_remainder(x):
    """float32 -> (bfloat16, int16 remainder) with join(split(x)) == x: reference.split_remainder.

    The high half rounds to nearest, ties away from zero, so the remainder fits a signed 16-bit
    integer; NaN becomes the canonical NaN first, so the round-up never carries out of a NaN.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(x != x, 0x7FC00000, bits)
    lo = bits & 0xFFFF
    up = lo >> 15
    high = ((bits >> 16) + up) << 16
    low = lo.to(tl.int32) - (up << 16).to(tl.int32)
    return _bf16_from_bits(high, high.to(tl.float32, bitcast=True)), low.to(tl.int16)


@triton.jit
def _noise(seed, first, PURPOSE: tl.constexpr, BLOCK: tl.constexpr):
    """16-bit uniform noise for the ``BLOCK`` elements of a flat state from ``first`` (a multiple of 8):
    one Philox-4x32-10 call serves eight elements, four 32-bit words holding eight 16-bit values.

    Element ``e`` takes half ``e % 2`` (low, then high) of word ``(e % 8) // 2`` of the call with
    counter ``(e // 8, PURPOSE, 0)`` (the 64-bit ``e // 8`` in the first two words) and key ``seed``.
    ``PURPOSE`` (0 parameter, 1 square_avg, 2 acc_delta) keeps the three writes' draws apart, and a
    variant draws only for the writes it rounds. reference.philox_bits draws the same values.
    """
    calls = first // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
    c0 = calls.to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, (calls >> 32).to(tl.uint32), zero + PURPOSE, zero)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [BLOCK/8, 2, 2]: word 2x + y at [:, x, y]
    halves = tl.join(words & 0xFFFF, words >> 16)  # [BLOCK/8, 2, 2, 2]: row-major order is element order
    return tl.reshape(halves, [BLOCK])


@triton.jit
def _store(ptr, value, mask, rnd, STOCHASTIC: tl.constexpr):
    if ptr.dtype.element_ty == tl.bfloat16:
        if STOCHASTIC:
            tl.store(ptr, _round_stochastic_bf16(value, rnd), mask=mask)
        else:
            tl.store(ptr, _round_nearest_bf16(value), mask=mask)
    elif ptr.dtype.element_ty == tl.float16:
        if STOCHASTIC:
            tl.store(ptr, _round_stochastic_fp16(value, rnd), mask=mask)
        else:
            tl.store(ptr, value.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_block(
    p_ptr, g_ptr, v_ptr, u_ptr, m_ptr, mask, seed, first,
    lr, rho, omr, eps, wd, sign, gscale, coef, clip,
    BLOCK: tl.constexpr, HAS_CLIP: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """One block: the pointers point at its first element, ``first`` is that element's index in the flat state."""
    idx = tl.arange(0, BLOCK)  # 32-bit offsets inside the block; the 64-bit part is in the pointers
    if MASTER == 2:
        p = _join_remainder(tl.load(p_ptr + idx, mask=mask, other=0.0), tl.load(m_ptr + idx, mask=mask, other=0))
    elif MASTER == 1:
        p = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    g = g * gscale
    if HAS_CLIP:
        # Keras' order on the unscaled gradient: clamp to clipvalue, then the norm clip's multiplier.
        # NaN stays NaN (a plain max/min on the GPU would return the bound instead).
        g = tl.minimum(tl.maximum(g, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                       propagate_nan=tl.PropagateNan.ALL) * coef
    g = g * sign
    if wd != 0.0:  # skipped entirely when 0, as torch does (0 * inf would be NaN)
        g = g + wd * p
    # The order of torch's operations, so that float32 results match it to the last bit or two.
    v = v * rho + (omr * g) * g
    delta = tl.div_rn(tl.sqrt_rn(u + eps), tl.sqrt_rn(v + eps)) * g
    u = u * rho + (omr * delta) * delta
    p = p - lr * delta

    # Noise only for the writes that round to 16 bits, each draw just before its store (fewer live
    # registers): a Philox call per 8 elements and write.
    r = 0
    if STOCHASTIC and v_ptr.dtype.element_ty != tl.float32:
        r = _noise(seed, first, 1, BLOCK)
    _store(v_ptr + idx, v, mask, r, STOCHASTIC)
    if STOCHASTIC and u_ptr.dtype.element_ty != tl.float32:
        r = _noise(seed, first, 2, BLOCK)
    _store(u_ptr + idx, u, mask, r, STOCHASTIC)
    if STOCHASTIC and MASTER == 0 and p_ptr.dtype.element_ty != tl.float32:
        r = _noise(seed, first, 0, BLOCK)
    r_p = r
    if MASTER == 2:
        high, low = _split_remainder(p)
        tl.store(p_ptr + idx, high, mask=mask)
        tl.store(m_ptr + idx, low, mask=mask)
    elif MASTER == 1:
        _store(p_ptr + idx, p, mask, r_p, False)
        tl.store(m_ptr + idx, p, mask=mask)
    else:
        _store(p_ptr + idx, p, mask, r_p, STOCHASTIC)


@triton.jit
def _stream_id(P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr):
    """A number below 16 for the (parameter dtype, state dtype) of a flat state, so flat states whose
    element indices overlap draw different random words. optimizer._rng_stream mirrors it. (A group
    has one master mode per parameter dtype, and both modes follow the same float32 trajectory: they
    share the stream.)"""
    p_code: tl.constexpr = 0 if P_DTYPE == tl.float32 else (1 if P_DTYPE == tl.bfloat16 else 2)
    s_code: tl.constexpr = 0 if S_DTYPE == tl.float32 else (1 if S_DTYPE == tl.bfloat16 else 2)
    return p_code + 4 * s_code


@triton.jit
def adadelta_kernel(
    param_table,  # int64 [2T]: parameter addresses, then gradient addresses
    tensor_meta,  # int64 [T, META_COLS]: state offset, elements (real view), step slot, param group
    chunk_tensor,  # int32 [C]: tensor of each program
    chunk_block,  # int32 [C]: block of that tensor handled by each program
    square_avg,  # flat state, state dtype
    acc_delta,  # flat state, state dtype
    master,  # flat float32 master weights (MASTER == 1) or int16 remainders (MASTER == 2); else unused
    steps,  # float32: per-tensor step counts, read for the seed (the host increments them afterwards)
    hyper,  # float32 [G, HYPER_COLS]
    clip_coef,  # float32 [T]: per-tensor gradient multiplier (read only when HAS_CLIP)
    grad_scale,  # float32 [1]: GradScaler scale (read only when HAS_SCALER)
    found_inf,  # float32 [1]: 1.0 when the step must change nothing (read only when HAS_SCALER)
    num_tensors,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes of the narrowest operand
    HAS_CLIP: tl.constexpr,
    HAS_SCALER: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor of this launch: both addresses 16-byte aligned, numel % VEC == 0
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_block + pid).to(tl.int64) * BLOCK
    offset = tl.load(tensor_meta + t * META_COLS + META_OFFSET)
    step_slot = tl.load(tensor_meta + t * META_COLS + META_STEP)
    row = tl.load(tensor_meta + t * META_COLS + META_GROUP) * HYPER_COLS
    lr = tl.load(hyper + row + HYPER_LR)
    rho = tl.load(hyper + row + HYPER_RHO)
    omr = tl.load(hyper + row + HYPER_OMR)
    eps = tl.load(hyper + row + HYPER_EPS)
    wd = tl.load(hyper + row + HYPER_WD)
    sign = tl.load(hyper + row + HYPER_SIGN)

    skip = 0.0
    gscale = 1.0
    coef = 1.0
    clip = 0.0
    if HAS_SCALER:
        skip = tl.load(found_inf)
        gscale = 1.0 / tl.load(grad_scale)
    if HAS_CLIP:
        coef = tl.load(clip_coef + t)
        clip = tl.load(hyper + row + HYPER_CLIP)
    seed = 0
    if STOCHASTIC:
        # Philox key: low word the tensor's step count (a fresh stream every step), high word the
        # group's seed and the flat state's stream id; reference.PhiloxStream builds the same key.
        stream = _stream_id(P_DTYPE, square_avg.dtype.element_ty)
        key1 = tl.load(hyper + row + HYPER_SEED).to(tl.int64) * 64 + stream
        seed = key1 * 4294967296 + tl.load(steps + step_slot).to(tl.int64)

    if skip == 0.0:
        # State offsets are padded to 64 elements and blocks start at multiples of BLOCK: a true hint.
        first = tl.multiple_of(offset + start, 64)
        # Elements of this block in the tensor (the one mask: the tail of each tensor's last block).
        left = tl.minimum(tl.load(tensor_meta + t * META_COLS + META_NUMEL) - start, BLOCK).to(tl.int32)
        p_ptr = tl.load(param_table + t).to(tl.pointer_type(P_DTYPE)) + start
        g_ptr = tl.load(param_table + num_tensors + t).to(tl.pointer_type(G_DTYPE)) + start
        if ALIGNED:
            # The host checked every tensor of this launch: both addresses are 16-byte aligned and n is
            # a multiple of VEC (so is `left`, BLOCK being one). The unaligned specialisation never
            # sees these promises: it is another compilation of this kernel, another launch.
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            left = tl.multiple_of(left, VEC)
        mask = tl.arange(0, BLOCK) < left
        _update_block(p_ptr, g_ptr, square_avg + first, acc_delta + first, master + first, mask, seed, first,
                      lr, rho, omr, eps, wd, sign, gscale, coef, clip,
                      BLOCK, HAS_CLIP, MASTER, STOCHASTIC)
