"""Learning-rate schedules: Keras' decay schedules, their configs, and how a step calls a schedule."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

__all__ = ["LearningRateSchedule", "ExponentialDecay", "InverseTimeDecay", "SCHEDULES", "serialize_schedule",
           "deserialize_schedule", "is_schedule", "takes_step", "schedule_value", "as_float"]


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


def is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, (Tensor, numbers.Number))


def takes_step(schedule: Callable) -> bool:
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
                   with_step: Optional[bool] = None) -> Union[float, Tensor]:
    """The learning rate a schedule (or a Keras zero-argument callable) gives at ``step``;
    ``with_step``: :func:`takes_step` of it, when the caller keeps it (the signature is slow to read)."""
    return schedule(step) if (takes_step(schedule) if with_step is None else with_step) else schedule()


def as_float(value: Union[float, Tensor]) -> float:
    return float(value.reshape(())) if isinstance(value, Tensor) else float(value)
