"""Keras' gradient clipping: clipvalue, clipnorm and global_clipnorm, in PyTorch and on the device.

Keras applies them in this order to the gradients it is given (each one optional)::

    g = clamp(g, -clipvalue, clipvalue)                       clipvalue
    g = g * c / max(||g||, c)            for each tensor       clipnorm = c
    g = g * c * min(1 / G, 1 / c)        G = sqrt(sum ||g||^2)  global_clipnorm = c  (NaN when G is Inf/NaN)

Norms are those of the clamped gradients. clipnorm and global_clipnorm exclude each other.

The optimizer never writes the clipped gradients anywhere: it hands the update a per-tensor
multiplier and the clamp bound, and the update applies ``clamp(g, -clipvalue, clipvalue) * multiplier``
in registers (``p.grad`` stays as it was, as in Keras). On the fused path the multipliers come from
one multi-tensor launch (``kernels/norms.py``) with no host synchronisation.

For data parallel training, :func:`squared_norms` returns the per-tensor squared norms as a device
tensor *before* they become multipliers: all-reduce it (sum) across ranks, then call
:func:`multipliers`. The optimizer does exactly that when its ``_squared_norm_hook`` is set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _triton
from .backends import tables
from .backends.tables import NORM_BLOCK, NUM_WARPS, upload
from .reference import compute_dtype, real_view
from .validation import check_nonnegative

__all__ = [
    "squared_norms",
    "squared_norms_reference",
    "multipliers",
    "clip_gradients",
    "GradientTransform",
    "build_transform",
]

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CHUNK_BLOCKS = 8  # a program sums 16384 elements: few partials, and loads enough to hide latency
_RBLOCK = 1024


def _norm_kernel() -> Any:
    from .kernels.norms import sqnorm_kernel

    return sqnorm_kernel


# --------------------------------------------------------------------------------------------- reference
def squared_norms_reference(
    grads: Sequence[Tensor], *, clip_value: Optional[float] = None, grad_scale: Optional[Tensor] = None
) -> Tensor:
    """Plain-PyTorch ``[sum(x_0^2), ..., sum(x_{n-1}^2), total]`` with ``x = clamp(g / grad_scale, ±clip_value)``.

    Arithmetic is float32 (float64 for float64 gradients); complex gradients count as their real view.
    The result is float64 when any gradient is float64, float32 otherwise, on the gradients' device.
    """
    sums = []
    for g in grads:
        cdt = compute_dtype(g.dtype)
        x = real_view(g).to(cdt)
        if grad_scale is not None:
            x = x / grad_scale.to(x.device, cdt).reshape(())
        if clip_value is not None:
            x = x.clamp(-clip_value, clip_value)
        sums.append((x * x).sum())
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    if not sums:
        return torch.zeros(1, dtype=dtype)
    per = torch.stack([s.to(dtype) for s in sums])
    return torch.cat([per, per.sum().reshape(1)])


def multipliers(sq: Tensor, *, clipnorm: Optional[float] = None, global_clipnorm: Optional[float] = None) -> Tensor:
    """Per-tensor gradient multipliers from ``sq = [squared norms..., total]`` (e.g. after an all-reduce).

    clipnorm c: ``c / max(sqrt(sq[i]), c)``; global_clipnorm c: ``c * min(1 / G, 1 / c)`` with
    ``G = sqrt(sq[-1])``, NaN when G is Inf or NaN (tf.clip_by_global_norm); neither: ones.
    Returns ``sq[:-1]``'s length, dtype and device.
    """
    per = sq[:-1]
    if clipnorm is not None and global_clipnorm is not None:
        raise ValueError("Cannot accept both `clipnorm` and `global_clipnorm`.")
    if clipnorm is not None:
        norms = per.sqrt()
        # A tensor numerator: `float / tensor` is reciprocal-then-multiply in torch, two roundings.
        return torch.full_like(norms, clipnorm) / torch.clamp_min(norms, clipnorm)
    if global_clipnorm is not None:
        g = sq[-1].sqrt()
        c = torch.full_like(g, global_clipnorm)
        scale = c * torch.minimum(g.reciprocal(), c.reciprocal()) + (g - g)
        return torch.ones_like(per) * scale
    return torch.ones_like(per)


def clip_gradients(
    grads: Sequence[Tensor],
    *,
    clipvalue: Optional[float] = None,
    clipnorm: Optional[float] = None,
    global_clipnorm: Optional[float] = None,
) -> list[Tensor]:
    """Keras' clipped gradients as new tensors (the equations of this module; the inputs are not changed).

    The optimizer does not call this (it applies the same transform inside the update); it is the
    plain statement of the math, and handy to clip gradients the Keras way outside the optimizer.
    """
    sq = squared_norms_reference(grads, clip_value=clipvalue)
    coef = multipliers(sq, clipnorm=clipnorm, global_clipnorm=global_clipnorm)
    return [_clamp(g, clipvalue) * coef[i].to(compute_dtype(g.dtype)) for i, g in enumerate(grads)]


def _clamp(g: Tensor, c: Optional[float]) -> Tensor:
    """clamp(g, -c, c), complex tensors by their real and imaginary parts; NaN stays NaN."""
    if c is None:
        return g
    if g.is_complex():
        return torch.view_as_complex(torch.view_as_real(g).clamp(-c, c))
    return g.clamp(-c, c)


def _move(t: Tensor, device: torch.device) -> Tensor:
    # Asynchronous between devices, but a copy into host memory must be complete before the host reads it.
    return t.to(device, non_blocking=device.type != "cpu")


# --------------------------------------------------------------------------------------------- device path
class NormPlan:
    """Tables for one norm launch over gradients of given sizes and dtypes on one device, cached."""

    def __init__(self, numels: list[int], codes: list[int], device: torch.device) -> None:
        chunks = tables.chunk_table(numels, NORM_BLOCK * _CHUNK_BLOCKS, device)
        meta = torch.stack([torch.tensor(numels, dtype=torch.int64), torch.tensor(codes, dtype=torch.int64),
                            chunks.first, chunks.counts], 1) if numels else torch.zeros(0, 4, dtype=torch.int64)
        self.num_tensors = len(numels)
        self.num_chunks = chunks.num_chunks
        self.meta = upload(meta.contiguous(), device)
        self.chunk_tensor, self.chunk_block = chunks.chunk_tensor, chunks.chunk_block
        self.partials = torch.empty(self.num_chunks, dtype=torch.float32, device=device)
        # The kernel leaves these at zero when it ends; they are allocated once.
        self.counters = torch.zeros(self.num_tensors + 1, dtype=torch.int32, device=device)
        self.device = device
        # Vector width: 4 float32 or 8 16-bit elements in 128 bits.
        self._pointers = tables.PointerTable(device, [n % (8 if c else 4) == 0 for n, c in zip(numels, codes)])
        self.streams: set = set()  # streams its tables were used on (tables.record_use)

    def pointers(self, grads: Sequence[Tensor]) -> Tensor:
        """The address table for these gradients (uploaded only when an address changed)."""
        return self._pointers.refresh([g.data_ptr() for g in grads])

    def tables(self) -> tuple[Tensor, ...]:
        return (self.meta, self.chunk_tensor, self.chunk_block, self.partials, self.counters)


def kernel_eligible(g: Tensor) -> bool:
    """Can the norm kernel read ``g``: a dense, contiguous float32/bfloat16/float16 (real view) on a kernel device?"""
    r = real_view(g)
    return (
        r.dtype in _CODES and r.is_contiguous() and not g.is_sparse and _triton.kernel_device_ok(g.device)
    )


_DEFAULT_CACHE: OrderedDict = OrderedDict()
_DEFAULT_CACHE_SIZE = 8


def _plan(grads: Sequence[Tensor], cache: Optional[dict]) -> NormPlan:
    views = [real_view(g) for g in grads]
    key = ("norms", views[0].device, tuple((v.numel(), _CODES[v.dtype]) for v in views))
    store = _DEFAULT_CACHE if cache is None else cache
    plan = store.get(key)
    if plan is None:
        plan = store[key] = NormPlan([k[0] for k in key[2]], [k[1] for k in key[2]], views[0].device)
        if cache is None and len(_DEFAULT_CACHE) > _DEFAULT_CACHE_SIZE:
            _DEFAULT_CACHE.popitem(last=False)
    return plan


def _launch(
    grads: Sequence[Tensor],
    *,
    mode: int,
    clip_value: Optional[float],
    threshold: Optional[float],
    grad_scale: Optional[Tensor],
    cache: Optional[dict],
) -> tuple[Tensor, Optional[Tensor]]:
    """One norm launch; returns (squared norms + total [T + 1], multipliers [T] or None)."""
    plan = _plan(grads, cache)
    views = [real_view(g) for g in grads]
    device = views[0].device
    with tables.device_guard(device):  # the gradients' device and its current stream
        # Fresh outputs each call: callers may keep them or all-reduce them in place.
        out = torch.empty(plan.num_tensors + 1, dtype=torch.float32, device=device)
        coef = torch.empty(plan.num_tensors, dtype=torch.float32, device=device) if mode else None
        has_scaler = grad_scale is not None
        scale = grad_scale.to(device, torch.float32).reshape(1) if has_scaler else out
        pointers = plan.pointers(views)
        tables.record_use(plan.streams, plan.tables(), device)
        _norm_kernel()[(plan.num_chunks,)](
            pointers, plan.meta, plan.chunk_tensor, plan.chunk_block, plan.partials, plan.counters,
            out, coef if coef is not None else out, scale,
            float(clip_value) if clip_value is not None else 0.0, float(threshold) if threshold is not None else 0.0,
            plan.num_tensors,
            BLOCK=NORM_BLOCK, CHUNK_BLOCKS=_CHUNK_BLOCKS, RBLOCK=_RBLOCK,
            HAS_SCALER=has_scaler, HAS_CLIPVALUE=clip_value is not None, MODE=mode,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # x*x + acc rounded twice on every backend and Triton version
        )
    return out, coef


def squared_norms(
    grads: Sequence[Tensor],
    *,
    clip_value: Optional[float] = None,
    grad_scale: Optional[Tensor] = None,
    fused: Optional[bool] = None,
    cache: Optional[dict] = None,
) -> Tensor:
    """``[sum(x_0^2), ..., sum(x_{n-1}^2), total]`` with ``x = clamp(g / grad_scale, -clip_value, clip_value)``.

    This is the hook for data parallelism: the result is a float32 device tensor (float64 when the
    PyTorch path sees float64 gradients), computed before anything becomes a multiplier; all-reduce
    it with SUM across ranks (per-tensor sums of shards and the total are both additive), then pass
    it to :func:`multipliers`. Every rank must list its gradients in the same order.

    All gradients must be on one device. ``fused=None`` uses the one-launch Triton kernel when every
    gradient is eligible (:func:`kernel_eligible`), PyTorch otherwise; ``True`` insists, ``False`` never.
    The kernel's sums are in a fixed order, so results are bit-identical from run to run.
    """
    grads = list(grads)
    if not grads:
        return torch.zeros(1, dtype=torch.float32)
    if len({g.device for g in grads}) > 1:
        raise ValueError("squared_norms needs all gradients on one device; call it once per device")
    eligible = all(kernel_eligible(g) for g in grads)
    if fused and not eligible:
        raise RuntimeError("fused=True needs contiguous float32/bfloat16/float16 gradients on a kernel device")
    if eligible and fused is not False:
        return _launch(grads, mode=0, clip_value=clip_value, threshold=None, grad_scale=grad_scale, cache=cache)[0]
    return squared_norms_reference(grads, clip_value=clip_value, grad_scale=grad_scale)


# --------------------------------------------------------------------------------------------- the update's view
class GradientTransform:
    """What the update does to gradient ``i``: ``clamp(g, -clip_value, clip_value) * multiplier[i]``.

    Multipliers live in one vector per device; entry ``i`` is ``vectors[where[i][0]][where[i][1]]``.
    Entries that share a kernel launch are adjacent in their vector, so the launch's table is a slice.
    """

    def __init__(self, clip_value: Optional[float], vectors: dict[torch.device, Tensor],
                 where: list[tuple[torch.device, int]]) -> None:
        self.clip_value = clip_value
        self.vectors = vectors
        self.where = where
        self._gathers: dict[tuple, Tensor] = {}

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, i: int) -> Tensor:
        """The multiplier of entry ``i`` as a 0-d tensor (a view: no copy)."""
        device, j = self.where[i]
        return self.vectors[device][j]

    def table(self, indices: Sequence[int], device: torch.device) -> Tensor:
        """float32 multipliers of ``indices`` (all on ``device``) for one launch: a slice when they are adjacent."""
        vec = self.vectors[device]
        pos = [self.where[i][1] for i in indices]
        if pos and pos == list(range(pos[0], pos[0] + len(pos))):
            out = vec[pos[0]: pos[0] + len(pos)]
        else:
            out = vec.index_select(0, upload(torch.tensor(pos, dtype=torch.int64), device))
        return out if out.dtype == torch.float32 else out.to(torch.float32)

    def apply(self, g: Tensor, i: int) -> Tensor:
        """The transformed gradient as a new tensor (the differentiable path, which has no fused update)."""
        return _clamp(g, self.clip_value) * self[i].to(g.device, compute_dtype(g.dtype))


def clip_table(coefs: Any, indices: Sequence[int], device: torch.device) -> Tensor:
    """The update kernel's float32 multipliers for ``indices``, from a GradientTransform or a list of 0-d tensors."""
    if isinstance(coefs, GradientTransform):
        return coefs.table(indices, device)
    return torch.stack([coefs[i] for i in indices]).to(device, torch.float32)


