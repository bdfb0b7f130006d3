"""Flat optimizer state and the multi-tensor launch plan.

A :class:`FlatState` holds the state of every parameter that shares (device, parameter dtype,
state dtype, master weights): one flat buffer each for square_avg, acc_delta, the per-tensor step
counts and optionally float32 master weights. ``optimizer.state[p]`` holds views into it. Each
tensor's segment starts at a multiple of :data:`ALIGN` elements, so aligned parameters get
128-bit accesses on the state too. ``optimizer.state`` itself is a :class:`StateDict`, torch's
``defaultdict(dict)`` counting its changes, so that a step notices edits to it cheaply.

A :class:`LaunchPlan` is what the kernel launches need for a set of tensors of one flat state:
the per-tensor table (state offset, numel, step slot, group) and a chunk table (tensor, block) per
launch: one for the aligned tensors, one for the others (the two specialisations of the kernel).
It is built once and cached; only the pointer table (parameter and gradient addresses) and the
hyperparameter table are refreshed, and only when their contents change (the chunk tables when
an address change moves a tensor to the other kind).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .reference import real_view

_DTENSOR: Any = None


def _dtensor_class() -> Any:
    """DTensor, if torch.distributed.tensor has been imported (importing it costs about a second, and
    no DTensor can exist before it is imported), else None."""
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return _DTENSOR

ALIGN = 64  # elements; a segment start is 128-byte aligned for 16-bit state, 256 for float32


class StateKey(NamedTuple):
    device: torch.device
    param_dtype: torch.dtype  # of the real view
    state_dtype: torch.dtype
    master: int  # MASTER_NONE, MASTER_FP32 or MASTER_REMAINDER (a bool reads as the first two)


MASTER_NONE, MASTER_FP32, MASTER_REMAINDER = 0, 1, 2


_PLAIN = (Tensor, torch.nn.Parameter)


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 and tensor-parallel parameters)."""
    if type(t) in _PLAIN:  # the common case, answered without looking for the DTensor class
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


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


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


def update_row(group: dict[str, Any], lr: Any) -> list[float]:
    """A group's update hyperparameters as a table row: lr, rho, 1 - rho, eps, weight_decay, sign (-1
    to maximize). The fused paths append their own last columns (the kernel: seed and clipvalue; the
    CPU path: grad_scale and clipvalue). ``lr`` is the step's float learning rate."""
    rho = float(group["rho"])
    return [float(lr), rho, 1.0 - rho, float(group["eps"]), float(group["weight_decay"]),
            -1.0 if group["maximize"] else 1.0]


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


class _Counted:
    """Mixin for the dicts of :class:`StateDict`: every change adds one to the owner's ``version``."""

    def _changed(self) -> None:
        raise NotImplementedError

    def __setitem__(self, key, value):
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changed()
        super().__delitem__(key)

    def clear(self):
        self._changed()
        super().clear()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            self._changed()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        self._changed()
        super().update(*args, **kwargs)

    def __ior__(self, other):
        self._changed()
        return super().__ior__(other)


class StateEntry(_Counted, dict):
    """The state dict of one parameter (``optimizer.state[p]``): a dict that reports its changes."""

    __slots__ = ("owner",)

    def __init__(self, owner: Optional[StateDict] = None, *args: Any, **kwargs: Any) -> None:
        self.owner = owner
        dict.__init__(self, *args, **kwargs)

    def __reduce__(self):  # pickle and deepcopy: the items; the owner adopts the entry when it is set
        return (type(self), (None, dict(self)))

    def _changed(self) -> None:
        if self.owner is not None:
            self.owner.version += 1


