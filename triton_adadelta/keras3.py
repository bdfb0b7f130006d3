"""Keras 3 on the torch backend: ``model.compile(optimizer=Adadelta(...))`` runs the fused update.

:class:`Adadelta` is a ``keras.optimizers.Adadelta`` (so a ``keras.optimizers.Optimizer``) whose
``update_step`` for all variables at once is one step of :class:`triton_adadelta.Adadelta` over the
variables' torch tensors: the Triton kernel on CUDA, the fused CPU path on CPU. Everything around the
update stays Keras': iterations, the learning-rate variable and schedules, decoupled weight decay,
EMA, gradient accumulation, loss scaling, ``LossScaleOptimizer`` and mixed precision policies.
Clipping (``clipnorm``, ``clipvalue``, ``global_clipnorm``) runs inside our update, with Keras'
formulas (docs/keras.md).

The optimizer variables are Keras' layout (``iteration``, ``learning_rate``, then per trainable variable
``accumulated_grad`` and ``accumulated_delta_var``), and their torch tensors are views of our flat
state buffers: Keras saves and restores them, and the fused update writes them, with no copy.

Importing this module before Keras selects the torch backend when ``KERAS_BACKEND`` is unset.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Union

if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .optimizer import Adadelta as TorchAdadelta  # noqa: E402

__all__ = ["Adadelta"]

# (Keras variable name, our state name), in the order keras.optimizers.Adadelta.build creates them.
_SLOTS = (("accumulated_grad", "square_avg"), ("accumulated_delta_var", "acc_delta"))


def _torch_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``state_dtype`` as a torch dtype: a torch dtype, its name ("float32", "bfloat16", ...) or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None) if isinstance(dtype, str) else None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"state_dtype must be a torch dtype, its name or None, got {dtype!r}")
    return resolved


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


@keras.saving.register_keras_serializable(package="triton_adadelta", name="Adadelta")
class Adadelta(keras.optimizers.Adadelta):
    """Keras 3's Adadelta (same arguments, defaults, variables and results) with our fused update.

    Per variable with gradient ``g`` (after Keras' loss unscaling, gradient accumulation and
    decoupled weight decay ``v -= v * weight_decay * lr``, all done by Keras' base class)::

        g = clip(g)                                        (clipnorm / clipvalue / global_clipnorm)
        accumulated_grad      = rho * accumulated_grad + (1 - rho) * g^2
        delta                 = sqrt(accumulated_delta_var + epsilon) / sqrt(accumulated_grad + epsilon) * g
        accumulated_delta_var = rho * accumulated_delta_var + (1 - rho) * delta^2
        v                    -= learning_rate * delta

    Args beyond Keras': ``state_dtype`` (float32 by default: bfloat16 variables keep float32
    accumulators; None follows the variable dtype, as Keras), ``stochastic_rounding`` (bfloat16/float16
    writes rounded stochastically, a Philox stream keyed by ``seed`` and the step), ``fused`` (None: the
    fused path where there is one; True: insist; False: the PyTorch reference path), ``seed``
    (drawn from ``torch.initial_seed()`` when None; saved in the config) and ``master_weights`` (True:
    a float32 copy of each bfloat16/float16 variable; "remainder": its int16 low halves; both kept as
    optimizer variables named ``..._master`` after Keras' ones, so that they are saved with the model).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        rho: float = 0.95,
        epsilon: float = 1e-7,
        weight_decay: Optional[float] = None,
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: Optional[int] = None,
        loss_scale_factor: Optional[float] = None,
        gradient_accumulation_steps: Optional[int] = None,
        name: Optional[str] = None,
        *,
        state_dtype: Union[None, str, torch.dtype] = torch.float32,
        stochastic_rounding: bool = False,
        master_weights: Union[bool, str] = False,
        fused: Optional[bool] = None,
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        backend = keras.backend.backend()
        if backend != "torch":
            raise RuntimeError(
                "triton_adadelta.keras3.Adadelta runs on Keras' torch backend only (set KERAS_BACKEND=torch "
                f"before importing keras); this Keras uses the {backend!r} backend")
        if master_weights and (weight_decay or (use_ema and ema_overwrite_frequency)):
            # Keras applies these by writing the variables directly, which the master copies would undo.
            raise ValueError("master_weights cannot be combined with weight_decay or with use_ema's "
                             "ema_overwrite_frequency: Keras writes those into the variables outside the update, "
                             "and the next update would start again from the master copies")
        state_dtype = _torch_dtype(state_dtype)
        # Our optimizer checks every option now (with no parameters yet), so that a bad one fails here.
        # Keras' learning rate is handed over at each step; clipping happens inside our update.
        torch_kwargs = dict(
            lr=0.0, rho=rho, eps=epsilon, fused=fused, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, master_weights=master_weights,
            clipnorm=clipnorm or None, clipvalue=clipvalue or None, global_clipnorm=global_clipnorm or None)
        probe = TorchAdadelta(None, **torch_kwargs)
        super().__init__(
            learning_rate=learning_rate, rho=rho, epsilon=epsilon, weight_decay=weight_decay,
            clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm, use_ema=use_ema,
            ema_momentum=ema_momentum, ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor, gradient_accumulation_steps=gradient_accumulation_steps,
            name=name, **kwargs)
        self._torch_kwargs = torch_kwargs
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self.master_weights = master_weights
        self.fused = fused
        self.seed = int(probe.param_groups[0]["seed"]) if seed is None else int(seed)
        self._torch_optimizer: Optional[TorchAdadelta] = None
        self._torch_params: dict[int, Tensor] = {}  # id(Keras variable) -> the torch tensor our optimizer updates

    @property
    def torch_optimizer(self) -> Optional[TorchAdadelta]:
        """The :class:`triton_adadelta.Adadelta` that updates the variables (None until :meth:`build`)."""
        return self._torch_optimizer

    def build(self, var_list: list) -> None:
        """Keras' variables (iteration, learning_rate, EMA and accumulators as configured, then per
        trainable variable accumulated_grad and accumulated_delta_var), the accumulators being views
        of our optimizer's flat state, zeroed."""
        if self.built:
            return
        trained = [v for v in var_list if not self._overwrite_variable_with_gradient(v)]
        if self.master_weights and any(v.constraint is not None for v in trained):
            raise ValueError("master_weights cannot be used with variable constraints: Keras applies them to the "
                             "variables after the update, and the next update would start from the master copies")
        keras.optimizers.Optimizer.build(self, var_list)  # not Keras Adadelta's: we make its slots
        params = [v.value for v in trained]
        opt = TorchAdadelta(params, **self._torch_kwargs)
        for group in opt.param_groups:
            group["seed"] = self.seed
        # Our state is made at the first step; loading a zero state makes it (flat, in variable order) now.
        sd = opt.state_dict()
        sd["state"] = {i: self._initial_state(p) for i, p in enumerate(params)}
        opt.load_state_dict(sd)
        self._torch_optimizer = opt
        self._torch_params = {id(v): p for v, p in zip(trained, params)}
        accumulated_grads, accumulated_delta_vars = [], []
        for v in var_list:  # interleaved per variable, as Keras' add_optimizer_variables
            if id(v) not in self._torch_params:
                accumulated_grads.append(None)
                accumulated_delta_vars.append(None)
                continue
            state = opt.state[self._torch_params[id(v)]]
            for (name, ours), out in zip(_SLOTS, (accumulated_grads, accumulated_delta_vars)):
                out.append(self._state_variable(v, name, state[ours]))
        self._accumulated_grads = accumulated_grads
        self._accumulated_delta_vars = accumulated_delta_vars
        # master_weights: the float32 copies (int16 low halves for "remainder") of 16-bit variables, after
        # Keras' variables, so that model.save keeps them and load_model continues from them.
        masters = []
        for v in var_list:
            state = opt.state[self._torch_params[id(v)]] if id(v) in self._torch_params else {}
            masters.append(self._state_variable(v, "master", state["master"]) if "master" in state else None)
        self._master_weights = masters

    def _initial_state(self, p: Tensor) -> dict[str, Tensor]:
        """Zero accumulators in the state dtype; with master weights the parameter's own value (float32,
        or a zero remainder: the bfloat16 parameter is then the whole value)."""
        dtype = p.dtype if self.state_dtype is None or p.dtype == torch.float64 else self.state_dtype
        state = {"step": torch.zeros((), dtype=torch.float32),
                 "square_avg": torch.zeros_like(p, dtype=dtype), "acc_delta": torch.zeros_like(p, dtype=dtype)}
        if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
            remainder = self.master_weights == "remainder"
            state["master"] = torch.zeros_like(p, dtype=torch.int16) if remainder else p.detach().float()
        return state

    def _state_variable(self, reference: Any, name: str, view: Tensor) -> Any:
        """A Keras variable named as ``add_variable_from_reference`` names it, whose tensor is ``view``."""
        prefix = reference.path.replace("/", "_") if hasattr(reference, "path") else str(reference.name)
        variable = self.add_variable(
            shape=reference.shape, dtype=_dtype_name(view.dtype), name=f"{prefix}_{name}",
            initializer=lambda shape, dtype: view)
        # Keras' torch Variable keeps its tensor as a Parameter: make it this view (no copy).
        variable._value = torch.nn.Parameter(view, requires_grad=False)
        return variable

    def _clip_gradients(self, grads: list) -> list:
        # Clipping happens inside our update (the same formulas; p.grad and the list stay unchanged).
        return grads

    @torch.no_grad()
    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        """One step of our optimizer over ``trainable_variables`` with ``grads`` (Keras has done loss
        unscaling, accumulation and weight decay) at ``learning_rate`` (a Keras variable, a schedule's
        tensor or a number)."""
        opt = self._torch_optimizer
        group = opt.param_groups[0]
        if isinstance(learning_rate, keras.Variable):
            learning_rate = learning_rate.value
        group["lr"] = learning_rate.detach() if isinstance(learning_rate, Tensor) else float(learning_rate)
        for attr in ("clipnorm", "clipvalue", "global_clipnorm"):  # a user may set them between steps
            value = getattr(self, attr) or None
            if getattr(opt, attr) != value:
                setattr(opt, attr, value)
        params = group["params"]
        previous = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            for g, v in zip(grads, trainable_variables):
                p = self._torch_params[id(v)]
                if v.value is not p:
                    raise RuntimeError(f"the tensor of variable {v.path} was replaced after the optimizer was "
                                       "built; build a new optimizer for the new tensors")
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            opt.step()
        finally:
            for p, g in zip(params, previous):
                p.grad = g

    def _sync_steps(self) -> None:
        # Our per-tensor step counts key the stochastic-rounding stream: after Keras restores its
        # variables they follow `iterations` (updates made so far), as in the uninterrupted run.
        opt = self._torch_optimizer
        if opt is None:
            return
        steps = float(int(self.iterations))
        for p in opt.param_groups[0]["params"]:
            opt.state[p]["step"].fill_(steps)

    def load_own_variables(self, store: Any) -> None:
        super().load_own_variables(store)
        self._sync_steps()

    def set_weights(self, weights: list) -> None:
        super().set_weights(weights)
        self._sync_steps()

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(state_dtype=_dtype_name(self.state_dtype), stochastic_rounding=self.stochastic_rounding,
                      master_weights=self.master_weights, fused=self.fused, seed=self.seed)
        return config
