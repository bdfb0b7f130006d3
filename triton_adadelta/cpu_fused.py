"""The fast CPU path: one fused pass over memory per tensor, compiled with ``torch.compile``.

``torch.optim.Adadelta`` (and the reference path) runs about a dozen element-wise operations per
step, each a full pass over memory. On a CPU the update is memory bound, so this module compiles
the whole update of one tensor into a single loop (TorchInductor's C++ backend) that reads p, g,
square_avg and acc_delta once and writes p, square_avg and acc_delta once, exactly like the
Triton kernel does on a GPU::

    g  = g * (1 / grad_scale) * clip * sign;  g = g + wd * p  (only where wd != 0)
    v  = rho * v + (1 - rho) * g * g
    d  = sqrt(u + eps) / sqrt(v + eps) * g
    u  = rho * u + (1 - rho) * d * d
    p  = p - lr * d

Why it is shaped this way:

* Shapes are dynamic and every tensor is passed flattened, so one compiled graph serves every
  model: no recompilation per model or per tensor size. Sizes 0 and 1 would be specialised by the
  compiler, so tensors with fewer than 2 elements stay on the reference path.
* ``GROUP`` (4) tensors per compiled call, the last ``n % GROUP`` one per call: a call of a compiled
  function costs tens of microseconds of host time, as much as updating tens of thousands of
  elements. Groups of 8 took over a minute per variant to compile on a loaded 2-core machine. A
  short last call is not padded with scratch tensors: torch.compile guards on which inputs share
  storage (the state segments of one flat buffer do), so a different mix would recompile.
* All hyperparameters (lr, rho, 1 - rho, eps, weight decay, sign, 1/grad scale, clip coefficient)
  are values in a small table, not Python constants: changing lr every step (schedulers)
  or switching weight decay on does not recompile. The table is float32, so every constant is
  rounded exactly as torch rounds a Python scalar for a float32 operation.
* Only dtypes (see SUPPORTED) and the group width select a compiled variant. Each variant
  is its own function object, so variants don't share torch.compile's recompilation limit.
* The compiled code is cached across processes by TorchInductor's on-disk caches (FX graph and
  AOTAutograd caches, ``TORCHINDUCTOR_CACHE_DIR``, by default under /tmp): the first step of the
  first process pays the C++ compilation, later processes only trace.

The path is used for CPU tensors when ``fused`` is not False, the step's eligible tensors hold at
least :data:`MIN_NUMEL` elements in all (below that the compile cost is not worth it) and
``torch.compile`` works here; anything else stays on the reference path. A failing compiler (no
C++ toolchain, an unsupported Python) disables the path with one warning.
"""

from __future__ import annotations

import os
import types
import warnings
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .reference import real_view

__all__ = ["ENABLED", "MIN_NUMEL", "GROUP", "SUPPORTED", "PartialUpdate", "available", "fused_update_", "step_"]

#: Set TRITON_ADADELTA_CPU_COMPILE=0 to keep every CPU step on the reference path.
ENABLED: bool = os.environ.get("TRITON_ADADELTA_CPU_COMPILE", "1") not in ("0", "", "false", "False")
#: The smallest number of elements (summed over a step's eligible tensors) worth compiling for.
MIN_NUMEL: int = int(os.environ.get("TRITON_ADADELTA_CPU_COMPILE_MIN_NUMEL", str(1 << 19)))

# (parameter dtype of the real view, state dtype) this path compiles for, gradients of the parameter's
# dtype, no master weights. Each pair is one compiled variant and costs seconds of compilation the first
# time, so only the common CPU set-ups are here; the rest (float16, float64, fp32 gradients for 16-bit
# parameters, master weights) is correct on the reference path.
SUPPORTED = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16))
# Columns of the per-tensor hyperparameter table.
_LR, _RHO, _OMR, _EPS, _WD, _SIGN, _SCALE, _CLIP = range(8)

#: Tensors per compiled call; the last ``len % GROUP`` tensors of a step go one per call.
GROUP: int = 4

_failed = False
_compiled: dict[tuple, Callable[..., None]] = {}
_rows: dict[tuple, Tensor] = {}


