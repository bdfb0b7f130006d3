"""The optimizer's state: ``optimizer.state`` and the flat buffers behind it, one owner for its lifecycle.

A :class:`FlatState` holds the state of every parameter that shares a :class:`StateKey` (device,
parameter dtype, state dtype, master weights): one flat buffer each for square_avg, acc_delta, the
per-tensor step counts and optionally master weights. ``optimizer.state[p]`` holds views into it.
Each tensor's segment starts at a multiple of :data:`ALIGN` elements, so aligned parameters get
128-bit accesses on the state too. ``optimizer.state`` itself is a :class:`StateDict`, torch's
``defaultdict(dict)`` counting its changes, so that a step notices edits to it cheaply.

:class:`StateStore` owns both and every change of their layout: new segments, resets, replaced
tensors, parameters whose dtype (key) changed, pickling and loading. Whenever buffers are
reallocated its ``generation`` grows, which tells launch plans made before that they are stale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from copy import deepcopy
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from . import validation
from .backends.tables import record_use
from .reference import real_view
from .shards import is_dtensor, like_param, local

__all__ = ["ALIGN", "MASTER_NONE", "MASTER_FP32", "MASTER_REMAINDER", "FLAT_NAMES", "StateKey", "StateEntry",
           "StateDict", "FlatState", "StateStore", "real_dtype"]

ALIGN = 64  # elements; a segment start is 128-byte aligned for 16-bit state, 256 for float32
MASTER_NONE, MASTER_FP32, MASTER_REMAINDER = 0, 1, 2
FLAT_NAMES = frozenset(("step", "square_avg", "acc_delta", "master"))  # state that lives in a FlatState
_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def real_dtype(p: Tensor) -> torch.dtype:
    """The dtype of ``p``'s real view (float32 for complex64)."""
    return _REAL_OF_COMPLEX.get(p.dtype, p.dtype)


class StateKey(NamedTuple):
    device: torch.device
    param_dtype: torch.dtype  # of the real view
    state_dtype: torch.dtype
    master: int  # MASTER_NONE, MASTER_FP32 or MASTER_REMAINDER (a bool reads as the first two)


def state_key(group: dict[str, Any], p: Tensor) -> StateKey:
    """The flat state that ``p`` (a local tensor) of ``group`` belongs in."""
    real = real_dtype(p)
    sdt = group["state_dtype"]
    if sdt is None or p.is_complex() or real == torch.float64:
        sdt = real
    mode = group["master_weights"]
    master = MASTER_NONE
    if real in (torch.bfloat16, torch.float16) and mode:
        master = MASTER_REMAINDER if mode == "remainder" else MASTER_FP32
    return StateKey(p.device, real, sdt, master)


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


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
        self.streams: set = set()  # streams the buffers were used on (backends.tables.record_use)

    def __getstate__(self) -> dict:
        # The index is keyed by object identity, which a copy does not keep: rebuilt on load. Streams
        # belong to this process.
        return {k: v for k, v in self.__dict__.items() if k not in ("index", "streams")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.streams = set()

    def buffers(self) -> tuple[Optional[Tensor], ...]:
        """The flat buffers (a launch reads and writes them)."""
        return (self.square_avg, self.acc_delta, self.steps, self.master)

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
        self.streams = set()  # new buffers: not yet used on any stream

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




def copy_state(dst: Tensor, src: Tensor, name: str) -> None:
    """Copy a loaded state tensor into its flat-buffer view ``dst``.

    A sharded (DTensor) state is copied shard to shard, redistributed first if the checkpoint's
    placements differ; a full plain tensor loaded into sharded state is split the way the parameter
    is (a collective: every rank loads). Anything else is a plain ``copy_``.
    """
    if is_dtensor(dst):
        if is_dtensor(src):
            if src.device_mesh != dst.device_mesh or tuple(src.placements) != tuple(dst.placements):
                src = src.redistribute(dst.device_mesh, dst.placements)
        elif src.shape == dst.shape:
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)
        else:
            raise ValueError(f"loaded state '{name}' has shape {tuple(src.shape)}, the parameter {tuple(dst.shape)}")
        local(dst).copy_(local(src))
    elif is_dtensor(src):
        dst.copy_(src.full_tensor())
    else:
        dst.copy_(src)


