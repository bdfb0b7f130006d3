"""Where each tensor of a step goes: the step's signature, the path table, the kernel buckets and their plans.

:func:`path_of` is docs/design.md's table of paths, the one place that decides it:

==========  ================================================================================
kernel      the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``), one launch per bucket
cpu         the fused CPU path (kernels/adadelta_cpu.c), one call per dtype combination
torch       the PyTorch path (reference.py), tensor by tensor; with ``differentiable``, torch's own
==========  ================================================================================

A :class:`Route` is kept between steps while the step's :func:`signature` and :func:`context` hold:
the metadata of every parameter and gradient, the state dict's change count and each group's options.
Where every tensor is a plain one, a :class:`Watch` checks the signature in bulk (see its docstring), so
that a cached step reads each parameter's gradient once and leaves the metadata comparison to C++.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import repeat
from operator import attrgetter, is_, is_not
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from . import _triton, cpu_fused
from .backends import tables
from .backends.triton import LaunchPlan
from .shards import PLAIN, local
from .state import StateKey, real_dtype

__all__ = ["KERNEL", "CPU", "TORCH", "Member", "BucketKey", "Bucket", "Route", "Watch", "signature", "context",
           "path_of", "build", "fused_unavailable"]

KERNEL, CPU, TORCH = "kernel", "cpu", "torch"

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of parameters and state
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_STRIDED = torch.strided


class Member(NamedTuple):
    """A parameter that takes part in a step (it has a gradient), with its group."""

    group_index: int
    group: dict
    param: Tensor


class BucketKey(NamedTuple):
    """What one kernel launch shares: flat state, gradient dtype (real view), stochastic rounding on."""

    state: StateKey
    grad_dtype: torch.dtype
    stochastic: bool


class Bucket(NamedTuple):
    key: BucketKey
    members: list[int]  # indices into Route.members
    plan: LaunchPlan
    plain: bool  # plain real tensors: their own addresses, no real views or local shards to take
    params: list[Tensor]  # the members' parameters, in launch order
    every_member: bool  # members == range(len(Route.members)): the step's gradient list is this launch's


class Route(NamedTuple):
    """Where the tensors of a step go, reused by the next step while its signature and context hold."""

    context: tuple
    signature: Optional[list]
    members: list[Member]  # each parameter with a gradient, in param_groups order
    paths: list[str]  # per member: KERNEL, CPU or TORCH
    launches: list[Optional[BucketKey]]  # per member: the kernel launch it is in, or None
    buckets: list[Bucket]  # the kernel's launches
    cpu: list[int]  # members for the fused CPU path
    torch: list[int]  # members for the PyTorch path
    cpu_plans: dict  # cpu_fused.settings() -> the CPU backend's plan (made on first use)
    params: list[Tensor]  # the members' parameters: the fused paths write them behind autograd's back
    watch: Optional[Watch]  # the bulk check of the signature, where every tensor is a plain one
    differentiable: bool  # some group is: torch's functional update for everything
    skip_nonfinite: bool  # some group checks its gradients for NaN/Inf
    capturable: bool  # some group is: no host read of a tensor, iterations counted on the device only


_GRAD = attrgetter("grad")
_TENSOR_GUARDS: Any = False  # torch's C++ tensor check, or None where absent or not as expected (looked up once)


def _tensor_guards() -> Any:
    """torch's ``TensorGuards`` (torch._C._dynamo.guards, what torch.compile guards its graphs with), or
    None. It is internal to torch, so it is taken only after it has shown, on tensors made here, that it
    tells apart everything the signature does (and the route depends on); else the Python signature serves."""
    global _TENSOR_GUARDS
    if _TENSOR_GUARDS is False:
        _TENSOR_GUARDS = None
        try:
            from torch._C._dynamo.guards import TensorGuards
        except ImportError:
            return None
        try:
            ok = _guards_tell_apart(TensorGuards)
        except Exception:  # any other interface than the one tested: not used
            ok = False
        if ok:
            _TENSOR_GUARDS = TensorGuards
    return _TENSOR_GUARDS


def _guards_tell_apart(guards_class: Any) -> bool:
    """Does a guard over (parameter, gradient) pass the same metadata and fail every change a route notices?"""
    p = torch.nn.Parameter(torch.zeros(4, 3))
    g = torch.zeros(4, 3)
    guard = guards_class(p, g, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    if not guard.check(torch.nn.Parameter(torch.ones(4, 3)), torch.ones(4, 3)):
        return False
    changed_grads = [
        None,  # no gradient
        torch.zeros(4, 3, dtype=torch.float64),  # dtype
        torch.zeros(3, 4),  # shape
        torch.zeros(3, 4).t(),  # contiguity
        torch._neg_view(g),  # negation bit
        torch.zeros(4, 3).to_sparse(),  # layout
        torch.nn.Parameter(torch.zeros(4, 3), requires_grad=False),  # type
        torch.zeros(4, 3, device="meta"),  # device
    ]
    return not any(guard.check(p, other) for other in changed_grads)


class Watch:
    """The signature of a route whose tensors are all plain, checked in bulk.

    The step's parameters must be the same objects in the same groups, the same ones must have a
    gradient, and every such parameter and gradient must have the same type, dtype, device, shape,
    strides and dispatch keys (which hold the layout and the negation and conjugation bits) as when the
    route was built: what :func:`signature` compares, read and compared in C++ by torch's own tensor
    guard. A change not seen here that the Python signature would see does not exist (the guard is
    stricter: strides, not only contiguity); one seen here that the signature would not see makes the
    optimizer read the signature and, while that still holds, take a fresh watch.
    """

    def __init__(self, guards_class: Any, param_groups: list[dict[str, Any]], params: list[Tensor],
                 grads: list[Tensor]) -> None:
        self.groups = [list(g["params"]) for g in param_groups]
        self.params = params  # those with a gradient, in param_groups order
        self.without_grad = [p for g in param_groups for p in g["params"] if p.grad is None]
        self.guard = guards_class(*params, *grads, dynamic_dims_sizes=None, dynamic_dims_strides=None)

    @classmethod
    def of(cls, param_groups: list[dict[str, Any]], params: list[Tensor], grads: list[Tensor]) -> Optional[Watch]:
        """A watch over these parameters (those with a gradient) and their gradients, or None where a
        tensor is not a plain one (a DTensor's placements are not metadata the guard reads) or torch's
        guard is not available."""
        guards_class = _tensor_guards()
        if guards_class is None or not all(type(t) in PLAIN for t in params + grads):
            return None
        return cls(guards_class, param_groups, params, grads)

    def grads(self, param_groups: list[dict[str, Any]]) -> Optional[list[Tensor]]:
        """The step's gradients (of :attr:`params`) when the signature holds, else None."""
        if len(param_groups) != len(self.groups):
            return None
        for group, seen in zip(param_groups, self.groups):
            params = group["params"]
            if len(params) != len(seen) or not all(map(is_, params, seen)):
                return None
        grads = list(map(_GRAD, self.params))
        if self.without_grad and any(map(is_not, map(_GRAD, self.without_grad), repeat(None))):
            return None
        return grads if self.guard.check(*self.params, *grads) else None


def signature(param_groups: list[dict[str, Any]]) -> tuple[list[Tensor], Optional[list]]:
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
            if type(p) not in PLAIN or type(g) not in PLAIN:
                entry += _subclass_signature(p) + _subclass_signature(g)
            sig.append(entry)
    return grads, sig


def _subclass_signature(t: Tensor) -> tuple:
    """A DTensor's placements and its local shard's shape and contiguity (routing reads the shard);
    for any other tensor subclass an object equal to nothing, so that its steps are routed afresh."""
    if type(t) in PLAIN:
        return ()
    shard = local(t)
    if shard is not t:  # a DTensor
        return (tuple(t.placements), id(t.device_mesh), shard.shape, shard.is_contiguous())
    return (object(),)


def context(state: Any, param_groups: list[dict[str, Any]]) -> tuple:
    """What a route depends on beyond the signature: the state dict (any change to it or to an entry:
    a reset ``opt.state[p] = {}`` or a replaced tensor), triton, each group's options (those of the
    path table, and those the step reads as the route's flags)."""
    return (id(state), getattr(state, "version", None),
            _triton.HAS_TRITON, _triton.interpreting(),
            tuple((id(g), g["fused"], g["differentiable"], g["state_dtype"], g["stochastic_rounding"],
                   g["master_weights"], g["skip_nonfinite"], g["capturable"]) for g in param_groups))


def kernel_takes(group: dict[str, Any], p: Tensor, g: Tensor) -> bool:
    """The kernel's row of the path table, for local tensors on a device the kernel runs on."""
    if group["fused"] is False or group["differentiable"]:
        return False
    real = real_dtype(p)
    if real not in KERNEL_DTYPES or g.dtype not in (p.dtype, torch.float32):
        return False
    is_complex = real is not p.dtype
    if is_complex and g.dtype != p.dtype:
        return False
    # The state dtype (state_key's rule without building the key): the group's, or the real dtype
    # of a complex parameter or when the group follows the parameter (both kernel dtypes here).
    sdt = group["state_dtype"]
    if not (sdt is None or is_complex or sdt in KERNEL_DTYPES):
        return False
    # A lazily negated tensor (is_neg(): its memory holds -value) is read right by torch's ops only.
    return p.is_contiguous() and g.is_contiguous() and g.device == p.device and not (p.is_neg() or g.is_neg())


def path_of(group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], device_ok: bool) -> str:
    """The path of parameter ``p`` with gradient ``g`` (either may be a DTensor) and state entry ``state``:
    docs/design.md's table. ``device_ok``: the kernel runs on ``p``'s device (asked once per device)."""
    pl, gl = local(p), local(g)
    if device_ok and kernel_takes(group, pl, gl):
        return KERNEL
    if not (group["fused"] is False or group["stochastic_rounding"] or group["differentiable"]
            or group["capturable"]) and cpu_fused.slot(p, g, state) is not None:
        return CPU
    return TORCH


