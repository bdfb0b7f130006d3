"""The Triton backend: one launch of kernels/adadelta.py per bucket of the route (two when it mixes
aligned and unaligned tensors).

A :class:`LaunchPlan` is what the launches of a bucket need for a set of tensors of one flat state:
the per-tensor table (state offset, numel, step slot, group) and a chunk table (tensor, block) per
launch: one for the aligned tensors, one for the others (the two specialisations of the kernel). It
is built once and cached; only the pointer table (parameter and gradient addresses) is refreshed, and
only when an address changes (the chunk tables when that moves a tensor to the other kind). Every
launch runs on its tensors' device and that device's current stream (:func:`.tables.device_guard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _triton
from ..clipping import GradientTransform, clip_table
from ..hyper import scaler_tensors
from ..reference import real_view
from ..shards import local
from ..state import FlatState
from . import tables

__all__ = ["Launch", "LaunchPlan", "is_aligned", "run"]


_data_ptr = Tensor.data_ptr
_TRITON_DTYPES: dict[torch.dtype, Any] = {}


def _triton_dtype(dtype: torch.dtype) -> Any:
    if not _TRITON_DTYPES:  # filled on first use: importing the package never needs triton
        import triton.language as tl

        _TRITON_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    return _TRITON_DTYPES[dtype]


def is_aligned(param_address: int, grad_address: int, numel: int, vec: int) -> bool:
    """May the kernel promise 128-bit accesses on this tensor? Both addresses 16-byte aligned and
    ``numel`` a multiple of ``vec`` (elements in 16 bytes of the narrower dtype): only then does no
    vector of a block's tail reach past the tensor."""
    return (param_address | grad_address) % 16 == 0 and numel % vec == 0


class Launch(NamedTuple):
    """The programs of one launch: a (tensor, block) pair for each, for tensors of one alignment kind.

    ``aligned`` is the kernel's ALIGNED specialisation; ``block`` its BLOCK (elements a program)."""

    aligned: bool
    block: int
    chunk_tensor: Tensor  # int32 [num_chunks]
    chunk_block: Tensor  # int32 [num_chunks]
    num_chunks: int