def build_transform(
    grads: Sequence[Tensor],
    fused: Sequence[bool],
    launch_keys: Sequence[Hashable],
    *,
    clip_value: Optional[float],
    clipnorm: Optional[float],
    global_clipnorm: Optional[float],
    grad_scale: Optional[Tensor] = None,
    squared_norm_hook: Optional[Callable[[Tensor], Optional[Tensor]]] = None,
    cache: Optional[dict] = None,
    per_tensor_hook: Optional[Callable[[Tensor, list[int]], Tensor]] = None,
) -> GradientTransform:
    """The clipping of one step, without a host synchronisation.

    ``fused[i]``: gradient ``i`` goes through the fused update (its norm may then come from the norm
    kernel). ``launch_keys[i]``: the update launch it belongs to; those entries are laid out
    adjacently so that each launch reads a slice. With a single device, every gradient fused and no
    ``squared_norm_hook``, multipliers come from one launch; otherwise squared norms are gathered on
    the first gradient's device (kernel launch per device for fused gradients, PyTorch for the rest),
    passed to ``squared_norm_hook`` (which may all-reduce them in place, or return a new tensor), and
    turned into multipliers there.

    ``per_tensor_hook(per, index)`` (sharded parameters) gets the per-tensor squared norms before the
    total is formed, ``index[j]`` being the gradient behind ``per[j]``, and returns them completed
    (summed over the shards of each tensor); the total is then the sum of the completed norms.
    """
    cache = {} if cache is None else cache
    devices: list[torch.device] = []
    for g in grads:
        if g.device not in devices:
            devices.append(g.device)
    rank: dict[Hashable, int] = {}
    for key, f in zip(launch_keys, fused):
        if f and key not in rank:
            rank[key] = len(rank)
    order: dict[torch.device, list[int]] = {}
    n_fused: dict[torch.device, int] = {}
    for d in devices:
        on_d = [i for i, g in enumerate(grads) if g.device == d]
        fused_d = sorted((i for i in on_d if fused[i]), key=lambda i: (rank[launch_keys[i]], i))
        order[d] = fused_d + [i for i in on_d if not fused[i]]
        n_fused[d] = len(fused_d)
    where: list[tuple[torch.device, int]] = [(devices[0], 0)] * len(grads)
    for d in devices:
        for j, i in enumerate(order[d]):
            where[i] = (d, j)

    if clipnorm is None and global_clipnorm is None:
        vectors = {}
        for d in devices:
            key = ("ones", d, len(order[d]))
            if key not in cache:
                cache[key] = torch.ones(len(order[d]), dtype=torch.float32, device=d)
            vectors[d] = cache[key]
        return GradientTransform(clip_value, vectors, where)

    mode, threshold = (1, clipnorm) if clipnorm is not None else (2, global_clipnorm)
    d0 = devices[0]
    if len(devices) == 1 and n_fused[d0] == len(grads) and squared_norm_hook is None and per_tensor_hook is None:
        _, coef = _launch([grads[i] for i in order[d0]], mode=mode, clip_value=clip_value, threshold=threshold,
                          grad_scale=grad_scale, cache=cache)
        return GradientTransform(clip_value, {d0: coef}, where)

    parts = []
    for d in devices:
        k = n_fused[d]
        if k:
            sq_fused = _launch([grads[i] for i in order[d][:k]], mode=0, clip_value=clip_value, threshold=None,
                               grad_scale=grad_scale, cache=cache)[0][:k]
            parts.append(_move(sq_fused, d0))
        if len(order[d]) > k:
            rest = squared_norms_reference([grads[i] for i in order[d][k:]], clip_value=clip_value,
                                           grad_scale=grad_scale)[:-1]
            parts.append(_move(rest, d0))
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    per = torch.cat([p.to(dtype) for p in parts])
    if per_tensor_hook is not None:
        per = per_tensor_hook(per, [i for d in devices for i in order[d]])
    sq = torch.cat([per, per.sum().reshape(1)])
    if squared_norm_hook is not None:
        reduced = squared_norm_hook(sq)
        sq = sq if reduced is None else reduced
    coef = multipliers(sq, clipnorm=clipnorm, global_clipnorm=global_clipnorm)
    vectors, offset = {}, 0
    for d in devices:
        vectors[d] = _move(coef[offset: offset + len(order[d])], d)
        offset += len(order[d])
    return GradientTransform(clip_value, vectors, where)