def _replacement(where: str, name: str, value: Any, view: Tensor) -> Tensor:
    """A value a user put in ``state[p][name]``, checked against the flat buffers' ``view``, ready to copy."""
    if name == "step":
        validation.check_step_value(f"the state of {where}", value)
        return value.detach().reshape(()) if isinstance(value, Tensor) else torch.tensor(float(value))
    if not isinstance(value, Tensor):
        raise TypeError(f"the state '{name}' of {where} was replaced by a {type(value).__name__}; expected a tensor")
    if value.device.type == "meta" or value.layout != torch.strided:
        raise TypeError(f"the state '{name}' of {where} was replaced by a {value.layout} tensor on {value.device}; "
                        "expected a dense tensor with data")
    if tuple(value.shape) != tuple(view.shape):
        raise RuntimeError(f"the state '{name}' of {where} was replaced by a tensor of shape {tuple(value.shape)}, "
                           f"but the parameter has shape {tuple(view.shape)}")
    if not (value.is_floating_point() or value.is_complex()) and not (name == "master" and value.dtype == view.dtype):
        raise TypeError(f"the state '{name}' of {where} was replaced by a tensor of dtype {value.dtype}; expected a "
                        "floating point dtype")
    return value.detach()


GroupParams = list[tuple[dict, list[Tensor]]]  # (group, its parameters that take part)


def _plain_state(group: dict[str, Any], p: Tensor, state_dtype: torch.dtype) -> dict[str, Tensor]:
    """A new parameter's state as ordinary tensors (differentiable=True), laid out as torch.optim.Adadelta's:
    a float32 0-d step (on the CPU unless capturable) and zero square_avg/acc_delta like ``p``, of the
    state dtype (the parameter's own for complex parameters)."""
    dtype = p.dtype if p.is_complex() else state_dtype
    return {"step": torch.zeros((), dtype=torch.float32, device=p.device if group["capturable"] else "cpu"),
            "square_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
            "acc_delta": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}