class LaunchPlan:
    """Tables for the launches over ``params`` (all from ``flat``), cached between steps.

    Aligned tensors (:func:`is_aligned`) and the others go to two specialisations of the kernel, so
    the common, aligned launch never carries the scalar path: :attr:`launches` holds one chunk table
    when every tensor is of one kind (one launch), two when the bucket mixes them.
    """

    def __init__(self, flat: FlatState, params: list[Tensor], groups: list[int], vec: int,
                 stochastic: bool = False) -> None:
        device = flat.key.device
        self.flat = flat
        self.blocks = {aligned: tables.update_block(aligned, stochastic) for aligned in (True, False)}
        self.vec = vec  # elements in 128 bits for this bucket's narrower dtype (parameter or gradient)
        self.num_tensors = len(params)
        self._numels = [real_view(local(p)).numel() for p in params]
        slots = [flat.index[id(p)] for p in params]
        meta = torch.tensor(
            [[flat.offsets[s], n, s, g] for s, n, g in zip(slots, self._numels, groups)], dtype=torch.int64
        ).reshape(-1, 4)
        self.tensor_meta = tables.upload(meta, device)
        self.step_slots = tables.upload(torch.tensor(slots, dtype=torch.int64), device)
        self._ones = torch.ones(len(slots), dtype=torch.float32, device=device)  # made once, not every step
        self.all_slots = slots == list(range(len(flat.params)))
        self.pointers = tables.PointerTable(device, None)  # the kernel is specialised by alignment instead
        self._aligned: Optional[list[bool]] = None
        self.launches: list[Launch] = []  # set by refresh_pointers, which knows the addresses
        self.streams: set = set()  # streams its tables were used on (tables.record_use)

    @property
    def pointer_table(self) -> Optional[Tensor]:
        return self.pointers.table

    def _launch(self, aligned: bool, tensors: list[int]) -> Launch:
        block = self.blocks[aligned]
        chunks = tables.chunk_table([self._numels[t] for t in tensors], block, self.flat.key.device, tensors)
        return Launch(aligned, block, chunks.chunk_tensor, chunks.chunk_block, chunks.num_chunks)

    def refresh_pointers(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        """The pointer table for this step (real views of local tensors), uploaded only when an address
        changed; the chunk tables are rebuilt when that changes which tensors are aligned."""
        pp = list(map(_data_ptr, params))
        gp = list(map(_data_ptr, grads))
        previous = self.pointers.table
        table = self.pointers.refresh(pp, gp)
        if table is not previous:
            aligned = [is_aligned(a, b, n, self.vec) for a, b, n in zip(pp, gp, self._numels)]
            if aligned != self._aligned:
                kinds = [(kind, [t for t, a in enumerate(aligned) if a == kind]) for kind in (True, False)]
                self.launches = [self._launch(kind, tensors) for kind, tensors in kinds if tensors]
                self._aligned = aligned
                self.streams = set()  # new chunk tables: not yet used on any stream
        return table

    def tables(self) -> tuple[Tensor, ...]:
        chunks = tuple(t for launch in self.launches for t in (launch.chunk_tensor, launch.chunk_block))
        return (self.tensor_meta, self.step_slots, self._ones) + chunks

    def increment_steps(self, found_inf: Optional[Tensor]) -> None:
        """step += 1 for every tensor of the plan (nothing when found_inf is set), on the device."""
        steps = self.flat.steps
        if found_inf is None:
            if self.all_slots:
                steps.add_(1.0)
            else:
                steps.index_add_(0, self.step_slots, self._ones)
        else:
            inc = (1.0 - found_inf.to(steps.device, steps.dtype).reshape(()))
            if self.all_slots:
                steps.add_(inc)
            else:
                steps.index_add_(0, self.step_slots, inc.expand(self.num_tensors))


def run(buckets: Sequence[Any], members: Sequence[Any], grads: Sequence[Tensor], hyper: Any,
        coefs: Optional[GradientTransform], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """One launch per bucket (route.Bucket: its members, plan and whether its tensors are plain).

    ``grads[i]`` is member ``i``'s gradient; ``hyper(device)`` the step's hyperparameter table there;
    ``coefs`` the clipping multipliers or None; GradScaler's ``grad_scale`` / ``found_inf`` or None.
    """
    kernel = _triton.adadelta_kernel()
    has_clip = coefs is not None
    has_scaler = grad_scale is not None or found_inf is not None
    for bucket in buckets:
        plan, key, idx = bucket.plan, bucket.key.state, bucket.members
        flat, device = plan.flat, key.device
        if bucket.plain:
            params = bucket.params
            gs = grads if bucket.every_member else [grads[i] for i in idx]
        else:
            params = [real_view(local(members[i].param)) for i in idx]
            gs = [real_view(local(grads[i])) for i in idx]
        with tables.device_guard(device):
            pointers = plan.refresh_pointers(params, gs)
            table = hyper(device)
            # A slice of the step's multiplier vector when this launch's entries are adjacent in it.
            clip = clip_table(coefs, idx, device) if has_clip else table
            scale, inf = scaler_tensors(device, grad_scale, found_inf) if has_scaler else (table, table)
            tables.record_use(plan.streams, plan.tables(), device)
            master = flat.master if flat.master is not None else flat.square_avg
            for launch in plan.launches:  # one, or two when the bucket mixes aligned and unaligned tensors
                kernel[(launch.num_chunks,)](
                    pointers, plan.tensor_meta, launch.chunk_tensor, launch.chunk_block,
                    flat.square_avg, flat.acc_delta, master, flat.steps, table, clip, scale, inf,
                    plan.num_tensors,
                    P_DTYPE=_triton_dtype(key.param_dtype), G_DTYPE=_triton_dtype(bucket.key.grad_dtype),
                    BLOCK=launch.block, VEC=plan.vec, HAS_CLIP=has_clip, HAS_SCALER=has_scaler,
                    MASTER=int(key.master), STOCHASTIC=bucket.key.stochastic, ALIGNED=launch.aligned,
                    num_warps=tables.NUM_WARPS,
                    enable_fp_fusion=False,  # no FMA contraction: each operation rounded once, as in the reference
                )
            plan.increment_steps(inf if has_scaler else None)
