"""The Keras (OptimizerV2) interface of :class:`triton_adadelta.Adadelta`.

:class:`KerasOptimizerMixin` holds everything Keras-shaped: the ``learning_rate``/``epsilon``
aliases and Keras' keyword arguments (clipnorm, clipvalue, global_clipnorm, decay), ``iterations``,
slots and weights, ``apply_gradients``/``minimize``/``get_gradients`` and ``get_config``/
``from_config``. The Adadelta class inherits it; the update itself is the optimizer's.

Keras semantics in one place (legacy ``tf.keras.optimizers.Adadelta``):

* clipping, in this order, on the gradient given to the step (see :mod:`triton_adadelta.clipping`):
  clamp to ``clipvalue``, then ``clipnorm`` per tensor or ``global_clipnorm`` over all tensors.
  Applied inside the update: ``p.grad`` is never changed (Keras leaves gradients alone; torch's
  ``clip_grad_norm_`` rescales them in place). Weight decay (ours, not Keras') is added after clipping.
* ``lr_t = lr / (1 + decay * iterations)`` with ``iterations`` counted before this step's increment,
  and with a learning-rate schedule ``lr = schedule(iterations)`` before the decay division.
* ``iterations`` counts steps that updated something (a step skipped by GradScaler's ``found_inf``
  does not count). It is a 0-d int64 tensor on the device of the parameters, incremented on the
  device; a host copy of the count is kept while it is known, so decay costs nothing on the host.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import clipping
from .buckets import local, shard_norm_hook

__all__ = [
    "KerasOptimizerMixin",
    "LearningRateSchedule",
    "ExponentialDecay",
    "InverseTimeDecay",
    "resolve_arguments",
]

# Keras' own keyword arguments, in the order its error message lists them.
KERAS_KWARGS = ("clipnorm", "clipvalue", "decay", "global_clipnorm", "lr")
# Keras slot names and torch's state names for the same tensors.
SLOT_NAMES = {"accum_grad": "square_avg", "accum_var": "acc_delta", "square_avg": "square_avg",
              "acc_delta": "acc_delta"}
_RESERVED = ("step", "master")


class _Default(float):
    """A float default that can be told apart from the same value passed by the caller."""

    def __repr__(self) -> str:
        return repr(float(self))


LR_DEFAULT = _Default(1.0)
EPS_DEFAULT = _Default(1e-6)


# --------------------------------------------------------------------------------------------- schedules
class LearningRateSchedule:
    """A learning rate as a function of the step count, serialisable in an optimizer's config.

    ``__call__(step)`` gets the number of steps taken so far (a Python int, or a 0-d int64 tensor on
    the device where the count is only known there) and returns a float or a 0-d tensor.
    Subclasses implement ``__call__`` and ``get_config``; ``from_config(config)`` is ``cls(**config)``.
    """

    def __call__(self, step: Union[int, Tensor]) -> Union[float, Tensor]:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments as a JSON-serialisable dict."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LearningRateSchedule:
        """The schedule :meth:`get_config` describes."""
        return cls(**config)


def _floor(x: Union[float, Tensor]) -> Union[float, Tensor]:
    return torch.floor(x) if isinstance(x, Tensor) else float(math.floor(x))


class _DecaySchedule(LearningRateSchedule):
    """Keras' decay schedules: ``initial_learning_rate`` scaled by a function of ``step / decay_steps``
    (floored with ``staircase``), :meth:`_scale`."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float,
                 staircase: bool = False, name: Optional[str] = None) -> None:
        if not decay_steps > 0:
            raise ValueError(f"decay_steps must be > 0, got {decay_steps}")
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name

    def _scale(self, progress: Union[float, Tensor]) -> Union[float, Tensor]:
        raise NotImplementedError

    def __call__(self, step: Union[int, Tensor]) -> Union[float, Tensor]:
        p = step / self.decay_steps
        if self.staircase:
            p = _floor(p)
        return self._scale(p)

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase, "name": self.name}


class ExponentialDecay(_DecaySchedule):
    """Keras' ExponentialDecay: ``initial_learning_rate * decay_rate ** (step / decay_steps)``.

    With ``staircase`` the exponent is floored (the rate drops every ``decay_steps`` steps).
    """

    def _scale(self, progress: Union[float, Tensor]) -> Union[float, Tensor]:
        return self.initial_learning_rate * self.decay_rate ** progress


class InverseTimeDecay(_DecaySchedule):
    """Keras' InverseTimeDecay: ``initial_learning_rate / (1 + decay_rate * step / decay_steps)``.

    With ``staircase`` ``step / decay_steps`` is floored.
    """

    def _scale(self, progress: Union[float, Tensor]) -> Union[float, Tensor]:
        return self.initial_learning_rate / (1 + self.decay_rate * progress)


SCHEDULES: dict[str, type] = {"ExponentialDecay": ExponentialDecay, "InverseTimeDecay": InverseTimeDecay}


def serialize_schedule(schedule: Any) -> dict[str, Any]:
    """``{"class_name": ..., "config": ...}``, Keras' form; only objects with ``get_config`` serialise."""
    if not callable(getattr(schedule, "get_config", None)):
        raise TypeError(
            f"the learning rate {schedule!r} is a callable without get_config(), so the optimizer's config cannot "
            "describe it: subclass triton_adadelta.keras.LearningRateSchedule (and pass the class in "
            "custom_objects to from_config)"
        )
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize_schedule(config: Mapping[str, Any], custom_objects: Optional[Mapping[str, Any]] = None) -> Any:
    """The schedule ``config`` describes; ``custom_objects`` maps class names to the user's classes."""
    if "class_name" not in config:
        raise ValueError(f"a serialised learning-rate schedule needs a 'class_name', got {dict(config)}")
    name = config["class_name"]
    cls = (custom_objects or {}).get(name) or SCHEDULES.get(name)
    if cls is None:
        raise ValueError(f"Unknown learning rate schedule: {name}. Pass its class in custom_objects.")
    inner = dict(config.get("config", {}))
    if hasattr(cls, "from_config"):
        return cls.from_config(inner)
    return cls(**inner)