# --------------------------------------------------------------------------------------------- the optimizer's settings
class ClipSettings:
    """An optimizer's Keras clipping: ``clipvalue``, ``clipnorm`` and ``global_clipnorm`` (each None or a
    number >= 0; clipnorm and global_clipnorm exclude each other), checked whenever one is set."""

    __slots__ = ("_clipvalue", "_clipnorm", "_global_clipnorm")

    def __init__(self, clipvalue: Optional[float] = None, clipnorm: Optional[float] = None,
                 global_clipnorm: Optional[float] = None) -> None:
        self._clipvalue = self._clipnorm = self._global_clipnorm = None
        self.set("clipvalue", clipvalue)
        self.set("clipnorm", clipnorm)
        self.set("global_clipnorm", global_clipnorm)

    def set(self, name: str, value: Optional[float]) -> None:
        value = check_nonnegative(name, value)
        norm = value if name == "clipnorm" else self._clipnorm
        global_norm = value if name == "global_clipnorm" else self._global_clipnorm
        if norm is not None and global_norm is not None:
            raise ValueError("Cannot accept both `clipnorm` and `global_clipnorm`. "
                             f"Received: `clipnorm`={norm}, `global_clipnorm`={global_norm}.")
        setattr(self, "_" + name, value)

    @property
    def clipvalue(self) -> Optional[float]:
        return self._clipvalue

    @property
    def clipnorm(self) -> Optional[float]:
        return self._clipnorm

    @property
    def global_clipnorm(self) -> Optional[float]:
        return self._global_clipnorm

    def __bool__(self) -> bool:
        return not (self._clipvalue is None and self._clipnorm is None and self._global_clipnorm is None)