def _update_one(p: Tensor, g: Tensor, v: Tensor, u: Tensor, h: Tensor) -> None:
    # The reference's operations in the reference's order; the compiler fuses them into one loop.
    cdt = h.dtype
    p32 = p.to(cdt)
    # h[_SCALE] is 1 / grad_scale: a multiply instead of a divide per element (the update is close to
    # compute bound on small CPU tensors). Exact for GradScaler's power-of-two scales.
    g32 = g.to(cdt) * h[_SCALE] * h[_CLIP] * h[_SIGN]
    # Weight decay is skipped, not multiplied by 0, when it is 0 (0 * inf would be NaN), as torch does.
    g32 = torch.where(h[_WD] != 0, g32 + h[_WD] * p32, g32)
    v32 = v.to(cdt) * h[_RHO] + (h[_OMR] * g32) * g32
    delta = (u.to(cdt) + h[_EPS]).sqrt() / (v32 + h[_EPS]).sqrt() * g32
    u32 = u.to(cdt) * h[_RHO] + (h[_OMR] * delta) * delta
    new_p = p32 - h[_LR] * delta
    v.copy_(v32)
    u.copy_(u32)
    p.copy_(new_p)


def available() -> bool:
    """Can the compiled CPU path run in this process (enabled, torch.compile supported, not failed)?"""
    if not ENABLED or _failed:
        return False
    try:
        if not torch._dynamo.is_dynamo_supported():
            return False
        compiling = getattr(torch.compiler, "is_compiling", None)
        # Inside a user's torch.compile region the reference math is traced instead.
        return not (compiling is not None and compiling())
    except Exception:  # an exotic build without dynamo
        return False


def _update_group(h: Tensor, *t: Tensor) -> None:
    # t: GROUP times (p, g, v, u), all 1-D; h: [GROUP, 8].
    for j in range(GROUP):
        _update_one(t[4 * j], t[4 * j + 1], t[4 * j + 2], t[4 * j + 3], h[j])


def _compiled_for(key: tuple, width: int) -> Callable[..., None]:
    """The compiled update of ``width`` tensors (1 or GROUP) with the dtypes ``key`` (parameter, gradient, state)."""
    fn = _compiled.get((key, width))
    if fn is None:
        # A fresh code object per variant: torch.compile counts recompilations per code object,
        # and variants must not use up each other's budget.
        base = _update_group if width == GROUP else _update_one
        fresh = types.FunctionType(base.__code__.replace(), base.__globals__, f"_adadelta_cpu_{len(_compiled)}")
        fn = _compiled[(key, width)] = torch.compile(fresh, dynamic=True, fullgraph=True)
    return fn


def _hyper_tensor(row: list) -> Tensor:
    """The hyperparameters (8 floats, or GROUP rows of 8) as a float32 tensor, made once per distinct row.

    Its own storage with a static size: a view would bring its base's size into the compiled code's
    guards, and a dynamic size of 8 would be tied to any 8-element parameter's. Rows repeat from
    step to step (one per param group) unless a scheduler changes lr, hence the small cache.
    """
    key = tuple(tuple(r) if isinstance(r, list) else r for r in row)
    h = _rows.get(key)
    if h is None:
        if len(_rows) >= 256:
            _rows.clear()
        h = _rows[key] = torch.tensor(row, dtype=torch.float32)
        torch._dynamo.mark_static(h)
    return h


def fused_update_(slots: list[tuple[Tensor, Tensor, Tensor, Tensor]], rows: list[list[float]]) -> None:
    """Apply one Adadelta step to every slot in place, one fused compiled pass per tensor.

    Args:
        slots: ``(param, grad, square_avg, acc_delta)`` per tensor: contiguous CPU tensors of the
            same number of elements (at least 2; complex tensors as their real views). All slots share
            the parameter, gradient and state dtypes.
        rows: the hyperparameters of each slot, 8 floats: lr, rho, 1 - rho, eps, weight_decay, sign
            (-1 to maximize), 1 / grad_scale, clip coefficient. They reach the compiled code as float32
            tensor values, so changing them never recompiles.

    Same equations as :func:`triton_adadelta.reference.adadelta_update_` (module docstring), same
    order of operations; results agree within float rounding (the compiler may contract a*b+c).
    Raises :class:`PartialUpdate` (from the original error) if a call fails, typically the first
    compilation of a variant; its ``done`` slots were updated, the others are untouched.
    """
    if not slots:
        return
    p0, g0, v0, _ = slots[0]
    key = (p0.dtype, g0.dtype, v0.dtype)
    n = len(slots)
    full = n - n % GROUP
    done = 0
    try:
        if full:
            many = _compiled_for(key, GROUP)
            for start in range(0, full, GROUP):
                args = [t.view(-1) for slot in slots[start: start + GROUP] for t in slot]
                many(_hyper_tensor(rows[start: start + GROUP]), *args)
                done = start + GROUP
        if full < n:
            one = _compiled_for(key, 1)
            for i in range(full, n):
                p, g, v, u = slots[i]
                one(p.view(-1), g.view(-1), v.view(-1), u.view(-1), _hyper_tensor(rows[i]))
                done = i + 1
    except Exception as exc:
        raise PartialUpdate(done) from exc


