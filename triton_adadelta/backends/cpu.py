"""The fused CPU backend: the members route.path_of sent to the CPU path, one C call per dtype combination.

A :class:`CpuPlan` is this path's share of a step: which members it updates and their call tables,
kept between steps. A table row is fixed but for the parameter's and the gradient's addresses, which
:meth:`CpuPlan.run` rewrites every step (gradients are usually new tensors, and ``p.data = ...``
moves a parameter). The route makes a new plan whenever the flat state, the tensors' metadata or
``cpu_fused.settings()`` change. Step counts of updated tensors are incremented in the C call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from .. import cpu_fused
from ..clipping import GradientTransform, clip_table

__all__ = ["CpuPlan"]

_CPU = torch.device("cpu")


class CpuCall(NamedTuple):
    """One C call: the function of a dtype combination, its members, their table and its numpy view."""

    fn: Any
    members: list[int]
    table: Tensor  # int64 [T, 7]: p, g, square_avg, acc_delta, numel, hyperparameter row, step
    view: Any  # numpy view of ``table``: the addresses are rewritten through it each step


class CpuPlan:
    """The C calls for ``indices`` (members of the step, route.Member) with state entries in ``state``."""

    def __init__(self, members: Sequence[Any], indices: Sequence[int], state: Mapping[Tensor, dict]) -> None:
        self.calls: list[CpuCall] = []
        chosen: dict[tuple, list] = defaultdict(list)
        total = 0
        for i in indices:
            m = members[i]
            st = state[m.param]
            slot = cpu_fused.slot(m.param, m.param.grad, st)
            if slot is not None:
                chosen[(slot[0].dtype, slot[1].dtype, slot[2].dtype)].append((i, slot, m.group_index, st["step"]))
                total += slot[0].numel()
        self.everything = list(indices)
        self.rest = self.everything  # until calls are made
        if not chosen or total < cpu_fused.MIN_NUMEL or not cpu_fused.available():
            return
        try:
            functions = cpu_fused.library().functions
        except cpu_fused.BuildError as exc:
            cpu_fused.fail(exc)
            return
        for key, items in chosen.items():
            fn = functions.get(key)
            if fn is None:  # float16 where the compiler has no _Float16
                continue
            table = torch.tensor(
                [[0, 0, v.data_ptr(), u.data_ptr(), p.numel(), r, s.data_ptr()] for _, (p, _, v, u), r, s in items],
                dtype=torch.int64,
            )
            self.calls.append(CpuCall(fn, [it[0] for it in items], table, table.numpy()))
        taken = {i for call in self.calls for i in call.members}
        self.rest = [i for i in self.rest if i not in taken]

    def run(self, members: Sequence[Any], grads: Sequence[Tensor], hyper: Tensor,
            coefs: Optional[GradientTransform], grad_scale: Optional[Tensor],
            found_inf: Optional[Tensor]) -> list[int]:
        """Update this plan's members (``grads[i]``: member ``i``'s gradient; ``hyper``: the step's CPU
        hyperparameter table, a row per group); return the indices it leaves to the PyTorch path (all
        of them when the path is not available now). With ``found_inf`` set nothing is updated: the
        flag of CPU tensors is read on the host (no device involved)."""
        if not self.calls or not cpu_fused.available():
            return self.everything
        if found_inf is not None and bool(found_inf.to(_CPU).reshape(()) != 0):
            return []
        for fn, idx, table, view in self.calls:
            # Complex tensors start where their real views do: the addresses are the same.
            view[:, 0] = [members[i].param.data_ptr() for i in idx]
            view[:, 1] = [grads[i].data_ptr() for i in idx]
            cpu_fused._call(fn, table, hyper, None if coefs is None else clip_table(coefs, idx, _CPU), None,
                            grad_scale)
        return self.rest
