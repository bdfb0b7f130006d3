"""Launch tables on the device: uploads without a host synchronisation, the chunk table that lets one launch
cover any number of tensors, the pointer table, and the device and stream every launch runs on.

Both multi-tensor kernels (the update, kernels/adadelta.py, and the norms, kernels/norms.py) read the
same kind of tables: program ``pid`` works on block ``chunk_block[pid]`` of tensor ``chunk_tensor[pid]``,
and the tensors' addresses come from an int64 pointer table with one alignment flag per tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["UPDATE_BLOCK", "UPDATE_BLOCK_UNALIGNED", "update_block", "NORM_BLOCK", "NUM_WARPS", "ChunkTable",
           "PointerTable", "chunk_table", "current_stream", "device_guard", "record_use", "upload", "upload_into",
           "refuse_during_capture"]

#: The launch constants of both kernels, in one place. The update: elements a program; 8 a thread with
#: 4 warps keeps every variant within 128 registers (issue 14, bench/codegen.py); the unaligned
#: specialisation's scalar accesses take more registers, so 4 there. The norms: a block of their chunks.
UPDATE_BLOCK = 1024
UPDATE_BLOCK_UNALIGNED = 512


def update_block(aligned: bool, stochastic: bool) -> int:
    """Elements a program of the update kernel handles: ``UPDATE_BLOCK`` (8 a thread) for aligned
    tensors; ``UPDATE_BLOCK_UNALIGNED`` (4 a thread) for the others, whose scalar accesses cost more
    registers per element, except with stochastic rounding, where 8 a thread let one Philox call serve
    all of a thread's elements (those variants stay under 128 registers; the defaults under 80)."""
    return UPDATE_BLOCK if aligned or stochastic else UPDATE_BLOCK_UNALIGNED

NORM_BLOCK = 2048
NUM_WARPS = 4


def upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without a host-device synchronisation."""
    if device.type == "cpu":
        return host
    refuse_during_capture(device, "a new launch table (a parameter without a warm-up step, or new groups)")
    return host.pin_memory().to(device, non_blocking=True)


def upload_into(dst: Tensor, host: Tensor) -> None:
    """Overwrite the device table ``dst`` with ``host`` in place, without a host-device synchronisation."""
    if dst.device.type == "cpu":
        dst.copy_(host)
    else:
        refuse_during_capture(dst.device, "a launch table changed")
        dst.copy_(host.pin_memory(), non_blocking=True)


def refuse_during_capture(device: torch.device, what: str) -> None:
    """Raise if the current CUDA stream is being captured: ``what`` would need a host-to-device copy.

    A copy from host memory recorded in a CUDA graph would replay stale or freed host memory, so
    every table the kernel reads must be final before capture (one eager warm-up step with the same
    tensors). Only called when a table is about to change, so a plain step pays nothing for it.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what} while a CUDA graph is being captured; the optimizer's device tables must be final "
            "before capture. Run an eager warm-up step with the same parameters and gradient tensors "
            "(keep gradients: zero_grad(set_to_none=False)), and change lr only through a tensor lr "
            "(capturable=True makes it one; LR schedulers update it in place)."
        )


# ------------------------------------------------------------------------------------- device and stream
_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device) -> Any:
    """The context every launch on ``device`` runs in: that device current, so a Triton launch (which
    goes to the current device's current stream) lands on ``device``'s current stream, where torch's own
    operations on its tensors run too. Nothing for CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_GUARD


def current_stream(device: torch.device) -> Any:
    """The stream a launch on ``device`` goes to (None for CPU tensors)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def record_use(streams: set, tensors: Sequence[Optional[Tensor]], device: torch.device) -> None:
    """Keep ``tensors`` allocated until the work queued on the current stream of ``device`` is done.

    The caching allocator reuses a freed block in the order of the stream it was allocated on; a
    launch on another stream (a step on a side stream, buffers made on the default one) may still
    read it then. ``Tensor.record_stream`` tells the allocator, once per tensor and stream; ``streams``
    is the owner's record of streams told so far, which the owner empties when it gets new tensors.
    """
    stream = current_stream(device)
    if stream is None or stream in streams:
        return
    for t in tensors:
        if t is not None:
            t.record_stream(stream)
    streams.add(stream)


# ------------------------------------------------------------------------------------- chunks and pointers
class ChunkTable(NamedTuple):
    """Which tensor and which chunk of it each program of a multi-tensor launch works on."""

    num_chunks: int
    chunk_tensor: Tensor  # int32 [C] on the device: tensor of program pid
    chunk_block: Tensor  # int32 [C] on the device: its chunk within that tensor
    first: Tensor  # int64 [T] on the host: the first program of each tensor
    counts: Tensor  # int64 [T] on the host: programs per tensor


def chunk_table(numels: Sequence[int], chunk: int, device: torch.device,
                tensors: Optional[Sequence[int]] = None) -> ChunkTable:
    """One program per ``chunk`` elements of each tensor, and at least one per tensor, so that empty
    tensors need no special case: ``counts[t] = max(1, ceil(numels[t] / chunk))``. ``tensors``: the
    number each tensor has in the launch's tables (default ``0..T-1``), when a launch takes a subset."""
    counts = torch.tensor([max(1, -(-n // chunk)) for n in numels], dtype=torch.int64)
    first = torch.cumsum(counts, 0) - counts
    local_of_chunk = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    num_chunks = int(counts.sum())
    block_of_chunk = torch.arange(num_chunks, dtype=torch.int64) - first[local_of_chunk]
    tensor_of_chunk = local_of_chunk if tensors is None else torch.tensor(tensors, dtype=torch.int64)[local_of_chunk]
    return ChunkTable(num_chunks, upload(tensor_of_chunk.to(torch.int32), device),
                      upload(block_of_chunk.to(torch.int32), device), first, counts)


class PointerTable:
    """int64 ``[(k + 1) * T]`` on the device: k columns of T addresses, then per tensor 1 when all its
    addresses are 16-byte aligned and ``fits[t]`` (its numel a multiple of the vector width), else 0:
    only then may a kernel promise 128-bit accesses (``fits=None``: the addresses only, for a kernel
    specialised by alignment instead). Uploaded again only when an address changed."""

    def __init__(self, device: torch.device, fits: Optional[Sequence[bool]]) -> None:
        self.device = device
        self.fits = None if fits is None else np.array(fits, dtype=bool)
        self._addresses: Optional[list[int]] = None
        self.table: Optional[Tensor] = None

    def refresh(self, first: list[int], second: Optional[list[int]] = None) -> Tensor:
        """The table for these addresses (one or two columns), uploaded only when one changed."""
        ptrs = first if second is None else first + second
        if ptrs != self._addresses:
            refuse_during_capture(self.device, "a parameter or gradient tensor moved")
            # numpy: the addresses converted and tested at C speed (torch.tensor of a list converts int by
            # int, and a Python test costs an operation per address).
            addresses = np.fromiter(ptrs, dtype=np.int64, count=len(ptrs))
            if self.fits is not None:
                columns = addresses.reshape(1 if second is None else 2, -1)
                aligned = (np.bitwise_or.reduce(columns, axis=0) & 15 == 0) & self.fits
                addresses = np.concatenate((addresses, aligned.astype(np.int64)))
            self.table = upload(torch.from_numpy(addresses), self.device)
            self._addresses = ptrs
        return self.table
