"""The Keras (OptimizerV2) API of Adadelta against an independent NumPy model of Keras' semantics.

The model below (:class:`KerasAdadelta`) is written from Keras' documented behaviour (legacy
``tf.keras.optimizers.Adadelta`` / ``OptimizerV2``), in float64 NumPy, without any of the package's
code. Every test runs on the default (PyTorch) path and, where the Triton kernel can run, the fused
path (on CPU in the Triton interpreter: tensors stay small).
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import CPU_PATHS, KERNEL_DEVICE, fused_cpu_library, needs_gpu, needs_kernel, use_path
from helpers import bf16_ulp

from triton_adadelta import Adadelta, clipping
from triton_adadelta.keras import ExponentialDecay, InverseTimeDecay, LearningRateSchedule


# ============================================================================== the NumPy model of Keras
class KerasAdadelta:
    """Keras' legacy Adadelta, float64: slots, iterations, clipping, decay, schedules."""

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, decay=0.0, schedule=None, norm_factor=1.0):
        self.lr, self.rho, self.eps = learning_rate, rho, epsilon
        self.clipnorm, self.clipvalue, self.global_clipnorm = clipnorm, clipvalue, global_clipnorm
        self.decay, self.schedule = decay, schedule
        self.norm_factor = norm_factor  # squared norms multiplied by this (a simulated all-reduce)
        self.iterations = 0
        self.accum_grad, self.accum_var = {}, {}
        self.weight_order = []  # (key, slot name) in creation order

    def clip(self, grads):
        grads = [np.asarray(g, dtype=np.float64) for g in grads]
        if self.clipvalue is not None:
            grads = [np.clip(g, -self.clipvalue, self.clipvalue) for g in grads]
        if self.clipnorm is not None:
            c = self.clipnorm
            out = []
            for g in grads:
                norm = math.sqrt(float(np.sum(g * g)) * self.norm_factor)
                out.append(g * c / max(norm, c))  # tf.clip_by_norm
            grads = out
        if self.global_clipnorm is not None:
            c = self.global_clipnorm
            total = math.sqrt(sum(float(np.sum(g * g)) for g in grads) * self.norm_factor)
            if not math.isfinite(total):
                scale = math.nan
            else:
                scale = c * min(1.0 / total if total > 0 else math.inf, 1.0 / c if c > 0 else math.inf)
            grads = [g * scale for g in grads]
        return grads

    def learning_rate_now(self):
        lr = self.schedule(self.iterations) if self.schedule is not None else self.lr
        if self.decay > 0:
            lr = lr / (1.0 + self.decay * self.iterations)
        return lr

    def apply_gradients(self, grads_and_keys, values):
        """``values``: key -> float64 array, updated in place."""
        present = [(g, k) for g, k in grads_and_keys if g is not None]
        if not present:
            raise ValueError("No gradients provided for any variable")
        new = [k for _, k in present if k not in self.accum_grad]
        for k in new:
            self.accum_grad[k] = np.zeros_like(values[k])
            self.weight_order.append((k, "accum_grad"))
        for k in new:
            self.accum_var[k] = np.zeros_like(values[k])
            self.weight_order.append((k, "accum_var"))
        grads = self.clip([g for g, _ in present])
        lr = self.learning_rate_now()
        for g, (_, k) in zip(grads, present):
            a = self.rho * self.accum_grad[k] + (1 - self.rho) * g * g
            update = np.sqrt(self.accum_var[k] + self.eps) / np.sqrt(a + self.eps) * g
            self.accum_var[k] = self.rho * self.accum_var[k] + (1 - self.rho) * update * update
            self.accum_grad[k] = a
            values[k] = values[k] - lr * update
        self.iterations += 1


# ============================================================================== fixtures and helpers
PATHS = ["default", pytest.param("fused", marks=needs_kernel)]
SHAPES = [(37,), (5, 7), (2100,)]
SCALES = [0.1, 3.0, 30.0]  # some tensors fall under each threshold, some above
CLIPS = {
    "none": {},
    "value": dict(clipvalue=0.5),
    "norm": dict(clipnorm=1.0),
    "global": dict(global_clipnorm=2.0),
    "value+norm": dict(clipvalue=0.5, clipnorm=1.0),
    "value+global": dict(clipvalue=0.5, global_clipnorm=2.0),
}


def _device(path):
    return KERNEL_DEVICE if path == "fused" else "cpu"


def _fused(path):
    return path == "fused"


def _make(shapes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_() for s in shapes]



def _oracle_step(oracle, grads, values) -> None:
    """One step of the NumPy Keras model on the same gradients (``values[i]`` is variable ``i``)."""
    oracle.apply_gradients([(_np(g), i) for i, g in enumerate(grads)], values)


def _step_both(opt, oracle, params, grads, values) -> None:
    """Set ``grads`` on ``params``, step ours, and step the Keras model on the same gradients."""
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    _oracle_step(oracle, grads, values)

def _grads(params, seed, scales=SCALES):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g, dtype=torch.float64) * s).to(p.dtype).to(p.device)
            for p, s in zip(params, scales)]


def _np(t):
    # A copy: a float64 CPU tensor's numpy view would alias the parameter the step is about to change.
    return t.detach().to("cpu", torch.float64).numpy().copy()


def _close(actual, expected, dtype, what=""):
    """fp64 1e-10, fp32 1e-5 relative to the tensor's scale, 16-bit within one ulp of the exact value."""
    a = torch.as_tensor(_np(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual, dtype=np.float64))
    e = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    if dtype == torch.bfloat16:
        ulp = bf16_ulp(e.float()).double()
        assert bool(((a - e).abs() <= ulp + 1e-30).all()), f"{what}: more than one bf16 ulp: {(a - e).abs().max()}"
        return
    if dtype == torch.float16:
        eh = e.abs().to(torch.float16)
        ulp = (torch.nextafter(eh, torch.tensor(float("inf"), dtype=torch.float16)).double() - eh.double()).abs()
        assert bool(((a - e).abs() <= ulp + 1e-30).all()), f"{what}: more than one fp16 ulp: {(a - e).abs().max()}"
        return
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    scale = float(e.abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def _count_launches(monkeypatch):
    counter = {"n": 0}
    if KERNEL_DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction as Fn
    else:
        from triton.runtime.jit import JITFunction as Fn
    original = Fn.run

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Fn, "run", counting)
    return counter


