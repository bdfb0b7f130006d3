"""Squared L2 norms of many gradients in one launch, for Keras-style clipping.

Program ``pid`` reduces one chunk (``CHUNK_BLOCKS`` blocks of ``BLOCK`` elements) of one tensor:
``chunk_tensor[pid]`` names the tensor and ``chunk_block[pid]`` the chunk inside it, as in
``adadelta.py``. Gradient addresses come from an int64 pointer table; a per-tensor dtype code picks
the load, so float32, bfloat16 and float16 gradients share the launch.

The result must be bit-identical from run to run, so there is no floating-point atomic: each program
writes its partial sum to ``partials[pid]`` and bumps an integer counter of its tensor. The program
that sees the counter reach the tensor's chunk count (the last one to finish) adds that tensor's
partials in index order; the last tensor to finish adds the per-tensor sums in index order. The
counters are reset to zero by those same last programs, ready for the next launch.

``out[t]`` receives sum(x*x) over tensor t, with ``x = clamp(g / grad_scale, -clip_value, clip_value)``
(each step optional), and ``out[num_tensors]`` their total. With ``MODE`` 1 (clipnorm) or 2
(global_clipnorm) the same launch also writes Keras' multipliers to ``coef``:

    MODE 1: coef[t] = c / max(sqrt(out[t]), c)
    MODE 2: coef[t] = c * min(1 / G, 1 / c) with G = sqrt(out[T]); NaN when G is not finite
"""

import triton
import triton.language as tl

# Columns of the per-tensor table.
NMETA_NUMEL, NMETA_CODE, NMETA_FIRST, NMETA_CHUNKS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
NMETA_COLS = tl.constexpr(4)
# Gradient dtype codes.
CODE_FP32, CODE_BF16, CODE_FP16 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _chunk_loop(ptr, start, n, inv_scale, clip_value,
                BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr,
                HAS_SCALER: tl.constexpr, HAS_CLIPVALUE: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(CHUNK_BLOCKS):
        idx = start + j * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
        if HAS_SCALER:
            x = x * inv_scale
        if HAS_CLIPVALUE:
            # NaN must stay NaN (a plain max/min on the GPU would return the bound instead).
            x = tl.minimum(tl.maximum(x, -clip_value, propagate_nan=tl.PropagateNan.ALL), clip_value,
                           propagate_nan=tl.PropagateNan.ALL)
        acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit
def _chunk_sumsq(addr, n_ptr, start, aligned, inv_scale, clip_value,
                 DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, VEC: tl.constexpr,
                 HAS_SCALER: tl.constexpr, HAS_CLIPVALUE: tl.constexpr):
    # tl.multiple_of marks the operation that defines its argument, so a pointer or n shared by both
    # branches would carry the promise into the unaligned branch too (128-bit accesses there: faults
    # and reads past n). Each branch therefore makes its own pointer and loads its own n.
    if aligned != 0:
        # The host checked: the address is 16-byte aligned and n a multiple of VEC, so these hints
        # are true and give 128-bit loads (a pointer from a table gets scalar loads otherwise).
        ptr = tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)
        n = tl.multiple_of(tl.load(n_ptr), VEC)
        s = _chunk_loop(ptr, start, n, inv_scale, clip_value, BLOCK, CHUNK_BLOCKS, HAS_SCALER, HAS_CLIPVALUE)
    else:
        ptr = addr.to(tl.pointer_type(DTYPE))
        n = tl.load(n_ptr)
        s = _chunk_loop(ptr, start, n, inv_scale, clip_value, BLOCK, CHUNK_BLOCKS, HAS_SCALER, HAS_CLIPVALUE)
    return s


@triton.jit
def _sum_in_order(ptr, n, RBLOCK: tl.constexpr):
    """sum(ptr[0:n]) in a fixed order; `.cg` reads from L2, past any stale L1 line of this SM."""
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    # A while loop, not range(0, n, RBLOCK): Triton 3.6's interpreter cannot take a runtime n (a loaded
    # value or a kernel argument) as a range bound. Compiled, both are the same loop.
    k = 0
    while k < n:
        idx = k + tl.arange(0, RBLOCK)
        acc += tl.load(ptr + idx, mask=idx < n, other=0.0, cache_modifier=".cg")
        k += RBLOCK
    return tl.sum(acc, axis=0)


