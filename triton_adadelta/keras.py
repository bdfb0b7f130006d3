"""The Keras (OptimizerV2) interface of :class:`triton_adadelta.Adadelta`.

:class:`KerasOptimizerMixin` holds everything Keras-shaped: the ``learning_rate``/``epsilon``
aliases and Keras' keyword arguments (clipnorm, clipvalue, global_clipnorm, decay), ``iterations``,
slots and weights, ``apply_gradients``/``minimize``/``get_gradients`` and ``get_config``/
``from_config``. The Adadelta class inherits it; the update, the learning rate at ``iterations`` and
the clipping are the optimizer's (optimizer.py, hyper.py, clipping.py). The mixin talks to the
optimizer through the public interface :class:`KerasHost` lists; schedules are in schedules.py.

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

import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from . import clipping
from .schedules import (  # noqa: F401  (re-exported: pickles and configs name them here)
    SCHEDULES,
    ExponentialDecay,
    InverseTimeDecay,
    LearningRateSchedule,
    as_float,
    deserialize_schedule,
    is_schedule,
    schedule_value,
    serialize_schedule,
)
from .validation import check_hyperparameters, check_nonnegative, whole_number

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


# --------------------------------------------------------------------------------------------- arguments
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
    clips = {k: check_nonnegative(k, v) for k, v in
             (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm))}
    decay = check_nonnegative("decay", decay) or 0.0
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
    if is_schedule(lr):
        schedule = lr
        lr = as_float(schedule_value(schedule, 0))
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
    iterations = whole_number("loaded state dict, keras iterations", entry.get("iterations", 0))
    names = entry.get("slot_names", [])
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError("loaded state dict's keras slot_names must be a list of strings")
    bad = [n for n in names if n in _RESERVED or n in SLOT_NAMES]
    if bad:
        raise ValueError(f"loaded state dict's keras slot_names include reserved names {bad}")
    opt._pending_keras = (iterations, list(names))
    return state_dict


def _state_dict_post_hook(opt: Any, state_dict: dict[str, Any]) -> None:
    """Add ``"keras"``: ``{"iterations": 0-d int64 tensor, "slot_names": [...]}`` to a state_dict.

    torch.optim.Adadelta ignores the extra entry when it loads the dict.
    """
    state_dict["keras"] = {"iterations": opt.iterations.detach().clone(), "slot_names": list(opt._user_slot_names)}


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


def _step_post_hook(opt: Any, args: Any, kwargs: Any) -> None:
    """After a step: Keras' slot record takes the variables whose state the step created (state changes
    only when state is made, so an ordinary step pays one comparison), and add_slot's unclaimed slots
    are claimed."""
    opt._unclaimed_slots.clear()
    token = (id(opt.state), opt.state.version)
    if token != opt._slot_log_token:
        opt._log_new_slots([p for g in opt.param_groups for p in g["params"]
                            if p.grad is not None and opt.state.get(p)])
        opt._slot_log_token = (id(opt.state), opt.state.version)


# --------------------------------------------------------------------------------------------- the mixin
# Keys that only Keras 3's optimizer configs have (its base Optimizer writes them all).
_KERAS3_ONLY_KEYS = ("use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
                     "gradient_accumulation_steps")


class KerasHost(Protocol):
    """What the Keras layer uses of the optimizer it is mixed into: torch's contract, plus the public
    ``iterations``, ``lr_schedule``, ``clipping`` (a :class:`clipping.ClipSettings`) and :meth:`init_state`
    of :class:`triton_adadelta.Adadelta`, which extends the mixin's :meth:`state_names` with its own."""

    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]
    clipping: clipping.ClipSettings
    lr_schedule: Optional[Callable]
    iterations: Any

    def add_param_group(self, param_group: dict[str, Any]) -> None: ...

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any: ...

    def init_state(self, params: list[Tensor]) -> None: ...

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any: ...

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any: ...

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any: ...

    def register_step_post_hook(self, hook: Callable) -> Any: ...


def _clip_property(name: str, doc: str) -> property:
    """A Keras clip attribute of the optimizer's :class:`clipping.ClipSettings` (checked when set)."""

    def get(self: Any) -> Optional[float]:
        return getattr(self.clipping, name)

    def set_(self: Any, value: Optional[float]) -> None:
        self.clipping.set(name, value)

    return property(get, set_, doc=doc)


