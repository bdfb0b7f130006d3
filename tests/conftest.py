"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET is read when @triton.jit decorates, so it is set here, before anything imports
triton. With a GPU the kernels compile for it and the interpreter stays off.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_adadelta import _triton  # noqa: E402

HAS_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_GPU else "cpu"

needs_kernel = pytest.mark.skipif(
    not (_triton.HAS_TRITON and (HAS_GPU or _triton.interpreting())),
    reason="the Triton kernel needs triton, and a GPU or TRITON_INTERPRET=1",
)
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


# The three paths a CPU-only machine can test: the reference (fused=False), the fused CPU path and
# the Triton kernel (in the interpreter).
CPU_PATHS = ["reference", "cpu-fused", pytest.param("kernel", marks=needs_kernel)]


def use_path(path: str, monkeypatch) -> tuple:
    """(device, fused) that route a test's tensors to ``path`` (one of :data:`CPU_PATHS`)."""
    if path == "cpu-fused":
        from triton_adadelta import cpu_fused

        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(cpu_fused, "MIN_NUMEL", 0)
        return "cpu", None
    return (KERNEL_DEVICE, True) if path == "kernel" else ("cpu", False)


def path_taken(opt) -> str:
    """Which of :data:`CPU_PATHS` the last routed step of ``opt`` used: "kernel" when it launched the
    kernel, "cpu-fused" when the fused CPU path took tensors, else "reference"."""
    route = opt._route
    if route.buckets:
        return "kernel"
    return "cpu-fused" if any(plan.calls for plan in route.cpu.values()) else "reference"
