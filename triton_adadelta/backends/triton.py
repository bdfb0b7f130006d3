"""The Triton backend: one launch of kernels/adadelta.py per bucket of the route.

A :class:`LaunchPlan` is what one launch needs for a set of tensors of one flat state: the
per-tensor table (state offset, numel, step slot, group) and the chunk table (tensor, block). It is
built once and cached; only the pointer table (parameter and gradient addresses, alignment) is
refreshed, and only when an address changes. Every launch runs on its tensors' device and that
device's current stream (:func:`.tables.device_guard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .. import _triton
from ..clipping import GradientTransform, clip_table
from ..hyper import scaler_tensors
from ..reference import real_view
from ..shards import local
from ..state import FlatState
from . import tables

__all__ = ["LaunchPlan", "run"]


_data_ptr = Tensor.data_ptr
_TRITON_DTYPES: dict[torch.dtype, Any] = {}


def _triton_dtype(dtype: torch.dtype) -> Any:
    if not _TRITON_DTYPES:  # filled on first use: importing the package never needs triton
        import triton.language as tl

        _TRITON_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    return _TRITON_DTYPES[dtype]


class LaunchPlan:
    """Tables for one launch over ``params`` (all from ``flat``), cached between steps."""

    def __init__(self, flat: FlatState, params: list[Tensor], groups: list[int], block: int, vec: int) -> None:
        device = flat.key.device
        self.flat = flat
        self.block = block
        self.vec = vec  # elements in 128 bits for this bucket's narrower dtype (parameter or gradient)
        self.num_tensors = len(params)
        numels = [real_view(local(p)).numel() for p in params]
        slots = [flat.index[id(p)] for p in params]
        meta = torch.tensor(
            [[flat.offsets[s], n, s, g] for s, n, g in zip(slots, numels, groups)], dtype=torch.int64
        ).reshape(-1, 4)
        self.tensor_meta = tables.upload(meta, device)
        chunks = tables.chunk_table(numels, block, device)
        self.num_chunks = chunks.num_chunks
        self.chunk_tensor, self.chunk_block = chunks.chunk_tensor, chunks.chunk_block
        self.step_slots = tables.upload(torch.tensor(slots, dtype=torch.int64), device)
        self._ones = torch.ones(len(slots), dtype=torch.float32, device=device)  # made once, not every step
        self.all_slots = slots == list(range(len(flat.params)))
        self.pointers = tables.PointerTable(device, [n % vec == 0 for n in numels])
        self.streams: set = set()  # streams its tables were used on (tables.record_use)

    @property
    def pointer_table(self) -> Optional[Tensor]:
        return self.pointers.table

    def refresh_pointers(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        """The pointer table for this step (real views of local tensors), uploaded only when an address changed.

        A tensor is marked aligned only when both addresses are 16-byte aligned and its numel is a
        multiple of ``vec``: only then may the kernel promise 128-bit accesses.
        """
        return self.pointers.refresh(list(map(_data_ptr, params)), list(map(_data_ptr, grads)))

    def tables(self) -> tuple[Tensor, ...]:
        return (self.tensor_meta, self.chunk_tensor, self.chunk_block, self.step_slots, self._ones)

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
            kernel[(plan.num_chunks,)](
                pointers, plan.tensor_meta, plan.chunk_tensor, plan.chunk_block,
                flat.square_avg, flat.acc_delta, master, flat.steps, table, clip, scale, inf,
                plan.num_tensors,
                P_DTYPE=_triton_dtype(key.param_dtype), G_DTYPE=_triton_dtype(bucket.key.grad_dtype),
                BLOCK=plan.block, VEC=plan.vec, HAS_CLIP=has_clip, HAS_SCALER=has_scaler,
                MASTER=int(key.master), STOCHASTIC=bucket.key.stochastic,
                num_warps=tables.NUM_WARPS,
                enable_fp_fusion=False,  # no FMA contraction: each operation rounded once, as in the reference
            )
            plan.increment_steps(inf if has_scaler else None)
