"""The Adadelta optimizer: param groups, flat state, validation and the dispatch of step()."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping
from copy import deepcopy
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _triton, clipping, cpu_fused, validation
from .buckets import (
    MASTER_FP32,
    MASTER_NONE,
    MASTER_REMAINDER,
    FlatState,
    LaunchPlan,
    StateDict,
    StateEntry,
    StateKey,
    is_dtensor,
    local,
    refuse_during_capture,
    update_row,
    upload,
    upload_into,
)
from .keras import EPS_DEFAULT, LR_DEFAULT, KerasOptimizerMixin, dtype_from_name, resolve_arguments
from .reference import PhiloxStream, adadelta_update_, real_view

__all__ = ["Adadelta"]

# torch's internal form of torch.compiler.disable imports dynamo on the first call, not at import
# (importing torch._dynamo costs about a second).
_disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)

_KERNEL_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements a program: 8 a thread with 4 warps keeps every variant within 128 registers (issue 14,
# bench/codegen.py); the unaligned specialisation's scalar accesses take more registers, so 4 there.
_BLOCK = 1024
_BLOCK_UNALIGNED = 512
_NUM_WARPS = 4


_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _real_dtype(p: Tensor) -> torch.dtype:
    return _REAL_OF_COMPLEX.get(p.dtype, p.dtype)


def _triton_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def _has_16bit_write(key: StateKey) -> bool:
    """Does an update of this flat state round anything to 16 bits (a parameter without master, or state)?"""
    return (key.param_dtype in _SIXTEEN_BIT and not key.master) or key.state_dtype in _SIXTEEN_BIT


def _rng_stream(group: dict[str, Any], key: StateKey) -> int:
    """High word of the Philox key: the group's seed and the flat state's id (kernels._stream_id).

    Flat states number their elements from 0 each, so the id keeps their random words apart. The
    device is deliberately not part of it: data-parallel replicas then round identically and stay equal.
    """
    # The master mode is not part of it: one group has one mode per parameter dtype, and the two
    # master modes (the same float32 trajectory) then draw the same words for the same tensors.
    stream = _DTYPE_CODE[key.param_dtype] + 4 * _DTYPE_CODE[key.state_dtype]
    return int(group["seed"]) * 64 + stream


def _copy_state(dst: Tensor, src: Tensor, name: str) -> None:
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


_PLAIN = (Tensor, torch.nn.Parameter)
_FLAT_NAMES = frozenset(("step", "square_avg", "acc_delta", "master"))  # state that lives in a FlatState
_STRIDED = torch.strided


def _signature(param_groups: list[dict[str, Any]]) -> tuple[list[Tensor], Optional[list]]:
    """The step's gradients, and per parameter what the checks and the routing of a step read of it.

    An entry is ``id(p)`` for a parameter without a gradient, else the tuple of its and its gradient's
    type, dtype, shape, device and contiguity (and :func:`_subclass_signature` for tensor subclasses).
    The signature is None when a gradient is not strided (sparse): the full checks then name the problem.
    """
    grads: list[Tensor] = []
    sig: list = []
    for group in param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                sig.append(id(p))
                continue
            if g.layout is not _STRIDED:
                return grads, None
            grads.append(g)
            # (A parameter's negation bit is read when the route is built: it changes only with p.data.)
            entry = (id(p), type(p), p.dtype, p.shape, p.device, p.is_contiguous(),
                     type(g), g.dtype, g.shape, g.device, g.is_contiguous(), g.is_neg())
            if type(p) not in _PLAIN or type(g) not in _PLAIN:
                entry += _subclass_signature(p) + _subclass_signature(g)
            sig.append(entry)
    return grads, sig


def _subclass_signature(t: Tensor) -> tuple:
    """A DTensor's placements and its local shard's shape and contiguity (routing reads the shard);
    for any other tensor subclass an object equal to nothing, so that its steps are routed afresh."""
    if type(t) in _PLAIN:
        return ()
    shard = local(t)
    if shard is not t:  # a DTensor
        return (tuple(t.placements), id(t.device_mesh), shard.shape, shard.is_contiguous())
    return (object(),)


def _plain_state(group: dict[str, Any], p: Tensor, state_dtype: torch.dtype) -> dict[str, Tensor]:
    """A new parameter's state as ordinary tensors (differentiable=True), laid out as torch.optim.Adadelta's:
    a float32 0-d step (on the CPU unless capturable) and zero square_avg/acc_delta like ``p``, of the
    state dtype (the parameter's own for complex parameters)."""
    dtype = p.dtype if p.is_complex() else state_dtype
    return {"step": torch.zeros((), dtype=torch.float32, device=p.device if group["capturable"] else "cpu"),
            "square_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
            "acc_delta": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}


def _differentiable_update_(p: Tensor, g: Tensor, square_avg: Tensor, acc_delta: Tensor, step: Tensor, *,
                            lr: Union[float, Tensor], rho: float, eps: float, weight_decay: float,
                            maximize: bool) -> None:
    """One Adadelta step as torch's ``_single_tensor_adadelta(differentiable=True)`` computes it, operation
    for operation (the same values and autograd graph), in place, with autograd on.

    One difference: an ``lr`` tensor that requires grad (learning the learning rate) multiplies the update,
    ``p -= delta * lr``, so that autograd tracks it; torch's ``add_(delta, alpha=-lr)`` refuses one
    ("argument 'alpha' must be Number, not Tensor").
    """
    step += 1
    g = -g if maximize else g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if p.is_complex():
        square_avg, acc_delta, g = torch.view_as_real(square_avg), torch.view_as_real(acc_delta), torch.view_as_real(g)
    square_avg.mul_(rho).addcmul_(g, g, value=1 - rho)
    std = square_avg.add(eps).sqrt_()
    delta = acc_delta.add(eps).sqrt_().clone()
    delta.div_(std).mul_(g)
    acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    if p.is_complex():
        delta = torch.view_as_complex(delta)
    if isinstance(lr, Tensor) and lr.requires_grad:
        p.sub_(delta * lr)
    else:
        p.add_(delta, alpha=-lr)


class _Route(NamedTuple):
    """Where the tensors of a step go, reused by the next step while its signature and context hold."""

    context: tuple
    signature: Optional[list]
    entries: list[tuple[int, dict, Tensor]]  # (group index, group, parameter) of each parameter with a gradient
    keys: list[Optional[tuple]]  # per entry: its kernel bucket (flat state key, gradient dtype, stochastic), or None
    buckets: list[tuple[tuple, list[int], LaunchPlan, bool]]  # (bucket, entry indices, plan, plain tensors)
    reference: list[int]  # entries on the PyTorch path
    reference_groups: list[dict]  # the groups of those entries
    cpu: dict  # cpu_fused.settings() -> the fused CPU path's plan for the reference entries (made on first use)
    params: list[Tensor]  # the parameters of the entries: the fused paths write them behind autograd's back


class Adadelta(KerasOptimizerMixin, torch.optim.Optimizer):
    r"""Adadelta with flat state and a fused multi-tensor Triton update.

    A drop-in for :class:`torch.optim.Adadelta`: same arguments, defaults, validation, results
    and ``state_dict`` layout (``step``, ``square_avg``, ``acc_delta`` per parameter). The state
    lives in flat buffers, one per (device, parameter dtype, state dtype), and ``state[p]`` holds
    views into them.

    Args beyond torch's:
        fused: ``None`` picks the Triton kernel for CUDA tensors (and CPU tensors under
            ``TRITON_INTERPRET=1``), the PyTorch path otherwise (with its fused CPU path for CPU
            tensors); ``True`` insists on a fused path (the kernel, or on CPU the fused CPU path);
            ``False`` uses neither.
        state_dtype: dtype of square_avg and acc_delta; float32 by default for every parameter
            dtype (bf16 parameters with fp32 state). ``None`` means the parameter's dtype, as torch.
            float64 and complex parameters always keep state of their own precision.
        stochastic_rounding: round every bf16/fp16 write (parameters, 16-bit state) stochastically:
            ``E[round(x)] = x``, NaN/Inf kept, finite values never rounded into Inf. The random bits
            are a Philox stream keyed by the group's ``seed`` (drawn from ``torch.initial_seed()``,
            saved in the state_dict) and the step, so a rerun is bit-identical, on either path.
        master_weights: ``True`` keeps a float32 copy of bf16/fp16 parameters (``state["master"]``,
            saved in the state_dict), updates it and rounds it to nearest into the parameter.
            ``"remainder"`` (bf16 parameters only) keeps the int16 low halves instead: the bf16
            parameter and its remainder are the same float32 value, for 2 bytes a parameter.
            See docs/precision.md.
        skip_nonfinite: when any gradient of a step holds NaN or Inf, skip the whole step (parameters,
            state and step counts stay as they were), decided on the device without a host
            synchronisation; :attr:`skipped_steps` counts such steps. One extra read of the gradients.
            Off by default: then NaN/Inf gradients flow into the update exactly as in torch.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Any = None,
        lr: Union[float, Tensor] = LR_DEFAULT,
        rho: float = 0.9,
        eps: float = EPS_DEFAULT,
        weight_decay: float = 0,
        foreach: Optional[bool] = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = torch.float32,
        stochastic_rounding: bool = False,
        master_weights: Union[bool, str] = False,
        skip_nonfinite: bool = False,
        learning_rate: Any = None,
        epsilon: Optional[float] = None,
        name: str = "Adadelta",
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # Keras' names and arguments (keras.py): checked first, so a bad call changes nothing.
        lr, eps, schedule, decay, clips = resolve_arguments(
            lr, eps, learning_rate, epsilon, kwargs,
            clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm, decay=decay)
        self._check_hyperparameters(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)
        validation.check_options(dict(foreach=foreach, capturable=capturable, maximize=maximize,
                                      differentiable=differentiable, fused=fused, state_dtype=state_dtype,
                                      stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                                      skip_nonfinite=skip_nonfinite))
        defaults = dict(
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            master_weights=master_weights,
            skip_nonfinite=skip_nonfinite,
            seed=random.Random(torch.initial_seed()).randrange(1 << 24),
            decay=decay,
        )
        self._flats: dict[StateKey, FlatState] = {}
        self._plans: dict[tuple, LaunchPlan] = {}
        self._hyper: dict[torch.device, tuple[list, Tensor]] = {}
        self._route: Optional[_Route] = None
        self._skipped_steps: Optional[Tensor] = None  # device counter, created by the first checked step
        self._master_from_param: list[Tensor] = []  # master weights to re-read from their parameter (loading)
        super().__init__(self._keras_params(params), defaults)
        self.state = StateDict(self.state)  # counts its changes: see _route_context
        self._keras_init(name=name, clips=clips, schedule=schedule)

    # ----------------------------------------------------------------------------- validation
    @staticmethod
    def _check_hyperparameters(**hp: Any) -> None:
        """torch.optim.Adadelta's checks and messages, plus NaN/Inf and type checks (see validation)."""
        validation.check_hyperparameters(**hp)

    @staticmethod
    def _kernel_unavailable(device: torch.device) -> Optional[str]:
        """None when a fused path can run on ``device`` (the Triton kernel, or on CPU the fused CPU path),
        else why not (for error messages)."""
        if _triton.kernel_device_ok(device):
            return None
        if device.type == "cpu":
            if not cpu_fused.ENABLED:
                return "the fused CPU path is switched off (TRITON_ADADELTA_CPU_COMPILE=0)"
            try:
                cpu_fused.library()  # built (about a second) or loaded now, so that a failure shows here
            except cpu_fused.BuildError as exc:
                return f"the fused CPU path cannot be built: {exc}"
            return None
        if not _triton.HAS_TRITON:
            return "triton is not installed"
        return "the Triton kernel does not run on this device"

    def _state_names(self, group: dict[str, Any], p: Tensor) -> tuple[set[str], set[str]]:
        """(required, allowed) names of a non-empty saved state entry of ``p`` in ``group``.

        Subclasses or layers that keep more per-parameter state (user slots) extend ``allowed``.
        """
        required = {"step", "square_avg", "acc_delta"}
        allowed = set(required)
        if self._state_key(group, local(p)).master:
            allowed.add("master")
        allowed |= self._keras_state_names()  # add_slot's user slots
        return required, allowed

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch's contract), validated first: a bad group changes nothing."""
        validation.check_param_group(param_group, self.defaults, self.param_groups, self._kernel_unavailable)
        super().add_param_group(param_group)
        if self.param_groups[-1]["capturable"]:
            self._device_lr(self.param_groups[-1])
        self._forget_plans()

    @staticmethod
    def _device_lr(group: dict[str, Any]) -> None:
        """capturable=True: keep ``group["lr"]`` a 0-d tensor on the device of the group's parameters.

        The kernel then reads lr on the device (a CUDA graph replays that read), and LR schedulers
        ``fill_`` a tensor lr in place, so a schedule keeps working under graph replay. Called when a
        group is added and at every step, to catch an lr replaced by a number (a loaded state_dict,
        a user's assignment); a tensor is moved without a host read.
        """
        if not group["params"]:
            return
        device = local(group["params"][0]).device
        lr = group["lr"]
        if (isinstance(lr, Tensor) and lr.device == device) or device.type == "meta":
            return  # (meta parameters get their device lr at the first step, after to_empty())
        wide = any(_real_dtype(p) == torch.float64 for p in group["params"])
        dtype = torch.float64 if wide else torch.float32
        if isinstance(lr, Tensor):
            group["lr"] = lr.detach().to(device=device, dtype=dtype, copy=True).reshape(())
        else:
            group["lr"] = torch.tensor(float(lr), dtype=dtype, device=device)

    # ----------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # The state entries of flat-backed parameters hold views of the flat buffers, which travel in
        # _flats; __setstate__ hands the views out again. (A DTensor over a view at an offset cannot be
        # pickled at all, so FSDP2 state must not travel as such views.)
        # A value a user put in place of a view (not yet taken up by a step) travels as it is, and an
        # emptied (reset) entry stays empty: only the entries listed in _flat_bound get views back.
        entries, bound = {}, []
        for p, st in self.state.items():
            if not isinstance(p, Tensor):  # not a parameter's state (a user's flag): travels as it is
                entries[p] = st
                continue
            flat = self._flat_of(p)
            if flat is None or not st:
                entries[p] = dict(st)
                continue
            replaced = flat.replaced(p, st)
            entries[p] = {k: v for k, v in st.items() if k not in _FLAT_NAMES or k in replaced}
            bound.append(p)
        state["state"] = entries
        state["_flat_bound"] = bound
        state["_flats"] = self._flats
        state["_skipped_steps"] = self._skipped_steps
        state["_master_from_param"] = list(self._master_from_param)  # due at the next step
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_flats", {})
        self.__dict__.setdefault("_skipped_steps", None)
        self.__dict__.setdefault("_master_from_param", [])
        self._plans = {}
        self._hyper = {}
        self._route = None
        if not isinstance(self.state, StateDict):  # pickled by an older version
            self.state = StateDict(self.state)
        self._fill_group_defaults()
        bound = self.__dict__.pop("_flat_bound", None)
        if bound is None:  # pickled by an older version: its entries hold the views
            for flat in self._flats.values():
                flat.rebind(self.state)
        else:
            bound_ids = {id(p) for p in bound}
            for flat in self._flats.values():
                for p in flat.params:
                    if id(p) in bound_ids:
                        entry = self.state[p]
                        for name, view in flat.views(p).items():
                            entry.setdefault(name, view)  # a user's value stays, for the next step to adopt

    # ----------------------------------------------------------------------------- state
    def _state_key(self, group: dict[str, Any], p: Tensor) -> StateKey:
        real = _real_dtype(p)
        sdt = group["state_dtype"]
        if sdt is None or p.is_complex() or real == torch.float64:
            sdt = real
        mode = group["master_weights"]
        master = MASTER_NONE
        if real in (torch.bfloat16, torch.float16) and mode:
            master = MASTER_REMAINDER if mode == "remainder" else MASTER_FP32
        return StateKey(p.device, real, sdt, master)

    def _flat_of(self, p: Tensor) -> Optional[FlatState]:
        for flat in self._flats.values():
            if p in flat:
                return flat
        return None

    @torch.no_grad()
    def _ensure_state(self, group_params: list[tuple[dict, list[Tensor]]],
                      given: Optional[dict[int, dict[str, Tensor]]] = None) -> None:
        """Give every listed parameter without state a zeroed segment in its flat state.

        A parameter that still has a segment but no state (its state was reset: ``opt.state[p] = {}``,
        ``.clear()``, ``del opt.state[p]``) leaves its old segment first, and starts again from zero as
        in torch. ``given``: by ``id(p)``, the checked values of state a user gave a parameter that had
        none (``opt.state[p] = {...}`` before its first step, see :meth:`_adopt_replaced_state`): such a
        parameter gets a segment holding them.
        """
        missing = [(group, p) for group, params in group_params for p in params if len(self.state.get(p, {})) == 0]
        if self.defaults["differentiable"]:
            # Autograd tracks the update through the state across steps: the state is ordinary tensors, as
            # torch's (views made here, under no_grad, must not be written in place with grad mode on).
            for group, p in missing:
                self.state[p] = _plain_state(group, p, self._state_key(group, local(p)).state_dtype)
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
            views = self._flat_of(p).views(p)
            for name, value in given[id(p)].items():
                if name in views:
                    _copy_state(views[name], value, name)

    @torch.no_grad()
    def _adopt_replaced_state(self) -> dict[int, dict[str, Tensor]]:
        """Copy state a user put in ``opt.state[p]`` in place of the flat buffers' views into them, and
        hand the views out again: torch's optimizers update whatever ``opt.state`` holds, so ours must
        start from those values too. Every replacement is checked before any is copied: one of another
        shape, or that is not a tensor (or for ``step`` a one-element number), is an error naming it.

        Returns, by ``id(p)``, the checked state given to parameters with a gradient and no segment yet,
        for :meth:`_ensure_state` to take up."""
        pending, given = [], {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                flat = self._flat_of(p)
                st = self.state.get(p)
                if not st:
                    continue
                if flat is None:  # state given before the first step, or a differentiable optimizer's state
                    if p.grad is not None:
                        checked = {name: _replacement(f"parameter {pi} of group {gi}", name, value, p)
                                   for name, value in st.items() if name in _FLAT_NAMES}
                        if not self.defaults["differentiable"]:  # (there the tensors stay, autograd tracks them)
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
                _copy_state(views[name], value, name)
            self.state[p].update(views)
        return given

    def _new_segments(self, pairs: list[tuple[dict, Tensor]]) -> None:
        """Give each ``(group, p)`` a zeroed segment in the flat state of its current key (and views in
        ``state[p]``). A segment it had before is dropped and that flat state compacted. Buffers are
        reallocated, so cached plans and the route are dropped too."""
        if not pairs:
            return
        new: dict[StateKey, list[Tensor]] = defaultdict(list)
        gone: dict[StateKey, set[int]] = defaultdict(set)
        for group, p in pairs:
            new[self._state_key(group, local(p))].append(p)
            flat = self._flat_of(p)
            if flat is not None:
                gone[flat.key].add(id(p))
        for key, ids in gone.items():
            rest = self._flats.pop(key).without(ids)
            if rest.params:
                self._flats[key] = rest
                rest.rebind(self.state)
        for key, params in new.items():
            flat = self._flats.get(key)
            if flat is None:
                flat = self._flats[key] = FlatState(key)
            flat.add(params)
            for p in params:  # state_dict() lists state in opt.state's order, load_state_dict lays the
                self.state[p] = self.state.pop(p, {})  # segments out in it: keep it the segments' order
            flat.rebind(self.state, new=params)
        self._forget_plans()

    @torch.no_grad()
    def _follow_key_changes(self, group_params: list[tuple[dict, list[Tensor]]]) -> None:
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
            if self.state.get(p) and (flat := self._flat_of(p)) is not None
            and flat.key != self._state_key(group, local(p))
        ]
        if not moves:
            return
        saved = {id(p): {k: local(v).clone() for k, v in self.state[p].items() if k in _FLAT_NAMES}
                 for _, p in moves}
        for _, p in moves:
            for k in _FLAT_NAMES:
                self.state[p].pop(k, None)
        self._new_segments(moves)
        for _, p in moves:
            st, old = self.state[p], saved[id(p)]
            for k in ("step", "square_avg", "acc_delta"):
                local(st[k]).copy_(old[k])
            if "master" in st and "master" in old and st["master"].dtype == old["master"].dtype == torch.float32:
                local(st["master"]).copy_(old["master"])

    def _fill_group_defaults(self) -> None:
        """A group appended to ``param_groups`` directly (not by add_param_group) has torch's keys only,
        which is enough for torch: it gets the constructor's values of ours."""
        for group in self.param_groups:
            if not self.defaults.keys() <= group.keys():
                for k, v in self.defaults.items():
                    group.setdefault(k, v)

    def _forget_plans(self) -> None:
        """Drop every cached launch plan, table and route: the flat states or the groups changed."""
        self._plans.clear()
        self._hyper.clear()
        self._route = None

    # ----------------------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict written by this class or by torch.optim.Adadelta.

        Saved tensors are copied into the flat buffers (cast to their state dtype), which stay flat.
        Everything is checked first (group count and sizes, hyperparameters, state keys, shapes,
        dtypes: see :func:`validation.check_state_dict`), and a failure while loading restores the
        previous state, so a state_dict that does not fit changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        self._fill_group_defaults()
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        if "param_groups" in state_dict:  # the saved settings must not alias the caller's (a tensor lr, say)
            state_dict["param_groups"] = deepcopy(state_dict["param_groups"])
            for sg in state_dict["param_groups"]:
                if isinstance(sg, dict) and isinstance(sg.get("state_dtype"), str):
                    sg["state_dtype"] = dtype_from_name(sg["state_dtype"])
        new_groups = validation.check_state_dict(state_dict, self.param_groups, self._state_names,
                                                 self._kernel_unavailable)
        group_of = {id(p): g for g in new_groups for p in g["params"]}
        id_map = {
            old_id: p for g, sg in zip(self.param_groups, state_dict["param_groups"])
            for old_id, p in zip(sg["params"], g["params"])
        }
        saved_state = state_dict["state"]

        previous = (self.state, self._flats, self.param_groups, self._skipped_steps, self._master_from_param)
        self.state = StateDict()
        self._master_from_param = []
        self._flats = {}
        self._forget_plans()
        self.param_groups = new_groups
        try:
            with torch.no_grad():
                loaded = [(k, id_map[k], v) for k, v in saved_state.items() if k in id_map and len(v)]
                # One parameter at a time in the saved order: state_dict() lists state in the order
                # it was created, so the flat layout (and with it the stochastic-rounding streams,
                # which follow the flat offsets) comes back exactly as it was before saving.
                self._ensure_state([(group_of[id(p)], [p]) for _, p, _ in loaded])
                # ... and self.state in the saved order too, so the next state_dict() lists it the same way.
                # A key that is no parameter's index is not a parameter's state (a user's flag): it comes
                # back as it is, as in torch (validation refuses one that holds a parameter's state).
                self.state = StateDict([(id_map[k], self.state[id_map[k]]) if k in id_map else (k, v)
                                        for k, v in saved_state.items() if k not in id_map or len(v)])
                for _, p, saved in loaded:
                    st = self.state[p]
                    master = saved.get("master")
                    if "master" in st and not (isinstance(master, Tensor) and master.dtype == st["master"].dtype):
                        # No master of our kind saved (a torch.optim.Adadelta state_dict: it carries ours
                        # along cast to the parameter dtype, and stale): take the parameter's value at the
                        # next step, when a model checkpoint loaded after this call has been loaded too.
                        self._master_from_param.append(p)
                        saved = {k: v for k, v in saved.items() if k != "master"}
                    for name, value in saved.items():
                        if name in ("square_avg", "acc_delta", "master", "step") and name in st:
                            if not isinstance(value, Tensor):  # a Python number step (older torch)
                                value = torch.tensor(float(value))
                            elif name == "step":  # any one-element shape, as torch.optim loads it
                                value = value.reshape(())
                            _copy_state(st[name], value.detach(), name)
                        else:
                            st[name] = deepcopy(value)
                if "skipped_steps" in state_dict:
                    first = next((p for g in new_groups for p in g["params"]), None)
                    dev = first.device if first is not None else torch.device("cpu")
                    self._skipped_steps = torch.as_tensor(state_dict["skipped_steps"]).detach().to(
                        dev, torch.int64, copy=True).reshape(())
        except BaseException:
            self.state, self._flats, self.param_groups, self._skipped_steps, self._master_from_param = previous
            self._forget_plans()
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ----------------------------------------------------------------------------- step
    def _group_lr(self, group: dict[str, Any]) -> Union[float, Tensor]:
        """The learning rate of this step for ``group``: ``lr`` (or the Keras schedule's value at
        ``iterations``) divided by ``1 + decay * iterations`` (keras.py)."""
        return self._keras_lr(group)

    def _use_kernel(self, group: dict[str, Any], p: Tensor, g: Tensor, device_ok: Optional[bool] = None) -> bool:
        """Does the fused kernel update ``p``? ``device_ok``: ``kernel_device_ok(p.device)`` if the caller knows it."""
        fused = group["fused"]
        if fused is False or group["differentiable"]:
            return False
        if not (device_ok if device_ok is not None else _triton.kernel_device_ok(p.device)):
            return False
        real = _real_dtype(p)
        if real not in _KERNEL_PARAM_DTYPES or g.dtype not in (p.dtype, torch.float32):
            return False
        is_complex = real is not p.dtype
        if is_complex and g.dtype != p.dtype:
            return False
        # The state dtype (_state_key's rule without building the key): the group's, or the real dtype
        # of a complex parameter or when the group follows the parameter (both kernel dtypes here).
        sdt = group["state_dtype"]
        if not (sdt is None or is_complex or sdt in _KERNEL_STATE_DTYPES):
            return False
        # A lazily negated tensor (is_neg(): its memory holds -value) is read right by torch's ops only.
        return p.is_contiguous() and g.is_contiguous() and g.device == p.device and not (p.is_neg() or g.is_neg())

    @torch.no_grad()
    def _hyper_table(self, device: torch.device) -> Tensor:
        """[G, 8] float32 on ``device``: lr, rho, 1 - rho, eps, weight_decay, sign, seed, clipvalue of every group.

        clipvalue (Keras') is +inf when there is none; the kernel reads it only when it clips.
        """
        clip_value = getattr(self, "clipvalue", None)
        clip_value = float("inf") if clip_value is None else float(clip_value)
        rows, tensor_lrs = [], []
        for i, group in enumerate(self.param_groups):
            lr = self._group_lr(group)
            if isinstance(lr, Tensor):
                # A CPU lr for CPU parameters is cheaper read on the host, except under capturable,
                # which promises no host read of a tensor at all.
                if lr.device == device and (device.type != "cpu" or group["capturable"]):
                    tensor_lrs.append((i, lr))
                    lr = 0.0
                else:
                    lr = float(lr)
            rows.append(update_row(group, lr) + [float(group["seed"]), clip_value])
        cached = self._hyper.get(device)
        if cached is None or len(cached[0]) != len(rows):
            self._hyper[device] = (rows, upload(torch.tensor(rows, dtype=torch.float32), device))
        elif cached[0] != rows:
            # Rewritten in place: a CUDA graph captured earlier keeps reading a live buffer.
            refuse_during_capture(device, "a hyperparameter (rho, eps, weight_decay, maximize or a float lr) changed")
            upload_into(cached[1], torch.tensor(rows, dtype=torch.float32))
            self._hyper[device] = (rows, cached[1])
        table = self._hyper[device][1]
        for i, lr in tensor_lrs:  # a device lr is read on the device: no synchronisation
            table[i, 0].copy_(lr.reshape(()))
        return table

    @torch.no_grad()
    def _refresh_masters(self) -> None:
        """master = parameter (remainder = 0) for the parameters load_state_dict found without a master."""
        pending = getattr(self, "_master_from_param", None)
        while pending:
            p = pending.pop()
            st = self.state.get(p, {})
            if "master" in st:
                m = local(st["master"])
                if m.dtype == torch.int16:  # remainder mode: the bf16 parameter alone is the value
                    m.zero_()
                else:
                    m.copy_(local(p).detach())

    def _scaler_tensors(
        self, device: torch.device, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """GradScaler's scale and inf flag as float32 tensors on ``device`` (1 and 0 where absent).

        A scaler may live on another device than some parameters (model parallel): the copies are
        non-blocking device-to-device transfers, never a host read.
        """
        def on(t: Optional[Tensor], fill: float) -> Tensor:
            if t is None:
                return torch.full((1,), fill, dtype=torch.float32, device=device)
            return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)

        return on(grad_scale, 1.0), on(found_inf, 0.0)

    def _grad_transforms(
        self, entries: list[tuple[int, dict, Tensor, Tensor]], grad_scale: Optional[Tensor],
        keys: Optional[list[Optional[tuple]]] = None,
    ) -> Optional[clipping.GradientTransform]:
        """The step's gradient transform (Keras clipping), or None for none at all.

        Entry ``i`` is updated with ``clamp(g, -coefs.clip_value, coefs.clip_value) * coefs[i]``;
        ``coefs.table(indices, device)`` is a launch's float32 multiplier table. ``p.grad`` is not changed.
        ``keys``: the entries' kernel buckets (:meth:`_route_keys`), computed here when not given.
        """
        return self._keras_grad_transforms(entries, grad_scale, keys)

    def _after_step(self, found_inf: Optional[Tensor]) -> None:
        """Called once after every step() that updated something: Keras' iterations += 1 (not when
        ``found_inf`` is set), on the device."""
        self._keras_after_step(found_inf)

    def _route_context(self) -> tuple:
        """What a route depends on beyond the signature: the state dict (any change to it or to an entry:
        a reset ``opt.state[p] = {}`` or a replaced tensor), triton, each group's options."""
        return (id(self.state), getattr(self.state, "version", None),
                _triton.HAS_TRITON, _triton.interpreting(),
                tuple((id(g), g["fused"], g["differentiable"], g["state_dtype"], g["stochastic_rounding"],
                       g["master_weights"]) for g in self.param_groups))

    def _build_route(self, signature: Optional[list]) -> _Route:
        """Route the parameters that have a gradient: follow dtype changes, create missing state, choose
        each one's path and kernel bucket, and find (or build) each bucket's launch plan."""
        if not isinstance(self.state, StateDict):  # replaced by the user: count its changes again
            self.state = StateDict(self.state)
        triples = [(gi, group, p) for gi, group in enumerate(self.param_groups) for p in group["params"]
                   if p.grad is not None]
        group_params = [(group, [p for _, gg, p in triples if gg is group]) for group in self.param_groups]
        # Replaced state first: new segments below re-point every state entry at the (new) buffers.
        given = self._adopt_replaced_state()
        self._follow_key_changes(group_params)
        self._ensure_state(group_params, given)
        keys = self._route_keys([(gi, group, p, p.grad) for gi, group, p in triples])
        by_bucket: dict[tuple, list[int]] = defaultdict(list)
        reference = []
        for i, key in enumerate(keys):
            if key is None:
                reference.append(i)
            else:
                by_bucket[key].append(i)
        buckets = []
        for bucket, idx in by_bucket.items():
            key, gdtype, _ = bucket
            params = [triples[i][2] for i in idx]
            groups = [triples[i][0] for i in idx]
            plan_key = (bucket, tuple(id(p) for p in params), tuple(groups))
            plan = self._plans.get(plan_key)
            if plan is None:
                vec = 16 // min(key.param_dtype.itemsize, gdtype.itemsize)  # elements in 128 bits
                plan = self._plans[plan_key] = LaunchPlan(self._flats[key], params, groups, _BLOCK, vec,
                                                            _BLOCK_UNALIGNED)
            plain = all(type(p) in _PLAIN and type(p.grad) in _PLAIN and not p.is_complex() for p in params)
            buckets.append((bucket, idx, plan, plain))
        return _Route(self._route_context(), signature, triples, keys, buckets, reference,
                      list({id(triples[i][1]): triples[i][1] for i in reference}.values()), {},
                      [p for _, _, p in triples])

    def _route_keys(self, entries: list[tuple[int, dict, Tensor, Tensor]]) -> list[Optional[tuple]]:
        """Per entry, its kernel bucket ``(flat state key, gradient dtype, stochastic)``, or None for the
        PyTorch path (the parameters must have state).

        Groups share a bucket; only the stochastic-rounding switch (a compile-time branch) splits one,
        and it is off where the bucket has no 16-bit write to round (no random numbers drawn).
        """
        if any(group["differentiable"] for group in self.param_groups):
            return [None] * len(entries)
        keys: list[Optional[tuple]] = []
        device_ok: dict[torch.device, bool] = {}  # asked once per device, not per tensor
        for _, group, p, g in entries:
            # DTensor parameters (FSDP2) are judged and updated by their local shard.
            pl, gl = local(p), local(g)
            ok = device_ok.get(pl.device)
            if ok is None:
                ok = device_ok[pl.device] = _triton.kernel_device_ok(pl.device)
            if ok and self._use_kernel(group, pl, gl, device_ok=True):
                key = self._flat_of(p).key
                keys.append((key, _real_dtype(gl), bool(group["stochastic_rounding"]) and _has_16bit_write(key)))
            else:
                keys.append(None)
        return keys

    # torch.compile: the step is a clean graph break. Dynamo would otherwise trace into the host-side
    # bookkeeping (dicts keyed by id(), pointer tables, the Triton launch) and guard on it; run eagerly,
    # it is one kernel launch per bucket anyway, and the compiled graphs around it are reused every step.
    @_disable_dynamo
    @torch.no_grad()
    def step(
        self,
        closure: Optional[Callable[[], Any]] = None,
        *,
        grad_scale: Optional[Tensor] = None,
        found_inf: Optional[Tensor] = None,
    ) -> Optional[Any]:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss.
            grad_scale, found_inf: GradScaler's scale and inf flag; the gradients are unscaled in
                the kernel and a step with ``found_inf`` set changes nothing. GradScaler passes them
                as attributes of the optimizer, which are read when these are None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        # Everything is checked before anything is written (metadata only: no synchronisation). The
        # per-tensor checks, new state and the routing run again only when the step's signature changes
        # (about 1 µs a tensor to read; gradients are new tensors each step, their metadata usually not).
        self._fill_group_defaults()
        validation.check_step_groups(self.param_groups, grad_scale, found_inf)
        # torch.distributed.checkpoint makes the state of a fresh optimizer with one step at lr 0 (and
        # zero gradients) that must change no parameter; a Keras schedule would otherwise replace that lr.
        self._lr_zeroed = (self._lr_schedule is not None
                           and all(not isinstance(g["lr"], Tensor) and g["lr"] == 0 for g in self.param_groups)
                           and not any(v for k, v in self.state.items() if isinstance(k, Tensor)))
        if self.defaults["differentiable"]:
            validation.check_differentiable(self.param_groups)
        try:
            grads, signature = _signature(self.param_groups)
        except AttributeError:
            validation.check_param_types(self.param_groups)  # names a non-tensor in a group's params
            raise
        route = self._route
        if (signature is None or route is None or route.signature != signature
                or route.context != self._route_context()):
            validation.check_step_tensors(self.param_groups, self.state)
            # fused=True accepts meta parameters at construction (torch's rule): their device is checked here.
            validation.check_fused_devices(self.param_groups, self._kernel_unavailable)
            route = self._route = self._build_route(signature)
        if not route.entries:
            return loss
        entries = [(gi, group, p, g) for (gi, group, p), g in zip(route.entries, grads)]
        if any(group.get("skip_nonfinite", False) for group in self.param_groups):
            found_inf = self._nonfinite_found_inf(grads, found_inf)
        for group in self.param_groups:
            if group["capturable"]:
                self._device_lr(group)
        self._refresh_masters()
        coefs = self._grad_transforms(entries, grad_scale, route.keys)

        if any(group["differentiable"] for group in self.param_groups):
            # As torch: the constructor's flag, not a group's, turns autograd on for the update.
            with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
                self._step_torch(entries, coefs, grad_scale, found_inf)
        else:
            if route.buckets:
                self._step_kernel(route, entries, coefs, grad_scale, found_inf)
            if route.reference:
                self._step_reference([(i, entries[i]) for i in route.reference], coefs, grad_scale, found_inf,
                                     route, entries)
            # The kernel and the fused CPU path write through pointers: tell autograd, as an in-place op
            # would, so that a graph which saved a parameter before the step refuses to use it after.
            torch.autograd.graph.increment_version(route.params)
        self._after_step(found_inf)
        return loss

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped by ``skip_nonfinite`` (NaN/Inf gradients, or GradScaler's found_inf), as a 0-d
        int64 tensor on the device of the gradients. Reading its value is the caller's synchronisation.
        Saved in the state_dict under ``"skipped_steps"`` once a checked step has run."""
        if self._skipped_steps is None:
            return torch.zeros((), dtype=torch.int64)
        return self._skipped_steps

    def _state_dict_extras(self, sd: dict[str, Any]) -> None:
        """Complete torch's state_dict (a state_dict post-hook that runs before the user's): per-parameter
        dicts copied (tensors shared as in torch), plus ``"skipped_steps"`` once ``skip_nonfinite`` has
        checked a step, and the Keras entry (keras.py)."""
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
        # Group settings are plain values (torch.distributed.checkpoint refuses a torch.dtype), and
        # carry the counters outside the state: DCP keeps only "state" and "param_groups".
        iterations = self._step_count()
        iterations = iterations.detach().clone() if isinstance(iterations, Tensor) else int(iterations)
        for g in sd["param_groups"]:
            if isinstance(g.get("state_dtype"), torch.dtype):
                g["state_dtype"] = str(g["state_dtype"]).replace("torch.", "")
            g["iterations"] = iterations
        if self._master_from_param:
            # A master still due to be taken from its parameter (after a torch.optim state_dict) is not
            # a value yet: saved without it, it is taken from the parameter after this dict's load too.
            index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            for p in self._master_from_param:
                sd["state"].get(index.get(id(p)), {}).pop("master", None)
        if self._skipped_steps is not None:
            sd["skipped_steps"] = self._skipped_steps.clone()
        self._keras_state_dict_entry(sd)

    def _nonfinite_found_inf(self, grads: list[Tensor], found_inf: Optional[Tensor]) -> Tensor:
        """The found_inf of this step: 1.0 when any gradient is non-finite (or ``found_inf`` is set).

        Everything stays on the device: the flag feeds the same skip that GradScaler's found_inf
        drives (the kernel exits early, step counts are not advanced), and the skip counter is
        advanced by the flag itself.
        """
        device = local(grads[0]).device
        bad = validation.nonfinite_flag([local(g) for g in grads], device)
        meshes = {id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}
        if meshes:
            # Sharded gradients: every rank must take the same decision, or the replicas diverge.
            import torch.distributed as dist

            flag = bad.to(torch.int32).reshape(1)
            for mesh in meshes.values():
                for dim in range(mesh.ndim):
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
            bad = flag.reshape(()) != 0
        if found_inf is not None:
            bad = bad | (found_inf.to(device).reshape(()) != 0)
        counter = self._skipped_steps
        if counter is None:
            counter = torch.zeros((), dtype=torch.int64, device=device)
        elif counter.device != device:
            counter = counter.to(device)
        counter.add_(bad)
        self._skipped_steps = counter
        return bad.to(torch.float32)

    def _step_torch(self, entries, coefs, grad_scale, found_inf) -> None:
        """differentiable=True: torch's single-tensor Adadelta, so autograd sees every operation."""
        if found_inf is not None and bool(found_inf.reshape(()) != 0):  # a skipped step (host read, as below)
            return

        for i, (_, group, p, g) in enumerate(entries):
            st = self.state[p]
            if grad_scale is not None:  # GradScaler left the gradients scaled: unscale them here
                g = g / grad_scale.to(g.device).reshape(())
            g = g if coefs is None else coefs.apply(g, i)
            _differentiable_update_(p, g, st["square_avg"], st["acc_delta"], st["step"], lr=self._group_lr(group),
                                    rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"],
                                    maximize=group["maximize"])

    def _step_reference(self, indexed_entries, coefs, grad_scale, found_inf, route: _Route, entries) -> None:
        """The PyTorch path: the reference update, tensor by tensor, for what the fused CPU path does not
        take (its plan is kept in ``route``; ``entries`` are all the step's entries)."""
        # A GradScaler step with inf gradients changes nothing. Without capturable that is decided by
        # one host read; capturable=True promises none, so there the skip is a select on the device.
        capturable = any(group["capturable"] for group in route.reference_groups)
        on_device = found_inf is not None and capturable
        if found_inf is not None and not on_device and bool(found_inf.reshape(()) != 0):
            return
        clip_value = getattr(coefs, "clip_value", None)
        if not capturable:  # (the fused CPU path reads lr on the host)
            # CPU tensors take the fused CPU path (one pass over all tensors); it hands back what it
            # does not take (other devices and dtypes, stochastic rounding, master weights).
            settings = cpu_fused.settings()
            plan = route.cpu.get(settings)
            if plan is None:
                plan = route.cpu[settings] = cpu_fused.CpuPlan(self, indexed_entries)
            indexed_entries = plan.run(self, entries, coefs, grad_scale, clip_value)
        for i, (_, group, p, g) in indexed_entries:
            st = self.state[p]
            lr = self._group_lr(group)
            if isinstance(lr, Tensor) and not group["capturable"]:
                lr = float(lr)
            rng = None
            if group["stochastic_rounding"]:
                # The kernel's Philox stream (see _rng_stream): both paths round the same way.
                flat = self._flat_of(p)
                rng = PhiloxStream(st["step"].to(torch.int64), _rng_stream(group, flat.key),
                                   flat.offsets[flat.index[id(p)]])
            master = st.get("master")
            targets = [local(p), local(st["square_avg"]), local(st["acc_delta"])]
            if master is not None:
                targets.append(local(master))
            # On-device skip: update copies, then keep the old or the new values (this fallback path
            # only; the kernel exits early on found_inf instead).
            work = [t.clone() for t in targets] if on_device else targets
            adadelta_update_(
                work[0], local(g), work[1], work[2],
                lr=lr,
                rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"],
                maximize=group["maximize"], grad_scale=grad_scale,
                clip_coef=None if coefs is None else coefs[i], clip_value=clip_value,
                # An int16 "master" is the remainder mode's low halves (FlatState); float32 is a full copy.
                master=work[3] if master is not None and master.dtype == torch.float32 else None,
                remainder=work[3] if master is not None and master.dtype == torch.int16 else None,
                stochastic_rounding=group["stochastic_rounding"], rng=rng,
            )
            if on_device:
                skip = found_inf.to(st["step"].device).reshape(()) != 0
                for t, w in zip(targets, work):
                    t.copy_(torch.where(skip.to(t.device), t, w))
                st["step"].add_((~skip).to(st["step"].dtype))
            else:
                st["step"].add_(1)

    def _step_kernel(self, route: _Route, entries, coefs, grad_scale, found_inf) -> None:
        """The fused path: one launch per bucket of the route (flat state, gradient dtype, stochastic)."""
        kernel = _triton.adadelta_kernel()
        hypers: dict[torch.device, Tensor] = {}  # one table per device and step, whatever the buckets
        for (key, gdtype, stochastic), idx, plan, plain in route.buckets:
            flat = plan.flat
            if plain:
                params = [entries[i][2] for i in idx]
                grads = [entries[i][3] for i in idx]
            else:
                params = [real_view(local(entries[i][2])) for i in idx]
                grads = [real_view(local(entries[i][3])) for i in idx]
            pointers = plan.refresh_pointers(params, grads)
            vec = plan.vec
            hyper = hypers.get(key.device)
            if hyper is None:
                hyper = hypers[key.device] = self._hyper_table(key.device)
            has_clip = coefs is not None
            # A slice of the step's multiplier vector when this launch's entries are adjacent in it.
            clip = clipping.clip_table(coefs, idx, key.device) if has_clip else hyper
            has_scaler = grad_scale is not None or found_inf is not None
            if has_scaler:
                scale, inf = self._scaler_tensors(key.device, grad_scale, found_inf)
            master = flat.master if flat.master is not None else flat.square_avg
            for launch in plan.launches:  # one, or two when the bucket mixes aligned and unaligned tensors
                kernel[(launch.num_chunks,)](
                    pointers, plan.tensor_meta, launch.chunk_tensor, launch.chunk_block,
                    flat.square_avg, flat.acc_delta, master, flat.steps, hyper, clip,
                    scale if has_scaler else hyper, inf if has_scaler else hyper,
                    plan.num_tensors,
                    P_DTYPE=_triton_dtype(key.param_dtype), G_DTYPE=_triton_dtype(gdtype),
                    BLOCK=launch.block, VEC=vec, HAS_CLIP=has_clip, HAS_SCALER=has_scaler,
                    MASTER=int(key.master), STOCHASTIC=stochastic, ALIGNED=launch.aligned,
                    num_warps=_NUM_WARPS,
                    enable_fp_fusion=False,  # no FMA contraction: each operation rounded once, as in the reference
                )
            plan.increment_steps(inf if has_scaler else None)
