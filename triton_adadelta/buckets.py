"""Flat optimizer state and the multi-tensor launch plan.

A :class:`FlatState` holds the state of every parameter that shares (device, parameter dtype,
state dtype, master weights): one flat buffer each for square_avg, acc_delta, the per-tensor step
counts and optionally float32 master weights. ``optimizer.state[p]`` holds views into it. Each
tensor's segment starts at a multiple of :data:`ALIGN` elements, so aligned parameters get
128-bit accesses on the state too.

A :class:`LaunchPlan` is what one kernel launch needs for a set of tensors of one flat state:
the per-tensor table (state offset, numel, step slot, group) and the chunk table (tensor, block).
It is built once and cached; only the pointer table (parameter and gradient addresses, alignment)
and the hyperparameter table are refreshed, and only when their contents change.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .reference import real_view

ALIGN = 64  # elements; a segment start is 128-byte aligned for 16-bit state, 256 for float32


class StateKey(NamedTuple):
    device: torch.device
    param_dtype: torch.dtype  # of the real view
    state_dtype: torch.dtype
    master: bool


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without a host-device synchronisation."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class FlatState:
    """square_avg, acc_delta, step and (optionally) master weights for a list of parameters."""

    def __init__(self, key: StateKey) -> None:
        self.key = key
        self.params: list[Tensor] = []
        self.offsets: list[int] = []
        self.index: dict[int, int] = {}
        self.size = 0
        dev, sdt = key.device, key.state_dtype
        self.square_avg = torch.zeros(0, dtype=sdt, device=dev)
        self.acc_delta = torch.zeros(0, dtype=sdt, device=dev)
        self.steps = torch.zeros(0, dtype=torch.float32, device=dev)
        self.master: Optional[Tensor] = torch.zeros(0, dtype=torch.float32, device=dev) if key.master else None

    def __getstate__(self) -> dict:
        # The index is keyed by object identity, which a copy does not keep: rebuilt on load.
        return {k: v for k, v in self.__dict__.items() if k != "index"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.index = {id(p): i for i, p in enumerate(self.params)}

    def __contains__(self, p: Tensor) -> bool:
        return id(p) in self.index

    def add(self, new_params: list[Tensor]) -> None:
        """Append segments for ``new_params`` (zero state, step 0; master = the parameter's value).

        The buffers are reallocated once and the old contents copied; views handed out before
        are stale afterwards, so callers rebind them with :meth:`views`.
        """
        offsets = list(self.offsets)
        size = self.size
        for p in new_params:
            offsets.append(size)
            size += _padded(real_view(p).numel())

        def grow(old: Tensor, n: int) -> Tensor:
            new = torch.zeros(n, dtype=old.dtype, device=old.device)
            new[: old.numel()].copy_(old)
            return new

        self.square_avg = grow(self.square_avg, size)
        self.acc_delta = grow(self.acc_delta, size)
        self.steps = grow(self.steps, len(offsets))
        if self.master is not None:
            self.master = grow(self.master, size)
            for p, off in zip(new_params, offsets[len(self.params):]):
                flat = real_view(p.detach()).reshape(-1)
                self.master[off: off + flat.numel()].copy_(flat)
        for p in new_params:
            self.index[id(p)] = len(self.params)
            self.params.append(p)
        self.offsets = offsets
        self.size = size

    def _segment(self, buf: Tensor, i: int, like: Tensor) -> Tensor:
        n = real_view(like).numel()
        seg = buf[self.offsets[i]: self.offsets[i] + n]
        if like.is_complex():
            return torch.view_as_complex(seg.view(*like.shape, 2))
        return seg.view(like.shape)

    def views(self, p: Tensor) -> dict[str, Tensor]:
        """The state entries of ``p`` as views into the flat buffers, under torch's names."""
        i = self.index[id(p)]
        out = {
            "step": self.steps[i],
            "square_avg": self._segment(self.square_avg, i, p),
            "acc_delta": self._segment(self.acc_delta, i, p),
        }
        if self.master is not None:
            out["master"] = self._segment(self.master, i, p)
        return out

    def rebind(self, state: dict) -> None:
        """Point ``state[p]`` of every parameter of this flat state at the current buffers."""
        for p in self.params:
            state[p].update(self.views(p))


class LaunchPlan:
    """Tables for one launch over ``params`` (all from ``flat``), cached between steps."""

    def __init__(self, flat: FlatState, params: list[Tensor], groups: list[int], block: int) -> None:
        device = flat.key.device
        self.flat = flat
        self.block = block
        self.num_tensors = len(params)
        numels = [real_view(p).numel() for p in params]
        slots = [flat.index[id(p)] for p in params]
        meta = torch.tensor(
            [[flat.offsets[s], n, s, g] for s, n, g in zip(slots, numels, groups)], dtype=torch.int64
        ).reshape(-1, 4)
        self.tensor_meta = upload(meta, device)
        # Every tensor gets at least one block, so 0-element tensors need no special case.
        blocks = torch.tensor([max(1, -(-n // block)) for n in numels], dtype=torch.int64)
        first = torch.cumsum(blocks, 0) - blocks
        tensor_of_chunk = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int64), blocks)
        block_of_chunk = torch.arange(int(blocks.sum()), dtype=torch.int64) - first[tensor_of_chunk]
        self.num_chunks = int(blocks.sum())
        self.chunk_tensor = upload(tensor_of_chunk.to(torch.int32), device)
        self.chunk_block = upload(block_of_chunk.to(torch.int32), device)
        self.step_slots = upload(torch.tensor(slots, dtype=torch.int64), device)
        self.all_slots = slots == list(range(len(flat.params)))
        self._pointers: Optional[list[int]] = None
        self.pointer_table: Optional[Tensor] = None

    def refresh_pointers(self, params: list[Tensor], grads: list[Tensor], vec: int) -> Tensor:
        """The pointer table for this step, uploaded only when an address changed.

        A tensor is marked aligned only when both addresses are 16-byte aligned and its numel is a
        multiple of ``vec``: only then may the kernel promise 128-bit accesses.
        """
        pp = [p.data_ptr() for p in params]
        gp = [g.data_ptr() for g in grads]
        ptrs = pp + gp
        if ptrs != self._pointers:
            aligned = [
                int(a % 16 == 0 and b % 16 == 0 and real_view(p).numel() % vec == 0)
                for a, b, p in zip(pp, gp, params)
            ]
            self.pointer_table = upload(torch.tensor(ptrs + aligned, dtype=torch.int64), self.flat.key.device)
            self._pointers = ptrs
        return self.pointer_table

    def increment_steps(self, found_inf: Optional[Tensor]) -> None:
        """step += 1 for every tensor of the plan (nothing when found_inf is set), on the device."""
        steps = self.flat.steps
        if found_inf is None:
            if self.all_slots:
                steps.add_(1.0)
            else:
                steps.index_add_(0, self.step_slots, torch.ones_like(self.step_slots, dtype=steps.dtype))
        else:
            inc = (1.0 - found_inf.to(steps.device, steps.dtype).reshape(()))
            if self.all_slots:
                steps.add_(inc)
            else:
                steps.index_add_(0, self.step_slots, inc.expand(self.num_tensors))