def has_16bit_write(key: StateKey) -> bool:
    """Does an update of this flat state round anything to 16 bits (a parameter without master, or state)?"""
    return (key.param_dtype in _SIXTEEN_BIT and not key.master) or key.state_dtype in _SIXTEEN_BIT


def bucket_key(group: dict[str, Any], key: StateKey, g: Tensor) -> BucketKey:
    """The launch a kernel member joins. Groups share a launch; only the stochastic-rounding switch (a
    compile-time branch) splits one, and it is off where there is no 16-bit write to round."""
    return BucketKey(key, real_dtype(local(g)), bool(group["stochastic_rounding"]) and has_16bit_write(key))


def build(param_groups: list[dict[str, Any]], store: Any, plans: dict, sig: Optional[list]) -> Route:
    """Route the parameters that have a gradient (their state must be ready: StateStore.prepare):
    choose each one's path, group the kernel's members in buckets, and find (or build) each bucket's
    launch plan in ``plans``."""
    members = [Member(gi, group, p) for gi, group in enumerate(param_groups) for p in group["params"]
               if p.grad is not None]
    any_differentiable = any(group["differentiable"] for group in param_groups)
    device_ok: dict[torch.device, bool] = {}
    paths = []
    for m in members:
        if any_differentiable:  # torch's functional update for everything, as autograd must see it all
            paths.append(TORCH)
            continue
        dev = local(m.param).device
        ok = device_ok.get(dev)
        if ok is None:
            ok = device_ok[dev] = _triton.kernel_device_ok(dev)
        paths.append(path_of(m.group, m.param, m.param.grad, store.state.get(m.param, {}), ok))
    by_bucket: dict[BucketKey, list[int]] = defaultdict(list)
    for i, (m, path) in enumerate(zip(members, paths)):
        if path == KERNEL:
            by_bucket[bucket_key(m.group, store.flat_of(m.param).key, m.param.grad)].append(i)
    buckets = []
    for bkey, idx in by_bucket.items():
        params = [members[i].param for i in idx]
        groups = [members[i].group_index for i in idx]
        plan_key = (bkey, tuple(id(p) for p in params), tuple(groups))
        plan = plans.get(plan_key)
        if plan is None:
            vec = 16 // min(bkey.state.param_dtype.itemsize, bkey.grad_dtype.itemsize)  # elements in 128 bits
            with tables.device_guard(bkey.state.device):  # its tables go up on that device's current stream
                plan = plans[plan_key] = LaunchPlan(store.flats[bkey.state], params, groups, vec, bkey.stochastic)
        plain = all(type(p) in PLAIN and type(p.grad) in PLAIN and not p.is_complex() for p in params)
        buckets.append(Bucket(bkey, idx, plan, plain, params, idx == list(range(len(members)))))
    launches: list[Optional[BucketKey]] = [None] * len(members)
    for b in buckets:
        for i in b.members:
            launches[i] = b.key
    params = [m.param for m in members]
    return Route(context(store.state, param_groups), sig, members, paths, launches, buckets,
                 [i for i, path in enumerate(paths) if path == CPU],
                 [i for i, path in enumerate(paths) if path == TORCH], {}, params,
                 None if sig is None else Watch.of(param_groups, params, [p.grad for p in params]),
                 any_differentiable, any(group["skip_nonfinite"] for group in param_groups),
                 any(group["capturable"] for group in param_groups))


def fused_unavailable(device: torch.device) -> Optional[str]:
    """None when a fused path can run on ``device`` (the Triton kernel, or on CPU the fused CPU path),
    else why not (for the error of ``fused=True``)."""
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