class StateStore:
    """``optimizer.state`` and its flat states: every change of the state's layout goes through here.

    ``state``: the :class:`StateDict` torch's contract exposes; ``flats``: the flat states by key;
    ``master_from_param``: parameters whose master weights are still to be taken from the parameter
    (after loading a state_dict without ours); ``generation``: grows whenever buffers are reallocated.
    ``differentiable``: the state is ordinary tensors instead (autograd tracks the update through it
    across steps, as in torch), and no flat state is made.
    """

    def __init__(self, differentiable: bool = False) -> None:
        self.state = StateDict()
        self.flats: dict[StateKey, FlatState] = {}
        self.master_from_param: list[Tensor] = []
        self.generation = 0
        self.differentiable = differentiable

    def flat_of(self, p: Tensor) -> Optional[FlatState]:
        for flat in self.flats.values():
            if p in flat:
                return flat
        return None

    def names(self, group: dict[str, Any], p: Tensor) -> tuple[set[str], set[str]]:
        """(required, allowed) state names of a non-empty saved entry of ``p`` in ``group``."""
        required = {"step", "square_avg", "acc_delta"}
        allowed = set(required)
        if state_key(group, local(p)).master:
            allowed.add("master")
        return required, allowed

    # ------------------------------------------------------------------------- a step's state
    @torch.no_grad()
    def prepare(self, param_groups: list[dict[str, Any]], group_params: GroupParams) -> None:
        """Make the state of a step's parameters ready for the fused paths, in this order: state a user
        replaced is copied into the buffers, segments follow parameters whose key changed, and every
        parameter without state gets a zeroed segment."""
        if not isinstance(self.state, StateDict):  # replaced by the user: count its changes again
            self.state = StateDict(self.state)
        given = self._adopt_replaced(param_groups)
        self._follow_key_changes(group_params)
        self.ensure(group_params, given)

    @torch.no_grad()
    def ensure(self, group_params: GroupParams, given: Optional[dict[int, dict[str, Tensor]]] = None) -> None:
        """Give every listed parameter without state a zeroed segment in its flat state.

        A parameter that still has a segment but no state (its state was reset: ``opt.state[p] = {}``,
        ``.clear()``, ``del opt.state[p]``) leaves its old segment first, and starts again from zero as
        in torch. ``given``: by ``id(p)``, the checked values of state a user gave a parameter that had
        none (``opt.state[p] = {...}`` before its first step, see :meth:`_adopt_replaced`): such a
        parameter gets a segment holding them.
        """
        missing = [(group, p) for group, params in group_params for p in params if len(self.state.get(p, {})) == 0]
        if self.differentiable:
            # Autograd tracks the update through the state across steps: the state is ordinary tensors, as
            # torch's (views made here, under no_grad, must not be written in place with grad mode on).
            for group, p in missing:
                self.state[p] = _plain_state(group, p, state_key(group, local(p)).state_dtype)
            return  # (a differentiable optimizer keeps the state a user gives as it is: nothing ``given``)
        self._new_segments(missing)
        pairs = [(group, p) for group, params in group_params for p in params if id(p) in (given or {})]
        if not pairs:
            return
        for _, p in pairs:
            for name in given[id(p)]:
                del self.state[p][name]
        self._new_segments(pairs)
        for _, p in pairs:
            views = self.flat_of(p).views(p)
            for name, value in given[id(p)].items():
                if name in views:
                    copy_state(views[name], value, name)

    def _adopt_replaced(self, param_groups: list[dict[str, Any]]) -> dict[int, dict[str, Tensor]]:
        """Copy state a user put in ``opt.state[p]`` in place of the flat buffers' views into them, and
        hand the views out again: torch's optimizers update whatever ``opt.state`` holds, so ours must
        start from those values too. Every replacement is checked before any is copied: one of another
        shape, or that is not a tensor (or for ``step`` a one-element number), is an error naming it.

        Returns, by ``id(p)``, the checked state given to parameters with a gradient and no segment yet,
        for :meth:`ensure` to take up."""
        pending, given = [], {}
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                flat = self.flat_of(p)
                if flat is None:  # state given before the first step, or a differentiable optimizer's state
                    if p.grad is not None:
                        checked = {name: _replacement(f"parameter {pi} of group {gi}", name, value, p)
                                   for name, value in st.items() if name in FLAT_NAMES}
                        if not self.differentiable:  # (there the tensors stay, autograd tracks them)
                            given[id(p)] = checked
                    continue
                replaced = flat.replaced(p, st)
                if replaced:
                    views = flat.views(p)
                    where = f"parameter {pi} of group {gi}"
                    values = {name: _replacement(where, name, value, views[name])
                              for name, value in replaced.items() if value is not None}  # None: the view returns
                    pending.append((p, views, values))
        for p, views, values in pending:
            for name, value in values.items():
                copy_state(views[name], value, name)
            self.state[p].update(views)
        return given

    def _new_segments(self, pairs: list[tuple[dict, Tensor]]) -> None:
        """Give each ``(group, p)`` a zeroed segment in the flat state of its current key (and views in
        ``state[p]``). A segment it had before is dropped and that flat state compacted."""
        if not pairs:
            return
        new: dict[StateKey, list[Tensor]] = defaultdict(list)
        gone: dict[StateKey, set[int]] = defaultdict(set)
        for group, p in pairs:
            new[state_key(group, local(p))].append(p)
            flat = self.flat_of(p)
            if flat is not None:
                gone[flat.key].add(id(p))
        for key, ids in gone.items():
            rest = self.flats.pop(key).without(ids)
            if rest.params:
                self.flats[key] = rest
                rest.rebind(self.state)
        for key, params in new.items():
            flat = self.flats.get(key)
            if flat is None:
                flat = self.flats[key] = FlatState(key)
            flat.add(params)
            for p in params:  # state_dict() lists state in opt.state's order, load_state_dict lays the
                self.state[p] = self.state.pop(p, {})  # segments out in it: keep it the segments' order
            flat.rebind(self.state, new=params)
        self.generation += 1

    def _follow_key_changes(self, group_params: GroupParams) -> None:
        """Move the state of parameters whose flat-state key changed since it was made to the new one.

        The key is (device, parameter dtype, state dtype, master mode). ``p.data = p.data.to(dtype)``
        (what ``model.to(dtype)`` does) keeps the parameter object and its state, and torch goes on
        updating it with that state; a group's ``state_dtype`` or ``master_weights`` edited between
        steps asks for another layout of the same state. The kernel reads the parameter as its key's
        dtype, so the state moves: values cast to the new state dtype, step counts kept, master
        weights kept where both keys have float32 ones (a new master starts from the parameter; a
        remainder from zero). The other flat states are compacted.
        """
        moves = [
            (group, p) for group, params in group_params for p in params
            if self.state.get(p) and (flat := self.flat_of(p)) is not None
            and flat.key != state_key(group, local(p))
        ]
        if not moves:
            return
        saved = {id(p): {k: local(v).clone() for k, v in self.state[p].items() if k in FLAT_NAMES}
                 for _, p in moves}
        for _, p in moves:
            for k in FLAT_NAMES:
                self.state[p].pop(k, None)
        self._new_segments(moves)
        for _, p in moves:
            st, old = self.state[p], saved[id(p)]
            for k in ("step", "square_avg", "acc_delta"):
                local(st[k]).copy_(old[k])
            if "master" in st and "master" in old and st["master"].dtype == old["master"].dtype == torch.float32:
                local(st["master"]).copy_(old["master"])

    def refresh_masters(self) -> None:
        """master = parameter (remainder = 0) for the parameters a load found without a master."""
        if self.master_from_param:  # (every step asks; almost never is there anything to do)
            with torch.no_grad():
                self._masters_from_params()

    def _masters_from_params(self) -> None:
        pending = self.master_from_param
        while pending:
            p = pending.pop()
            st = self.state.get(p, {})
            if "master" in st:
                m = local(st["master"])
                if m.dtype == torch.int16:  # remainder mode: the bf16 parameter alone is the value
                    m.zero_()
                else:
                    m.copy_(local(p).detach())

    # ------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load(self, loaded: list[tuple[dict, Tensor, dict[str, Any]]], order: Optional[list[Any]] = None) -> None:
        """Replace everything with the saved state ``(group, p, saved entry)``, in the saved order.

        ``order``: the new state dict's keys in order, each a parameter of ``loaded`` or, for a key that is
        no parameter's (a user's flag, kept as it is, as in torch), a ``(key, value)`` pair.

        One parameter at a time in the saved order: state_dict() lists state in the order it was
        created, so the flat layout (and with it the stochastic-rounding streams, which follow the flat
        offsets) comes back exactly as it was before saving. Saved tensors are copied into the flat
        buffers (cast to their state dtype). The caller restores :meth:`snapshot` on failure.
        """
        self.state, self.flats, self.master_from_param = StateDict(), {}, []
        self.generation += 1
        self.ensure([(group, [p]) for group, p, _ in loaded])
        # ... and the state dict in the saved order too, so the next state_dict() lists it the same way.
        if order is None:
            order = [p for _, p, _ in loaded]
        self.state = StateDict([item if isinstance(item, tuple) else (item, self.state[item]) for item in order])
        for _, p, saved in loaded:
            st = self.state[p]
            master = saved.get("master")
            if "master" in st and not (isinstance(master, Tensor) and master.dtype == st["master"].dtype):
                # No master of our kind saved (a torch.optim.Adadelta state_dict: it carries ours along
                # cast to the parameter dtype, and stale): take the parameter's value at the next step,
                # when a model checkpoint loaded after this call has been loaded too.
                self.master_from_param.append(p)
                saved = {k: v for k, v in saved.items() if k != "master"}
            for name, value in saved.items():
                if name in FLAT_NAMES and name in st:
                    if not isinstance(value, Tensor):  # a Python number step (older torch)
                        value = torch.tensor(float(value))
                    elif name == "step":  # any one-element shape, as torch.optim loads it
                        value = value.reshape(())
                    copy_state(st[name], value.detach(), name)
                else:
                    st[name] = deepcopy(value)

    def record_use(self) -> None:
        """Keep the flat buffers of CUDA devices allocated until the current streams' work is done (a
        step on a side stream; see backends.tables.record_use)."""
        for flat in self.flats.values():
            record_use(flat.streams, flat.buffers(), flat.key.device)  # nothing for CPU buffers

    def snapshot(self) -> tuple:
        return (self.state, self.flats, self.master_from_param)

    def restore(self, snapshot: tuple) -> None:
        self.state, self.flats, self.master_from_param = snapshot
        self.generation += 1

    def complete_state_dict(self, sd: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
        """Make torch's ``state_dict()["state"]`` safe to keep and to save: per-parameter dicts copied
        (tensors shared, as in torch), complex and sharded state copied, masters still due left out."""
        # torch hands out its live per-parameter dicts: editing the result would edit the optimizer.
        # Values under other keys (a user's flags: StateDict keeps them as they are) are handed out as
        # they are, as torch does.
        sd["state"] = {k: dict(v) if isinstance(v, StateEntry) else v for k, v in sd["state"].items()}
        for entry in sd["state"].values():
            if not isinstance(entry, dict):
                continue
            for name, value in entry.items():
                # Complex state is a complex view of a real flat buffer that real parameters share;
                # torch.save refuses one storage seen as two dtypes, so such entries are copied. A
                # DTensor over a view at an offset into a buffer cannot be pickled or deep-copied at all
                # (torch 2.11-2.13: "invalid python storage"), so sharded state is copied too.
                if isinstance(value, Tensor) and (is_dtensor(value) or value.is_complex()):
                    entry[name] = value.clone()
        if self.master_from_param:
            # A master still due to be taken from its parameter (after a torch.optim state_dict) is not a
            # value yet: saved without it, it is taken from the parameter after this dict's load too.
            index = {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}
            for p in self.master_from_param:
                sd["state"].get(index.get(id(p)), {}).pop("master", None)

    # ------------------------------------------------------------------------- pickling
    def pickled(self) -> dict[str, Any]:
        """The optimizer attributes that carry the state in a pickle (the layout of every version).

        The state entries of flat-backed parameters hold views of the flat buffers, which travel in
        ``_flats``; :meth:`from_pickle` hands the views out again. (A DTensor over a view at an offset
        cannot be pickled at all, so FSDP2 state must not travel as such views.) A value a user put in
        place of a view (not yet taken up by a step) travels as it is, and an emptied (reset) entry
        stays empty: only the entries listed in ``_flat_bound`` get views back.
        """
        entries, bound = {}, []
        for p, st in self.state.items():
            if not isinstance(p, Tensor):  # not a parameter's state (a user's flag): travels as it is
                entries[p] = st
                continue
            flat = self.flat_of(p)
            if flat is None or not st:
                entries[p] = dict(st)
                continue
            replaced = flat.replaced(p, st)
            entries[p] = {k: v for k, v in st.items() if k not in FLAT_NAMES or k in replaced}
            bound.append(p)
        return {"state": entries, "_flat_bound": bound, "_flats": self.flats,
                "_master_from_param": list(self.master_from_param)}

    @classmethod
    def from_pickle(cls, attrs: dict[str, Any], differentiable: bool = False) -> StateStore:
        """The store from :meth:`pickled`'s attributes (popped from ``attrs``), or an older version's."""
        store = cls(differentiable)
        state = attrs.pop("state", None) or {}
        store.state = state if isinstance(state, StateDict) else StateDict(state)
        store.flats = attrs.pop("_flats", None) or {}
        store.master_from_param = attrs.pop("_master_from_param", None) or []
        bound = attrs.pop("_flat_bound", None)
        if bound is None:  # pickled by an older version: its entries hold the views
            for flat in store.flats.values():
                flat.rebind(store.state)
        else:
            bound_ids = {id(p) for p in bound}
            for flat in store.flats.values():
                for p in flat.params:
                    if id(p) in bound_ids:
                        entry = store.state[p]
                        for name, view in flat.views(p).items():
                            entry.setdefault(name, view)  # a user's value stays, for the next step to adopt
        return store
