"""Checks that run before the optimizer changes anything, and the device-side non-finite flag.

Every public entry point of :class:`triton_adadelta.Adadelta` (``__init__``, ``add_param_group``,
``step``, ``load_state_dict``) calls into this module first. A check either returns or raises a
``TypeError`` (wrong kind of thing), ``ValueError`` (right kind, bad value or bad structure) or
``RuntimeError`` (torch's choice for gradient errors), with a message naming the parameter or key
at fault. Nothing here writes to parameters, gradients or state, so a failed call leaves them as
they were.

The checks that run on every ``step()`` look at tensor metadata only (shape, dtype, device,
layout) and at Python hyperparameters: they never read a device tensor, so they never make the
host wait for the device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from operator import is_
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PARAM_DTYPES",
    "STATE_DTYPES",
    "check_hyperparameters",
    "check_options",
    "check_param_group",
    "check_nonnegative",
    "whole_number",
    "check_scaler_flags",
    "CheckedGroups",
    "check_step_groups",
    "check_step_tensors",
    "check_state_dict",
    "nonfinite_flag",
]

PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_BOOL_OPTIONS = ("maximize", "capturable", "differentiable", "stochastic_rounding", "skip_nonfinite")
_OPTIONAL_BOOL_OPTIONS = ("foreach", "fused")
# state_dict keys this class writes besides torch's two.
STATE_DICT_EXTRA_KEYS = ("skipped_steps",)


# ------------------------------------------------------------------------------------- hyperparameters
def _number(name: str, value: Any, allow_tensor: bool) -> Optional[float]:
    """The value as a float, None for a tensor whose value may not be read; TypeError for non-numbers."""
    if isinstance(value, Tensor):
        # Shape, dtype and device are metadata: checked even where the value may not be read (in step()).
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.device.type == "meta":
            if not allow_tensor:  # a step would compute with it
                raise ValueError(f"Tensor {name} is on the meta device and holds no value")
            return None
        if not allow_tensor:
            return None
        return float(value.detach().reshape(()))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_hyperparameters(read_tensors: bool = True, **hp: Any) -> None:
    """Validate any of ``lr``, ``rho``, ``eps``, ``weight_decay`` that are given.

    Contract: ``0 <= lr < inf``, ``0 <= rho <= 1``, ``0 <= eps < inf``, ``0 <= weight_decay < inf``;
    NaN fails every range. Messages are torch.optim.Adadelta's ("Invalid learning rate: nan").
    ``lr`` may be a 1-element tensor; with ``read_tensors=False`` (inside step()) a tensor's value is
    not read, so no host-device synchronisation happens, and only its shape and dtype are checked.
    """
    if "lr" in hp:
        lr = hp["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        v = _number("lr", lr, read_tensors)
        if v is not None and not 0.0 <= v < math.inf:
            raise ValueError(f"Invalid learning rate: {v if isinstance(lr, Tensor) else lr}")
    for name, label, upper in (("rho", "rho", 1.0), ("eps", "epsilon", math.inf),
                               ("weight_decay", "weight_decay", math.inf)):
        if name in hp:
            v = _number(name, hp[name], read_tensors)
            ok = v is None or (0.0 <= v <= upper if upper == 1.0 else 0.0 <= v < upper)
            if not ok:
                raise ValueError(f"Invalid {label} value: {hp[name]}")


def check_options(group: Mapping[str, Any]) -> None:
    """Validate the non-numeric options of a (defaults-merged) param group.

    Flags must be ``bool`` (a string such as ``"False"`` would silently read as true); ``foreach`` and
    ``fused`` may also be None; ``state_dtype`` is None or a floating dtype the flat state supports.
    """
    for name in _BOOL_OPTIONS:
        if name in group and not isinstance(group[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(group[name]).__name__} {group[name]!r}")
    for name in _OPTIONAL_BOOL_OPTIONS:
        if name in group and group[name] is not None and not isinstance(group[name], bool):
            raise TypeError(f"{name} must be a bool or None, got {type(group[name]).__name__} {group[name]!r}")
    mw = group.get("master_weights", False)
    if not (isinstance(mw, bool) or (isinstance(mw, str) and mw == "remainder")):
        raise TypeError(f"master_weights must be a bool or 'remainder', got {type(mw).__name__} {mw!r}")
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 24:
        raise ValueError(f"seed must be an integer in [0, 2**24), got {seed!r}")
    if group.get("differentiable") and (mw or group.get("stochastic_rounding")):
        raise ValueError("`differentiable` does not support `master_weights` or `stochastic_rounding`")
    sdt = group.get("state_dtype")
    if sdt is not None and sdt not in STATE_DTYPES:
        raise TypeError(f"state_dtype must be a floating point dtype or None, got {sdt}")
    if group.get("fused") and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    check_nonnegative("decay", group.get("decay", 0.0), optional=False)  # Keras' time decay of the learning rate


def check_nonnegative(name: str, value: Any, optional: bool = True) -> Optional[float]:
    """A Keras setting (clip values, decay): a real number >= 0 (Keras' message), or None when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number{' or None' if optional else ''}, got {type(value).__name__} "
                        f"{value!r}")
    if not value >= 0:  # NaN fails too
        raise ValueError(f"Expected {name} >= 0, received: {value}")
    return value


