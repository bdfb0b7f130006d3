"""Where triton is, and whether its kernels may run on the tensors at hand."""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # macOS, Windows, minimal installs: the PyTorch path still works
    HAS_TRITON = False


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors, with numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_device_ok(device: torch.device) -> bool:
    """Can the Triton kernel update tensors on ``device`` in this process?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def adadelta_kernel() -> Any:
    """The update kernel, imported on first use so that importing the package never needs triton."""
    from .kernels.adadelta import adadelta_kernel as kernel

    return kernel
