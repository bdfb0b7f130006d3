"""The fused multi-tensor Adadelta update.

One launch updates every tensor of a bucket. Program ``pid`` handles one block of ``BLOCK``
elements of one tensor: ``chunk_tensor[pid]`` names the tensor and ``chunk_block[pid]`` the
block inside it. Parameter and gradient addresses come from int64 pointer tables (the pattern of
Triton's grouped-GEMM tutorial); the optimizer state lives in two flat buffers addressed by
``state_offsets``. Hyperparameters are read per tensor from a small table indexed by its param
group, so param groups never split a launch.

Every element is read once (p, g, square_avg, acc_delta) and written once (p, square_avg,
acc_delta); the arithmetic is float32 in registers.
"""

import triton
import triton.language as tl

# Columns of the hyperparameter table, one row per param group.
# OMR is 1 - rho rounded once from float64, as torch does; SEED is the group's stochastic-rounding
# seed, an integer below 2**24 (exact in float32).
HYPER_LR, HYPER_RHO, HYPER_OMR, HYPER_EPS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
HYPER_WD, HYPER_SIGN, HYPER_SEED = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6)
HYPER_COLS = tl.constexpr(7)
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
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _round_nearest_bf16(x):
    """float32 -> bfloat16, round to nearest even (torch's rounding)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return _bf16_from_bits(bits, x)


@triton.jit
def _round_stochastic_bf16(x, seed, idx):
    """float32 -> bfloat16 without bias: add 16 random bits below the bf16 mantissa, then truncate.

    Inf stays Inf and a finite value never rounds up into Inf.
    """
    noise = tl.randint(seed, idx).to(tl.uint32) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True)
    finite = tl.abs(x) <= 3.4028234663852886e38
    rounded = (bits + noise) & 0xFFFF0000
    max_bf16 = 0x7F7F0000
    sign = bits & 0x80000000
    rounded = tl.where(finite & ((rounded & 0x7FFFFFFF) > max_bf16), sign | max_bf16, rounded)
    rounded = tl.where(finite, rounded, bits & 0xFFFF0000)
    return _bf16_from_bits(rounded, x)


@triton.jit
def _store(ptr, value, mask, seed, idx, STOCHASTIC: tl.constexpr):
    if ptr.dtype.element_ty == tl.bfloat16:
        if STOCHASTIC:
            tl.store(ptr, _round_stochastic_bf16(value, seed, idx), mask=mask)
        else:
            tl.store(ptr, _round_nearest_bf16(value), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_block(
    p_ptr, g_ptr, v_ptr, u_ptr, m_ptr, idx, mask, seed, ridx,
    lr, rho, omr, eps, wd, sign, gscale,
    MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    if MASTER:
        p = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    g = g * gscale * sign
    if wd != 0.0:  # skipped entirely when 0, as torch does (0 * inf would be NaN)
        g = g + wd * p
    # The order of torch's operations, so that float32 results match it to the last bit or two.
    v = v * rho + (omr * g) * g
    delta = tl.div_rn(tl.sqrt_rn(u + eps), tl.sqrt_rn(v + eps)) * g
    u = u * rho + (omr * delta) * delta
    p = p - lr * delta

    # `ridx` numbers the element within the bucket; three counters per element keep the streams apart.
    _store(v_ptr + idx, v, mask, seed, ridx * 3 + 1, STOCHASTIC)
    _store(u_ptr + idx, u, mask, seed, ridx * 3 + 2, STOCHASTIC)
    if MASTER:
        tl.store(m_ptr + idx, p, mask=mask)
        _store(p_ptr + idx, p, mask, seed, ridx * 3, False)
    else:
        _store(p_ptr + idx, p, mask, seed, ridx * 3, STOCHASTIC)


@triton.jit
def adadelta_kernel(
    param_table,  # int64 [3T]: parameter addresses, gradient addresses, 1 where the tensor is aligned
    tensor_meta,  # int64 [T, META_COLS]: state offset, elements (real view), step slot, param group
    chunk_tensor,  # int32 [C]: tensor of each program
    chunk_block,  # int32 [C]: block of that tensor handled by each program
    square_avg,  # flat state, state dtype
    acc_delta,  # flat state, state dtype
    master,  # flat float32 master weights (read only when MASTER)
    steps,  # float32: per-tensor step counts, read for the seed (the host increments them afterwards)
    hyper,  # float32 [G, HYPER_COLS]
    clip_coef,  # float32 [T]: per-tensor gradient scale (read only when HAS_CLIP)
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
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    block = tl.load(chunk_block + pid).to(tl.int64)
    n = tl.load(tensor_meta + t * META_COLS + META_NUMEL)
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
    if HAS_SCALER:
        skip = tl.load(found_inf)
        gscale = 1.0 / tl.load(grad_scale)
    if HAS_CLIP:
        gscale = gscale * tl.load(clip_coef + t)
    seed = 0
    if STOCHASTIC:
        # A fresh Philox stream every step: the group's seed and the tensor's step count.
        seed = tl.load(hyper + row + HYPER_SEED).to(tl.int64) * 16777259 + tl.load(steps + step_slot).to(tl.int64)

    if skip == 0.0:
        p_ptr = tl.load(param_table + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(param_table + num_tensors + t).to(tl.pointer_type(G_DTYPE))
        aligned = tl.load(param_table + 2 * num_tensors + t)
        start = block * BLOCK
        if aligned != 0:
            # The host checked: both addresses are 16-byte aligned and n is a multiple of VEC,
            # and state offsets are always padded to 64 elements. These hints give 128-bit accesses.
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            n = tl.multiple_of(n, VEC)
            offset = tl.multiple_of(offset, 64)
            start = tl.multiple_of(start, BLOCK)
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n  # the one mask: the tail of each tensor's last block
            _update_block(p_ptr, g_ptr, square_avg + offset, acc_delta + offset, master + offset, idx, mask,
                          seed, offset + idx, lr, rho, omr, eps, wd, sign, gscale, MASTER, STOCHASTIC)
        else:
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n
            _update_block(p_ptr, g_ptr, square_avg + offset, acc_delta + offset, master + offset, idx, mask,
                          seed, offset + idx, lr, rho, omr, eps, wd, sign, gscale, MASTER, STOCHASTIC)