def check_master_dtypes(where: str, group: Mapping[str, Any], params: Iterable[Tensor]) -> None:
    """master_weights='remainder' keeps the low halves of a float32 whose high half is a bfloat16
    parameter: a float16 parameter has no such split (ValueError naming it)."""
    if group.get("master_weights") != "remainder":
        return
    for i, p in enumerate(params):
        if p.dtype == torch.float16:
            raise _remainder_fp16_error(f"parameter {i} of {where}")


def _remainder_fp16_error(where: str) -> ValueError:
    return ValueError(f"{where} is float16: master_weights='remainder' needs bfloat16 parameters (the high half "
                      "of a float32); use master_weights=True for float16")


# ------------------------------------------------------------------------------------- parameters
def _param_list(params: Any) -> list:
    """``param_group["params"]`` as a list, as torch's add_param_group would make it."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but "
            "the ordering of tensors in sets will change between runs. Please use a list instead."
        )
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be a tensor or an iterable of tensors, got {type(params).__name__}")
    return list(params)


def _tensor_of(entry: Any) -> Any:
    # torch accepts (name, tensor) pairs for named parameters.
    return entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry


def check_param_group(
    param_group: Any,
    defaults: Mapping[str, Any],
    existing_groups: list[dict[str, Any]],
    device_ok: Callable[[torch.device], Optional[str]],
) -> None:
    """Validate a param group before it is added; its ``params`` entry becomes a list (as torch does).

    Contract: a dict with ``params``: tensors (or (name, tensor) pairs) of a dtype in
    :data:`PARAM_DTYPES`, leaves unless ``differentiable``, each once, none already in
    ``existing_groups``; hyperparameters and options valid once merged with ``defaults``; with
    ``fused=True`` every parameter on a device a fused path can run on (``device_ok`` returns None,
    or the reason it cannot).
    """
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    if "params" not in param_group:
        raise ValueError("param_group has no 'params' entry")
    # A generator can be read once: keep the list so torch's add_param_group sees the same tensors.
    param_group["params"] = params = _param_list(param_group["params"])
    merged = {**defaults, **param_group}
    check_hyperparameters(**{k: merged[k] for k in ("lr", "rho", "eps", "weight_decay") if k in merged})
    check_options(merged)

    tensors = [_tensor_of(e) for e in params]
    seen: dict[int, int] = {}
    for i, p in enumerate(tensors):
        if not isinstance(p, Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
        if not merged.get("differentiable") and not (p.is_leaf or p.retains_grad):
            raise ValueError("can't optimize a non-leaf Tensor")
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(
                f"parameter {i} of the group has dtype {p.dtype}: Adadelta updates floating point and complex "
                f"parameters only ({', '.join(str(d) for d in PARAM_DTYPES)})"
            )
        if p.layout != torch.strided:
            raise TypeError(f"parameter {i} of the group has layout {p.layout}: only dense parameters are supported")
        if id(p) in seen:
            # torch only warns; with flat state the kernel would update the tensor twice in one launch.
            raise ValueError(
                f"parameter {i} of the group is the same tensor as parameter {seen[id(p)]}: "
                "each parameter may appear in a group once"
            )
        seen[id(p)] = i
    check_master_dtypes("the group", merged, tensors)
    for gi, group in enumerate(existing_groups):
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(
                    "some parameters appear in more than one parameter group "
                    f"(parameter {seen[id(p)]} of the new group is already in group {gi})"
                )
    if merged.get("fused"):
        # Parameters on the meta device (a model built there, to_empty() later) are accepted, as by torch's
        # fused optimizers: check_fused_devices checks the device when a step is routed.
        check_fused_devices([{"fused": True, "params": [p for p in tensors if p.device.type != "meta"]}], device_ok,
                            with_grad_only=False)


def check_fused_devices(param_groups: list[dict[str, Any]], device_ok: Callable[[torch.device], Optional[str]],
                        with_grad_only: bool = True) -> None:
    """``fused=True``: every parameter (with a gradient, unless ``with_grad_only`` is False) is on a device a
    fused path runs on (``device_ok`` returns None, or the reason it cannot); a RuntimeError names the device."""
    reasons: dict[torch.device, Optional[str]] = {}  # asked once per device
    for group in param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            if with_grad_only and p.grad is None:
                continue
            if p.device not in reasons:
                reasons[p.device] = device_ok(p.device)
            why = reasons[p.device]
            if why is not None:
                raise RuntimeError(
                    f"`fused=True` requires CUDA tensors or CPU tensors with the fused CPU path; "
                    f"got a parameter on {p.device}: {why}"
                )


# ------------------------------------------------------------------------------------- step
def _allowed_grad_dtype(p: Tensor, g: Tensor) -> bool:
    # float32 gradients for 16-bit parameters are the mixed-precision accumulation case the kernel reads.
    return g.dtype == p.dtype or (p.dtype in _LOW_PRECISION and g.dtype == torch.float32)


def _check_flag(name: str, t: Any) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")


def check_scaler_flags(grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """GradScaler's ``grad_scale`` / ``found_inf``: None or one-element floating tensors."""
    if grad_scale is not None or found_inf is not None:
        _check_flag("grad_scale", grad_scale)
        _check_flag("found_inf", found_inf)


