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