@triton.jit
def sqnorm_kernel(
    grad_table,  # int64 [2T]: gradient addresses, then 1 where the address and numel allow 128-bit loads
    tensor_meta,  # int64 [T, NMETA_COLS]: numel, dtype code, first chunk, number of chunks
    chunk_tensor,  # int32 [C]: tensor of each program
    chunk_block,  # int32 [C]: chunk of that tensor handled by each program
    partials,  # float32 [C]: scratch, one partial sum per program
    counters,  # int32 [T + 1]: zero on entry, zero again on exit
    out,  # float32 [T + 1]: squared norms, then their total
    coef,  # float32 [T]: multipliers (written only when MODE != 0)
    grad_scale,  # float32 [1]: GradScaler's scale (read only when HAS_SCALER)
    clip_value,  # float: clamp bound (used only when HAS_CLIPVALUE)
    threshold,  # float: clipnorm (MODE 1) or global_clipnorm (MODE 2)
    num_tensors,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    RBLOCK: tl.constexpr,
    HAS_SCALER: tl.constexpr,
    HAS_CLIPVALUE: tl.constexpr,
    MODE: tl.constexpr,  # 0: norms only, 1: clipnorm multipliers, 2: global_clipnorm multipliers
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    chunk = tl.load(chunk_block + pid).to(tl.int64)
    n_ptr = tensor_meta + t * NMETA_COLS + NMETA_NUMEL  # read inside each branch (see _chunk_sumsq)
    code = tl.load(tensor_meta + t * NMETA_COLS + NMETA_CODE)
    first = tl.load(tensor_meta + t * NMETA_COLS + NMETA_FIRST)
    nchunks = tl.load(tensor_meta + t * NMETA_COLS + NMETA_CHUNKS)
    addr = tl.load(grad_table + t)
    aligned = tl.load(grad_table + num_tensors + t)
    inv_scale = 1.0
    if HAS_SCALER:
        inv_scale = 1.0 / tl.load(grad_scale)
    start = chunk * (BLOCK * CHUNK_BLOCKS)

    if code == CODE_FP32:
        s = _chunk_sumsq(addr, n_ptr, start, aligned, inv_scale, clip_value,
                         tl.float32, BLOCK, CHUNK_BLOCKS, 4, HAS_SCALER, HAS_CLIPVALUE)
    elif code == CODE_BF16:
        s = _chunk_sumsq(addr, n_ptr, start, aligned, inv_scale, clip_value,
                         tl.bfloat16, BLOCK, CHUNK_BLOCKS, 8, HAS_SCALER, HAS_CLIPVALUE)
    else:
        s = _chunk_sumsq(addr, n_ptr, start, aligned, inv_scale, clip_value,
                         tl.float16, BLOCK, CHUNK_BLOCKS, 8, HAS_SCALER, HAS_CLIPVALUE)
    tl.store(partials + pid, s)

    # The barrier orders every thread's store before the (release) atomic; the atomic's acquire side
    # makes the other programs' partials visible to whichever program finishes last.
    tl.debug_barrier()
    done = tl.atomic_add(counters + t, 1, sem="acq_rel")
    if done == nchunks - 1:
        total = _sum_in_order(partials + first, nchunks, RBLOCK)
        tl.store(out + t, total)
        tl.store(counters + t, 0)
        if MODE == 1:
            norm = tl.sqrt_rn(total)
            tl.store(coef + t, tl.div_rn(threshold, tl.maximum(norm, threshold, propagate_nan=tl.PropagateNan.ALL)))
        tl.debug_barrier()
        finished = tl.atomic_add(counters + num_tensors, 1, sem="acq_rel")
        if finished == num_tensors - 1:
            grand = _sum_in_order(out, num_tensors, RBLOCK)
            tl.store(out + num_tensors, grand)
            tl.store(counters + num_tensors, 0)
            if MODE == 2:
                g = tl.sqrt_rn(grand)
                one = tl.full([], 1.0, tl.float32)
                scale = threshold * tl.minimum(tl.div_rn(one, g), tl.div_rn(one, threshold))
                # tf.clip_by_global_norm's own trick: adding (G - G) is +0 for a finite norm and NaN for
                # an Inf or NaN one, which then turns every gradient into NaN, as Keras does.
                scale = scale + (g - g)
                k = 0
                while k < num_tensors:  # (while, not range: see _sum_in_order)
                    idx = k + tl.arange(0, RBLOCK)
                    tl.store(coef + idx, tl.zeros([RBLOCK], dtype=tl.float32) + scale, mask=idx < num_tensors)
                    k += RBLOCK
