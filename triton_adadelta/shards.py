"""DTensor (FSDP2, tensor parallel) helpers: a tensor's local shard, state made to look like its parameter,
and the completion of per-shard squared norms across a mesh."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .backends.tables import upload

__all__ = ["PLAIN", "is_dtensor", "local", "like_param", "shard_norm_hook"]

#: The tensor types that need no subclass handling (the common case, answered by a type test).
PLAIN = (Tensor, torch.nn.Parameter)

_DTENSOR: Any = None


def _dtensor_class() -> Any:
    """DTensor, if torch.distributed.tensor has been imported (importing it costs about a second, and
    no DTensor can exist before it is imported), else None."""
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return _DTENSOR

def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 and tensor-parallel parameters)."""
    if type(t) in PLAIN:  # the common case, answered without looking for the DTensor class
        return False
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (``t.to_local()``), any other tensor as it is.

    The optimizer updates shards in place: the local tensor of a DTensor parameter is the storage
    FSDP2 all-gathers from, so writing into it is writing the parameter.
    """
    if not is_dtensor(t):
        return t
    # The shard itself, as to_local() returns it without autograd (it makes a view of it, ~1 µs).
    shard = getattr(t, "_local_tensor", None)
    return shard if isinstance(shard, Tensor) else t.to_local()


def like_param(seg: Tensor, p: Tensor) -> Tensor:
    """Wrap the local state segment ``seg`` as a DTensor with ``p``'s mesh, placements and global shape.

    Passing shape and stride skips the collective that would otherwise infer them and keeps uneven
    shards (FSDP2 pads the last ranks) right. A plain parameter gets ``seg`` back unchanged.
    """
    if not is_dtensor(p):
        return seg
    return _dtensor_class().from_local(
        seg, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def shard_norm_hook(grads: list[Tensor], cache: dict) -> Optional[Callable[[Tensor, list[int]], Tensor]]:
    """Complete per-tensor squared norms of sharded gradients across their mesh, for clipping.

    Contract: ``hook(per, index)`` takes ``per[j]``, the squared norm of this rank's shard of
    ``grads[index[j]]``, and returns ``per`` with every DTensor gradient's entry summed over the
    mesh dimensions it is sharded on (all-reduce, SUM); entries of plain or replicated gradients
    stay as they are (every rank holds the whole tensor). A sum of squares over shards is the
    square of the full norm, so clipnorm and global_clipnorm then equal an unsharded run. Each group
    of tensors sharded alike is reduced in one collective, laid out by gradient index, so ranks agree
    however their launches are ordered. None when no gradient is sharded (nothing to reduce).
    Partial placements (unreduced gradients) have no local norm and raise a RuntimeError.
    """
    groups: dict[tuple, tuple[Any, tuple[int, ...], list[int]]] = {}
    for i, g in enumerate(grads):
        if not is_dtensor(g):
            continue
        if any(pl.is_partial() for pl in g.placements):
            raise RuntimeError(
                f"gradient {i} is a DTensor with a Partial placement {tuple(g.placements)}: clipping needs "
                "reduced gradients (Shard or Replicate); redistribute it before the optimizer step"
            )
        dims = tuple(d for d, pl in enumerate(g.placements) if pl.is_shard())
        if dims:
            groups.setdefault((id(g.device_mesh), dims), (g.device_mesh, dims, []))[2].append(i)
    if not groups:
        return None

    def hook(per: Tensor, index: list[int]) -> Tensor:
        import torch.distributed as dist

        where = {i: j for j, i in enumerate(index)}
        for mesh, dims, members in groups.values():
            positions = [where[i] for i in members]
            whole = positions == list(range(per.numel()))
            if whole:  # every tensor sharded alike (FSDP2): reduce the vector in place
                vals = per
            else:
                key = ("shard_positions", per.device, tuple(positions))
                if key not in cache:
                    cache[key] = upload(torch.tensor(positions, dtype=torch.int64), per.device)
                vals = per.index_select(0, cache[key])
            for d in dims:
                dist.all_reduce(vals, group=mesh.get_group(d))
            if not whole:
                per = per.index_copy(0, cache[key], vals)
        return per

    return hook
