"""The Adadelta optimizer: torch's contract (constructor, param groups, state_dict, pickling) and step().

A step is a one-way pipeline of modules that never see the optimizer:

1. check: validation.py (metadata only);
2. route: route.py (signature, path of each tensor, kernel buckets and plans), with the state made
   ready by state.py's StateStore when the route is rebuilt;
3. numbers: hyper.py (each group's lr at ``iterations``, the skip flag);
4. clip multipliers: clipping.py;
5. backends: backends/triton.py, backends/cpu.py, backends/torch.py;
6. bookkeeping: iterations, autograd version counters, streams.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from copy import deepcopy
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from . import clipping, cpu_fused, hyper, validation
from . import route as routing
from .backends import cpu as cpu_backend
from .backends import torch as torch_backend
from .backends import triton as triton_backend
from .keras import EPS_DEFAULT, LR_DEFAULT, KerasOptimizerMixin, dtype_from_name, resolve_arguments
from .schedules import takes_step
from .shards import local, shard_norm_hook
from .state import StateDict, StateStore

__all__ = ["Adadelta"]

# torch's internal form of torch.compiler.disable imports dynamo on the first call, not at import
# (importing torch._dynamo costs about a second).
_disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)
_CPU = torch.device("cpu")
SquaredNormHook = Callable[[Tensor], Optional[Tensor]]


class Adadelta(KerasOptimizerMixin, torch.optim.Optimizer):
    r"""Adadelta with flat state and a fused multi-tensor Triton update.

    A drop-in for :class:`torch.optim.Adadelta`: same arguments, defaults, validation, results
    and ``state_dict`` layout (``step``, ``square_avg``, ``acc_delta`` per parameter). The state
    lives in flat buffers, one per (device, parameter dtype, state dtype), and ``state[p]`` holds
    views into them.

    Args beyond torch's:
        fused: ``None`` picks the Triton kernel for CUDA tensors (and CPU tensors under
            ``TRITON_INTERPRET=1``), the PyTorch path otherwise (with its fused CPU path for CPU
            tensors); ``True`` insists on a fused path (the kernel, or on CPU the fused CPU path);
            ``False`` uses neither.
        state_dtype: dtype of square_avg and acc_delta; float32 by default for every parameter
            dtype (bf16 parameters with fp32 state). ``None`` means the parameter's dtype, as torch.
            float64 and complex parameters always keep state of their own precision.
        stochastic_rounding: round every bf16/fp16 write (parameters, 16-bit state) stochastically:
            ``E[round(x)] = x``, NaN/Inf kept, finite values never rounded into Inf. The random bits
            are a Philox stream keyed by the group's ``seed`` (drawn from ``torch.initial_seed()``,
            saved in the state_dict) and the step, so a rerun is bit-identical, on either path.
        master_weights: ``True`` keeps a float32 copy of bf16/fp16 parameters (``state["master"]``,
            saved in the state_dict), updates it and rounds it to nearest into the parameter.
            ``"remainder"`` (bf16 parameters only) keeps the int16 low halves instead: the bf16
            parameter and its remainder are the same float32 value, for 2 bytes a parameter.
            See docs/precision.md.
        skip_nonfinite: when any gradient of a step holds NaN or Inf, skip the whole step (parameters,
            state and step counts stay as they were), decided on the device without a host
            synchronisation; :attr:`skipped_steps` counts such steps. One extra read of the gradients.
            Off by default: then NaN/Inf gradients flow into the update exactly as in torch.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Any = None,
        lr: Union[float, Tensor] = LR_DEFAULT,
        rho: float = 0.9,
        eps: float = EPS_DEFAULT,
        weight_decay: float = 0,
        foreach: Optional[bool] = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = torch.float32,
        stochastic_rounding: bool = False,
        master_weights: Union[bool, str] = False,
        skip_nonfinite: bool = False,
        learning_rate: Any = None,
        epsilon: Optional[float] = None,
        name: str = "Adadelta",
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # Keras' names and arguments (keras.py): checked first, so a bad call changes nothing.
        lr, eps, schedule, decay, clips = resolve_arguments(
            lr, eps, learning_rate, epsilon, kwargs,
            clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm, decay=decay)
        validation.check_hyperparameters(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)
        defaults = dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, capturable=capturable,
            foreach=foreach, differentiable=differentiable, fused=fused, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, master_weights=master_weights, skip_nonfinite=skip_nonfinite,
            seed=random.Random(torch.initial_seed()).randrange(1 << 24), decay=decay,
        )
        validation.check_options(defaults)
        self._store = StateStore(differentiable)  # before torch's __init__, which sets self.state
        self._skipped_steps: Optional[Tensor] = None  # device counter, created by the first checked step
        self.clipping = clipping.ClipSettings(**clips)
        self._iters = hyper.Iterations(torch.zeros((), dtype=torch.int64))
        self.lr_schedule = schedule
        self._transient()
        super().__init__(self._keras_params(params), defaults)  # add_param_group moves iterations to the params
        self._keras_init(name=name)
        self._register_hooks()

    def _transient(self) -> None:
        """Caches rebuilt rather than copied or pickled."""
        self._plans: dict = {}  # launch plans by bucket and members, valid for one store generation
        self._plans_generation = -1
        self._hyper = hyper.HyperTables()
        self._route: Optional[routing.Route] = None
        self._checked_groups = validation.CheckedGroups()
        self._lr_zeroed = False  # set by each step: DCP's first step at lr 0
        self._norm_cache: dict = {}
        self.__dict__.setdefault("_squared_norm_hook", None)

    def _register_hooks(self) -> None:
        # Our entries join state_dict() before any post-hook of the user's runs (and before the Keras
        # layer's, registered earlier), so those hooks see them.
        self.register_state_dict_post_hook(Adadelta._state_dict_extras, prepend=True)

    # ----------------------------------------------------------------------------- public interface
    @property
    def state(self) -> StateDict:  # type: ignore[override]
        """torch's ``optimizer.state``: per parameter its state, views into the flat buffers."""
        return self._store.state

    @state.setter
    def state(self, value: Any) -> None:
        self._store.state = value if isinstance(value, StateDict) else StateDict(value)

    @property
    def iterations(self) -> Tensor:
        """Steps taken (skipped GradScaler steps excluded): a 0-d int64 tensor on the parameters' device.

        ``int(opt.iterations)`` reads it (a synchronisation on a GPU). Assigning an int sets it.
        """
        return self._iters.tensor

    @iterations.setter
    def iterations(self, value: Any) -> None:
        self._iters.set(validation.whole_number("iterations", value))

    @property
    def lr_schedule(self) -> Optional[Callable]:
        """A learning rate as a function of ``iterations`` (a schedules.LearningRateSchedule, a callable
        of the step, or a Keras zero-argument callable), or None for the groups' ``lr``."""
        return self._schedule

    @lr_schedule.setter
    def lr_schedule(self, schedule: Optional[Callable]) -> None:
        self._schedule = schedule
        self._schedule_takes_step = schedule is None or takes_step(schedule)

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped by ``skip_nonfinite`` (NaN/Inf gradients, or GradScaler's found_inf), as a 0-d
        int64 tensor on the device of the gradients. Reading its value is the caller's synchronisation.
        Saved in the state_dict under ``"skipped_steps"`` once a checked step has run."""
        if self._skipped_steps is None:
            return torch.zeros((), dtype=torch.int64)
        return self._skipped_steps

    def set_squared_norm_hook(self, hook: Optional[SquaredNormHook]) -> None:
        """For data parallelism with clipnorm or global_clipnorm: ``hook(sq)`` gets each step's squared
        norms ``[per tensor..., total]`` (clipping.squared_norms) before they become multipliers, and
        all-reduces them in place (SUM) or returns the reduced tensor. None removes it."""
        if hook is not None and not callable(hook):
            raise TypeError(f"the squared-norm hook must be callable or None, got {type(hook).__name__}")
        self._squared_norm_hook = hook

    def path_counts(self) -> dict[str, int]:
        """How many parameters of the last routed step took each path ("kernel", "cpu", "torch":
        route.path_of, docs/design.md's table); empty before the first step."""
        counts: dict[str, int] = {}
        for path in self._route.paths if self._route is not None else ():
            counts[path] = counts.get(path, 0) + 1
        return counts

    def init_state(self, params: list[Tensor]) -> None:
        """Give each of ``params`` (parameters of this optimizer) without state a zeroed state."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        self._store.ensure([(group_of[id(p)], [p]) for p in params])

    def state_names(self, group: dict[str, Any], p: Tensor) -> tuple[set[str], set[str]]:
        """(required, allowed) names of a non-empty saved state entry of ``p`` in ``group``: Adadelta's,
        and the Keras layer's user slots; subclasses that keep more per-parameter state extend ``allowed``."""
        required, allowed = self._store.names(group, p)
        extra_required, extra_allowed = super().state_names(group, p)
        return required | extra_required, allowed | extra_allowed

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch's contract), validated first: a bad group changes nothing."""
        validation.check_param_group(param_group, self.defaults, self.param_groups, routing.fused_unavailable)
        had_params = any(g["params"] for g in self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["capturable"]:
            hyper.device_lr(group)
        if not had_params and group["params"] and "_iters" in self.__dict__:
            self._iters.move_to(local(group["params"][0]).device)  # the counter lives with the parameters
        self._forget()

    # ----------------------------------------------------------------------------- pickling
    _PICKLED_NUMBERS = ("_skipped_steps", "_lr_schedule", "_clipnorm", "_clipvalue", "_global_clipnorm",
                        "_iterations", "_iterations_host")

    def __getstate__(self) -> dict[str, Any]:
        # The attributes of every version since the flat state (old pickles load, new ones load in old code).
        state = super().__getstate__()
        state.update(self._store.pickled())
        state.update(_skipped_steps=self._skipped_steps, _lr_schedule=self._schedule,
                     _clipnorm=self.clipping.clipnorm, _clipvalue=self.clipping.clipvalue,
                     _global_clipnorm=self.clipping.global_clipnorm,
                     _iterations=self._iters.tensor, _iterations_host=self._iters.count()
                     if self._iters.tensor.device.type == "cpu" else self._iters.host,
                     _iterations_version=self._iters.tensor._version)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.__dict__["_store"] = StateStore.from_pickle(state, bool(state["defaults"].get("differentiable")))
        numbers = {k: state.pop(k, None) for k in self._PICKLED_NUMBERS}
        state.pop("_iterations_version", None)
        for k in ("_plans", "_hyper", "_route", "_flat_bound"):
            state.pop(k, None)
        super().__setstate__(state)
        self._skipped_steps = numbers["_skipped_steps"]
        self.clipping = clipping.ClipSettings(numbers["_clipvalue"], numbers["_clipnorm"], numbers["_global_clipnorm"])
        it = numbers["_iterations"]
        if it is None:  # a pickle from before the Keras layer existed
            self._iters = hyper.Iterations(torch.zeros((), dtype=torch.int64))
        else:
            self._iters = hyper.Iterations(it, numbers["_iterations_host"])
        self.lr_schedule = numbers["_lr_schedule"]
        self._transient()
        self._register_hooks()
        self._fill_group_defaults()

    # ----------------------------------------------------------------------------- state_dict
    def _state_dict_extras(self, sd: dict[str, Any]) -> None:  # (optimizer, state_dict): a post-hook
        """Complete torch's state_dict (a state_dict post-hook that runs before the user's): per-parameter
        dicts copied (tensors shared as in torch), plus ``"skipped_steps"`` once ``skip_nonfinite`` has
        checked a step, and ``iterations`` in every group (torch.distributed.checkpoint keeps groups)."""
        self._store.complete_state_dict(sd, self.param_groups)
        # Group settings are plain values (torch.distributed.checkpoint refuses a torch.dtype), and
        # carry the counters outside the state: DCP keeps only "state" and "param_groups".
        iterations = self._iters.count()
        iterations = iterations.detach().clone() if isinstance(iterations, Tensor) else int(iterations)
        for g in sd["param_groups"]:
            if isinstance(g.get("state_dtype"), torch.dtype):
                g["state_dtype"] = str(g["state_dtype"]).replace("torch.", "")
            g["iterations"] = iterations
        if self._skipped_steps is not None:
            sd["skipped_steps"] = self._skipped_steps.clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict written by this class or by torch.optim.Adadelta.

        Saved tensors are copied into the flat buffers (cast to their state dtype), which stay flat.
        Everything is checked first (group count and sizes, hyperparameters, state keys, shapes,
        dtypes: see :func:`validation.check_state_dict`), and a failure while loading restores the
        previous state, so a state_dict that does not fit changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        self._fill_group_defaults()
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        if "param_groups" in state_dict:  # the saved settings must not alias the caller's (a tensor lr, say)
            state_dict["param_groups"] = deepcopy(state_dict["param_groups"])
            for sg in state_dict["param_groups"]:
                if isinstance(sg, dict) and isinstance(sg.get("state_dtype"), str):
                    sg["state_dtype"] = dtype_from_name(sg["state_dtype"])
        new_groups = validation.check_state_dict(state_dict, self.param_groups, self.state_names,
                                                 routing.fused_unavailable)
        group_of = {id(p): g for g in new_groups for p in g["params"]}
        id_map = {old_id: p for g, sg in zip(self.param_groups, state_dict["param_groups"])
                  for old_id, p in zip(sg["params"], g["params"])}
        saved = state_dict["state"]
        previous = (self._store.snapshot(), self.param_groups, self._skipped_steps)
        self._forget()
        self.param_groups = new_groups
        try:
            # A key that is no parameter's index is not a parameter's state (a user's flag): it comes back as
            # it is, as in torch (validation refuses one that holds a parameter's state).
            self._store.load([(group_of[id(id_map[k])], id_map[k], v) for k, v in saved.items()
                              if k in id_map and len(v)],
                             [id_map[k] if k in id_map else (k, v) for k, v in saved.items()
                              if k not in id_map or len(v)])
            if "skipped_steps" in state_dict:
                first = next((p for g in new_groups for p in g["params"]), None)
                dev = first.device if first is not None else _CPU
                self._skipped_steps = torch.as_tensor(state_dict["skipped_steps"]).detach().to(
                    dev, torch.int64, copy=True).reshape(())
        except BaseException:
            snapshot, self.param_groups, self._skipped_steps = previous
            self._store.restore(snapshot)
            self._forget()
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _fill_group_defaults(self) -> None:
        """A group appended to ``param_groups`` directly (not by add_param_group) has torch's keys only,
        which is enough for torch: it gets the constructor's values of ours."""
        for group in self.param_groups:
            if not self.defaults.keys() <= group.keys():
                for k, v in self.defaults.items():
                    group.setdefault(k, v)

    def _forget(self) -> None:
        """Drop the cached route, plans and tables: the groups or the whole state changed."""
        self._plans.clear()
        self._hyper.clear()
        self._route = None

    # ----------------------------------------------------------------------------- step
    # torch.compile: the step is a clean graph break. Dynamo would otherwise trace into the host-side
    # bookkeeping (dicts keyed by id(), pointer tables, the Triton launch) and guard on it; run eagerly,
    # it is one kernel launch per bucket anyway, and the compiled graphs around it are reused every step.
    @_disable_dynamo
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
                the update and a step with ``found_inf`` set changes nothing. GradScaler passes them
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
        groups = self.param_groups

        # 1. Check everything before anything is written (metadata only: no synchronisation); the groups
        # that hold the same values as at the last step passed already.
        unchecked = self._checked_groups.unchecked(groups)
        if unchecked:
            self._fill_group_defaults()
            validation.check_step_groups(unchecked)
            self._checked_groups.passed(groups)
        validation.check_scaler_flags(grad_scale, found_inf)
        if self.defaults["differentiable"]:
            validation.check_differentiable(groups)
        # torch.distributed.checkpoint makes the state of a fresh optimizer with one step at lr 0 (and
        # zero gradients) that must change no parameter; a Keras schedule would otherwise replace that lr.
        self._lr_zeroed = (self._schedule is not None
                           and all(not isinstance(g["lr"], Tensor) and g["lr"] == 0 for g in groups)
                           and not any(v for k, v in self.state.items() if isinstance(k, Tensor)))
        # 2. Route: the per-tensor checks, new state and the routing run again only when the signature
        # changes (about 1 µs a tensor to read; gradients are new tensors each step, their metadata usually not).
        route, grads = self._routed()
        if not route.members:
            return loss
        # 3. Numbers: the skip flag, each group's learning rate.
        if route.skip_nonfinite:
            found_inf, self._skipped_steps = hyper.nonfinite_found_inf(grads, found_inf, self._skipped_steps)
        lrs = self._learning_rates(route.capturable)
        self._store.refresh_masters()
        # 4. Clip multipliers (Keras' clipnorm, global_clipnorm, clipvalue), on the device.
        coefs = self._clip_multipliers(route, grads, grad_scale)
        # 5. The backends.
        if route.differentiable:
            # As torch: the constructor's flag, not a group's, turns autograd on for the update.
            with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
                torch_backend.run_differentiable(route.members, grads, self.state, lrs, coefs, grad_scale, found_inf)
        else:
            self._update(route, grads, lrs, coefs, grad_scale, found_inf)
            # The kernel and the fused CPU path write through pointers: tell autograd, as an in-place op
            # would, so that a graph which saved a parameter before the step refuses to use it after.
            torch.autograd.graph.increment_version(route.params)
        # 6. Bookkeeping: iterations += 1 on the device (not when found_inf is set); buffers kept alive
        # for the streams that used them.
        self._iters.advance(found_inf, route.capturable)
        self._store.record_use()
        return loss

    def _routed(self) -> tuple[routing.Route, list[Tensor]]:
        """The step's route (the cached one while signature and context hold) and its gradients."""
        route = self._route
        context = None
        if route is not None and route.watch is not None:
            context = routing.context(self.state, self.param_groups)
            if route.context == context:
                grads = route.watch.grads(self.param_groups)
                if grads is not None:
                    return route, grads
        try:
            grads, signature = routing.signature(self.param_groups)
        except AttributeError:
            validation.check_param_types(self.param_groups)  # names a non-tensor in a group's params
            raise
        if (signature is not None and route is not None and route.signature == signature
                and route.context == (context or routing.context(self.state, self.param_groups))):
            if route.watch is not None:  # it saw a change the signature does not read (strides): watch anew
                route = self._route = route._replace(
                    watch=routing.Watch.of(self.param_groups, route.params, grads))
        else:
            validation.check_step_tensors(self.param_groups, self.state)
            # fused=True accepts meta parameters at construction (torch's rule): their device is checked here.
            validation.check_fused_devices(self.param_groups, routing.fused_unavailable)
            self._store.prepare(self.param_groups, [(g, [p for p in g["params"] if p.grad is not None])
                                                    for g in self.param_groups])
            if self._plans_generation != self._store.generation:  # buffers reallocated: plans are stale
                self._plans.clear()
                self._plans_generation = self._store.generation
            route = self._route = routing.build(self.param_groups, self._store, self._plans, signature)
        return route, grads

    def _learning_rates(self, capturable: bool = True) -> list[Union[float, Tensor]]:
        """Each group's learning rate of this step (hyper.group_lr); ``capturable=False``: no group is
        (the step knows it from its route), so no group's lr needs to be kept on the device."""
        groups = self.param_groups
        if capturable:
            for group in groups:
                if group["capturable"]:
                    hyper.device_lr(group)
        return [hyper.group_lr(g, self._iters, self._schedule, self._schedule_takes_step, self._lr_zeroed)
                for g in groups]

    def _clip_multipliers(self, route: routing.Route, grads: list[Tensor],
                          grad_scale: Optional[Tensor]) -> Optional[clipping.GradientTransform]:
        """The step's gradient transform (Keras clipping), or None for none at all: member ``i`` is updated
        with ``clamp(g, -clip_value, clip_value) * coefs[i]``. ``p.grad`` is not changed."""
        clip = self.clipping
        if not clip:
            return None
        return clipping.build_transform(
            [local(g) for g in grads], [path == routing.KERNEL for path in route.paths], route.launches,
            clip_value=clip.clipvalue, clipnorm=clip.clipnorm, global_clipnorm=clip.global_clipnorm,
            grad_scale=grad_scale, squared_norm_hook=self._squared_norm_hook, cache=self._norm_cache,
            # FSDP2 / DTensor gradients: complete each tensor's squared norm across the mesh first.
            per_tensor_hook=shard_norm_hook(grads, self._norm_cache),
        )

    def _update(self, route: routing.Route, grads: list[Tensor], lrs: list, coefs: Any,
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """The kernel's buckets, then the fused CPU path's members, then the PyTorch path's."""
        tables: dict[torch.device, Tensor] = {}  # one hyperparameter table per device and step
        clip_value = None if coefs is None else coefs.clip_value

        def table(device: torch.device) -> Tensor:
            if device not in tables:
                tables[device] = self._hyper.table(device, self.param_groups, lrs, clip_value)
            return tables[device]

        if route.buckets:
            triton_backend.run(route.buckets, route.members, grads, table, coefs, grad_scale, found_inf)
        rest = route.torch
        if route.cpu:
            settings = cpu_fused.settings()
            plan = route.cpu_plans.get(settings)
            if plan is None:
                plan = route.cpu_plans[settings] = cpu_backend.CpuPlan(route.members, route.cpu, self.state)
            left = plan.run(route.members, grads, table(_CPU), coefs, grad_scale, found_inf)
            rest = sorted(rest + left) if left else rest
        if rest:
            torch_backend.run(route.members, grads, rest, self._store, lrs, coefs, grad_scale, found_inf)