# ============================================================================== numbers: clipping, decay, schedules
# float64 parameters always take the PyTorch path: the fused path is float32 here, 16-bit below.
# "cpu-fused": the fused CPU path (the C update), the default for CPU tensors without the interpreter.
PATH_DTYPES = [("default", torch.float32), ("default", torch.float64), ("cpu-fused", torch.float32),
               pytest.param("fused", torch.float32, marks=needs_kernel)]


def _route(path, monkeypatch) -> tuple:
    """(device, fused) for this file's paths: "default" (the reference), "fused" (the kernel), "cpu-fused"."""
    if path == "cpu-fused":
        return use_path(path, monkeypatch)
    return _device(path), _fused(path)


@pytest.mark.parametrize("path, dtype", PATH_DTYPES, ids=["default-fp32", "default-fp64", "cpu-fused-fp32",
                                                           "fused-fp32"])
@pytest.mark.parametrize("clip", list(CLIPS), ids=list(CLIPS))
def test_clipping_matches_keras_over_steps(path, clip, dtype, monkeypatch):
    dev, fused = _route(path, monkeypatch)
    params = _make(SHAPES, dtype, dev, seed=1)
    values = {i: _np(p) for i, p in enumerate(params)}
    opt = Adadelta(params, learning_rate=0.5, rho=0.95, epsilon=1e-6, fused=fused, **CLIPS[clip])
    oracle = KerasAdadelta(learning_rate=0.5, rho=0.95, epsilon=1e-6, **CLIPS[clip])
    unclipped = KerasAdadelta(learning_rate=0.5, rho=0.95, epsilon=1e-6)
    plain = {k: v.copy() for k, v in values.items()}
    for step in range(3):
        grads = _grads(params, seed=10 + step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):  # Keras leaves the gradients alone, and so do we
            assert torch.equal(p.grad, g)
        _oracle_step(oracle, grads, values)
        unclipped.apply_gradients([(_np(g), i) for i, g in enumerate(grads)], plain)
    for i, p in enumerate(params):
        _close(p, values[i], dtype, f"param {i}")
        _close(opt.get_slot(p, "accum_grad"), oracle.accum_grad[i], dtype, f"accum_grad {i}")
        _close(opt.get_slot(p, "accum_var"), oracle.accum_var[i], dtype, f"accum_var {i}")
    assert int(opt.iterations) == 3
    if clip != "none":  # the settings really clip these gradients: the test would see clipping that does nothing
        assert max(np.abs(values[i] - plain[i]).max() for i in values) > 1e-3