class StateDict(_Counted, defaultdict):
    """``optimizer.state``: torch's ``defaultdict(dict)``, counting in ``version`` every change to it or
    to a parameter's entry (a :class:`StateEntry`).

    A step compares ``version`` with the one its cached route saw, so that ``opt.state[p] = {}``,
    ``opt.state[p].clear()`` or a replaced ``opt.state[p]["square_avg"]`` are noticed without looking
    at every parameter's state each step (what torch's optimizers do). A tensor key's value must be a
    dict (a parameter's state); any other key takes any value, kept as it is (torch's rule).
    """

    def __init__(self, *args: Any) -> None:
        """``StateDict(items)``; ``StateDict(factory, items)`` as defaultdict's own ``copy()`` calls it."""
        if args and (args[0] is None or callable(args[0])):
            args = args[1:]
        defaultdict.__init__(self, dict)  # the factory torch has; __missing__ makes tracked entries instead
        self.version = 0
        for key, value in dict(*args).items():
            self[key] = value

    def __reduce__(self):  # pickle and deepcopy: the same class, entries re-adopted on load
        return (type(self), (), None, None, iter(self.items()))

    def __missing__(self, key: Any) -> dict:
        entry = StateEntry(self) if isinstance(key, Tensor) else {}
        self[key] = entry
        return entry

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(key, Tensor):
            # Not a parameter's state (torch's state_dict hooks and users keep flags so): any value, kept
            # as it is, as in torch. Setting it still counts as a change (harmless: one re-routed step).
            super().__setitem__(key, value)
            return
        if not isinstance(value, dict):
            raise TypeError(f"the state of a parameter must be a dict, got {type(value).__name__}")
        if isinstance(value, StateEntry) and value.owner is None:
            value.owner = self  # an unpickled or copied entry
        elif not (isinstance(value, StateEntry) and value.owner is self):
            value = StateEntry(self, value)  # a plain dict from the user (or another's entry): tracked from now on
        super().__setitem__(key, value)

    def _changed(self) -> None:
        self.version += 1


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
        # float32 master weights, or (remainder mode) the int16 low halves that make a bf16 parameter float32.
        mdt = torch.int16 if key.master == MASTER_REMAINDER else torch.float32
        self.master: Optional[Tensor] = torch.zeros(0, dtype=mdt, device=dev) if key.master else None

    def __getstate__(self) -> dict:
        # The index is keyed by object identity, which a copy does not keep: rebuilt on load.
        return {k: v for k, v in self.__dict__.items() if k != "index"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.index = {id(p): i for i, p in enumerate(self.params)}

    def __contains__(self, p: Tensor) -> bool:
        return id(p) in self.index

    def add(self, new_params: list[Tensor]) -> None:
        """Append segments for ``new_params`` (zero state, step 0; master = the parameter's value,
        a zero remainder in remainder mode: the parameter is then its own float32 value).

        The buffers are reallocated once and the old contents copied; views handed out before
        are stale afterwards, so callers rebind them with :meth:`views`.
        """
        offsets = list(self.offsets)
        size = self.size
        for p in new_params:
            offsets.append(size)
            size += _padded(real_view(local(p)).numel())

        def grow(old: Tensor, n: int) -> Tensor:
            new = torch.zeros(n, dtype=old.dtype, device=old.device)
            new[: old.numel()].copy_(old)
            return new

        self.square_avg = grow(self.square_avg, size)
        self.acc_delta = grow(self.acc_delta, size)
        self.steps = grow(self.steps, len(offsets))
        if self.master is not None:
            self.master = grow(self.master, size)
            for p, off in zip(new_params, offsets[len(self.params):] if self.key.master == MASTER_FP32 else []):
                flat = real_view(local(p.detach())).reshape(-1)
                self.master[off: off + flat.numel()].copy_(flat)
        for p in new_params:
            self.index[id(p)] = len(self.params)
            self.params.append(p)
        self.offsets = offsets
        self.size = size

    def without(self, gone: set[int]) -> FlatState:
        """A copy holding every parameter but those whose id is in ``gone``, with their values.

        Offsets of the kept parameters change (the buffers are compacted), so views and launch plans
        of the old flat state are stale afterwards.
        """
        kept = [p for p in self.params if id(p) not in gone]
        new = FlatState(self.key)
        new.add(kept)
        pairs = [(name, getattr(self, name), getattr(new, name)) for name in ("square_avg", "acc_delta", "master")]
        for j, p in enumerate(kept):
            i = self.index[id(p)]
            n = real_view(local(p)).numel()
            for _, src, dst in pairs:
                if src is not None:
                    dst[new.offsets[j]: new.offsets[j] + n].copy_(src[self.offsets[i]: self.offsets[i] + n])
            new.steps[j] = self.steps[i]
        return new

    def _segment(self, buf: Tensor, i: int, like: Tensor) -> Tensor:
        n = real_view(like).numel()
        seg = buf[self.offsets[i]: self.offsets[i] + n]
        if like.is_complex():
            return torch.view_as_complex(seg.view(*like.shape, 2))
        return seg.view(like.shape)

    def views(self, p: Tensor) -> dict[str, Tensor]:
        """The state entries of ``p`` as views into the flat buffers, under torch's names.

        For a DTensor parameter the segments hold its local shard and are handed out as DTensors
        with its mesh and placements (so torch.distributed.checkpoint saves them sharded); ``step``
        stays a plain 0-d tensor, the same on every rank, as torch's optimizers keep it.
        """
        i = self.index[id(p)]
        shard = local(p)
        out = {
            "step": self.steps[i],
            "square_avg": like_param(self._segment(self.square_avg, i, shard), p),
            "acc_delta": like_param(self._segment(self.acc_delta, i, shard), p),
        }
        if self.master is not None:
            out["master"] = like_param(self._segment(self.master, i, shard), p)
        return out

    def replaced(self, p: Tensor, entry: dict) -> dict[str, Any]:
        """The names of ``entry`` (``state[p]``) that do not hold this flat state's view of p's segment,
        with what they hold instead (something a user put there); None for a name that is missing."""
        i = self.index[id(p)]
        bufs = {"step": (self.steps, i), "square_avg": (self.square_avg, self.offsets[i]),
                "acc_delta": (self.acc_delta, self.offsets[i])}
        if self.master is not None:
            bufs["master"] = (self.master, self.offsets[i])
        out: dict[str, Any] = {}
        for name, (buf, off) in bufs.items():
            value = entry.get(name)
            if isinstance(value, Tensor):
                t = local(value)
                if t.numel() == 0 and name != "step" and value.shape == p.shape:
                    continue  # an empty segment has no address to compare, and no value to take up
                if (t.data_ptr() == buf.data_ptr() + off * buf.element_size()
                        and t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()):
                    continue  # a view of the segment (ours, or made from ours)
            out[name] = value
        return out

    def rebind(self, state: dict, new: Iterable[Tensor] = ()) -> None:
        """Point ``state[p]`` at the current buffers for every parameter of this flat state that has
        state, and for the ``new`` ones. An emptied entry (a reset: ``state[p] = {}``) stays empty, as
        in torch, until a step gives the parameter new state."""
        new_ids = {id(p) for p in new}
        for p in self.params:
            if state.get(p) or id(p) in new_ids:
                state[p].update(self.views(p))


def is_aligned(param_address: int, grad_address: int, numel: int, vec: int) -> bool:
    """May the kernel promise 128-bit accesses on this tensor? Both addresses 16-byte aligned and
    ``numel`` a multiple of ``vec`` (elements in 16 bytes of the narrower dtype): only then does no
    vector of a block's tail reach past the tensor."""
    return (param_address | grad_address) % 16 == 0 and numel % vec == 0


class ChunkTable(NamedTuple):
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

    def __init__(self, flat: FlatState, params: list[Tensor], groups: list[int], block: int, vec: int,
                 unaligned_block: Optional[int] = None) -> None:
        device = flat.key.device
        self.flat = flat
        self.blocks = {True: block, False: unaligned_block or block}
        self.vec = vec  # elements in 128 bits for this bucket's narrower dtype (parameter or gradient)
        self.num_tensors = len(params)
        self._numels = [real_view(local(p)).numel() for p in params]
        slots = [flat.index[id(p)] for p in params]
        meta = torch.tensor(
            [[flat.offsets[s], n, s, g] for s, n, g in zip(slots, self._numels, groups)], dtype=torch.int64
        ).reshape(-1, 4)
        self.tensor_meta = upload(meta, device)
        self.step_slots = upload(torch.tensor(slots, dtype=torch.int64), device)
        self._ones = torch.ones(len(slots), dtype=torch.float32, device=device)  # made once, not every step
        self.all_slots = slots == list(range(len(flat.params)))
        self._pointers: Optional[list[int]] = None
        self._aligned: Optional[list[bool]] = None
        self.pointer_table: Optional[Tensor] = None
        self.launches: list[ChunkTable] = []  # set by refresh_pointers, which knows the addresses

    def _chunk_table(self, aligned: bool, tensors: list[int]) -> ChunkTable:
        """Programs for ``tensors`` (indices into the plan): every tensor gets at least one block, so
        0-element tensors need no special case."""
        block = self.blocks[aligned]
        blocks = torch.tensor([max(1, -(-self._numels[t] // block)) for t in tensors], dtype=torch.int64)
        first = torch.cumsum(blocks, 0) - blocks
        local_of_chunk = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int64), blocks)
        block_of_chunk = torch.arange(int(blocks.sum()), dtype=torch.int64) - first[local_of_chunk]
        tensor_of_chunk = torch.tensor(tensors, dtype=torch.int64)[local_of_chunk]
        device = self.flat.key.device
        return ChunkTable(aligned, block, upload(tensor_of_chunk.to(torch.int32), device),
                          upload(block_of_chunk.to(torch.int32), device), int(blocks.sum()))

    def refresh_pointers(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        """The pointer table for this step (real views of local tensors), uploaded only when an address
        changed; the chunk tables are rebuilt when that changes which tensors are aligned."""
        pp = [p.data_ptr() for p in params]
        gp = [g.data_ptr() for g in grads]
        ptrs = pp + gp
        if ptrs != self._pointers:
            refuse_during_capture(self.flat.key.device, "a parameter or gradient tensor moved")
            self.pointer_table = upload(torch.tensor(ptrs, dtype=torch.int64), self.flat.key.device)
            self._pointers = ptrs
            aligned = [is_aligned(a, b, n, self.vec) for a, b, n in zip(pp, gp, self._numels)]
            if aligned != self._aligned:
                kinds = [(kind, [t for t, a in enumerate(aligned) if a == kind]) for kind in (True, False)]
                self.launches = [self._chunk_table(kind, tensors) for kind, tensors in kinds if tensors]
                self._aligned = aligned
        return self.pointer_table

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
