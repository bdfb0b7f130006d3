"""Keras 3 (torch backend): triton_adadelta.keras3.Adadelta against keras.optimizers.Adadelta itself.

Each comparison fits the same tiny model (same initial weights, same batches, no shuffling) once with
Keras' optimizer and once with ours, and compares the weights and every optimizer variable.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported (tests/ may import it first)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import use_path  # noqa: E402

import triton_adadelta  # noqa: E402
from triton_adadelta import _triton, cpu_fused, reference  # noqa: E402
from triton_adadelta.keras3 import Adadelta  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="keras was imported with another backend")

RNG = np.random.default_rng(18)
X = RNG.normal(size=(48, 5)).astype("float32")
Y = RNG.normal(size=(48, 3)).astype("float32")


@pytest.fixture(autouse=True)
def cpu_fused_path(monkeypatch):
    """The fused CPU path (not the Triton interpreter that conftest selects without a GPU) unless a
    test asks for another path (so the C calls are not required: tests that need them count them)."""
    use_path("cpu-fused", monkeypatch, checked=False)


def make_model(dtype=None, seed=0) -> keras.Model:
    keras.backend.clear_session()  # the same layer names each time
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh", dtype=dtype),
                             keras.layers.Dense(3, dtype=dtype)])


def fit(optimizer, dtype=None, epochs=2) -> keras.Model:
    model = make_model(dtype)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


def values(model: keras.Model) -> list[np.ndarray]:
    """Model weights, then every optimizer variable (a LossScaleOptimizer's inner one's included)."""
    opt = model.optimizer
    variables = list(opt.variables)
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):
        variables += list(opt.inner_optimizer.variables)
    return [np.asarray(w.numpy(), dtype=np.float64) for w in list(model.weights) + variables]


def assert_same_numbers(ours: keras.Model, theirs: keras.Model) -> None:
    a, b = values(ours), values(theirs)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)  # float32 rounding, a few steps


OPTIONS = {
    "defaults": dict(),
    "lr_rho_eps": dict(learning_rate=0.5, rho=0.9, epsilon=1e-5),
    "clipnorm": dict(clipnorm=0.05),
    "global_clipnorm": dict(global_clipnorm=0.05),
    "clipvalue": dict(clipvalue=0.005),
    "weight_decay": dict(weight_decay=0.2),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
    "gradient_accumulation": dict(gradient_accumulation_steps=2),
    "loss_scale_factor": dict(loss_scale_factor=64.0),
    "schedule": dict(learning_rate="schedule"),
    "callable_lr": dict(learning_rate="callable"),
}


def _resolve(options: dict) -> dict:
    options = dict(options)
    if options.get("learning_rate") == "schedule":
        options["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=2, decay_rate=0.5)
    elif options.get("learning_rate") == "callable":
        options["learning_rate"] = lambda: 0.75
    else:
        options.setdefault("learning_rate", 1.0)  # large enough that the weights move visibly
    return options


@pytest.mark.parametrize("option", list(OPTIONS))
def test_fit_equals_keras(option):
    ours = fit(Adadelta(**_resolve(OPTIONS[option])))
    theirs = fit(keras.optimizers.Adadelta(**_resolve(OPTIONS[option])))
    assert [v.path.split("/", 1)[1] for v in ours.optimizer.variables] == \
           [v.path.split("/", 1)[1] for v in theirs.optimizer.variables]
    assert [v.dtype for v in ours.optimizer.variables] == [v.dtype for v in theirs.optimizer.variables]
    assert int(ours.optimizer.iterations) == int(theirs.optimizer.iterations) > 0
    # The weights moved: the comparison is not between two untouched models.
    assert not np.allclose(values(ours)[0], make_model().weights[0].numpy())
    assert_same_numbers(ours, theirs)


def test_loss_scale_optimizer_and_mixed_precision_policy():
    policy = "mixed_bfloat16"  # float32 variables, bfloat16 compute
    ours = fit(keras.optimizers.LossScaleOptimizer(Adadelta(learning_rate=1.0)), dtype=policy)
    theirs = fit(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adadelta(learning_rate=1.0)), dtype=policy)
    assert ours.weights[0].dtype == "float32" and ours.layers[0].compute_dtype == "bfloat16"
    assert int(ours.optimizer.inner_optimizer.iterations) > 0
    assert_same_numbers(ours, theirs)


def test_variables_are_the_flat_state():
    model = fit(Adadelta(learning_rate=1.0), epochs=1)
    opt = model.optimizer
    slots = opt.variables[2:]
    assert [v.name.rsplit("_", 2)[-2:] for v in slots[:2]] == [["accumulated", "grad"], ["delta", "var"]]
    torch_opt = opt.torch_optimizer
    for i, variable in enumerate(slots):
        ours_name = ("square_avg", "acc_delta")[i % 2]
        p = opt._torch_params[id(model.trainable_variables[i // 2])]
        view = torch_opt.state[p][ours_name]
        assert variable.value.data_ptr() == view.data_ptr()
        # One flat buffer per state: all accumulated_grads in one, all accumulated_delta_vars in another.
        assert variable.value.untyped_storage().data_ptr() == slots[i % 2].value.untyped_storage().data_ptr()
    # A write through Keras is a write into our state, and the next step reads it.
    slots[0].assign(np.full(slots[0].shape, 0.25, dtype="float32"))
    p0 = opt._torch_params[id(model.trainable_variables[0])]
    assert torch.equal(torch_opt.state[p0]["square_avg"], torch.full(tuple(slots[0].shape), 0.25))


@pytest.mark.parametrize("path", ["cpu-fused", pytest.param("kernel", marks=pytest.mark.skipif(
    not _triton.HAS_TRITON, reason="needs triton"))])
def test_the_fused_path_ran(path, monkeypatch):
    calls = []
    if path == "kernel":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # without a GPU: the Triton kernel in the interpreter
        kernel = _triton.adadelta_kernel()

        class Counting:
            def __getitem__(self, grid):
                calls.append(grid)
                return kernel[grid]

        monkeypatch.setattr(_triton, "adadelta_kernel", lambda: Counting())
    else:
        real_call = cpu_fused._call
        monkeypatch.setattr(cpu_fused, "_call", lambda *a: (calls.append(a), real_call(*a))[1])
    ours = fit(Adadelta(learning_rate=1.0, clipnorm=0.05), epochs=1)
    theirs = fit(keras.optimizers.Adadelta(learning_rate=1.0, clipnorm=0.05), epochs=1)
    assert len(calls) == 3  # one fused call per step (48 samples / 16): every tensor in it
    assert_same_numbers(ours, theirs)


@pytest.mark.parametrize("options", [dict(), dict(master_weights=True), dict(master_weights="remainder"),
                                     dict(stochastic_rounding=True, seed=7)])
def test_bf16_weights_keep_fp32_state_and_match_the_reference(options):
    model = make_model(dtype="bfloat16")
    opt = Adadelta(learning_rate=1.0, **options)
    variables = model.trainable_variables
    opt.build(variables)
    n = len(variables)
    assert [v.dtype for v in variables] == ["bfloat16"] * n
    assert [v.dtype for v in opt.variables[2:2 + 2 * n]] == ["float32"] * 2 * n
    masters = opt.variables[2 + 2 * n:]
    if options.get("master_weights"):
        assert [v.name.endswith("_master") for v in masters] == [True] * n
        assert {v.dtype for v in masters} == {"int16" if options["master_weights"] == "remainder" else "float32"}
    else:
        assert masters == []
    params = [v.value.detach().clone() for v in variables]
    fp32 = [p.float() for p in params]  # the master copies of the reference (the remainder mode's value too)
    states = [(torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)) for p in params]
    torch_opt = opt.torch_optimizer
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]
        opt.apply(grads, variables)
        for i, (p, g, (v, u)) in enumerate(zip(params, grads, states)):
            rng = None
            if options.get("stochastic_rounding"):  # the stream our optimizer keys by seed, flat offset and step
                flat_offset = torch_opt.state[torch_opt.param_groups[0]["params"][i]]["square_avg"].storage_offset()
                rng = reference.PhiloxStream(torch.tensor(step), opt.seed * 64 + 1, flat_offset)
            reference.adadelta_update_(p, g, v, u, lr=1.0, rho=0.95, eps=1e-7,
                                       master=fp32[i] if options.get("master_weights") else None,
                                       stochastic_rounding=bool(options.get("stochastic_rounding")), rng=rng)
    for var, p in zip(variables, params):
        assert torch.equal(var.value, p)
    for slot, ref in zip(opt.variables[2:], [t for pair in states for t in pair]):
        assert torch.equal(slot.value, ref)
    if options.get("master_weights") is True:
        for master, ref in zip(masters, fp32):
            assert torch.equal(master.value, ref)


@pytest.mark.parametrize("dtype, options", [
    (None, dict(learning_rate=1.0, clipnorm=0.05, weight_decay=0.1)),
    ("bfloat16", dict(learning_rate=1.0, stochastic_rounding=True)),
    (None, dict(learning_rate="schedule", gradient_accumulation_steps=2, use_ema=True)),
    ("bfloat16", dict(learning_rate=1.0, master_weights=True)),
])
def test_save_and_load_model_continue_exactly(tmp_path, dtype, options):
    model = fit(Adadelta(**_resolve(options)), dtype=dtype, epochs=1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is Adadelta
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for m in (model, loaded):
        m.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(values(model), values(loaded)):
        np.testing.assert_array_equal(a, b)


def test_set_weights_continues_exactly():
    model = fit(Adadelta(learning_rate=1.0, stochastic_rounding=True, seed=5), dtype="bfloat16", epochs=1)
    copy_ = make_model(dtype="bfloat16")
    copy_.set_weights(model.get_weights())
    copy_.compile(optimizer=Adadelta(learning_rate=1.0, stochastic_rounding=True, seed=5), loss="mse")
    copy_.optimizer.build(copy_.trainable_variables)
    copy_.optimizer.set_weights([v.numpy() for v in model.optimizer.variables])
    for m in (model, copy_):
        m.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(values(model), values(copy_)):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=3, decay_rate=0.9)
    opt = Adadelta(learning_rate=schedule, rho=0.9, epsilon=1e-6, clipvalue=0.5, weight_decay=0.01,
                   use_ema=True, ema_momentum=0.9, gradient_accumulation_steps=4, name="mine",
                   state_dtype="bfloat16", stochastic_rounding=True, seed=1234)
    config = opt.get_config()
    assert config["state_dtype"] == "bfloat16" and config["seed"] == 1234 and config["rho"] == 0.9
    again = Adadelta.from_config(copy.deepcopy(config))  # (Keras' from_config edits the dict it is given)
    assert again.get_config() == config
    assert again.state_dtype == torch.bfloat16
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is Adadelta and restored.get_config() == config
    # Keras' own Adadelta's config is ours less our keys.
    keras_config = keras.optimizers.Adadelta(learning_rate=schedule, rho=0.9, epsilon=1e-6, clipvalue=0.5,
                                             weight_decay=0.01, use_ema=True, ema_momentum=0.9,
                                             gradient_accumulation_steps=4, name="mine").get_config()
    assert {k: v for k, v in config.items() if k in keras_config} == keras_config
    assert Adadelta.from_config(copy.deepcopy(keras_config)).get_config()["state_dtype"] == "float32"


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="master_weights cannot be combined with weight_decay"):
        Adadelta(master_weights=True, weight_decay=0.1)
    with pytest.raises(TypeError, match="master_weights must be a bool or 'remainder'"):
        Adadelta(master_weights="float32")
    with pytest.raises(ValueError, match="rho"):
        Adadelta(rho=1.5)
    with pytest.raises(ValueError, match="epsilon|eps"):
        Adadelta(epsilon=-1.0)
    with pytest.raises(ValueError, match="state_dtype"):
        Adadelta(state_dtype="float8")
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"):
        Adadelta(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        Adadelta(gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="not recognized"):
        Adadelta(momentum=0.9)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="torch backend only.*'jax'"):
        Adadelta()


def test_a_step_that_fails_its_checks_changes_nothing():
    model = make_model()
    opt = Adadelta(learning_rate=1.0)
    variables = model.trainable_variables
    opt.build(variables)
    before = [v.numpy().copy() for v in variables + opt.variables]
    grads = [torch.randn(tuple(v.shape)) for v in variables]
    grads[1] = torch.randn(2)  # the wrong shape
    with pytest.raises(RuntimeError):
        opt.apply(grads, variables)
    for v, b in zip(variables + opt.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_a_replaced_variable_tensor_is_an_error():
    model = make_model()
    opt = Adadelta(learning_rate=1.0)
    variables = model.trainable_variables
    opt.build(variables)
    variables[2]._value = torch.nn.Parameter(variables[2].value.detach().clone())
    with pytest.raises(RuntimeError, match="the tensor of variable .*dense_1/kernel was replaced"):
        opt.apply([torch.randn(tuple(v.shape)) for v in variables], variables)


def test_tf_keras2_class_points_keras3_configs_here():
    config = keras.optimizers.Adadelta(learning_rate=0.5).get_config()
    with pytest.raises(TypeError, match=r"Keras 3 optimizer config.*triton_adadelta\.keras3\.Adadelta"):
        triton_adadelta.Adadelta.from_config(config)
