"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET is read when @triton.jit decorates, and that includes triton's own library of
jit functions (``tl.philox``, ``tl.randint``, the reductions' combine functions), decorated when
triton is first imported. So it is set here, and triton and the kernels are imported here, while it
is on: a test that turns the interpreter off for a while (the fused CPU path's tests) would
otherwise let the first import of triton happen then -- torch._dynamo imports it, e.g. through
``torch.compiler.is_compiling()`` -- and a later interpreted kernel calling ``tl.philox`` fails with
"Cannot call @triton.jit'd outside of the scope of a kernel". With a GPU the kernels compile for
it and the interpreter stays off.

Every test starts from the same seeds (torch, ``random``, numpy): a test's random calls give the
same values whether it runs alone or after others, in any order.
"""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_adadelta import _triton, cpu_fused  # noqa: E402

HAS_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_GPU else "cpu"

if _triton.HAS_TRITON and (HAS_GPU or _triton.interpreting()):
    import triton.language  # noqa: F401  (see the module docstring: decorated now, under this setting)
    from triton_adadelta.kernels import adadelta as _adadelta_kernels  # noqa: F401
    from triton_adadelta.kernels import norms as _norm_kernels  # noqa: F401

needs_kernel = pytest.mark.skipif(
    not (_triton.HAS_TRITON and (HAS_GPU or _triton.interpreting())),
    reason="the Triton kernel needs triton, and a GPU or TRITON_INTERPRET=1",
)
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def has_c_compiler() -> bool:
    """Is there a C compiler on this machine? Then the fused CPU path must build (CI has one)."""
    return cpu_fused._compiler() is not None


def fused_cpu_library():
    """The compiled CPU update; a test fails (not skips) when it does not build on a machine with a
    C compiler, and skips only where there is none."""
    if not cpu_fused.ENABLED:
        pytest.skip("the fused CPU path is switched off (TRITON_ADADELTA_CPU_COMPILE=0)")
    try:
        return cpu_fused.library()
    except cpu_fused.BuildError as exc:
        if has_c_compiler():
            pytest.fail(f"the fused CPU path does not build, though there is a C compiler: {exc}")
        pytest.skip(f"no C compiler on this machine: {exc}")


@pytest.fixture(autouse=True)
def _seeded(request):
    """The same seeds before every test, derived from its id: reproducible alone and in any order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    yield


@pytest.fixture(autouse=True)
def _fused_cpu_calls_checked(request):
    """Tests routed to the fused CPU path by :func:`use_path` must have called it (no silent fallback)."""
    _FUSED_CPU_CALLS.clear()
    yield
    declines = request.node.originalname in _FUSED_CPU_DECLINES
    if request.node.originalname in _FUSED_CPU_MAY_DECLINE:
        return
    if _FUSED_CPU_CALLS and (_FUSED_CPU_CALLS[-1] == 0) != declines:
        pytest.fail("the test asked for the fused CPU path but no step called it (fell back to the reference path)"
                    if not declines else "the fused CPU path took tensors it must leave to the reference path")


_FUSED_CPU_CALLS: list[int] = []  # one counter per use_path("cpu-fused") in the running test
# Tests whose "cpu-fused" case checks that the path declines its tensors (lazily negated views): there
# the C update must not run at all. (By name here, so that the test files need no marker.)
_FUSED_CPU_DECLINES = frozenset({"test_lazily_negated_gradients_and_parameters_are_read_as_their_values"})
# Tests whose "cpu-fused" case includes cases the path does not take by design (differentiable=True,
# float64 parameters): the check does not apply to them. (Found when i16's and i19's tests met.)
_FUSED_CPU_MAY_DECLINE = frozenset({
    "test_differentiable_gradients_through_two_steps_equal_torch",
    "test_differentiable_gradient_with_respect_to_a_tensor_lr",
    "test_configurations_match_torch",
    "test_configurations_match_torch_in_other_dtypes_and_groups",
})


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


# The three paths a CPU-only machine can test: the reference (fused=False), the fused CPU path and
# the Triton kernel (in the interpreter).
CPU_PATHS = ["reference", "cpu-fused", pytest.param("kernel", marks=needs_kernel)]


def use_path(path: str, monkeypatch, checked: bool = True) -> tuple:
    """(device, fused) that route a test's tensors to ``path`` (one of :data:`CPU_PATHS`).

    For "cpu-fused" the compiled update must be available (a failure where a C compiler exists), and
    the C calls are counted: the test fails at teardown if none ran (unless not ``checked``: a default
    path for tests that may pick another one)."""
    if path == "cpu-fused":
        fused_cpu_library()
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(cpu_fused, "MIN_NUMEL", 0)
        monkeypatch.setattr(cpu_fused, "_failed", False)
        if not checked:
            return "cpu", None
        real_call = cpu_fused._call
        _FUSED_CPU_CALLS.append(0)

        def counted(*args, **kwargs):
            _FUSED_CPU_CALLS[-1] += 1
            return real_call(*args, **kwargs)

        monkeypatch.setattr(cpu_fused, "_call", counted)
        return "cpu", None
    return (KERNEL_DEVICE, True) if path == "kernel" else ("cpu", False)


def path_taken(opt) -> str:
    """Which of :data:`CPU_PATHS` the last routed step of ``opt`` used: "kernel" when it launched the
    kernel, "cpu-fused" when the fused CPU path took tensors, else "reference"."""
    route = opt._route
    if route.buckets:
        return "kernel"
    return "cpu-fused" if any(plan.calls for plan in route.cpu_plans.values()) else "reference"