class PartialUpdate(RuntimeError):
    """fused_update_ failed (typically: compilation); the first ``done`` slots were updated, the rest not."""

    def __init__(self, done: int) -> None:
        super().__init__(f"the compiled CPU update failed after {done} tensors")
        self.done = done


def _eligible(group: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Tensor]) -> bool:
    if group.get("fused") is False or group.get("stochastic_rounding") or group.get("differentiable"):
        return False
    if type(p.data) is not Tensor or type(g) is not Tensor:  # DTensor and other subclasses: not here
        return False
    if p.device.type != "cpu" or g.device != p.device or g.is_sparse:
        return False
    if not (p.is_contiguous() and g.is_contiguous()) or p.numel() < 2:
        return False
    if g.dtype != p.dtype or st.get("master") is not None:
        return False
    v = st.get("square_avg")
    u = st.get("acc_delta")
    if v is None or u is None or not (v.is_contiguous() and u.is_contiguous()) or u.dtype != v.dtype:
        return False
    return (real_view(p).dtype, real_view(v).dtype) in SUPPORTED


def step_(
    opt: Any,
    indexed_entries: list[tuple[int, tuple[int, dict, Tensor, Tensor]]],
    coefs: Optional[list[Tensor]],
    grad_scale: Optional[Tensor],
) -> list[tuple[int, tuple[int, dict, Tensor, Tensor]]]:
    """Update what this path can of one step of ``opt`` (an Adadelta); return the entries left over.

    ``indexed_entries`` are ``(i, (group index, group, param, grad))`` as in ``Adadelta.step``;
    ``coefs[i]`` is the gradient multiplier of entry ``i`` (clipping) or ``coefs`` is None. The
    caller has already handled ``found_inf``. Step counts of updated tensors are incremented here.
    """
    if not available() or not indexed_entries:
        return indexed_entries
    chosen, rest = [], []
    total = 0
    for item in indexed_entries:
        _, (_, group, p, g) = item
        st = opt.state[p]
        if _eligible(group, p, g, st):
            chosen.append(item)
            total += p.numel()
        else:
            rest.append(item)
    if total < MIN_NUMEL:
        return indexed_entries

    inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
    by_key: dict[tuple, list] = defaultdict(list)
    for item in chosen:
        i, (_, group, p, g) = item
        st = opt.state[p]
        pr = real_view(p)
        key = (pr.dtype, real_view(g).dtype, real_view(st["square_avg"]).dtype)
        lr = opt._group_lr(group)
        row = [
            float(lr), float(group["rho"]), 1.0 - float(group["rho"]), float(group["eps"]),
            float(group["weight_decay"]), -1.0 if group["maximize"] else 1.0, inv_scale,
            1.0 if coefs is None else float(coefs[i]),
        ]
        slot = (pr, real_view(g), real_view(st["square_avg"]), real_view(st["acc_delta"]))
        by_key[key].append((item, slot, row))

    global _failed
    for items in by_key.values():
        if _failed:
            rest.extend(item for item, _, _ in items)
            continue
        done = len(items)
        try:
            fused_update_([slot for _, slot, _ in items], [row for _, _, row in items])
        except PartialUpdate as exc:
            cause = exc.__cause__
            _failed = True
            warnings.warn(
                f"triton_adadelta: the compiled CPU path is disabled ({type(cause).__name__}: {cause}); "
                "using the PyTorch path", RuntimeWarning, stacklevel=3,
            )
            done = exc.done
            rest.extend(item for item, _, _ in items[done:])
        for item, _, _ in items[:done]:
            opt.state[item[1][2]]["step"].add_(1)
    rest.sort(key=lambda item: item[0])
    return rest
