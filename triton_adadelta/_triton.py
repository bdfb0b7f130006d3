"""Where triton is, and whether its kernels may run on the tensors at hand."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

# Found, not imported: importing triton takes half a second and is left to the first kernel launch.
# macOS, Windows and minimal installs have no triton; the PyTorch path works there.
HAS_TRITON = importlib.util.find_spec("triton") is not None


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