@pytest.mark.parametrize("path", [pytest.param("fused", marks=needs_kernel), "cpu-fused"])
@pytest.mark.parametrize("clip", ["value+norm", "value+global", "norm", "global"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_clipping_low_precision_fused_each_step(clip, dtype, path, monkeypatch):
    """16-bit parameters, float32 state: each step from the fused path's own values (the kernel's or
    the C update's), within one ulp of Keras."""
    dev, fused = _route(path, monkeypatch)
    if path == "cpu-fused" and (dtype, dtype, torch.float32) not in fused_cpu_library().functions:
        pytest.skip("float16 on the fused CPU path needs a compiler with _Float16")
    params = _make(SHAPES, dtype, dev, seed=2)
    opt = Adadelta(params, learning_rate=0.5, rho=0.95, epsilon=1e-6, fused=fused, **CLIPS[clip])
    oracle = KerasAdadelta(learning_rate=0.5, rho=0.95, epsilon=1e-6, **CLIPS[clip])
    for step in range(2):
        grads = _grads(params, seed=20 + step)
        values = {i: _np(p) for i, p in enumerate(params)}
        if step:  # start the model from our state
            for i, p in enumerate(params):
                oracle.accum_grad[i] = _np(opt.get_slot(p, "accum_grad"))
                oracle.accum_var[i] = _np(opt.get_slot(p, "accum_var"))
        _step_both(opt, oracle, params, grads, values)
        for i, p in enumerate(params):
            _close(p, values[i], dtype, f"step {step} param {i}")
            _close(opt.get_slot(p, "accum_grad"), oracle.accum_grad[i], torch.float32, f"accum_grad {i}")


@pytest.mark.parametrize("path", PATHS)
def test_decay_and_schedules(path):
    dev = _device(path)
    schedule = ExponentialDecay(0.8, decay_steps=2, decay_rate=0.5)
    cases = [
        (dict(learning_rate=0.6, decay=0.3), dict(learning_rate=0.6, decay=0.3)),
        (dict(learning_rate=schedule), dict(schedule=schedule)),
        (dict(learning_rate=InverseTimeDecay(0.9, 1, 0.5, staircase=True), decay=0.1, clipnorm=1.0),
         dict(schedule=lambda t: 0.9 / (1 + 0.5 * math.floor(t)), decay=0.1, clipnorm=1.0)),
    ]
    for ours, theirs in cases:
        params = _make(SHAPES[:2], torch.float32, dev, seed=3)
        values = {i: _np(p) for i, p in enumerate(params)}
        opt = Adadelta(params, rho=0.9, epsilon=1e-6, fused=_fused(path), **ours)
        oracle = KerasAdadelta(rho=0.9, epsilon=1e-6, **theirs)
        for step in range(4):
            grads = _grads(params, seed=30 + step)
            _step_both(opt, oracle, params, grads, values)
        for i, p in enumerate(params):
            _close(p, values[i], torch.float32, f"{ours} param {i}")


def test_first_step_is_undecayed():
    p = torch.zeros(3, requires_grad=True)
    opt = Adadelta([p], learning_rate=0.5, decay=1.0, rho=0.0, epsilon=1.0)
    assert opt._learning_rates()[0] == 0.5
    p.grad = torch.ones(3)
    opt.step()
    assert opt._learning_rates()[0] == 0.25  # 0.5 / (1 + 1.0 * 1)


@pytest.mark.parametrize("path", PATHS)
def test_grad_scaler_unscales_before_clipping(path):
    dev = _device(path)
    params = _make(SHAPES, torch.float32, dev, seed=4)
    values = {i: _np(p) for i, p in enumerate(params)}
    opt = Adadelta(params, learning_rate=0.7, fused=_fused(path), clipvalue=0.5, global_clipnorm=2.0)
    oracle = KerasAdadelta(learning_rate=0.7, rho=0.9, epsilon=1e-6, clipvalue=0.5, global_clipnorm=2.0)
    scale = torch.tensor([8.0], device=dev)
    for step in range(2):
        grads = _grads(params, seed=40 + step)
        for p, g in zip(params, grads):
            p.grad = g * 8.0
        opt.step(grad_scale=scale, found_inf=torch.zeros(1, device=dev))
        _oracle_step(oracle, grads, values)
    for i, p in enumerate(params):
        _close(p, values[i], torch.float32, f"param {i}")


@pytest.mark.parametrize("path", PATHS)
def test_found_inf_step_changes_nothing_and_is_not_counted(path):
    dev = _device(path)
    params = _make(SHAPES[:2], torch.float32, dev, seed=5)
    values = {i: _np(p) for i, p in enumerate(params)}
    opt = Adadelta(params, learning_rate=0.5, decay=0.2, clipnorm=1.0, fused=_fused(path))
    oracle = KerasAdadelta(learning_rate=0.5, rho=0.9, epsilon=1e-6, decay=0.2, clipnorm=1.0)
    for step, inf in enumerate([0.0, 1.0, 0.0, 1.0, 0.0]):
        grads = _grads(params, seed=50 + step)
        for p, g in zip(params, grads):
            p.grad = g
        before = [p.detach().clone() for p in params]
        opt.step(found_inf=torch.tensor([inf], device=dev))
        if inf:
            assert all(torch.equal(p, b) for p, b in zip(params, before))
        else:
            _oracle_step(oracle, grads, values)
    assert int(opt.iterations) == 3 == oracle.iterations
    assert opt.iterations.dtype == torch.int64 and opt.iterations.device.type == torch.device(dev).type
    for i, p in enumerate(params):  # decay used the count of steps taken, skipped ones excluded
        _close(p, values[i], torch.float32, f"param {i}")


def test_iterations_changed_in_place_is_seen_by_decay():
    p = torch.zeros(2, requires_grad=True)
    opt = Adadelta([p], learning_rate=1.0, decay=0.5)
    opt.iterations.fill_(4)
    assert opt._learning_rates()[0] == pytest.approx(1.0 / 3.0)
    opt.iterations = 2
    assert int(opt.iterations) == 2
    assert opt._learning_rates()[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-negative whole number"):
        opt.iterations = -1


@pytest.mark.parametrize("path", PATHS)
def test_mixed_paths_share_the_global_norm(path):
    """float64 parameters take the PyTorch path, float32 ones the kernel: one global norm over both."""
    dev = _device(path)
    a = _make([(33,)], torch.float32, dev, seed=6)
    b = _make([(9,)], torch.float64, dev, seed=7)
    params = [a[0], b[0]]
    values = {i: _np(p) for i, p in enumerate(params)}
    opt = Adadelta(params, learning_rate=0.5, global_clipnorm=1.5, clipvalue=2.0, fused=None if path == "fused" else
                   False)
    oracle = KerasAdadelta(learning_rate=0.5, rho=0.9, epsilon=1e-6, global_clipnorm=1.5, clipvalue=2.0)
    for step in range(2):
        grads = _grads(params, seed=60 + step, scales=[3.0, 5.0])
        _step_both(opt, oracle, params, grads, values)
    for i, p in enumerate(params):
        _close(p, values[i], torch.float32, f"param {i}")


def test_differentiable_path_clips_too():
    params = _make(SHAPES[:2], torch.float32, "cpu", seed=8)
    values = {i: _np(p) for i, p in enumerate(params)}
    opt = Adadelta([p.detach().clone() for p in params], differentiable=True, clipvalue=0.5, clipnorm=1.0)
    mine = [p for g in opt.param_groups for p in g["params"]]
    oracle = KerasAdadelta(learning_rate=1.0, rho=0.9, epsilon=1e-6, clipvalue=0.5, clipnorm=1.0)
    for step in range(2):
        grads = _grads(mine, seed=70 + step)
        _step_both(opt, oracle, mine, grads, values)
    for i, p in enumerate(mine):
        _close(p, values[i], torch.float32, f"param {i}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf - inf
@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_gradient_with_global_clipnorm_is_nan_everywhere(path):
    dev = _device(path)
    params = _make([(5,), (6,)], torch.float32, dev, seed=9)
    opt = Adadelta(params, global_clipnorm=1.0, fused=_fused(path))
    grads = _grads(params, seed=80)
    grads[0][2] = float("inf")
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert all(bool(p.isnan().all()) for p in params)  # tf.clip_by_global_norm: NaN for every gradient


# ============================================================================== apply_gradients, minimize
@pytest.mark.parametrize("path", PATHS)
def test_apply_gradients_missing_gradient_and_adoption(path):
    dev = _device(path)
    variables = _make(SHAPES, torch.float32, dev, seed=11)
    values = {i: _np(v) for i, v in enumerate(variables)}
    opt = Adadelta(learning_rate=0.4, rho=0.95, epsilon=1e-6, clipnorm=2.0, fused=_fused(path))  # no params
    oracle = KerasAdadelta(learning_rate=0.4, rho=0.95, epsilon=1e-6, clipnorm=2.0)
    assert opt.get_slot_names() == [] and len(opt.weights) == 1
    plan = [[True, False, True], [True, True, True], [False, True, True]]
    for step, has in enumerate(plan):
        grads = _grads(variables, seed=90 + step)
        pairs = [(g if h else None, v) for g, v, h in zip(grads, variables, has)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = opt.apply_gradients(pairs)
        assert (len(caught) == 1 and "Gradients do not exist for variables" in str(caught[0].message)) == (
            not all(has))
        assert out is opt.iterations
        oracle.apply_gradients([(_np(g) if h else None, i) for i, (g, h) in enumerate(zip(grads, has))], values)
        if step == 0:  # the variable without a gradient was skipped: no slots, value untouched
            with pytest.raises(KeyError):
                opt.get_slot(variables[1], "accum_grad")
            assert np.array_equal(_np(variables[1]), values[1])
    assert int(opt.iterations) == 3
    for v in variables:  # adopted variables got their state in the flat buffers (views, not copies)
        flat = opt._store.flat_of(v)
        assert opt.state[v]["square_avg"].untyped_storage().data_ptr() == flat.square_avg.untyped_storage().data_ptr()
    for i, v in enumerate(variables):
        assert v.grad is None  # never set, and not left behind
        _close(v, values[i], torch.float32, f"variable {i}")
    # Keras' weights order: iterations, then slots in creation order (variable 1 joined at step 2).
    expected = [int(opt.iterations)] + [
        getattr(oracle, name)[k] for k, name in oracle.weight_order]
    got = opt.get_weights()
    assert len(got) == len(expected) == 7
    assert got[0] == expected[0]
    for g, e, (k, name) in zip(got[1:], expected[1:], oracle.weight_order):
        _close(g, e, torch.float32, f"{name} of {k}")


def test_apply_gradients_validates_first():
    v = torch.zeros(3, requires_grad=True)
    w = torch.zeros(2, requires_grad=True)
    opt = Adadelta([v, w])
    with pytest.raises(ValueError, match="No gradients provided for any variable"):
        opt.apply_gradients([(None, v), (None, w)])
    with pytest.raises(ValueError, match="gradient shape \\(2,\\) does not match variable shape \\(3,\\)"):
        opt.apply_gradients([(torch.ones(2), v)])
    with pytest.raises(ValueError, match="pairs"):
        opt.apply_gradients([(torch.ones(3),)])
    with pytest.raises(TypeError, match="only optimize Tensors"):
        opt.apply_gradients([(torch.ones(3), "v")])
    with pytest.raises(ValueError, match="each variable once"):
        opt.apply_gradients([(torch.ones(3), v), (torch.ones(3), v)])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.apply_gradients([(torch.ones(3).to_sparse(), v)])
    assert int(opt.iterations) == 0 and len(opt.state) == 0
    assert torch.equal(v, torch.zeros(3))
    opt.apply_gradients([])  # nothing to do: no step
    assert int(opt.iterations) == 0


def test_p_grad_is_kept_by_apply_gradients():
    v = torch.zeros(3, requires_grad=True)
    w = torch.zeros(2, requires_grad=True)
    opt = Adadelta([v, w])
    w.grad = torch.full((2,), 7.0)
    opt.apply_gradients([(torch.ones(3), v)])
    assert torch.equal(w, torch.zeros(2)), "only the given variables move"
    assert torch.equal(w.grad, torch.full((2,), 7.0)) and v.grad is None


def test_minimize_and_get_gradients():
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    w = torch.zeros(3, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    opt = Adadelta(learning_rate=1.0, clipnorm=10.0)
    values = {0: _np(w), 1: _np(b)}
    oracle = KerasAdadelta(learning_rate=1.0, rho=0.9, epsilon=1e-6, clipnorm=10.0)

    def loss():
        return ((x @ w + b - y) ** 2).mean()

    for _ in range(3):
        gw, gb = torch.autograd.grad(loss(), [w, b])
        oracle.apply_gradients([(_np(gw), 0), (_np(gb), 1)], values)
        opt.minimize(loss, var_list=lambda: [w, b])  # a callable var_list, resolved after the loss ran
    _close(w, values[0], torch.float32, "w")
    _close(b, values[1], torch.float32, "b")
    assert w.grad is None and b.grad is None
    opt.minimize(loss(), [w, b])  # a tensor with a graph works too
    assert int(opt.iterations) == 4
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.minimize(loss, [w, unused])
    grads = opt.get_gradients(loss, [w, b])
    torch.testing.assert_close(grads[0], torch.autograd.grad(loss(), [w])[0])
    with pytest.raises(ValueError, match=r"^Variable .* has `None` for gradient\. Please make sure"):
        opt.get_gradients(loss, [w, unused])
    with pytest.raises(TypeError, match="GradientTape"):
        opt.minimize(loss, [w], tape=object())


# ============================================================================== slots and weights
def test_slots():
    v = torch.randn(4, requires_grad=True)
    u = torch.randn(2, 3, requires_grad=True)
    opt = Adadelta([v, u])
    assert opt.get_slot_names() == []
    with pytest.raises(KeyError):
        opt.get_slot(v, "accum_grad")
    v.grad = torch.randn(4)
    opt.step()
    assert opt.get_slot_names() == ["accum_grad", "accum_var"]
    s = opt.get_slot(v, "accum_grad")
    assert s is opt.state[v]["square_avg"] and opt.get_slot(v, "square_avg") is s
    assert opt.get_slot(v, "accum_var") is opt.state[v]["acc_delta"] is opt.get_slot(v, "acc_delta")
    assert bool((s > 0).all())  # live state after a step
    with pytest.raises(KeyError, match="unknown slot"):
        opt.get_slot(v, "momentum")
    with pytest.raises(KeyError):
        opt.get_slot(torch.zeros(4), "accum_grad")

    m = opt.add_slot(v, "momentum")
    assert torch.equal(m, torch.zeros(4)) and opt.add_slot(v, "momentum", initializer="ones") is m
    ones = opt.add_slot(u, "m2", initializer="ones")
    assert torch.equal(ones, torch.ones(2, 3)) and opt.get_slot(u, "accum_grad").shape == (2, 3)
    custom = opt.add_slot(u, "m3", initializer=lambda shape, dtype: torch.full(shape, 2.5, dtype=dtype), shape=[6])
    assert torch.equal(custom, torch.full((6,), 2.5))
    assert torch.equal(opt.add_slot(v, "m4", initializer=-1.5), torch.full((4,), -1.5))
    assert opt.get_slot_names() == ["accum_grad", "accum_var", "momentum", "m2", "m3", "m4"]
    with pytest.raises(ValueError, match="Unknown initializer"):
        opt.add_slot(v, "bad", initializer="glorot_uniform")
    with pytest.raises(ValueError, match="reserved"):
        opt.add_slot(v, "step")
    with pytest.raises(ValueError, match="shape"):
        opt.add_slot(v, "bad", initializer=torch.zeros(3))
    assert "bad" not in opt.state[v]

    # A variable the optimizer did not know joins it with its state; user slots go into the state_dict.
    new = torch.randn(5, requires_grad=True)
    opt.add_slot(new, "momentum")
    assert any(p is new for p in opt.param_groups[0]["params"]) and "square_avg" in opt.state[new]
    m.fill_(3.0)
    sd = opt.state_dict()
    assert torch.equal(sd["state"][0]["momentum"], torch.full((4,), 3.0))
    fresh = [v.detach().clone().requires_grad_(), u.detach().clone().requires_grad_(),
             new.detach().clone().requires_grad_()]
    other = Adadelta(fresh)
    other.load_state_dict(copy.deepcopy(sd))  # declared user slots load into a fresh optimizer
    assert torch.equal(other.get_slot(fresh[0], "momentum"), torch.full((4,), 3.0))
    assert other.get_slot_names() == opt.get_slot_names()
    for p in fresh:
        p.grad = torch.ones_like(p)
    other.step()  # user slots ride along untouched
    assert torch.equal(other.get_slot(fresh[0], "momentum"), torch.full((4,), 3.0))
    bad = copy.deepcopy(sd)
    bad["state"][0]["junk"] = torch.zeros(4)
    with pytest.raises(ValueError, match="unknown state keys"):
        Adadelta([p.detach().clone() for p in fresh]).load_state_dict(bad)


@pytest.mark.parametrize("path", PATHS)
def test_weights_get_set(path):
    dev = _device(path)
    params = _make([(3,), (2, 2)], torch.float32, dev, seed=12)
    opt = Adadelta(params, fused=_fused(path), name="my_opt")
    assert len(opt.weights) == 1 and opt.weights[0] is opt.iterations
    for step in range(2):
        for p, g in zip(params, _grads(params, seed=100 + step)):
            p.grad = g
        opt.step()
    w = opt.weights
    assert len(w) == 5 and w[0] is opt.iterations
    assert w[1] is opt.state[params[0]]["square_avg"] and w[2] is opt.state[params[1]]["square_avg"]
    assert w[3] is opt.state[params[0]]["acc_delta"] and w[4] is opt.state[params[1]]["acc_delta"]
    assert all(a is b for a, b in zip(opt.variables(), w)) and len(opt.variables()) == len(w)
    values = opt.get_weights()
    assert isinstance(values[1], np.ndarray) and values[0] == 2 and [x.shape for x in values] == [
        (), (3,), (2, 2), (3,), (2, 2)]

    rng = np.random.default_rng(0)
    new = [np.array(7)] + [rng.random(x.shape).astype(np.float32) for x in values[1:]]
    opt.set_weights(new)
    assert int(opt.iterations) == 7
    for t, x in zip(opt.weights[1:], new[1:]):
        assert np.array_equal(_np(t), x.astype(np.float64))

    snapshot = [x.copy() for x in opt.get_weights()]
    with pytest.raises(ValueError) as err:
        opt.set_weights(new[:2])
    assert str(err.value).startswith(
        "You called `set_weights(weights)` on optimizer my_opt with a weight list of length 2, but the optimizer "
        "was expecting 5 weights. Provided weights: ")
    bad = list(new)
    bad[3] = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^Optimizer weight shape \(3,\) not compatible with provided weight "
                                         r"shape \(4,\)\.$"):
        opt.set_weights(bad)
    for a, b in zip(opt.get_weights(), snapshot):  # nothing changed by the failed calls
        assert np.array_equal(a, b)

    opt.set_weights(new[1:])  # Keras 1's list without iterations: iterations becomes 0
    assert int(opt.iterations) == 0


def test_state_dict_keeps_iterations_and_torch_reads_ours():
    params = [torch.randn(4, requires_grad=True)]
    opt = Adadelta(params, decay=0.5)
    for _ in range(3):
        params[0].grad = torch.randn(4)
        opt.step()
    sd = opt.state_dict()
    assert int(sd["keras"]["iterations"]) == 3
    twin = [params[0].detach().clone().requires_grad_()]
    other = Adadelta(twin, decay=0.5)
    other.load_state_dict(copy.deepcopy(sd))
    assert int(other.iterations) == 3
    g = torch.randn(4)
    params[0].grad, twin[0].grad = g.clone(), g.clone()
    opt.step()
    other.step()
    assert torch.equal(params[0], twin[0])  # decay resumed at the same count
    theirs = torch.optim.Adadelta([params[0].detach().clone()])
    theirs.load_state_dict(copy.deepcopy(sd))  # torch ignores our extra entry
    bad = copy.deepcopy(sd)
    bad["keras"]["iterations"] = -2
    with pytest.raises(ValueError, match="non-negative whole number"):
        other.load_state_dict(bad)
    assert int(other.iterations) == 4


def test_pickle_and_deepcopy_keep_the_keras_state():
    params = [torch.randn(6, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = Adadelta(params, clipvalue=0.3, global_clipnorm=0.5, decay=0.1, learning_rate=ExponentialDecay(1.0, 3, 0.7),
                   name="saved")
    for step in range(2):
        for p, g in zip(params, _grads(params, seed=110 + step)):
            p.grad = g
        opt.step()
    opt.add_slot(params[0], "extra", initializer="ones")
    for copier in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        clone = copier(opt)
        assert clone.get_config() == opt.get_config() and int(clone.iterations) == int(opt.iterations)
        assert clone.get_slot_names() == opt.get_slot_names() and len(clone.weights) == len(opt.weights)
        cparams = [p for g in clone.param_groups for p in g["params"]]
        grads = _grads(params, seed=120)
        for p, q, g in zip(params, cparams, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        clone.step()
        for p, q in zip(params, cparams):  # the copy continues exactly as the original
            assert torch.equal(p, q)
        assert int(clone.iterations) == int(opt.iterations)


# ============================================================================== constructor and config
def test_constructor_keras_names_and_errors():
    p = [torch.randn(3, requires_grad=True)]
    opt = Adadelta(p, learning_rate=0.01, epsilon=1e-7, rho=0.95)
    g = opt.param_groups[0]
    assert (g["lr"], g["eps"], g["rho"]) == (0.01, 1e-7, 0.95)
    assert opt.learning_rate == opt.lr == 0.01 and opt.epsilon == 1e-7
    assert Adadelta(p, epsilon=0).param_groups[0]["eps"] == 1e-7  # legacy Keras: epsilon or 1e-7
    assert Adadelta(p, lr=0.3, learning_rate=0.3).param_groups[0]["lr"] == 0.3
    assert Adadelta(p).param_groups[0]["lr"] == 1.0 and Adadelta(p).name == "Adadelta"
    with pytest.raises(TypeError) as err:
        Adadelta(p, momentum=0.9)
    assert str(err.value) == ("Unexpected keyword argument passed to optimizer: momentum. Allowed kwargs are "
                              "{'clipnorm', 'clipvalue', 'decay', 'global_clipnorm', 'lr'}.")
    for k in ("clipnorm", "clipvalue", "global_clipnorm", "decay"):
        with pytest.raises(ValueError) as err:
            Adadelta(p, **{k: -1.0})
        assert str(err.value) == f"Expected {k} >= 0, received: -1.0"
    with pytest.raises(ValueError, match="^Cannot accept both `clipnorm` and `global_clipnorm`"):
        Adadelta(p, clipnorm=1.0, global_clipnorm=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        Adadelta(p, lr=0.1, learning_rate=0.2)
    with pytest.raises(ValueError, match="epsilon"):
        Adadelta(p, eps=1e-3, epsilon=1e-4)
    with pytest.raises(TypeError, match="learning_rate="):
        Adadelta(0.001)
    with pytest.raises(TypeError, match="clipnorm must be a number"):
        Adadelta(p, clipnorm="1")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        Adadelta(p, learning_rate=-0.5)

    opt.clipnorm = 2.0
    with pytest.raises(ValueError, match="Cannot accept both"):
        opt.global_clipnorm = 1.0
    assert opt.global_clipnorm is None and opt.clipnorm == 2.0
    with pytest.raises(ValueError, match="Expected clipvalue >= 0"):
        opt.clipvalue = -3
    opt.learning_rate = 0.05
    assert opt.param_groups[0]["lr"] == 0.05
    with pytest.raises(ValueError, match="Invalid rho"):
        opt.rho = 2.0


def test_config_round_trip_and_tf_keras_configs():
    opt = Adadelta(learning_rate=0.001, rho=0.95, epsilon=1e-7, clipnorm=1.0, decay=0.01, weight_decay=0.1,
                   state_dtype=torch.bfloat16, name="ad")
    config = opt.get_config()
    assert list(config)[:7] == ["name", "clipnorm", "learning_rate", "decay", "rho", "epsilon", "weight_decay"]
    assert config["state_dtype"] == "bfloat16" and config["weight_decay"] == 0.1
    assert json.loads(json.dumps(config)) == config
    again = Adadelta.from_config(config)
    assert again.get_config() == config
    assert again.param_groups[0]["state_dtype"] == torch.bfloat16 and again.clipnorm == 1.0

    # What tf_keras 2.x writes for its legacy Adadelta (float32-rounded values), and its older "lr" key.
    tf_config = {"name": "Adadelta", "clipnorm": 1.0, "learning_rate": 0.0010000000474974513, "decay": 0.01,
                 "rho": 0.949999988079071, "epsilon": 1e-07}
    for cfg in (tf_config, {**{k: v for k, v in tf_config.items() if k != "learning_rate"},
                            "lr": 0.0010000000474974513, "is_legacy_optimizer": True}):
        loaded = Adadelta.from_config(cfg)
        out = loaded.get_config()
        assert {k: out[k] for k in tf_config} == tf_config

    sched = Adadelta(learning_rate=ExponentialDecay(0.5, 10, 0.9, staircase=True), global_clipnorm=3.0,
                     clipvalue=0.1)
    config = sched.get_config()
    assert config["learning_rate"] == {"class_name": "ExponentialDecay", "config": {
        "initial_learning_rate": 0.5, "decay_steps": 10, "decay_rate": 0.9, "staircase": True, "name": None}}
    assert Adadelta.from_config(json.loads(json.dumps(config))).get_config() == config

    class Halving(LearningRateSchedule):
        def __init__(self, start):
            self.start = start

        def __call__(self, step):
            return self.start * 0.5 ** step

        def get_config(self):
            return {"start": self.start}

    config = Adadelta(learning_rate=Halving(0.8)).get_config()
    with pytest.raises(ValueError, match="Unknown learning rate schedule: Halving"):
        Adadelta.from_config(config)
    restored = Adadelta.from_config(config, custom_objects={"Halving": Halving})
    assert isinstance(restored.learning_rate, Halving) and restored.get_config() == config
    with pytest.raises(TypeError, match="get_config"):
        Adadelta(learning_rate=lambda step: 0.1).get_config()


# ============================================================================== the norm kernel and the device path
@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_kernel), False], ids=["kernel", "torch"])
def test_squared_norms_against_numpy(fused):
    dev = KERNEL_DEVICE if fused else "cpu"
    g = torch.Generator().manual_seed(13)
    shapes = [(1,), (7,), (2049,), (0,), (3, 5), (16384 + 17,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float32]
    grads = [(torch.randn(s, generator=g) * 4).to(d).to(dev) for s, d in zip(shapes, dtypes)]
    grads.append(torch.randn(3, 2, generator=g, dtype=torch.complex64).to(dev))
    grads.append(torch.randn(40, generator=g)[::2].to(dev) if not fused else torch.randn(8, generator=g).to(dev))
    for clip_value, scale in ((None, None), (1.5, 4.0), (0.0, None)):
        out = clipping.squared_norms(grads, clip_value=clip_value, fused=fused,
                                     grad_scale=None if scale is None else torch.tensor([scale], device=dev))
        expected = []
        for t in grads:
            x = torch.view_as_real(t) if t.is_complex() else t
            x = x.detach().cpu().double().numpy() / (scale or 1.0)
            if clip_value is not None:
                x = np.clip(x, -clip_value, clip_value)
            expected.append(float(np.sum(x * x)))
        expected.append(sum(expected))
        assert out.shape == (len(grads) + 1,) and out.dtype == torch.float32
        _close(out, expected, torch.float32, f"clip={clip_value} scale={scale}")
        again = clipping.squared_norms(grads, clip_value=clip_value, fused=fused,
                                       grad_scale=None if scale is None else torch.tensor([scale], device=dev))
        assert torch.equal(out, again)  # a fixed summation order: bit-identical reruns


@pytest.mark.parametrize("clip", [c for c in CLIPS if c != "none"])
def test_clip_gradients_function_matches_keras(clip):
    g = torch.Generator().manual_seed(21)
    grads = [torch.randn(s, generator=g) * k for s, k in zip(SHAPES, SCALES)]
    originals = [t.clone() for t in grads]
    out = clipping.clip_gradients(grads, **CLIPS[clip])
    expected = KerasAdadelta(**CLIPS[clip]).clip([_np(t) for t in grads])
    for o, e in zip(out, expected):
        _close(o, e, torch.float32, clip)
    assert all(torch.equal(a, b) for a, b in zip(grads, originals))  # inputs untouched
    with pytest.raises(ValueError, match="Cannot accept both"):
        clipping.multipliers(torch.ones(3), clipnorm=1.0, global_clipnorm=1.0)


@needs_kernel
def test_norm_kernel_propagates_nan_and_inf():
    grads = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 2.0]), torch.tensor([3.0])]
    grads = [t.to(KERNEL_DEVICE) for t in grads]
    out = clipping.squared_norms(grads, clip_value=10.0, fused=True).cpu()
    assert out[0].isnan() and out[1] == 104.0 and out[2] == 9.0 and out[3].isnan()


@needs_kernel
def test_one_extra_launch_and_slices_not_gathers(monkeypatch):
    counter = _count_launches(monkeypatch)
    fp32 = _make([(9,), (33,)], torch.float32, KERNEL_DEVICE, seed=14)
    bf16 = _make([(17,), (5,)], torch.bfloat16, KERNEL_DEVICE, seed=15)
    params = [fp32[0], bf16[0], fp32[1], bf16[1]]  # interleaved dtypes: two update launches
    for kwargs, launches in ((dict(), 2), (dict(clipvalue=0.1), 2), (dict(clipnorm=0.5), 3),
                             (dict(global_clipnorm=0.5, clipvalue=1.0), 3)):
        opt = Adadelta(params, fused=True, **kwargs)
        for p, g in zip(params, _grads(params, seed=16, scales=[1.0] * 4)):
            p.grad = g
        before = counter["n"]
        opt.step()
        assert counter["n"] - before == launches, kwargs
    # The multiplier table of each update launch is a view of the step's vector, not a gathered copy.
    route, grads = opt._routed()
    transform = opt._clip_multipliers(route, grads, None)
    vec = transform.vectors[torch.device(KERNEL_DEVICE)]
    for idx in ([0, 2], [1, 3]):
        table = transform.table(idx, torch.device(KERNEL_DEVICE))
        assert table.untyped_storage().data_ptr() == vec.untyped_storage().data_ptr()
        torch.testing.assert_close(table, torch.stack([transform[i] for i in idx]))


@needs_kernel
def test_squared_norm_hook_sees_the_norms_before_multipliers():
    """A data-parallel setup all-reduces the squared norms; here a hook plays two identical ranks."""
    params = _make(SHAPES, torch.float32, KERNEL_DEVICE, seed=17)
    values = {i: _np(p) for i, p in enumerate(params)}
    opt = Adadelta(params, learning_rate=0.5, clipnorm=1.0, fused=True)
    seen = []

    def all_reduce_two_ranks(sq):
        seen.append(sq.clone())
        sq.mul_(2.0)  # in place, like dist.all_reduce(sq) over two ranks holding the same shards

    opt._squared_norm_hook = all_reduce_two_ranks
    oracle = KerasAdadelta(learning_rate=0.5, rho=0.9, epsilon=1e-6, clipnorm=1.0, norm_factor=2.0)
    grads = _grads(params, seed=18)
    _step_both(opt, oracle, params, grads, values)
    assert len(seen) == 1 and seen[0].shape == (len(params) + 1,)
    _close(seen[0][:-1], [float((_np(g) ** 2).sum()) for g in grads], torch.float32, "squared norms")
    for i, p in enumerate(params):
        _close(p, values[i], torch.float32, f"param {i}")


@needs_kernel
def test_norm_kernel_codegen_vectorised():
    """Compiled for sm_90 without a GPU (the interpreter off in a subprocess)."""
    import os
    import subprocess
    import sys

    code = r"""
import re, json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_adadelta.kernels.norms import sqnorm_kernel
sig = {"grad_table": "*i64", "tensor_meta": "*i64", "chunk_tensor": "*i32", "chunk_block": "*i32",
       "partials": "*fp32", "counters": "*i32", "out": "*fp32", "coef": "*fp32", "grad_scale": "*fp32",
       "clip_value": "fp32", "threshold": "fp32", "num_tensors": "i32"}
ce = {"BLOCK": 2048, "CHUNK_BLOCKS": 8, "RBLOCK": 1024, "HAS_SCALER": False, "HAS_CLIPVALUE": True, "MODE": 1}
for k in ce:
    sig[k] = "constexpr"
attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
src = ASTSource(fn=sqnorm_kernel, signature=sig, constexprs=ce, attrs=attrs)
c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
ptx = c.asm["ptx"]
print(json.dumps({"v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)), "local": len(re.findall(r"\.local", ptx)),
                  "atom": len(re.findall(r"atom\.", ptx))}))
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    # 128-bit loads on the aligned branch (fp32 and both 16-bit dtypes), no spills, the two counters' atomics.
    assert info["v4"] >= 3 and info["local"] == 0 and info["atom"] >= 2, info


@needs_gpu
def test_fused_step_with_clipping_does_not_synchronise():
    params = _make([(4097,), (33,)], torch.bfloat16, "cuda", seed=19)
    opt = Adadelta(params, fused=True, clipvalue=0.5, global_clipnorm=1.0, decay=0.01)
    for step in range(3):
        for p, g in zip(params, _grads(params, seed=step, scales=[1.0, 1.0])):
            p.grad = g
        if step == 0:
            opt.step()  # first step: plans and tables are built
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(found_inf=torch.zeros(1, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(opt.iterations) == 3


def test_docs_migration_example_runs():
    """The runnable examples of docs/keras.md, as written there."""
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "keras.md")
    with open(path) as f:
        blocks = re.findall(r"```python\n(# runnable\n.*?)```", f.read(), flags=re.S)
    assert blocks, "docs/keras.md lost its runnable example"
    for block in blocks:
        exec(compile(block, "docs/keras.md", "exec"), {})


# ============================================================================== Keras details found by review
@pytest.mark.parametrize("path", CPU_PATHS)
def test_get_weights_is_a_snapshot_that_set_weights_restores(path, monkeypatch):
    dev, fused = use_path(path, monkeypatch)
    params = _make([(5,), (3, 3)], torch.float32, dev, seed=40)
    opt = Adadelta(params, fused=fused)
    for step in range(3):
        for p, g in zip(params, _grads(params, seed=41 + step)):
            p.grad = g
        opt.step()
        if step == 0:
            snapshot = opt.get_weights()
            expected = [_np(w) for w in opt.weights]
    for a, e in zip(snapshot, expected):  # later steps did not reach into the snapshot
        assert np.array_equal(a, e)
    opt.set_weights(snapshot)
    assert int(opt.iterations) == 1
    for w, e in zip(opt.weights, expected):
        assert np.array_equal(_np(w), e)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_zero_argument_callable_learning_rate_is_read_every_step(path, monkeypatch):
    """Keras calls a callable that is not a LearningRateSchedule with no arguments, each step."""
    dev, fused = use_path(path, monkeypatch)
    box = [0.7]
    params = _make(SHAPES[:2], torch.float32, dev, seed=43)
    values = {i: _np(p) for i, p in enumerate(params)}
    opt = Adadelta(params, learning_rate=lambda: box[0], rho=0.8, epsilon=1e-6, fused=fused)
    oracle = KerasAdadelta(rho=0.8, epsilon=1e-6, schedule=lambda t: box[0])
    assert opt.param_groups[0]["lr"] == 0.7
    for step, lr in enumerate([0.7, 0.2, 1.5]):
        box[0] = lr
        _step_both(opt, oracle, params, _grads(params, seed=44 + step), values)
    opt.learning_rate = lambda: 0.05  # the setter takes one as well
    oracle.schedule = lambda t: 0.05
    _step_both(opt, oracle, params, _grads(params, seed=50), values)
    for i, p in enumerate(params):
        _close(p, values[i], torch.float32, f"param {i}")
    with pytest.raises(TypeError, match="get_config"):
        opt.get_config()  # a lambda cannot be serialised, as before


def test_from_config_applies_keras_epsilon_fallback_to_keras_configs_only():
    keras_config = {"name": "Adadelta", "learning_rate": 0.001, "decay": 0.0, "rho": 0.95}
    for eps in (0, 0.0, None):
        opt = Adadelta.from_config({**keras_config, "epsilon": eps})
        assert opt.epsilon == 1e-7, eps
    assert Adadelta.from_config({**keras_config, "epsilon": 1e-5}).epsilon == 1e-5
    ours = Adadelta([torch.zeros(2, requires_grad=True)], eps=0.0).get_config()  # torch allows eps=0
    assert ours["epsilon"] == 0.0
    assert Adadelta.from_config(json.loads(json.dumps(ours))).get_config() == ours


def test_get_config_turns_numpy_numbers_into_json():
    opt = Adadelta([torch.zeros(2, requires_grad=True)], learning_rate=np.float32(0.5), rho=np.float32(0.9),
                   epsilon=np.float64(1e-6), clipnorm=np.float32(1.5), decay=np.float32(0.25))
    config = opt.get_config()
    text = json.dumps(config)
    for k in ("learning_rate", "rho", "epsilon", "clipnorm", "decay"):
        assert type(config[k]) is float, k
    again = Adadelta.from_config(json.loads(text))
    assert again.get_config() == config
    assert again.rho == float(np.float32(0.9)) and again.clipnorm == 1.5


@pytest.mark.parametrize("path", CPU_PATHS)
def test_add_slot_creates_adadelta_slots_from_the_initializer(path, monkeypatch):
    """As in Keras: a slot created by add_slot before the first apply starts from its initializer."""
    dev, fused = use_path(path, monkeypatch)
    (v,) = _make([(6,)], torch.float32, dev, seed=60)
    values = {0: _np(v)}
    opt = Adadelta([v], learning_rate=0.5, rho=0.9, epsilon=1e-6, fused=fused)
    with pytest.raises(ValueError, match="variable's shape"):
        opt.add_slot(v, "accum_grad", "ones", shape=(2, 3))
    assert not opt.state[v]  # the bad call created nothing
    grad_slot = opt.add_slot(v, "accum_grad", initializer="ones")
    acc_slot = opt.add_slot(v, "accum_var", initializer=0.25)
    assert torch.equal(grad_slot, torch.ones(6, device=dev)) and torch.equal(acc_slot, torch.full((6,), 0.25,
                                                                                                  device=dev))
    assert opt.add_slot(v, "accum_grad", initializer=7.0) is grad_slot  # it exists now: returned as it is
    assert torch.equal(grad_slot, torch.ones(6, device=dev))
    oracle = KerasAdadelta(learning_rate=0.5, rho=0.9, epsilon=1e-6)
    oracle.accum_grad[0], oracle.accum_var[0] = np.ones(6), np.full(6, 0.25)
    for step in range(3):
        _step_both(opt, oracle, [v], _grads([v], seed=61 + step), values)
    _close(v, values[0], torch.float32, "variable")
    _close(opt.get_slot(v, "accum_grad"), oracle.accum_grad[0], torch.float32, "accum_grad")
    _close(opt.get_slot(v, "accum_var"), oracle.accum_var[0], torch.float32, "accum_var")
    assert opt.add_slot(v, "accum_var", initializer=3.0) is opt.get_slot(v, "accum_var")  # after a step: kept
    _close(opt.get_slot(v, "accum_var"), oracle.accum_var[0], torch.float32, "accum_var after add_slot")


@pytest.mark.parametrize("path", CPU_PATHS)
def test_weights_follow_the_order_of_the_first_apply(path, monkeypatch):
    dev, fused = use_path(path, monkeypatch)
    a, b, c = _make([(3,), (2,), (4,)], torch.float32, dev, seed=70)
    opt = Adadelta([a, b, c], fused=fused)
    oracle = KerasAdadelta()
    keys = {id(a): "a", id(b): "b", id(c): "c"}
    ga, gb, gc = _grads([a, b, c], seed=71)
    opt.param_groups[0]["lr"] = -1.0  # this apply fails inside step(): the order it logged is undone
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.apply_gradients([(ga, a), (gb, b)])
    opt.param_groups[0]["lr"] = 1.0
    opt.apply_gradients([(gc, c), (ga, a)])
    oracle.apply_gradients([(_np(gc), "c"), (_np(ga), "a")], {"a": _np(a), "b": _np(b), "c": _np(c)})
    opt.apply_gradients([(gb, b), (gc, c)])
    oracle.apply_gradients([(_np(gb), "b"), (_np(gc), "c")], {"a": _np(a), "b": _np(b), "c": _np(c)})
    entries = [(keys[id(p)], name) for p, name, _ in opt._slot_entries()]
    assert entries == oracle.weight_order == [("c", "accum_grad"), ("a", "accum_grad"), ("c", "accum_var"),
                                              ("a", "accum_var"), ("b", "accum_grad"), ("b", "accum_var")]
    assert [tuple(w.shape) for w in opt.weights] == [(), (4,), (3,), (4,), (3,), (2,), (2,)]


def test_squared_norm_hook_is_set_by_a_public_method():
    """set_squared_norm_hook is the public way to set the data-parallel hook (the former private attribute
    still works, see above); None removes it, and a hook that is not callable is refused."""
    params = _make(SHAPES, torch.float32, "cpu", seed=19)
    opt = Adadelta(params, clipnorm=1.0, fused=False)
    seen = []
    opt.set_squared_norm_hook(lambda sq: seen.append(sq.clone()))
    for p, g in zip(params, _grads(params, seed=20)):
        p.grad = g
    opt.step()
    assert len(seen) == 1 and seen[0].shape == (len(params) + 1,)
    _close(seen[0][:-1], [float((_np(p.grad) ** 2).sum()) for p in params], torch.float32, "squared norms")
    opt.set_squared_norm_hook(None)
    opt.step()
    assert len(seen) == 1
    with pytest.raises(TypeError, match="callable"):
        opt.set_squared_norm_hook(3)
