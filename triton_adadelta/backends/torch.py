"""The PyTorch backend: reference.py's update tensor by tensor, and the differentiable path.

What the fused paths do not take (float64, non-contiguous tensors, stochastic rounding on CPU,
``capturable`` on CPU, DTensors on CPU, ...) runs here. A step that GradScaler (or
``skip_nonfinite``) flags changes nothing, decided on the device: the update is computed into
copies and kept or dropped with ``torch.where``, never by reading ``found_inf`` on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..clipping import GradientTransform
from ..reference import PhiloxStream, adadelta_update_
from ..shards import local
from ..state import StateKey

__all__ = ["run", "run_differentiable", "rng_stream"]

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def rng_stream(group: dict[str, Any], key: StateKey) -> int:
    """High word of the Philox key: the group's seed and the flat state's id (kernels._stream_id).

    Flat states number their elements from 0 each, so the id keeps their random words apart. The
    device is deliberately not part of it: data-parallel replicas then round identically and stay equal.
    The master mode is not part of it either: one group has one mode per parameter dtype, and the two
    master modes (the same float32 trajectory) then draw the same words for the same tensors.
    """
    stream = _DTYPE_CODE[key.param_dtype] + 4 * _DTYPE_CODE[key.state_dtype]
    return int(group["seed"]) * 64 + stream


def _lr_on(lr: Union[float, Tensor], device: torch.device, capturable: bool) -> Union[float, Tensor]:
    """The lr to compute with on ``device``: a CPU tensor is read on the host (no device involved) unless
    ``capturable``; a device tensor stays a tensor (read on the device)."""
    if not isinstance(lr, Tensor):
        return lr
    if lr.device.type == "cpu" and not capturable:
        return float(lr)
    return lr if lr.device == device else lr.to(device, non_blocking=True)


def run(members: Sequence[Any], grads: Sequence[Tensor], indices: Sequence[int], store: Any,
        lrs: Sequence[Union[float, Tensor]], coefs: Optional[GradientTransform], grad_scale: Optional[Tensor],
        found_inf: Optional[Tensor]) -> None:
    """The reference update of members ``indices`` (``grads[i]``: member ``i``'s gradient, ``lrs[gi]``
    group ``gi``'s learning rate; ``store``: the state.StateStore, for the state entries and, with
    stochastic rounding, each tensor's place in its flat state, which keys the kernel's random stream)."""
    clip_value = None if coefs is None else coefs.clip_value
    skips: dict[torch.device, Tensor] = {}
    for i in indices:
        _, group, p = members[i]
        st = store.state[p]
        device = local(p).device
        lr = _lr_on(lrs[members[i].group_index], device, bool(group["capturable"]))
        rng = None
        if group["stochastic_rounding"]:
            # The kernel's Philox stream (see rng_stream): both paths round the same way.
            flat = store.flat_of(p)
            rng = PhiloxStream(st["step"].to(torch.int64), rng_stream(group, flat.key),
                               flat.offsets[flat.index[id(p)]])
        master = st.get("master")
        targets = [local(p), local(st["square_avg"]), local(st["acc_delta"])]
        if master is not None:
            targets.append(local(master))
        # A flagged step: update copies, then keep the old or the new values (on the device).
        work = [t.clone() for t in targets] if found_inf is not None else targets
        adadelta_update_(
            work[0], local(grads[i]), work[1], work[2],
            lr=lr, rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"],
            maximize=group["maximize"], grad_scale=grad_scale,
            clip_coef=None if coefs is None else coefs[i], clip_value=clip_value,
            # An int16 "master" is the remainder mode's low halves (FlatState); float32 is a full copy.
            master=work[3] if master is not None and master.dtype == torch.float32 else None,
            remainder=work[3] if master is not None and master.dtype == torch.int16 else None,
            stochastic_rounding=group["stochastic_rounding"], rng=rng,
        )
        step = st["step"]
        if found_inf is None:
            step.add_(1)
            continue
        skip = skips.get(step.device)
        if skip is None:
            skip = skips[step.device] = found_inf.to(step.device, non_blocking=True).reshape(()) != 0
        for t, w in zip(targets, work):
            t.copy_(torch.where(skip.to(t.device, non_blocking=True), t, w))
        step.add_((~skip).to(step.dtype))


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


def run_differentiable(members: Sequence[Any], grads: Sequence[Tensor], state: Any,
                       lrs: Sequence[Union[float, Tensor]], coefs: Optional[GradientTransform],
                       grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """differentiable=True: torch's single-tensor Adadelta, so autograd sees every operation. A flagged
    step (``found_inf``) keeps the old values, selected on the device."""
    for i, (_, group, p) in enumerate(members):
        st = state[p]
        g = grads[i]
        if grad_scale is not None:  # GradScaler left the gradients scaled: unscale them here
            g = g / grad_scale.to(g.device).reshape(())
        g = g if coefs is None else coefs.apply(g, i)
        targets = [p, st["square_avg"], st["acc_delta"], st["step"]]
        old = [t.clone() for t in targets] if found_inf is not None else None
        _differentiable_update_(p, g, st["square_avg"], st["acc_delta"], st["step"], lr=lrs[members[i].group_index],
                                rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"],
                                maximize=group["maximize"])
        if old is not None:
            skip = found_inf.to(p.device, non_blocking=True).reshape(()) != 0
            for t, o in zip(targets, old):
                t.copy_(torch.where(skip.to(t.device), o, t))