def _is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, (Tensor, numbers.Number))


def _takes_step(schedule: Callable) -> bool:
    """Whether a learning-rate callable is called with the step (Keras calls other callables with nothing).

    A LearningRateSchedule, or any callable that accepts one positional argument, gets the step;
    one that takes no arguments (Keras' ``learning_rate=lambda: 0.01``) is called without it.
    """
    if isinstance(schedule, LearningRateSchedule):
        return True
    try:
        inspect.signature(schedule).bind(0)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (some builtins): assume a schedule
        return True
    return True


def schedule_value(schedule: Callable, step: Union[int, Tensor],
                   takes_step: Optional[bool] = None) -> Union[float, Tensor]:
    """The learning rate a schedule (or a Keras zero-argument callable) gives at ``step``;
    ``takes_step``: :func:`_takes_step` of it, when the caller keeps it (the signature is slow to read)."""
    return schedule(step) if (_takes_step(schedule) if takes_step is None else takes_step) else schedule()


def _as_float(value: Union[float, Tensor]) -> float:
    return float(value.reshape(())) if isinstance(value, Tensor) else float(value)


# --------------------------------------------------------------------------------------------- arguments
def _check_nonnegative(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__} {value!r}")
    if not value >= 0:  # NaN fails too
        raise ValueError(f"Expected {name} >= 0, received: {value}")
    return value


def _same_value(a: Any, b: Any) -> bool:
    def as_float(x: Any) -> float:
        return float(x.reshape(())) if isinstance(x, Tensor) else float(x)

    try:
        return as_float(a) == as_float(b)
    except (TypeError, ValueError, RuntimeError):
        return a is b


def resolve_arguments(
    lr: Any, eps: Any, learning_rate: Any, epsilon: Any, kwargs: Mapping[str, Any], *,
    clipnorm: Any, clipvalue: Any, global_clipnorm: Any, decay: Any,
) -> tuple[Any, float, Optional[Callable], float, dict[str, Optional[float]]]:
    """Merge torch's and Keras' names; validate Keras' arguments. Returns (lr, eps, schedule, decay, clips).

    Contract: unknown keywords raise Keras' TypeError; clip values and decay must be numbers >= 0
    (Keras' ValueError ``Expected {k} >= 0, received: {v}``); clipnorm and global_clipnorm exclude each
    other; ``lr``/``learning_rate`` (and ``eps``/``epsilon``) given with different values raise a
    ValueError. A callable learning rate is a schedule. ``epsilon=0`` means 1e-7, as in legacy Keras.
    """
    if kwargs:
        allowed = "{" + ", ".join(repr(k) for k in KERAS_KWARGS) + "}"
        raise TypeError(f"Unexpected keyword argument passed to optimizer: {next(iter(kwargs))}. "
                        f"Allowed kwargs are {allowed}.")
    clips = {k: _check_nonnegative(k, v) for k, v in
             (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm))}
    decay = _check_nonnegative("decay", decay) or 0.0
    if clips["clipnorm"] is not None and clips["global_clipnorm"] is not None:
        raise ValueError("Cannot accept both `clipnorm` and `global_clipnorm`. "
                         f"Received: `clipnorm`={clipnorm}, `global_clipnorm`={global_clipnorm}.")

    lr_given = lr is not LR_DEFAULT
    if learning_rate is not None:
        if lr_given and not _same_value(lr, learning_rate):
            raise ValueError(f"lr={lr!r} and learning_rate={learning_rate!r} disagree: learning_rate is Keras' "
                             "name for lr, pass one of them")
        lr = learning_rate
    schedule = None
    if _is_schedule(lr):
        schedule = lr
        lr = _as_float(schedule_value(schedule, 0))
    elif not lr_given and learning_rate is None:
        lr = 1.0

    if epsilon is not None:
        if _check_number("epsilon", epsilon) == 0:
            epsilon = 1e-7  # legacy Keras: `epsilon or backend.epsilon()`
        if eps is not EPS_DEFAULT and not _same_value(eps, epsilon):
            raise ValueError(f"eps={eps!r} and epsilon={epsilon!r} disagree: epsilon is Keras' name for eps, "
                             "pass one of them")
        eps = epsilon
    elif eps is EPS_DEFAULT:
        eps = 1e-6
    return lr, eps, schedule, decay, clips


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _whole_number(name: str, value: Any) -> int:
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


def _describe(v: Any, i: Optional[int] = None) -> str:
    name = getattr(v, "name", None)
    if isinstance(name, str):
        return name
    where = f"variable {i}" if i is not None else "variable"
    if isinstance(v, Tensor):
        return f"<{where}: shape={tuple(v.shape)}, dtype={str(v.dtype).replace('torch.', '')}>"
    return f"<{where}: {type(v).__name__}>"


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in the config")
    return dtype


