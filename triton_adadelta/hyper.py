"""The numbers of a step: each group's learning rate (schedule and decay at ``iterations``), the one
hyperparameter row every path reads, GradScaler's tensors and the non-finite skip flag.

One row per param group, float32, the same columns for the Triton kernel (``kernels/adadelta.py``,
``HYPER_*``), the C source (``kernels/adadelta_cpu.c``, ``H_*``) and the PyTorch path (which reads
the group itself)::

    lr, rho, 1 - rho, eps, weight_decay, sign (-1 to maximize), seed, clip_value (+inf: none)

GradScaler's scale is not a column: it is one value per step, read from a device tensor by the
kernel and from a pointer by the C function.

Nothing here reads a device tensor on the host: a device lr, ``found_inf`` and the skip counter
stay on the device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from . import validation
from .backends.tables import record_use, refuse_during_capture, upload, upload_into
from .schedules import schedule_value
from .shards import is_dtensor, local

__all__ = ["COLUMNS", "NUM_COLUMNS", "Iterations", "HyperTables", "row", "group_lr", "scaler_tensors",
           "nonfinite_found_inf"]

#: The hyperparameter row, one per param group (kernels/adadelta.py HYPER_*, kernels/adadelta_cpu.c H_*).
COLUMNS = ("lr", "rho", "one_minus_rho", "eps", "weight_decay", "sign", "seed", "clip_value")
NUM_COLUMNS = len(COLUMNS)


def row(group: dict[str, Any], lr: float, clip_value: Optional[float]) -> list[float]:
    """``group``'s row of the hyperparameter table (:data:`COLUMNS`); ``lr`` is the step's float lr.

    1 - rho is rounded once from float64, as torch does; the seed (below 2**24) is exact in float32.
    """
    rho = float(group["rho"])
    return [float(lr), rho, 1.0 - rho, float(group["eps"]), float(group["weight_decay"]),
            -1.0 if group["maximize"] else 1.0, float(group["seed"]),
            math.inf if clip_value is None else float(clip_value)]


class Iterations:
    """Keras' ``iterations``: steps that updated something (a step skipped by ``found_inf`` does not count).

    ``tensor`` is a 0-d int64 tensor on the parameters' device, incremented on the device; ``host`` is
    its value while known without a synchronisation (None when only the device knows it). A change
    the user makes in place (``fill_``) is noticed through the tensor's version counter.
    """

    def __init__(self, tensor: Tensor, host: Optional[int] = 0) -> None:
        self.tensor = tensor
        self.host = host
        self.version = tensor._version

    def count(self, capturable: bool = False) -> Union[int, Tensor]:
        """The count as a host int when known without a synchronisation, else the device tensor
        (always the tensor under ``capturable``: a CUDA graph replays device reads, never a host number)."""
        it = self.tensor
        if it._version != self.version:  # changed in place by the user (fill_, zero_, ...)
            self.host = int(it) if it.device.type == "cpu" else None
            self.version = it._version
        if capturable:
            return it
        if self.host is not None:
            return self.host
        return int(it) if it.device.type == "cpu" else it

    def set(self, value: int) -> None:
        with torch.no_grad():
            self.tensor.fill_(value)
        self.host = value
        self.version = self.tensor._version

    def move_to(self, device: torch.device) -> None:
        self.count()
        self.tensor = self.tensor.to(device)
        self.version = self.tensor._version

    def advance(self, found_inf: Optional[Tensor], capturable: bool) -> None:
        """+= 1 on the device; by 0 when ``found_inf`` is set (no host read of a device value either way)."""
        it = self.tensor
        if capturable:
            # capturable promises no host read of a tensor, even of a CPU one (on a device it is a
            # synchronisation, and a CUDA graph would replay a stale number): count on the device only.
            it.add_(1 if found_inf is None else (found_inf.to(it.device).reshape(()) == 0).to(it.dtype))
            self.host = None
            self.version = it._version
            return
        self.count()  # notice a user's in-place change before counting on the host copy
        if found_inf is None:
            it.add_(1)
            if self.host is not None:
                self.host += 1
        else:
            flag = found_inf.to(it.device, non_blocking=it.device.type != "cpu").reshape(())
            it.add_((flag == 0).to(it.dtype))
            self.host = None if it.device.type != "cpu" else int(it)
        self.version = it._version


def group_lr(group: dict[str, Any], iterations: Iterations, schedule: Optional[Callable] = None,
             takes_step: bool = True, zeroed: bool = False) -> Union[float, Tensor]:
    """The learning rate of this step for ``group``: ``lr`` (or ``schedule(iterations)``; a Keras
    zero-argument callable when not ``takes_step``) divided by ``1 + decay * iterations``; 0 when
    ``zeroed`` (a first step with every lr set to 0, see Adadelta.step)."""
    decay = group.get("decay", 0.0)
    if schedule is None and not decay:
        return group["lr"]
    if zeroed:
        return 0.0
    step = iterations.count(bool(group.get("capturable")))
    lr = group["lr"] if schedule is None else schedule_value(schedule, step, takes_step)
    if decay:
        lr = lr / (1 + decay * step)
    return lr


class HyperTables:
    """The hyperparameter table of each device, kept between steps and rewritten only when a value changed."""

    def __init__(self) -> None:
        self._tables: dict[torch.device, tuple[list, Tensor, set]] = {}

    def clear(self) -> None:
        self._tables.clear()

    def table(self, device: torch.device, groups: list[dict[str, Any]], lrs: list[Union[float, Tensor]],
              clip_value: Optional[float]) -> Tensor:
        """[G, NUM_COLUMNS] float32 on ``device``: the rows of ``groups`` with this step's ``lrs``.

        A tensor lr on ``device`` is copied into the table on the device (no synchronisation); a CPU lr
        for CPU parameters is cheaper read on the host, except under capturable, which promises no
        host read of a tensor at all.
        """
        rows, tensor_lrs = [], []
        for i, (group, lr) in enumerate(zip(groups, lrs)):
            if isinstance(lr, Tensor):
                if lr.device == device and (device.type != "cpu" or group["capturable"]):
                    tensor_lrs.append((i, lr))
                    lr = 0.0
                else:
                    lr = float(lr)
            rows.append(row(group, lr, clip_value))
        cached = self._tables.get(device)
        if cached is None or len(cached[0]) != len(rows):
            cached = self._tables[device] = (rows, upload(torch.tensor(rows, dtype=torch.float32), device), set())
        elif cached[0] != rows:
            # Rewritten in place: a CUDA graph captured earlier keeps reading a live buffer.
            refuse_during_capture(device, "a hyperparameter (rho, eps, weight_decay, maximize or a float lr) changed")
            upload_into(cached[1], torch.tensor(rows, dtype=torch.float32))
            cached = self._tables[device] = (rows, cached[1], cached[2])
        table = cached[1]
        record_use(cached[2], (table,), device)
        if tensor_lrs:
            with torch.no_grad():  # (step() runs without autograd already; this keeps any caller so)
                for i, lr in tensor_lrs:  # a device lr is read on the device: no synchronisation
                    table[i, 0].copy_(lr.reshape(()))
        return table


def scaler_tensors(device: torch.device, grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """GradScaler's scale and inf flag as float32 [1] tensors on ``device`` (1 and 0 where absent).

    A scaler may live on another device than some parameters (model parallel): the copies are
    non-blocking device-to-device transfers, never a host read.
    """
    def on(t: Optional[Tensor], fill: float) -> Tensor:
        if t is None:
            return torch.full((1,), fill, dtype=torch.float32, device=device)
        return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)

    return on(grad_scale, 1.0), on(found_inf, 0.0)


def nonfinite_found_inf(grads: list[Tensor], found_inf: Optional[Tensor],
                        counter: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(found_inf of this step, the skip counter advanced by it): the flag is 1.0 when any gradient is
    non-finite (or ``found_inf`` is set), on the first gradient's device.

    Everything stays on the device: the flag feeds the same skip that GradScaler's found_inf drives
    (the kernel exits early, step counts are not advanced). Sharded gradients: every rank takes the
    same decision (a MAX all-reduce over their meshes), or the replicas would diverge.
    """
    device = local(grads[0]).device
    bad = validation.nonfinite_flag([local(g) for g in grads], device)
    meshes = {id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}
    if meshes:
        import torch.distributed as dist

        flag = bad.to(torch.int32).reshape(1)
        for mesh in meshes.values():
            for dim in range(mesh.ndim):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        bad = flag.reshape(()) != 0
    if found_inf is not None:
        bad = bad | (found_inf.to(device).reshape(()) != 0)
    if counter is None:
        counter = torch.zeros((), dtype=torch.int64, device=device)
    elif counter.device != device:
        counter = counter.to(device)
    counter.add_(bad)
    return bad.to(torch.float32), counter


def device_lr(group: dict[str, Any]) -> None:
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
    wide = any(p.dtype in (torch.float64, torch.complex128) for p in group["params"])
    dtype = torch.float64 if wide else torch.float32
    if isinstance(lr, Tensor):
        group["lr"] = lr.detach().to(device=device, dtype=dtype, copy=True).reshape(())
    else:
        group["lr"] = torch.tensor(float(lr), dtype=dtype, device=device)