class KerasOptimizerMixin(KerasHost if TYPE_CHECKING else object):
    """Keras' OptimizerV2 API on a torch optimizer with Adadelta's state (``square_avg``, ``acc_delta``).

    The host class calls :meth:`_keras_init` after ``torch.optim.Optimizer.__init__``; from then on the
    mixin uses only :class:`KerasHost`'s members, and the host never calls the mixin.
    """

    _PICKLED = ("name", "_slot_log", "_user_slot_names")

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

    def _keras_init(self, *, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.name = name
        self._slot_log: list[tuple[Tensor, str]] = []
        self._user_slot_names: list[str] = []
        self._keras_transient()

    def _keras_transient(self) -> None:
        """Attributes that are rebuilt rather than copied (id-keyed sets, hooks)."""
        self._slot_logged = {id(p) for p, n in self._slot_log if n == "accum_grad"}
        self._slot_log_token: tuple = ()
        #: (id(var), slot) of Adadelta slots that exist only because add_slot made the other one: Keras
        #: would still create them from a later add_slot's initializer. Cleared by a step.
        self._unclaimed_slots: set[tuple[int, str]] = set()
        self._pending_keras: Optional[tuple] = None
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)
        # Our entry joins state_dict() before any post-hook of the user's runs, so those hooks see it.
        self.register_state_dict_post_hook(_state_dict_post_hook, prepend=True)
        self.register_step_post_hook(_step_post_hook)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for k in self._PICKLED:
            state[k] = self.__dict__.get(k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("name", "Adadelta")
        if self.__dict__.get("_slot_log") is None:
            self._slot_log = []
        if self.__dict__.get("_user_slot_names") is None:
            self._user_slot_names = []
        self._keras_transient()

    # ------------------------------------------------------------------ hyperparameters as attributes
    def _set_all(self, key: str, value: Any) -> None:
        for g in self.param_groups:
            g[key] = value
        self.defaults[key] = value

    @property
    def learning_rate(self) -> Any:
        """The schedule when there is one, else the first group's lr. Setting it sets every group's."""
        return self.lr_schedule if self.lr_schedule is not None else self.param_groups[0]["lr"]

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if is_schedule(value):
            lr = as_float(schedule_value(value, 0))
            check_hyperparameters(lr=lr)
            self.lr_schedule = value
        else:
            check_hyperparameters(lr=value)
            self.lr_schedule = None
            lr = value
        self._set_all("lr", lr)

    lr = learning_rate

    @property
    def rho(self) -> float:
        """The first group's rho (Keras' one value); setting it sets every group's, validated."""
        return self.param_groups[0]["rho"]

    @rho.setter
    def rho(self, value: float) -> None:
        check_hyperparameters(rho=value)
        self._set_all("rho", value)

    @property
    def epsilon(self) -> float:
        """Keras' name for eps: the first group's; setting it sets every group's, validated."""
        return self.param_groups[0]["eps"]

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        check_hyperparameters(eps=value)
        self._set_all("eps", value)

    @property
    def decay(self) -> float:
        """Keras' time decay: ``lr_t = lr / (1 + decay * iterations)``; setting it sets every group's."""
        return self.param_groups[0].get("decay", 0.0)

    @decay.setter
    def decay(self, value: float) -> None:
        self._set_all("decay", check_nonnegative("decay", value) or 0.0)

    clipnorm = _clip_property("clipnorm", "Per-tensor norm clip: ``g * c / max(||g||, c)``.")
    clipvalue = _clip_property("clipvalue", "Element clip: ``clamp(g, -c, c)``, before any norm clip.")
    global_clipnorm = _clip_property(
        "global_clipnorm", "Norm clip over all tensors: ``g * c * min(1 / G, 1 / c)``, G the global norm.")

    def state_names(self, group: dict[str, Any], p: Tensor) -> tuple[set[str], set[str]]:
        """(required, allowed) names of Keras' own per-parameter state: none required; add_slot's user
        slots allowed (those known, and those a loading dict declares). The optimizer adds its names."""
        allowed = set(self._user_slot_names)
        if self._pending_keras is not None:
            allowed.update(self._pending_keras[1])
        return set(), allowed

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
        first = self.param_groups[0]
        count = len(self.param_groups)
        settings = {k: v for k, v in first.items() if k not in ("params", "initial_lr")}
        try:
            self.add_param_group({"params": list(new_vars), **settings})
        except BaseException:
            del self.param_groups[count:]
            raise
        added = self.param_groups.pop()
        first["params"].extend(added["params"])

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
        return [self.iterations] + [t for _, _, t in self._slot_entries()]

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
        iterations = whole_number("iterations (the first weight)", values[0])
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
            self.init_state([var])
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
            return self.iterations
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
            self.step()
        except BaseException:
            del self._slot_log[log_length:]
            self._slot_logged = {id(p) for p, n in self._slot_log if n == "accum_grad"}
            if not any(self.state.get(v) for v in adopted):  # refused before it wrote: unknown again
                del self.param_groups[0]["params"][first_length:]
            raise
        finally:
            for p, g in zip(everything, saved):
                p.grad = g
        return self.iterations

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
        return [g for g in grads if g is not None]  # all of them, checked above

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
        config["learning_rate"] = (serialize_schedule(self.lr_schedule) if self.lr_schedule is not None
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