class CheckedGroups:
    """The param groups as :func:`check_step_groups` last passed them, so that a step checks again only
    the groups that changed.

    A group that holds the very same keys and value objects as when it passed needs no new check:
    every value that passes is immutable (numbers, bools, None, strings, dtypes), so the same object
    is the same valid value. A group with a tensor value (a tensor lr, which can change its shape in
    place) is checked at every step.
    """

    def __init__(self) -> None:
        self._passed: list[Optional[tuple[dict, tuple, list]]] = []

    def unchecked(self, param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The groups that did not pass as they are now (all of them when the list of groups changed)."""
        passed = self._passed
        if len(passed) != len(param_groups):
            return param_groups
        changed = []
        for group, seen in zip(param_groups, passed):
            if (seen is None or group is not seen[0] or tuple(group) != seen[1]
                    or not all(map(is_, group.values(), seen[2]))):
                changed.append(group)
        return changed

    def passed(self, param_groups: list[dict[str, Any]]) -> None:
        """``param_groups`` passed :func:`check_step_groups` (with the optimizer's defaults filled in)."""
        self._passed = [None if any(isinstance(v, Tensor) for v in group.values())
                        else (group, tuple(group), list(group.values())) for group in param_groups]


def check_step_groups(
    param_groups: list[dict[str, Any]], grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None
) -> None:
    """The step checks that do not look at parameters: options, hyperparameters, GradScaler's flags.

    Together with :func:`check_step_tensors` they validate everything a step will read before it
    writes anything, from metadata only (no synchronisation): hyperparameters and options of every
    group valid (tensor values are not read); no parameter in two groups or twice in one; for every
    parameter with a gradient: parameter dtype in :data:`PARAM_DTYPES`, gradient dense, of the
    parameter's shape and device, of the parameter's dtype (or float32 for a bfloat16/float16
    parameter); existing state of the parameter's shape and device; ``grad_scale`` / ``found_inf``
    None or one-element floating tensors.
    """
    check_scaler_flags(grad_scale, found_inf)
    for group in param_groups:
        check_hyperparameters(read_tensors=False, lr=group["lr"], rho=group["rho"], eps=group["eps"],
                              weight_decay=group["weight_decay"])
        check_options(group)


def check_differentiable(param_groups: list[dict[str, Any]]) -> None:
    """With ``differentiable`` the update runs with autograd on, in place: a leaf parameter that requires
    grad cannot be written so (torch's error, raised here before the step writes any state)."""
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None and p.is_leaf and p.requires_grad:
                raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")


def check_param_types(param_groups: list[dict[str, Any]]) -> None:
    """Every entry of every group's ``params`` is a tensor (a list edited by hand may hold anything)."""
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if not isinstance(p, Tensor):
                raise TypeError(f"parameter {pi} of group {gi} is a {type(p).__name__}: optimizer can only "
                                "optimize Tensors")


def check_step_tensors(param_groups: list[dict[str, Any]], state: Mapping[Tensor, dict[str, Any]]) -> None:
    """The step checks that look at parameters, gradients and state (metadata only; see check_step_groups)."""
    # A lean pass that only detects trouble (about a microsecond a tensor), and the slow pass, which
    # builds the message, only when something is wrong.
    seen: set[int] = set()
    n = 0
    strided, fp32, low, ok_dtypes = torch.strided, torch.float32, _LOW_PRECISION, PARAM_DTYPES
    for group in param_groups:
        no_fp16 = group.get("master_weights") == "remainder"
        for p in group["params"]:
            seen.add(id(p))
            n += 1
            g = p.grad
            if g is None:
                continue
            pdt, gdt, pshape, pdev = p.dtype, g.dtype, p.shape, p.device
            if (g.layout is not strided or pdt not in ok_dtypes or g.shape != pshape or g.device != pdev
                    or (gdt is not pdt and not (gdt is fp32 and pdt in low))
                    or (no_fp16 and pdt is torch.float16)):
                _explain_step_error(param_groups, state)
            st = state.get(p)
            if st:
                v = st.get("square_avg")
                if isinstance(v, Tensor) and (v.shape != pshape or v.device != pdev):
                    _explain_step_error(param_groups, state)
    if len(seen) != n:
        _explain_step_error(param_groups, state)


def _explain_step_error(param_groups: list[dict[str, Any]], state: Mapping[Tensor, dict[str, Any]]) -> None:
    """Find the first problem :func:`check_step_tensors` detected and raise it with a message naming it."""
    seen: dict[int, tuple[int, int]] = {}
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            where = f"parameter {pi} of group {gi}"
            if id(p) in seen:
                raise ValueError(
                    f"{where} is also parameter {seen[id(p)][1]} of group {seen[id(p)][0]}: "
                    "each parameter may appear once in an optimizer"
                )
            seen[id(p)] = (gi, pi)
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise RuntimeError("Adadelta does not support sparse gradients")
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"{where} has dtype {p.dtype}: Adadelta updates floating point and complex "
                                "parameters only")
            if g.shape != p.shape:
                raise RuntimeError(
                    f"the gradient of {where} has shape {tuple(g.shape)}, but the parameter has shape {tuple(p.shape)}"
                )
            if g.device != p.device:
                raise RuntimeError(f"the gradient of {where} is on {g.device}, but the parameter is on {p.device}")
            if not _allowed_grad_dtype(p, g):
                extra = " or torch.float32" if p.dtype in _LOW_PRECISION else ""
                raise TypeError(f"the gradient of {where} has dtype {g.dtype}; expected {p.dtype}{extra}")
            if group.get("master_weights") == "remainder" and p.dtype == torch.float16:
                raise _remainder_fp16_error(where)  # (turned float16 after the group was checked)
            st = state.get(p)
            if st:
                v = st.get("square_avg")
                if isinstance(v, Tensor) and (v.shape != p.shape or v.device != p.device):
                    raise RuntimeError(
                        f"the state of {where} has shape {tuple(v.shape)} on {v.device}, but the parameter now "
                        f"has shape {tuple(p.shape)} on {p.device}: it was resized or moved after its state was "
                        "created"
                    )
    raise AssertionError("check_step_tensors found a problem that _explain_step_error cannot name")  # pragma: no cover


# ------------------------------------------------------------------------------------- state_dict
def _check_slot(where: str, name: str, value: Any, p: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: '{name}' must be a tensor, got {type(value).__name__}")
    if value.layout != torch.strided or value.device.type == "meta":
        raise TypeError(f"{where}: '{name}' must be a dense tensor with data, got {value.layout} on {value.device}")
    if value.shape != p.shape:
        raise ValueError(f"{where}: '{name}' has shape {tuple(value.shape)}, but the parameter has shape "
                         f"{tuple(p.shape)}")
    if p.is_complex():
        if not value.is_complex():
            raise TypeError(f"{where}: '{name}' has dtype {value.dtype}, but the parameter is complex ({p.dtype})")
    elif not value.is_floating_point() and not (name == "master" and value.dtype == torch.int16):
        # (an int16 'master' is the low halves of master_weights='remainder')
        raise TypeError(f"{where}: '{name}' has dtype {value.dtype}; expected a floating point dtype")


def check_step_value(where: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{where}: 'step' must be a one-element real tensor or a number, got "
                            f"{value.dtype} of shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise TypeError(f"{where}: 'step' is on the meta device and holds no value")
        v = float(value.reshape(()))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
    else:
        raise TypeError(f"{where}: 'step' must be a one-element real tensor or a number, got {type(value).__name__}")
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise ValueError(f"{where}: 'step' must be a non-negative whole number, got {v}")


def check_state_dict(
    state_dict: Any,
    param_groups: list[dict[str, Any]],
    state_names: Callable[[dict[str, Any], Tensor], tuple[set[str], set[str]]],
    device_ok: Callable[[torch.device], Optional[str]],
) -> list[dict[str, Any]]:
    """Validate a state_dict against the optimizer's ``param_groups``; return the merged groups.

    Contract: a mapping with ``state`` and ``param_groups`` (and at most the keys of
    :data:`STATE_DICT_EXTRA_KEYS` besides); as many groups as the optimizer, of the same sizes, each
    saved index once; merged hyperparameters and options valid; parameter state only for saved indices
    (other keys hold anything but a parameter's state: torch keeps them as they are); each
    state entry empty or holding every required name of ``state_names(group, p)`` (required, allowed)
    and no other: ``step`` a non-negative whole number, the others tensors of the parameter's shape
    and a floating dtype (complex for a complex parameter). The merged groups are the optimizer's
    groups updated with the saved settings, ``params`` kept.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"loaded state dict has no '{key}' entry")
    unknown = [k for k in state_dict if k not in ("state", "param_groups") + STATE_DICT_EXTRA_KEYS]
    if unknown:
        raise ValueError(f"loaded state dict has unknown keys {unknown}")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in saved_groups):
        raise TypeError("loaded state dict's 'param_groups' must be a list of dicts")
    if len(param_groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for g, sg in zip(param_groups, saved_groups):
        if "params" not in sg or not isinstance(sg["params"], (list, tuple)):
            raise ValueError("loaded state dict has a parameter group without a 'params' list")
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
    id_map: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
    merged_groups = []
    for gi, (g, sg) in enumerate(zip(param_groups, saved_groups)):
        merged = dict(g)
        merged.update({k: v for k, v in sg.items() if k != "params"})
        check_hyperparameters(**{k: merged[k] for k in ("lr", "rho", "eps", "weight_decay") if k in merged})
        check_options(merged)
        check_master_dtypes(f"group {gi}", merged, g["params"])
        if merged.get("fused"):
            for p in g["params"]:
                why = None if p.device.type == "meta" else device_ok(p.device)  # meta: checked by a step
                if why is not None:
                    raise RuntimeError(f"loaded state dict sets `fused=True` for group {gi}, but a parameter is on "
                                       f"{p.device}: {why}")
        merged_groups.append(merged)
        for old_id, p in zip(sg["params"], g["params"]):
            # torch.optim accepts any hashable id; torch.distributed.checkpoint's set_optimizer_state_dict
            # passes parameter names (FQN strings) in place of indices.
            if isinstance(old_id, bool) or not isinstance(old_id, (int, str)):
                raise TypeError(f"loaded state dict has a parameter index {old_id!r} that is not an int or a name")
            if old_id in id_map:
                raise ValueError(f"loaded state dict lists parameter index {old_id} twice")
            id_map[old_id] = (p, merged)

    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise TypeError("loaded state dict's 'state' must be a dict")
    for k, entry in saved_state.items():
        if k not in id_map:
            # torch keeps any key that is no parameter's index as it is (a user's or a hook's flag), and so
            # do we; but a parameter's state there means a checkpoint that does not fit these groups.
            if isinstance(entry, Mapping) and any(name in entry for name in ("step", "square_avg", "acc_delta")):
                raise ValueError(f"loaded state dict has state for an unknown parameter index {k}")
            continue
        if not isinstance(entry, Mapping):
            raise TypeError(f"loaded state dict: the state of parameter {k} must be a dict, got {type(entry).__name__}")
        if not entry:
            continue
        p, group = id_map[k]
        where = f"loaded state dict, parameter {k}"
        required, allowed = state_names(group, p)
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown state keys {unknown} (expected {sorted(allowed)})")
        missing = sorted(required - set(entry))
        if missing:
            raise ValueError(f"{where}: missing state keys {missing}")
        for name, value in entry.items():
            if name == "step":
                check_step_value(where, value)
            elif name in ("square_avg", "acc_delta", "master"):
                _check_slot(where, name, value, p)
    if "skipped_steps" in state_dict:
        check_step_value("loaded state dict, skipped_steps", state_dict["skipped_steps"])
    return merged_groups


# ------------------------------------------------------------------------------------- non-finite gradients
def nonfinite_flag(grads: list[Tensor], device: torch.device) -> Tensor:
    """A 0-d bool tensor on ``device``: True when any element of ``grads`` is NaN or +-Inf.

    On a GPU it stays on the device, without a host synchronisation: the max-abs norm of each
    gradient (``_foreach_norm`` with ord=inf: one multi-tensor pass that propagates NaN), then a
    small reduction. Max-abs, not the 2-norm: squaring a large finite gradient would overflow and
    flag it. On the CPU, where torch's inf-norm is slow, see :func:`_cpu_nonfinite`. Complex
    gradients are read as their real views (|a + bi| can overflow); empty gradients are finite.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        if g.numel() == 0:
            continue
        r = torch.view_as_real(g) if g.is_complex() else g
        groups.setdefault((r.device, r.dtype), []).append(r)
    flag = torch.zeros((), dtype=torch.bool, device=device)
    for (dev, _), ts in groups.items():
        if dev.type == "cpu":
            bad = _cpu_nonfinite(ts)
        else:
            norms = torch._foreach_norm(ts, float("inf"))
            bad = ~torch.stack(norms).isfinite().all()
        flag |= bad.to(device, non_blocking=True) if dev != device else bad
    return flag


def _cpu_nonfinite(ts: list[Tensor]) -> Tensor:
    """The CPU version, no host read either. torch's CPU inf-norm is about 8x slower than a memory
    pass, so large tensors take ``aminmax`` (minimum and maximum, NaN-propagating, at memory speed);
    small ones the inf-norm, whose one multi-tensor call costs less than a call per tensor."""
    small = [t for t in ts if t.numel() < 65536]
    extremes = list(torch._foreach_norm(small, float("inf"))) if small else []
    extremes += [x for t in ts if t.numel() >= 65536 for x in torch.aminmax(t)]  # one dtype: no casts
    return ~torch.stack(extremes).isfinite().all()


def whole_number(name: str, value: Any) -> int:
    """A non-negative whole number from an int, a float, a numpy scalar/array or a one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a whole number, got a tensor of dtype {value.dtype} and shape "
                            f"{tuple(value.shape)}")
        v = float(value.reshape(()))
    else:
        arr = np.asarray(value)
        if arr.size != 1 or arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a whole number, got {value!r}")
        v = float(arr.reshape(()))
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise ValueError(f"{name} must be a non-negative whole number, got {v}")
    return int(v)
