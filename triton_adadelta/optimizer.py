"""The Adadelta optimizer: param groups, flat state, validation and the dispatch of step()."""

from __future__ import annotations

import random
from collections import defaultdict
from copy import deepcopy
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from . import _triton
from .buckets import FlatState, LaunchPlan, StateKey, upload
from .reference import adadelta_update_, real_view

__all__ = ["Adadelta"]

_KERNEL_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 2048
_NUM_WARPS = 4


def _real_dtype(p: Tensor) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(p.dtype, p.dtype)


def _triton_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class Adadelta(torch.optim.Optimizer):
    r"""Adadelta with flat state and a fused multi-tensor Triton update.

    A drop-in for :class:`torch.optim.Adadelta`: same arguments, defaults, validation, results
    and ``state_dict`` layout (``step``, ``square_avg``, ``acc_delta`` per parameter). The state
    lives in flat buffers, one per (device, parameter dtype, state dtype), and ``state[p]`` holds
    views into them.

    Args beyond torch's:
        fused: ``None`` picks the Triton kernel for CUDA tensors (and CPU tensors under
            ``TRITON_INTERPRET=1``), the PyTorch path otherwise; ``True`` insists on the kernel;
            ``False`` never uses it.
        state_dtype: dtype of square_avg and acc_delta; float32 by default for every parameter
            dtype (bf16 parameters with fp32 state). ``None`` means the parameter's dtype, as torch.
            float64 and complex parameters always keep state of their own precision.
        stochastic_rounding: write bf16 parameters and 16-bit state with unbiased stochastic rounding.
        master_weights: keep a float32 copy of bf16/fp16 parameters in the state and update that.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: Optional[bool] = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = torch.float32,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None:
        self._check_hyperparameters(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if state_dtype is not None and state_dtype not in _KERNEL_STATE_DTYPES + (torch.float64,):
            raise TypeError(f"state_dtype must be a floating point dtype or None, got {state_dtype}")
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
            seed=random.Random(torch.initial_seed()).randrange(1 << 24),
        )
        self._flats: dict[StateKey, FlatState] = {}
        self._plans: dict[tuple, LaunchPlan] = {}
        self._hyper: dict[torch.device, tuple[list, Tensor]] = {}
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- validation
    @staticmethod
    def _check_hyperparameters(**hp: Any) -> None:
        """torch.optim.Adadelta's checks and messages."""
        lr = hp.get("lr", 0.0)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= hp.get("rho", 0.0) <= 1.0:
            raise ValueError(f"Invalid rho value: {hp['rho']}")
        if not 0.0 <= hp.get("eps", 0.0):
            raise ValueError(f"Invalid epsilon value: {hp['eps']}")
        if not 0.0 <= hp.get("weight_decay", 0.0):
            raise ValueError(f"Invalid weight_decay value: {hp['weight_decay']}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_hyperparameters(**{k: param_group[k] for k in ("lr", "rho", "eps", "weight_decay")
                                       if k in param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["fused"]:
            for p in group["params"]:
                if not _triton.kernel_device_ok(p.device):
                    if not _triton.HAS_TRITON:
                        why = "triton is not installed"
                    else:
                        why = "set TRITON_INTERPRET=1 to run the kernel on CPU tensors"
                    raise RuntimeError(
                        f"`fused=True` requires CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                        f"got a parameter on {p.device}: {why}"
                    )
        self._plans.clear()
        self._hyper.clear()

    # ----------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_flats"] = self._flats
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_flats", {})
        self._plans = {}
        self._hyper = {}
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        for flat in self._flats.values():
            flat.rebind(self.state)

    # ----------------------------------------------------------------------------- state
    def _state_key(self, group: dict[str, Any], p: Tensor) -> StateKey:
        real = _real_dtype(p)
        sdt = group["state_dtype"]
        if sdt is None or p.is_complex() or real == torch.float64:
            sdt = real
        master = bool(group["master_weights"]) and real in (torch.bfloat16, torch.float16)
        return StateKey(p.device, real, sdt, master)

    def _flat_of(self, p: Tensor) -> Optional[FlatState]:
        for flat in self._flats.values():
            if p in flat:
                return flat
        return None

    def _ensure_state(self, group_params: list[tuple[dict, list[Tensor]]]) -> None:
        """Give every listed parameter without state a zeroed segment in its flat state."""
        new: dict[StateKey, list[Tensor]] = defaultdict(list)
        for group, params in group_params:
            for p in params:
                if len(self.state.get(p, {})) == 0:
                    new[self._state_key(group, p)].append(p)
        for key, params in new.items():
            flat = self._flats.get(key)
            if flat is None:
                flat = self._flats[key] = FlatState(key)
            flat.add(params)
            flat.rebind(self.state)

    # ----------------------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict written by this class or by torch.optim.Adadelta.

        Saved tensors are copied into the flat buffers (cast to their state dtype), which stay flat.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
        id_map = {
            old_id: p for g, sg in zip(groups, saved_groups) for old_id, p in zip(sg["params"], g["params"])
        }
        saved_state = state_dict["state"]
        for k in saved_state:
            if k not in id_map:
                raise ValueError(f"loaded state dict has state for an unknown parameter index {k}")

        new_groups = []
        for g, sg in zip(groups, saved_groups):
            merged = dict(g)
            merged.update({k: v for k, v in sg.items() if k != "params"})
            new_groups.append(merged)
        group_of = {id(p): g for g in new_groups for p in g["params"]}

        # Build the new state first: a failure above or here leaves the optimizer as it was.
        self.state = defaultdict(dict)
        self._flats = {}
        self._plans.clear()
        self._hyper.clear()
        self.param_groups = new_groups
        with torch.no_grad():
            loaded = [(k, id_map[k], v) for k, v in saved_state.items()]
            by_group: dict[int, list[Tensor]] = defaultdict(list)
            for _, p, _ in loaded:
                by_group[id(group_of[id(p)])].append(p)
            self._ensure_state([(g, by_group[id(g)]) for g in new_groups if by_group[id(g)]])
            for _, p, saved in loaded:
                st = self.state[p]
                for name, value in saved.items():
                    if name in ("square_avg", "acc_delta", "master", "step") and name in st:
                        st[name].copy_(value.detach())
                    else:
                        st[name] = deepcopy(value)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ----------------------------------------------------------------------------- step
    def _group_lr(self, group: dict[str, Any]) -> Union[float, Tensor]:
        """The learning rate of this step for ``group`` (the Keras layer adds decay and schedules)."""
        return group["lr"]

    def _use_kernel(self, group: dict[str, Any], p: Tensor, g: Tensor) -> bool:
        fused = group["fused"]
        if fused is False or group["differentiable"] or not _triton.kernel_device_ok(p.device):
            return False
        if _real_dtype(p) not in _KERNEL_PARAM_DTYPES or g.dtype not in (p.dtype, torch.float32):
            return False
        if p.is_complex() and g.dtype != p.dtype:
            return False
        if self._state_key(group, p).state_dtype not in _KERNEL_STATE_DTYPES:
            return False
        return p.is_contiguous() and g.is_contiguous() and g.device == p.device

    @torch.no_grad()
    def _hyper_table(self, device: torch.device) -> Tensor:
        """[G, 7] float32 on ``device``: lr, rho, 1 - rho, eps, weight_decay, sign, seed of every group."""
        rows, tensor_lrs = [], []
        for i, group in enumerate(self.param_groups):
            lr = self._group_lr(group)
            if isinstance(lr, Tensor):
                if lr.device == device and device.type != "cpu":
                    tensor_lrs.append((i, lr))
                    lr = 0.0
                else:
                    lr = float(lr)
            rows.append([float(lr), float(group["rho"]), 1.0 - float(group["rho"]), float(group["eps"]),
                         float(group["weight_decay"]),
                         -1.0 if group["maximize"] else 1.0, float(group["seed"])])
        cached = self._hyper.get(device)
        if cached is None or cached[0] != rows:
            table = upload(torch.tensor(rows, dtype=torch.float32), device)
            self._hyper[device] = (rows, table)
        table = self._hyper[device][1]
        for i, lr in tensor_lrs:  # a device lr is read on the device: no synchronisation
            table[i, 0].copy_(lr.reshape(()))
        return table

    def _grad_transforms(
        self, params: list[Tensor], grads: list[Tensor]
    ) -> Optional[list[Tensor]]:
        """Per-tensor gradient multipliers (clipping) as 0-d tensors, or None for none at all."""
        return None

    def _after_step(self, found_inf: Optional[Tensor]) -> None:
        """Called once after every step() that updated something."""

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

        entries: list[tuple[int, dict, Tensor, Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adadelta does not support sparse gradients")
                entries.append((gi, group, p, p.grad))
        if not entries:
            return loss
        self._ensure_state(
            [(group, [p for _, gg, p, _ in entries if gg is group]) for group in self.param_groups]
        )
        coefs = self._grad_transforms([e[2] for e in entries], [e[3] for e in entries])

        if any(group["differentiable"] for group in self.param_groups):
            with torch.enable_grad():
                self._step_torch(entries, coefs, grad_scale, found_inf)
        else:
            kernel_entries, torch_entries = [], []
            for i, e in enumerate(entries):
                (kernel_entries if self._use_kernel(e[1], e[2], e[3]) else torch_entries).append((i, e))
            if kernel_entries:
                self._step_kernel(kernel_entries, coefs, grad_scale, found_inf)
            if torch_entries:
                self._step_reference(torch_entries, coefs, grad_scale, found_inf)
        self._after_step(found_inf)
        return loss

    def _step_torch(self, entries, coefs, grad_scale, found_inf) -> None:
        """differentiable=True: torch's own functional Adadelta, so autograd sees every operation."""
        from torch.optim.adadelta import adadelta

        for i, (_, group, p, g) in enumerate(entries):
            st = self.state[p]
            g = g if coefs is None else g * coefs[i]
            adadelta([p], [g], [st["square_avg"]], [st["acc_delta"]], [st["step"]],
                     lr=self._group_lr(group), rho=group["rho"], eps=group["eps"],
                     weight_decay=group["weight_decay"], maximize=group["maximize"],
                     foreach=False, differentiable=True, capturable=False)

    def _step_reference(self, indexed_entries, coefs, grad_scale, found_inf) -> None:
        """The PyTorch path: the reference update, tensor by tensor."""
        # A GradScaler step with inf gradients changes nothing; this is the PyTorch path's one host
        # read (the kernel path needs none).
        if found_inf is not None and bool(found_inf.reshape(()) != 0):
            return
        for i, (_, group, p, g) in indexed_entries:
            st = self.state[p]
            lr = self._group_lr(group)
            generator = None
            if group["stochastic_rounding"]:
                generator = torch.Generator(device=p.device)
                flat = self._flat_of(p)
                generator.manual_seed(
                    (int(group["seed"]) * 16777259 + int(st["step"])) * 1000003 + flat.offsets[flat.index[id(p)]]
                )
            adadelta_update_(
                p, g, st["square_avg"], st["acc_delta"],
                lr=float(lr) if isinstance(lr, Tensor) else lr,
                rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"],
                maximize=group["maximize"], grad_scale=grad_scale,
                clip_coef=None if coefs is None else coefs[i],
                master=st.get("master"), stochastic_rounding=group["stochastic_rounding"], generator=generator,
            )
            st["step"].add_(1)

    def _step_kernel(self, indexed_entries, coefs, grad_scale, found_inf) -> None:
        """The fused path: one launch per (flat state, gradient dtype)."""
        buckets: dict[tuple, list] = defaultdict(list)
        for i, (gi, group, p, g) in indexed_entries:
            flat = self._flat_of(p)
            # Groups share a launch; only the stochastic-rounding switch (a compile-time branch) splits one.
            buckets[(flat.key, _real_dtype(g), bool(group["stochastic_rounding"]))].append((i, gi, group, p, g))
        kernel = _triton.adadelta_kernel()
        for (key, gdtype, stochastic), items in buckets.items():
            flat = self._flats[key]
            params = [it[3] for it in items]
            grads = [real_view(it[4]) for it in items]
            plan_key = (key, gdtype, stochastic, tuple(id(p) for p in params), tuple(it[1] for it in items))
            plan = self._plans.get(plan_key)
            if plan is None:
                plan = self._plans[plan_key] = LaunchPlan(flat, params, [it[1] for it in items], _BLOCK)
            vec = 16 // min(key.param_dtype.itemsize, gdtype.itemsize)
            pointers = plan.refresh_pointers([real_view(p) for p in params], grads, vec)
            hyper = self._hyper_table(key.device)
            has_clip = coefs is not None
            clip = torch.stack([coefs[it[0]] for it in items]).to(torch.float32) if has_clip else hyper
            has_scaler = grad_scale is not None or found_inf is not None
            scale = grad_scale if grad_scale is not None else torch.ones((), device=key.device)
            inf = found_inf if found_inf is not None else torch.zeros((), device=key.device)
            master = flat.master if flat.master is not None else flat.square_avg
            kernel[(plan.num_chunks,)](
                pointers, plan.tensor_meta, plan.chunk_tensor, plan.chunk_block,
                flat.square_avg, flat.acc_delta, master, flat.steps, hyper, clip,
                scale.to(torch.float32) if has_scaler else hyper, inf.to(torch.float32) if has_scaler else hyper,
                plan.num_tensors,
                P_DTYPE=_triton_dtype(key.param_dtype), G_DTYPE=_triton_dtype(gdtype),
                BLOCK=_BLOCK, VEC=vec, HAS_CLIP=has_clip, HAS_SCALER=has_scaler,
                MASTER=flat.master is not None, STOCHASTIC=stochastic,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=False,  # no FMA contraction: the same rounding as torch's operations
            )
            plan.increment_steps(found_inf)