def _plain(value: Any) -> Any:
    """A JSON-friendly value: tensors and numpy scalars become Python numbers, dtypes their names."""
    if isinstance(value, Tensor):
        return float(value.reshape(()))
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------- state_dict hooks
def _load_pre_hook(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Take our ``"keras"`` entry out of a state_dict before the optimizer validates the rest.

    Its contents are checked here and applied by :func:`_load_post_hook`, once the load succeeded.
    """
    opt._pending_keras = None
    groups = state_dict.get("param_groups")
    if isinstance(groups, (list, tuple)) and any(isinstance(g, Mapping) and "iterations" in g for g in groups):
        # Our state_dict() copies iterations into every group, where torch.distributed.checkpoint,
        # which keeps only "state" and "param_groups", carries it. It is no setting of the groups.
        state_dict = dict(state_dict)
        first = next(g for g in groups if isinstance(g, Mapping) and "iterations" in g)
        state_dict["param_groups"] = [{k: v for k, v in g.items() if k != "iterations"} if isinstance(g, Mapping)
                                      else g for g in groups]
        if "keras" not in state_dict:
            state_dict["keras"] = {"iterations": first["iterations"], "slot_names": []}
    if "keras" not in state_dict:
        return state_dict
    state_dict = dict(state_dict)
    entry = state_dict.pop("keras")
    if not isinstance(entry, Mapping):
        raise TypeError(f"loaded state dict's 'keras' entry must be a dict, got {type(entry).__name__}")
    unknown = sorted(set(entry) - {"iterations", "slot_names"})
    if unknown:
        raise ValueError(f"loaded state dict's 'keras' entry has unknown keys {unknown}")
    iterations = _whole_number("loaded state dict, keras iterations", entry.get("iterations", 0))
    names = entry.get("slot_names", [])
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError("loaded state dict's keras slot_names must be a list of strings")
    bad = [n for n in names if n in _RESERVED or n in SLOT_NAMES]
    if bad:
        raise ValueError(f"loaded state dict's keras slot_names include reserved names {bad}")
    opt._pending_keras = (iterations, list(names))
    return state_dict


def _state_dict_post_hook(opt: Any, state_dict: dict[str, Any]) -> None:
    opt._state_dict_extras(state_dict)


def _load_post_hook(opt: Any) -> None:
    opt._unclaimed_slots.clear()  # loaded state is state Keras has created
    pending, opt._pending_keras = opt._pending_keras, None
    if pending is None:
        return
    iterations, names = pending
    opt.iterations = iterations
    for n in names:
        if n not in opt._user_slot_names:
            opt._user_slot_names.append(n)


# --------------------------------------------------------------------------------------------- the mixin
def _clip_property(name: str, doc: str) -> property:
    """A Keras clip attribute: reads ``self._<name>``, writes through ``_set_clip`` (checks, exclusivity)."""

    def get(self: Any) -> Optional[float]:
        return getattr(self, "_" + name)

    def set_(self: Any, value: Optional[float]) -> None:
        self._set_clip(name, value)

    return property(get, set_, doc=doc)


# Keys that only Keras 3's optimizer configs have (its base Optimizer writes them all).
_KERAS3_ONLY_KEYS = ("use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
                     "gradient_accumulation_steps")


class KerasOptimizerMixin:
    """Keras' OptimizerV2 API on a torch optimizer with Adadelta's state (``square_avg``, ``acc_delta``).

    The host class calls :meth:`_keras_init` after ``torch.optim.Optimizer.__init__`` and routes its
    hooks ``_group_lr``, ``_grad_transforms`` and ``_after_step`` to the ``_keras_*`` methods here.
    """

    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]

    _PICKLED = ("name", "_clipnorm", "_clipvalue", "_global_clipnorm", "_lr_schedule", "_iterations",
                "_iterations_host", "_iterations_version", "_slot_log", "_user_slot_names")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _keras_params(params: Any) -> Any:
        """``params=None`` (Keras: variables come with the first apply) becomes one empty param group."""
        if params is None:
            return [{"params": []}]
        if isinstance(params, numbers.Number) or isinstance(params, LearningRateSchedule):
            raise TypeError(
                f"params must be an iterable of tensors or dicts, got {type(params).__name__}: a Keras-style "
                "positional learning rate? Pass learning_rate=... (and params first, or not at all)"
            )
        return params

    def _keras_init(self, *, name: str, clips: dict[str, Optional[float]], schedule: Optional[Callable]) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.name = name
        self._clipnorm = clips["clipnorm"]
        self._clipvalue = clips["clipvalue"]
        self._global_clipnorm = clips["global_clipnorm"]
        self._lr_schedule = schedule
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = local(first).device if first is not None else torch.device("cpu")
        self._iterations = torch.zeros((), dtype=torch.int64, device=device)
        self._iterations_host: Optional[int] = 0
        self._iterations_version = self._iterations._version
        self._slot_log: list[tuple[Tensor, str]] = []
        self._user_slot_names: list[str] = []
        self._keras_transient()

    def _keras_transient(self) -> None:
        """Attributes that are rebuilt rather than copied (caches, id-keyed sets, hooks)."""
        self._slot_logged = {id(p) for p, n in self._slot_log if n == "accum_grad"}
        #: (id(var), slot) of Adadelta slots that exist only because add_slot made the other one: Keras
        #: would still create them from a later add_slot's initializer. Cleared by a step.
        self._unclaimed_slots: set[tuple[int, str]] = set()
        self._lr_takes_step = self._lr_schedule is None or _takes_step(self._lr_schedule)
        self._lr_zeroed = False  # set by each step (optimizer.py): DCP's first step at lr 0
        self._norm_cache: dict = {}
        #: Set by data-parallel setups: called with the step's squared norms ([per tensor..., total],
        #: see clipping.squared_norms) before they become multipliers; all-reduce it in place (SUM) or
        #: return the reduced tensor.
        self._squared_norm_hook: Optional[Callable[[Tensor], Optional[Tensor]]] = None
        self._pending_keras: Optional[tuple] = None
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)
        # Our entries join state_dict() before any post-hook of the user's runs, so those hooks see them.
        self.register_state_dict_post_hook(_state_dict_post_hook, prepend=True)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        for k in self._PICKLED:
            state[k] = self.__dict__.get(k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if self.__dict__.get("_iterations") is None:  # a pickle from before the Keras layer existed
            self._iterations = torch.zeros((), dtype=torch.int64)
            self._iterations_host = 0
        self.__dict__.setdefault("name", "Adadelta")
        for k in ("_clipnorm", "_clipvalue", "_global_clipnorm", "_lr_schedule"):
            self.__dict__.setdefault(k, None)
        if self.__dict__.get("_slot_log") is None:
            self._slot_log = []
        if self.__dict__.get("_user_slot_names") is None:
            self._user_slot_names = []
        self._iterations_version = self._iterations._version
        self._keras_transient()

    def _keras_state_dict_entry(self, sd: dict[str, Any]) -> None:
        """Add ``"keras"``: ``{"iterations": 0-d int64 tensor, "slot_names": [...]}`` to a state_dict.

        torch.optim.Adadelta ignores the extra entry when it loads the dict.
        """
        sd["keras"] = {"iterations": self._iterations.detach().clone(), "slot_names": list(self._user_slot_names)}

    # ------------------------------------------------------------------ hyperparameters as attributes
    def _set_all(self, key: str, value: Any) -> None:
        for g in self.param_groups:
            g[key] = value
        self.defaults[key] = value

    @property
    def learning_rate(self) -> Any:
        """The schedule when there is one, else the first group's lr. Setting it sets every group's."""
        return self._lr_schedule if self._lr_schedule is not None else self.param_groups[0]["lr"]

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if _is_schedule(value):
            lr = _as_float(schedule_value(value, 0))
            self._check_hyperparameters(lr=lr)  # type: ignore[attr-defined]
            self._lr_schedule = value
        else:
            self._check_hyperparameters(lr=value)  # type: ignore[attr-defined]
            self._lr_schedule = None
            lr = value
        self._lr_takes_step = self._lr_schedule is None or _takes_step(self._lr_schedule)
        self._set_all("lr", lr)

    lr = learning_rate

    @property
    def rho(self) -> float:
        """The first group's rho (Keras' one value); setting it sets every group's, validated."""
        return self.param_groups[0]["rho"]

    @rho.setter
    def rho(self, value: float) -> None:
        self._check_hyperparameters(rho=value)  # type: ignore[attr-defined]
        self._set_all("rho", value)

    @property
    def epsilon(self) -> float:
        """Keras' name for eps: the first group's; setting it sets every group's, validated."""
        return self.param_groups[0]["eps"]

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._check_hyperparameters(eps=value)  # type: ignore[attr-defined]
        self._set_all("eps", value)

    @property
    def decay(self) -> float:
        """Keras' time decay: ``lr_t = lr / (1 + decay * iterations)``; setting it sets every group's."""
        return self.param_groups[0].get("decay", 0.0)

    @decay.setter
    def decay(self, value: float) -> None:
        self._set_all("decay", _check_nonnegative("decay", value) or 0.0)

    def _set_clip(self, name: str, value: Optional[float]) -> None:
        value = _check_nonnegative(name, value)
        norm = value if name == "clipnorm" else self._clipnorm
        global_norm = value if name == "global_clipnorm" else self._global_clipnorm
        if norm is not None and global_norm is not None:
            raise ValueError("Cannot accept both `clipnorm` and `global_clipnorm`. "
                             f"Received: `clipnorm`={norm}, `global_clipnorm`={global_norm}.")
        setattr(self, "_" + name, value)

    clipnorm = _clip_property("clipnorm", "Per-tensor norm clip: ``g * c / max(||g||, c)``.")
    clipvalue = _clip_property("clipvalue", "Element clip: ``clamp(g, -c, c)``, before any norm clip.")
    global_clipnorm = _clip_property(
        "global_clipnorm", "Norm clip over all tensors: ``g * c * min(1 / G, 1 / c)``, G the global norm.")

    # ------------------------------------------------------------------ iterations
    @property
    def iterations(self) -> Tensor:
        """Steps taken (skipped GradScaler steps excluded): a 0-d int64 tensor on the parameters' device.

        ``int(opt.iterations)`` reads it (a synchronisation on a GPU). Assigning an int sets it.
        """
        return self._iterations

    @iterations.setter
    def iterations(self, value: Any) -> None:
        v = _whole_number("iterations", value)
        with torch.no_grad():
            self._iterations.fill_(v)
        self._iterations_host = v
        self._iterations_version = self._iterations._version

    def _step_count(self, group: Optional[dict[str, Any]] = None) -> Union[int, Tensor]:
        """iterations as a host int when known without a synchronisation, else the device tensor."""
        it = self._iterations
        if it._version != self._iterations_version:  # changed in place by the user (fill_, zero_, ...)
            self._iterations_host = int(it) if it.device.type == "cpu" else None
            self._iterations_version = it._version
        if group is not None and group.get("capturable"):
            return it  # a CUDA graph replays device reads, never a host number
        if self._iterations_host is not None:
            return self._iterations_host
        return int(it) if it.device.type == "cpu" else it

    # ------------------------------------------------------------------ the optimizer's hooks
    def _keras_lr(self, group: dict[str, Any]) -> Union[float, Tensor]:
        """lr (or ``schedule(iterations)``) divided by ``1 + decay * iterations``."""
        decay = group.get("decay", 0.0)
        if self._lr_schedule is None and not decay:
            return group["lr"]
        if self._lr_zeroed:  # a first step with every lr set to 0 (see step())
            return 0.0
        step = self._step_count(group)
        if self._lr_schedule is None:
            lr = group["lr"]
        else:
            lr = schedule_value(self._lr_schedule, step, self._lr_takes_step)
        if decay:
            lr = lr / (1 + decay * step)
        return lr

    def _keras_grad_transforms(
        self, entries: list[tuple], grad_scale: Optional[Tensor], keys: Optional[list] = None
    ) -> Any:
        """Note new slots, then the step's clipping as a :class:`clipping.GradientTransform` (None: none).

        ``keys``: each entry's kernel bucket or None (the optimizer's ``_route_keys``), computed when not given.
        """
        self._log_new_slots([e[2] for e in entries])
        if self._clipvalue is None and self._clipnorm is None and self._global_clipnorm is None:
            return None
        if keys is None:
            keys = self._route_keys(entries)  # type: ignore[attr-defined]
        return clipping.build_transform(
            [local(e[3]) for e in entries], [k is not None for k in keys], keys,
            clip_value=self._clipvalue, clipnorm=self._clipnorm, global_clipnorm=self._global_clipnorm,
            grad_scale=grad_scale, squared_norm_hook=self._squared_norm_hook, cache=self._norm_cache,
            # FSDP2 / DTensor gradients: complete each tensor's squared norm across the mesh first.
            per_tensor_hook=shard_norm_hook([e[3] for e in entries], self._norm_cache),
        )

    def _keras_after_step(self, found_inf: Optional[Tensor]) -> None:
        """iterations += 1 on the device; by 0 when ``found_inf`` is set (no host read either way)."""
        self._unclaimed_slots.clear()
        it = self._iterations
        if any(g.get("capturable") for g in self.param_groups):
            # capturable promises no host read of a tensor, even of a CPU one (on a device it is a
            # synchronisation, and a CUDA graph would replay a stale number): count on the device only.
            it.add_(1 if found_inf is None else (found_inf.to(it.device).reshape(()) == 0).to(it.dtype))
            self._iterations_host = None
            self._iterations_version = it._version
            return
        self._step_count()  # notice a user's in-place change before counting on the host copy
        if found_inf is None:
            it.add_(1)
            if self._iterations_host is not None:
                self._iterations_host += 1
        else:
            flag = found_inf.to(it.device, non_blocking=it.device.type != "cpu").reshape(())
            it.add_((flag == 0).to(it.dtype))
            self._iterations_host = None if it.device.type != "cpu" else int(it)
        self._iterations_version = it._version

    def _keras_state_names(self) -> set[str]:
        """User slot names a saved state entry may hold (those known, and those a loading dict declares)."""
        names = set(self._user_slot_names)
        if self._pending_keras is not None:
            names.update(self._pending_keras[1])
        return names

    # ------------------------------------------------------------------ variables and slots
    def _group_of(self, var: Tensor) -> Optional[dict[str, Any]]:
        for g in self.param_groups:
            if any(p is var for p in g["params"]):
                return g
        return None

    def _adopt(self, new_vars: list[Tensor]) -> None:
        """Add variables the optimizer does not know yet to its first param group (Keras: at first sight).

        They go through add_param_group's checks first; on an error nothing is added.
        """
        if not new_vars:
            return
        had_params = any(g["params"] for g in self.param_groups)
        first = self.param_groups[0]
        count = len(self.param_groups)
        settings = {k: v for k, v in first.items() if k not in ("params", "initial_lr")}
        try:
            self.add_param_group({"params": list(new_vars), **settings})  # type: ignore[attr-defined]
        except BaseException:
            del self.param_groups[count:]
            raise
        added = self.param_groups.pop()
        first["params"].extend(added["params"])
        self._forget_plans()  # type: ignore[attr-defined]
        device = local(new_vars[0]).device
        if not had_params and self._iterations.device != device:
            # Keras creates iterations with the first variables: move it (value and all) to their device.
            self._step_count()
            self._iterations = self._iterations.to(device)
            self._iterations_version = self._iterations._version

    def _log_new_slots(self, params: list[Tensor]) -> None:
        """Record Keras' slot creation order: accum_grad of each new variable, then accum_var of each."""
        new = [p for p in params if id(p) not in self._slot_logged]
        if not new:
            return
        self._slot_logged.update(id(p) for p in new)
        self._slot_log.extend((p, "accum_grad") for p in new)
        self._slot_log.extend((p, "accum_var") for p in new)

    def _log_existing_state(self) -> None:
        """State created outside a step (load_state_dict) joins the slot record in parameter order."""
        self._log_new_slots([p for g in self.param_groups for p in g["params"] if self.state.get(p)])

    def _slot_entries(self) -> list[tuple[Tensor, str, Tensor]]:
        self._log_existing_state()
        out = []
        for p, name in self._slot_log:
            st = self.state.get(p)
            t = st.get(SLOT_NAMES.get(name, name)) if st else None
            if isinstance(t, Tensor):
                out.append((p, name, t))
        return out

    @property
    def weights(self) -> list[Tensor]:
        """Keras' order: ``[iterations, accum_grad of each variable, accum_var of each, user slots]``.

        Variables are listed in the order their slots were created (first step that had their gradient);
        the tensors are the live state (views into the flat buffers; re-read after new variables join).
        """
        return [self._iterations] + [t for _, _, t in self._slot_entries()]

    def variables(self) -> list[Tensor]:
        """Same as :attr:`weights` (Keras' ``variables()``)."""
        return self.weights

    def get_weights(self) -> list[np.ndarray]:
        """Copies of the values of :attr:`weights` as numpy arrays (bfloat16 state as float32: numpy has no
        bfloat16). Copies, as in Keras: later steps do not change a list taken before them."""
        out = []
        for w in self.weights:
            w = w.detach()
            if w.dtype == torch.bfloat16:
                w = w.float()
            out.append(w.to("cpu", copy=True).numpy())
        return out

    def set_weights(self, weights: Iterable[Any]) -> None:
        """Set :attr:`weights` from arrays (Keras' checks and messages; nothing changes on an error).

        A list one shorter than :attr:`weights` (no iterations, Keras 1's layout) sets iterations to 0.
        """
        params = self.weights
        weights = list(weights)
        if len(params) == len(weights) + 1:
            weights = [np.array(0)] + weights
        if len(params) != len(weights):
            raise ValueError(
                f"You called `set_weights(weights)` on optimizer {self.name} with a weight list of length "
                f"{len(weights)}, but the optimizer was expecting {len(params)} weights. "
                f"Provided weights: {str(weights)[:50]}..."
            )
        values = []
        for p, w in zip(params, weights):
            shape = tuple(w.shape) if hasattr(w, "shape") else np.shape(w)
            if tuple(p.shape) != tuple(shape):
                raise ValueError(f"Optimizer weight shape {tuple(p.shape)} not compatible with provided weight "
                                 f"shape {tuple(shape)}.")
            t = w.detach() if isinstance(w, Tensor) else torch.as_tensor(np.asarray(w))
            if not (t.is_floating_point() or t.is_complex() or t.dtype in (torch.int64, torch.int32, torch.int16,
                                                                             torch.int8, torch.uint8)):
                raise TypeError(f"a weight of dtype {t.dtype} cannot be set")
            if t.is_complex() and not p.is_complex():
                raise TypeError("a complex weight for a real optimizer weight")
            values.append(t)
        iterations = _whole_number("iterations (the first weight)", values[0])
        for i, t in enumerate(values[1:], 1):
            if t.device.type == "meta":
                raise TypeError(f"weight {i} is a tensor on the meta device, which holds no values")
        # Every value on its weight's device and dtype before the first is written: a failure writes nothing.
        values = [t.to(p.device, p.dtype) for p, t in zip(params[1:], values[1:])]
        with torch.no_grad():
            for p, t in zip(params[1:], values):
                p.copy_(t)
        self.iterations = iterations

    def get_slot_names(self) -> list[str]:
        """``[]`` before any state exists, then ``["accum_grad", "accum_var"]`` and the user slots' names."""
        has_state = any(st for p, st in self.state.items() if isinstance(p, Tensor))  # (other keys: users' flags)
        names = ["accum_grad", "accum_var"] if has_state else []
        return names + [n for n in self._user_slot_names if n not in names]

    def get_slot(self, var: Tensor, slot_name: str) -> Tensor:
        """The live state tensor ``slot_name`` of ``var`` (Keras' or torch's name); KeyError if none."""
        st = self.state.get(var) if isinstance(var, Tensor) else None
        if not st:
            raise KeyError(f"{_describe(var)} has no slots: it is not a variable of this optimizer, or no step has "
                           "updated it yet")
        name = SLOT_NAMES.get(slot_name, slot_name)
        if name == "step" or not isinstance(st.get(name), Tensor):
            known = [k for k in ("accum_grad", "accum_var") if SLOT_NAMES[k] in st]
            known += [k for k in st if k not in ("step", "square_avg", "acc_delta")]
            raise KeyError(f"unknown slot {slot_name!r} for {_describe(var)}; its slots are {known}")
        return st[name]

    def add_slot(self, var: Tensor, slot_name: str, initializer: Any = "zeros",
                 shape: Optional[Iterable[int]] = None) -> Tensor:
        """Create (or return the existing) slot ``slot_name`` of ``var``, kept in ``state[var]`` and the state_dict.

        ``initializer``: "zeros", "ones", a number, a tensor, or a callable ``(shape, dtype) -> tensor``.
        The slot has ``var``'s dtype and device and ``shape`` (default ``var.shape``). A variable the
        optimizer does not know joins its first param group; its Adadelta state is created with it.
        ``accum_grad``/``accum_var`` of a variable without state are created from ``initializer`` (the
        other one zeros), as Keras' first apply would find them; when they exist they are returned as they are.
        """
        if not isinstance(var, Tensor):
            raise TypeError(f"add_slot needs a tensor variable, got {type(var).__name__}")
        if not isinstance(slot_name, str) or not slot_name:
            raise TypeError(f"slot_name must be a non-empty str, got {slot_name!r}")
        if slot_name in _RESERVED:
            raise ValueError(f"{slot_name!r} is a reserved state name; choose another slot name")
        shape = tuple(var.shape) if shape is None else tuple(int(s) for s in shape)
        group = self._group_of(var)
        st = self.state.get(var) if group is not None else None
        if st and slot_name in SLOT_NAMES and (id(var), SLOT_NAMES[slot_name]) not in self._unclaimed_slots:
            return st[SLOT_NAMES[slot_name]]
        if st and slot_name in st:
            return st[slot_name]
        if slot_name in SLOT_NAMES:
            if shape != tuple(var.shape):
                raise ValueError(f"the slot {slot_name!r} has the variable's shape {tuple(var.shape)}, not {shape}")
            # Keras creates a missing Adadelta slot from the initializer given here; the first apply then
            # finds it. Built in fp32 at least, as the state is (bf16 variables have fp32 state).
            value = self._initial_value(initializer, shape, var, torch.promote_types(var.dtype, torch.float32))
        else:
            value = self._initial_value(initializer, shape, var)
        if group is None:
            self._adopt([var])
            group = self._group_of(var)
        if not self.state.get(var):
            self._ensure_state([(group, [var])])  # type: ignore[attr-defined]
            if slot_name in SLOT_NAMES:
                other = "acc_delta" if SLOT_NAMES[slot_name] == "square_avg" else "square_avg"
                self._unclaimed_slots.add((id(var), other))
        self._log_new_slots([var])
        st = self.state[var]
        if slot_name in SLOT_NAMES:
            self._unclaimed_slots.discard((id(var), SLOT_NAMES[slot_name]))
            slot = st[SLOT_NAMES[slot_name]]
            with torch.no_grad():
                slot.copy_(value)
            return slot
        st[slot_name] = value
        self._slot_log.append((var, slot_name))
        if slot_name not in self._user_slot_names:
            self._user_slot_names.append(slot_name)
        return value

    @staticmethod
    def _initial_value(initializer: Any, shape: tuple, var: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        dtype, device = dtype or var.dtype, var.device
        if isinstance(initializer, str):
            fill = {"zeros": 0.0, "ones": 1.0}.get(initializer)
            if fill is None:
                raise ValueError(f"Unknown initializer {initializer!r}: use 'zeros', 'ones', a number, a tensor or "
                                 "a callable (shape, dtype) -> tensor")
            return torch.full(shape, fill, dtype=dtype, device=device)
        if isinstance(initializer, numbers.Number) and not isinstance(initializer, bool):
            return torch.full(shape, initializer, dtype=dtype, device=device)
        if isinstance(initializer, Tensor):
            value = initializer
        elif callable(initializer):
            value = torch.as_tensor(initializer(shape, dtype=dtype))
        else:
            raise TypeError(f"initializer must be a name, a number, a tensor or a callable, got "
                            f"{type(initializer).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"the initial value has shape {tuple(value.shape)}, the slot {shape}")
        return value.detach().to(device=device, dtype=dtype).clone()

    # ------------------------------------------------------------------ applying gradients
    def _check_pairs(self, grads_and_vars: Any) -> list[tuple[Optional[Tensor], Tensor]]:
        if isinstance(grads_and_vars, (Tensor, str, bytes)) or not isinstance(grads_and_vars, Iterable):
            raise TypeError(f"grads_and_vars must be an iterable of (gradient, variable) pairs, got "
                            f"{type(grads_and_vars).__name__}")
        pairs = []
        seen: dict[int, int] = {}
        for i, item in enumerate(grads_and_vars):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                length = f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
                raise ValueError(f"grads_and_vars must hold (gradient, variable) pairs; item {i} is "
                                 f"{type(item).__name__}{length}")
            g, v = item
            if not isinstance(v, Tensor):
                raise TypeError(f"item {i}: optimizer can only optimize Tensors, but the variable is "
                                f"{torch.typename(v)}")
            if id(v) in seen:
                raise ValueError(f"item {i}: the variable also appears as item {seen[id(v)]}; each variable once")
            seen[id(v)] = i
            if g is not None:
                if not isinstance(g, Tensor):
                    raise TypeError(f"item {i}: the gradient must be a tensor or None, got {type(g).__name__}")
                if g.layout != torch.strided:
                    raise RuntimeError("Adadelta does not support sparse gradients")
                if g.shape != v.shape:
                    raise ValueError(f"item {i}: gradient shape {tuple(g.shape)} does not match variable shape "
                                     f"{tuple(v.shape)}")
                if g.device != v.device:
                    raise ValueError(f"item {i}: the gradient is on {g.device}, the variable on {v.device}")
                if not (g.is_floating_point() or g.is_complex()) or g.is_complex() != v.is_complex():
                    raise TypeError(f"item {i}: gradient dtype {g.dtype} does not fit variable dtype {v.dtype}")
            pairs.append((g, v))
        return pairs

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Optional[Tensor], Tensor]], name: Optional[str] = None,
                        experimental_aggregate_gradients: bool = True) -> Tensor:
        """One step with the given gradients (Keras' contract); returns :attr:`iterations`.

        Validates first (malformed pairs, shapes, devices, dtypes; all gradients None: "No gradients
        provided for any variable"); warns about variables whose gradient is None and leaves them (and
        their slots) untouched; adopts variables the optimizer does not know; clips (clipvalue,
        clipnorm, global_clipnorm) inside the update; increments iterations. An empty list does
        nothing. Gradients of another dtype are cast to the variable's. ``p.grad`` of every parameter
        is the same afterwards as before (the step reads the given gradients, not ``p.grad``).
        ``name`` and ``experimental_aggregate_gradients`` are accepted for Keras compatibility and unused.
        """
        pairs = self._check_pairs(grads_and_vars)
        if not pairs:
            return self._iterations
        present = [(g, v) for g, v in pairs if g is not None]
        if not present:
            names = [_describe(v, i) for i, (_, v) in enumerate(pairs)]
            raise ValueError(f"No gradients provided for any variable: {names}. "
                             f"Provided `grads_and_vars` is {[(None, n) for n in names]}.")
        missing = [_describe(v, i) for i, (g, v) in enumerate(pairs) if g is None]
        if missing:
            warnings.warn(f"Gradients do not exist for variables {missing} when minimizing the loss.",
                          UserWarning, stacklevel=2)
        known = {id(p) for g in self.param_groups for p in g["params"]}
        adopted = [v for _, v in present if id(v) not in known]
        first_length = len(self.param_groups[0]["params"])
        self._adopt(adopted)

        everything = [p for g in self.param_groups for p in g["params"]]
        saved = [p.grad for p in everything]
        # Keras creates slots in the order of grads_and_vars, which need not be the param groups' order.
        log_length = len(self._slot_log)
        self._log_existing_state()  # earlier state keeps its place
        self._log_new_slots([v for _, v in present])
        try:
            for p in everything:
                p.grad = None
            for g, v in present:
                v.grad = g.detach() if g.dtype == v.dtype else g.detach().to(v.dtype)
            self.step()  # type: ignore[attr-defined]
        except BaseException:
            del self._slot_log[log_length:]
            self._slot_logged = {id(p) for p, n in self._slot_log if n == "accum_grad"}
            if not any(self.state.get(v) for v in adopted):  # refused before it wrote: unknown again
                del self.param_groups[0]["params"][first_length:]
                self._forget_plans()  # type: ignore[attr-defined]
            raise
        finally:
            for p, g in zip(everything, saved):
                p.grad = g
        return self._iterations

    @staticmethod
    def _loss_value(loss: Any) -> Tensor:
        with torch.enable_grad():
            value = loss() if callable(loss) else loss
        if not isinstance(value, Tensor):
            raise TypeError(f"the loss must be a tensor (or a callable returning one), got {type(value).__name__}")
        return value

    @staticmethod
    def _gradients(value: Tensor, var_list: list[Tensor], grad_loss: Optional[Tensor]) -> list[Optional[Tensor]]:
        if not isinstance(value, Tensor):
            raise TypeError(f"the loss must be a tensor (or a callable returning one), got {type(value).__name__}")
        wanted = [i for i, v in enumerate(var_list) if v.requires_grad]
        grads: list[Optional[Tensor]] = [None] * len(var_list)
        if not wanted or not value.requires_grad:
            return grads
        if grad_loss is None and value.numel() != 1:
            grad_loss = torch.ones_like(value)  # TF differentiates the sum of a non-scalar loss
        found = torch.autograd.grad(value, [var_list[i] for i in wanted], grad_outputs=grad_loss, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
        return grads

    @staticmethod
    def _var_list(var_list: Any) -> list[Tensor]:
        if callable(var_list) and not isinstance(var_list, Tensor):
            var_list = var_list()
        if isinstance(var_list, Tensor):
            return [var_list]
        out = list(var_list)
        for i, v in enumerate(out):
            if not isinstance(v, Tensor):
                raise TypeError(f"var_list[{i}] is a {type(v).__name__}; the variables must be tensors")
        return out

    def minimize(self, loss: Any, var_list: Any, grad_loss: Optional[Tensor] = None, name: Optional[str] = None,
                 tape: Any = None) -> Tensor:
        """Compute gradients of ``loss`` and apply them (Keras' contract); returns :attr:`iterations`.

        ``loss``: a callable returning a scalar tensor (called with autograd on) or a tensor with a
        graph. ``var_list``: tensors, or a callable returning them (called after ``loss``).
        ``grad_loss``: the gradient of the loss (default ones). Variables that do not require grad,
        or that the loss does not reach, get no gradient (a warning; all of them: ValueError).
        ``p.grad`` is not touched. ``tape`` (TensorFlow's GradientTape) has no torch meaning.
        """
        if tape is not None:
            raise TypeError("tape is TensorFlow's GradientTape; torch records the graph itself: pass the loss as a "
                            "callable or as a tensor with a graph")
        value = self._loss_value(loss)
        variables = self._var_list(var_list)  # after the loss: a callable may list variables the loss made
        grads = self._gradients(value, variables, grad_loss)
        return self.apply_gradients(list(zip(grads, variables)), name=name)

    def get_gradients(self, loss: Any, params: Any) -> list[Tensor]:
        """Gradients of ``loss`` for ``params`` (not clipped, as Keras 2.4+); ValueError naming a None gradient."""
        value = self._loss_value(loss)
        variables = self._var_list(params)
        grads = self._gradients(value, variables, None)
        for i, (g, v) in enumerate(zip(grads, variables)):
            if g is None:
                raise ValueError(f"Variable {_describe(v, i)} has `None` for gradient. Please make sure that all of "
                                 "your ops have a gradient defined (i.e. are differentiable). Common ops without "
                                 "gradient: K.argmax, K.round, K.eval.")
        return grads  # type: ignore[return-value]

    # ------------------------------------------------------------------ config
    _NOT_IN_CONFIG = ("params", "lr", "rho", "eps", "decay", "seed", "initial_lr")
    #: Keys our get_config writes and tf.keras' never does: they tell our configs from Keras' ones.
    _OUR_CONFIG_KEYS = ("weight_decay", "state_dtype", "fused", "maximize")

    def get_config(self) -> dict[str, Any]:
        """Keras' keys (name, clip values when set, learning_rate, decay, rho, epsilon), then ours.

        JSON-serialisable: a tensor lr becomes a float, dtypes their names, a schedule
        ``{"class_name", "config"}``. Values are the first param group's (Keras has one).
        """
        g0 = self.param_groups[0]
        config: dict[str, Any] = {"name": self.name}
        for k in ("clipnorm", "clipvalue", "global_clipnorm"):
            if getattr(self, k) is not None:
                config[k] = _plain(getattr(self, k))
        config["learning_rate"] = (serialize_schedule(self._lr_schedule) if self._lr_schedule is not None
                                   else _plain(g0["lr"]))
        config["decay"] = _plain(g0.get("decay", 0.0))
        config["rho"] = _plain(g0["rho"])
        config["epsilon"] = _plain(g0["eps"])
        for k in self.defaults:
            if k not in self._NOT_IN_CONFIG:
                config[k] = _plain(g0.get(k, self.defaults[k]))
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], custom_objects: Optional[Mapping[str, Any]] = None) -> Any:
        """An optimizer (with no parameters yet) from :meth:`get_config`'s dict or tf.keras Adadelta's.

        ``lr`` is renamed ``learning_rate``; a dict learning rate is a schedule (``custom_objects``
        resolves its class name); dtype names become dtypes.
        """
        keras3_keys = [k for k in _KERAS3_ONLY_KEYS if k in config]
        if keras3_keys:
            raise TypeError(
                f"this is a Keras 3 optimizer config (it has {keras3_keys}); triton_adadelta.Adadelta speaks "
                "tf.keras 2's API. For Keras 3 (KERAS_BACKEND=torch) use "
                "triton_adadelta.keras3.Adadelta.from_config(config)")
        config = dict(config)
        config.pop("is_legacy_optimizer", None)
        if "lr" in config:
            config["learning_rate"] = config.pop("lr")
        if isinstance(config.get("learning_rate"), Mapping):
            config["learning_rate"] = deserialize_schedule(config["learning_rate"], custom_objects)
        if isinstance(config.get("state_dtype"), str):
            config["state_dtype"] = dtype_from_name(config["state_dtype"])
        if "epsilon" in config and "eps" not in config:
            if any(k in config for k in cls._OUR_CONFIG_KEYS):
                config["eps"] = config.pop("epsilon")  # our config holds the resolved eps, which may be 0
            elif not config["epsilon"]:
                config["epsilon"] = 0.0  # Keras' config: `epsilon or 1e-7` (None or 0 mean 1e-7)
        return cls(**config)
