"""The fast CPU path: one fused pass over memory for all tensors of a step, in one call.

``torch.optim.Adadelta`` (and the reference path) runs about a dozen element-wise operations per
step, each a full pass over memory. On a CPU the update is memory bound, so this path runs the
Triton kernel's design on the CPU: a small C function (``kernels/adadelta_cpu.c``, shipped as
``triton_adadelta/kernels/adadelta_cpu.c``) receives a table with the addresses and sizes of every
tensor and walks them all, reading p, g, square_avg and acc_delta once and writing p, square_avg and
acc_delta once, split across torch's threads (OpenMP). The equations and their order are the
reference's::

    g  = clamp(g / grad_scale, -clip_value, clip_value) * clip_coef;  g = -g if maximize
    g  = g + wd * p  (only where wd != 0)
    v  = rho * v + (1 - rho) * g * g
    d  = sqrt(u + eps) / sqrt(v + eps) * g
    u  = rho * u + (1 - rho) * d * d
    p  = p - lr * d

Why it is shaped this way:

* One call per (parameter, gradient, state) dtype combination and step, whatever the number of
  tensors: a first version compiled the update with ``torch.compile`` and paid ~100 µs of
  TorchDynamo host time per call, a quarter of the step on a 24M-parameter model.
* The C source is compiled once per machine (under a second with ``cc -O3 -march=native -fopenmp``)
  and cached on disk (``TRITON_ADADELTA_CACHE_DIR``, default ``$XDG_CACHE_HOME/triton_adadelta``, else
  ``~/.cache/triton_adadelta``), keyed by the source, the compiler flags and the CPU; later processes
  only load it. Without OpenMP it is built single-threaded, without a C compiler the path is off (one
  warning) and the reference runs.
* Arithmetic is IEEE float32 with every operation rounded once (no FMA contraction, no fast-math):
  the same arithmetic as the Triton kernel. Hyperparameters travel as float32, which is how torch
  rounds a Python scalar for a float32 operation.
* The result does not depend on the number of threads: each element is computed the same way
  whichever thread owns it.

The path is used for contiguous CPU tensors when ``fused`` is not False, without stochastic
rounding, master weights, ``differentiable`` or ``capturable``, and when the step's eligible tensors hold at least
:data:`MIN_NUMEL` elements in all; anything else stays on the reference path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .hyper import NUM_COLUMNS
from .reference import real_view
from .shards import PLAIN

__all__ = ["ENABLED", "MIN_NUMEL", "SUPPORTED", "BuildError", "available", "library", "fused_update_",
           "settings", "slot", "fail"]

#: Set TRITON_ADADELTA_CPU_COMPILE=0 to keep every CPU step on the reference path.
ENABLED: bool = os.environ.get("TRITON_ADADELTA_CPU_COMPILE", "1") not in ("0", "", "false", "False")
#: The smallest number of elements (summed over a step's eligible tensors) that takes this path. 0: every
#: step; the C call beats the reference path's dozen operations per tensor even for one tensor of 1,000
#: elements (153 against 187 µs; 10 tensors: 200 against 1,525 µs; AMD EPYC, torch 2.13.0, 2026-11-25).
MIN_NUMEL: int = int(os.environ.get("TRITON_ADADELTA_CPU_COMPILE_MIN_NUMEL", "0"))

_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
#: (parameter dtype, gradient dtype, state dtype) of the real views this path updates. float16
#: parameters need a compiler with _Float16; where it has none they stay on the reference path.
SUPPORTED: tuple[tuple[torch.dtype, torch.dtype, torch.dtype], ...] = tuple(
    (p, g, s)
    for p in (torch.float32, torch.bfloat16, torch.float16)
    for g in ((p,) if p == torch.float32 else (p, torch.float32))
    for s in (torch.float32, torch.bfloat16)
)

# The layout of the tables (hyperparameters: hyper.COLUMNS, float32; tensors: 7 int64 columns) is the
# enum of kernels/adadelta_cpu.c; its version number is checked when the library loads.
_ABI = 3

_SOURCE = "adadelta_cpu.c"
# Tried in order until one builds: vectorised for this CPU with threads, portable with threads, plain.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_COMMON_FLAGS = ["-std=c11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]


class BuildError(RuntimeError):
    """The C library could not be built or loaded (no compiler, a failing compiler, no write access)."""


class _Library:
    """The loaded shared library: one ctypes function per supported dtype combination."""

    def __init__(self, path: str, flags: list[str]) -> None:
        self.path = path
        self.flags = flags
        self.threaded = "-fopenmp" in flags
        self._dll = ctypes.CDLL(path)
        if self._dll.adadelta_cpu_abi_version() != _ABI:
            raise BuildError(f"{path} is not ABI version {_ABI}")
        self.functions: dict[tuple[torch.dtype, ...], Any] = {}
        for key in SUPPORTED:
            fn = getattr(self._dll, "adadelta_cpu_" + "_".join(_NAMES[d] for d in key), None)
            if fn is not None:  # the float16 variants exist only where the compiler has _Float16
                fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int]
                fn.restype = None
                self.functions[key] = fn


_library: Optional[_Library] = None
_failed = False


def source_path() -> str:
    """Where the C source of the CPU update is (the checkout's kernels/ or the wheel's triton_adadelta/kernels/)."""
    import triton_adadelta.kernels as kernels_pkg

    return os.path.join(os.path.dirname(kernels_pkg.__file__), _SOURCE)


def cache_dir() -> str:
    """The folder of built libraries: ``TRITON_ADADELTA_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_adadelta``."""
    explicit = os.environ.get("TRITON_ADADELTA_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "triton_adadelta")


def _cpu_identity() -> str:
    # -march=native code must not run on another CPU that shares the cache folder (a cluster's home).
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    ident += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        ident += platform.processor()
    return ident


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _build(src: str, out_dir: str) -> _Library:
    cc = _compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC)")
    with open(src, "rb") as f:
        code = f.read()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([code, cc.encode(), " ".join(flags + _COMMON_FLAGS).encode(),
                                         _cpu_identity().encode()])).hexdigest()[:24]
        path = os.path.join(out_dir, f"adadelta_cpu_{key}.so")
        if not os.path.exists(path):
            os.makedirs(out_dir, exist_ok=True)
            # Build under a unique name and rename: processes that build at once (DDP ranks) never
            # load a half-written file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            try:
                proc = subprocess.run([cc, *flags, *_COMMON_FLAGS, src, "-o", tmp, "-lm"],
                                      capture_output=True, text=True)
            except OSError as exc:
                os.unlink(tmp)
                raise BuildError(f"cannot run the C compiler {cc!r}: {exc}") from exc
            if proc.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-400:]}")
                continue
            os.replace(tmp, path)
        try:
            return _Library(path, flags)
        except OSError as exc:
            errors.append(f"loading {path}: {exc}")
    raise BuildError("could not build the CPU update: " + " | ".join(errors))


def library() -> _Library:
    """The compiled CPU update, built on first use (or loaded from the cache); raises :class:`BuildError`."""
    global _library
    if _library is None:
        try:
            try:
                _library = _build(source_path(), cache_dir())
            except PermissionError:  # a read-only home or cache folder: build for this process only
                _library = _build(source_path(), tempfile.mkdtemp(prefix="triton_adadelta-"))
        except OSError as exc:  # a missing source file, a full disk
            raise BuildError(str(exc)) from exc
    return _library


def available() -> bool:
    """Can the CPU path run in this process (enabled, not failed, not inside a torch.compile trace)?"""
    if not ENABLED or _failed:
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    # Inside a user's torch.compile region the reference math is traced instead.
    return not (compiling is not None and compiling())


def fused_update_(
    slots: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
    hyper: Tensor,
    rows: Sequence[int],
    coefs: Optional[Tensor] = None,
    steps: Optional[Sequence[Optional[Tensor]]] = None,
    threads: Optional[int] = None,
    check: bool = True,
    grad_scale: Optional[Tensor] = None,
) -> None:
    """Apply one Adadelta step to every slot in place, in one call of the compiled C update.

    Args:
        slots: ``(param, grad, square_avg, acc_delta)`` per tensor: contiguous CPU tensors with the
            same number of elements (complex tensors as their real views), all with the same
            (parameter, gradient, state) dtypes, one of :data:`SUPPORTED`.
        hyper: float32 ``[R, 8]``, contiguous, the rows of :data:`triton_adadelta.hyper.COLUMNS`: lr, rho,
            1 - rho, eps, weight_decay, sign (-1 to maximize), seed (not read here), clip_value (+inf for none).
        rows: the row of ``hyper`` of each slot.
        coefs: float32 ``[len(slots)]`` gradient multipliers (clipping), or None for 1.
        steps: optional float32 0-d CPU step counts, one per slot (or None): each gets + 1.
        threads: threads to split the work over (default ``torch.get_num_threads()``).
        grad_scale: a one-element CPU tensor that divides every gradient (GradScaler's scale), or None.
        check: verify the arguments first (the C code trusts every address and size it is given);
            pass False only for tensors already checked.

    Raises :class:`BuildError` when the library cannot be built, ValueError for arguments that
    do not fit (a dtype combination this path does not cover, mismatched sizes, non-contiguous or
    non-CPU tensors, rows outside ``hyper``); nothing is updated then.
    """
    if not slots:
        return
    p0, g0, v0, _ = slots[0]
    key = (p0.dtype, g0.dtype, v0.dtype)
    fn = library().functions.get(key)
    if fn is None:
        raise ValueError(f"the CPU path has no update for parameter/gradient/state dtypes {key}")
    if check:
        _check_arguments(slots, key, hyper, rows, coefs, steps)
    if steps is None:
        steps = [None] * len(slots)
    table = torch.tensor(
        [[p.data_ptr(), g.data_ptr(), v.data_ptr(), u.data_ptr(), p.numel(), r, 0 if s is None else s.data_ptr()]
         for (p, g, v, u), r, s in zip(slots, rows, steps)],
        dtype=torch.int64,
    )
    _call(fn, table, hyper, coefs, threads, grad_scale)


def _call(fn: Any, table: Tensor, hyper: Tensor, coefs: Optional[Tensor], threads: Optional[int],
          grad_scale: Optional[Tensor] = None) -> None:
    """One C call over the rows of ``table`` (int64 [T, 7]: p, g, square_avg, acc_delta, numel, row, step)."""
    coef_ptr = scale_ptr = None
    if coefs is not None:
        coefs = coefs.to(torch.float32).contiguous()
        coef_ptr = coefs.data_ptr()
    if grad_scale is not None:
        grad_scale = grad_scale.to("cpu", torch.float32).reshape(1).contiguous()
        scale_ptr = grad_scale.data_ptr()
    fn(table.shape[0], table.data_ptr(), hyper.data_ptr(), coef_ptr, scale_ptr, threads or torch.get_num_threads())


def _check_arguments(slots: Sequence[tuple[Tensor, ...]], key: tuple, hyper: Tensor, rows: Sequence[int],
                     coefs: Optional[Tensor], steps: Optional[Sequence[Optional[Tensor]]]) -> None:
    if (hyper.dtype != torch.float32 or hyper.dim() != 2 or hyper.shape[1] != NUM_COLUMNS
            or hyper.device.type != "cpu" or not hyper.is_contiguous()):
        raise ValueError(f"hyper must be a float32 [R, {NUM_COLUMNS}] contiguous CPU tensor, got {hyper.dtype} "
                         f"{tuple(hyper.shape)}")
    if len(rows) != len(slots) or any(not 0 <= r < hyper.shape[0] for r in rows):
        raise ValueError(f"rows must give one row of hyper (0..{hyper.shape[0] - 1}) for each of {len(slots)} slots")
    if coefs is not None and (coefs.numel() != len(slots) or coefs.device.type != "cpu"):
        raise ValueError(f"coefs must be a CPU tensor of {len(slots)} multipliers, got {tuple(coefs.shape)}")
    if steps is not None and (len(steps) != len(slots) or not all(_is_step(s) for s in steps if s is not None)):
        raise ValueError(f"steps must give one float32 0-d CPU tensor (or None) for each of {len(slots)} slots")
    for i, slot in enumerate(slots):
        if len(slot) != 4 or (slot[0].dtype, slot[1].dtype, slot[2].dtype) != key or slot[3].dtype != key[2]:
            raise ValueError(f"slot {i}: expected (param, grad, square_avg, acc_delta) with dtypes {key}")
        n = slot[0].numel()
        for name, t in zip(("param", "grad", "square_avg", "acc_delta"), slot):
            if t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n:
                raise ValueError(f"slot {i}: {name} must be a contiguous CPU tensor of {n} elements")


def _is_step(s: Any) -> bool:
    return type(s) is Tensor and s.dtype == torch.float32 and s.is_cpu and s.numel() == 1


_SUPPORTED_SET = frozenset(SUPPORTED)


def slot(p: Tensor, g: Tensor, st: dict[str, Any]) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(param, grad, square_avg, acc_delta) as real views when this path can update them, else None:
    contiguous plain CPU tensors of a :data:`SUPPORTED` dtype combination, no master weights, a
    float32 0-d step (DTensors and other subclasses stay on the PyTorch path)."""
    if type(p) not in PLAIN or type(g) is not Tensor or not (p.is_cpu and g.is_cpu) or g.is_sparse:
        return None
    v, u = st.get("square_avg"), st.get("acc_delta")
    if v is None or u is None or st.get("master") is not None or u.dtype != v.dtype or not _is_step(st.get("step")):
        return None
    if not (p.is_contiguous() and g.is_contiguous() and v.is_contiguous() and u.is_contiguous()):
        return None
    if p.is_neg() or g.is_neg():  # lazily negated: the memory holds -value, which only torch's ops undo
        return None
    if p.is_complex():
        if not g.is_complex():
            return None
        p, g, v, u = torch.view_as_real(p), torch.view_as_real(g), real_view(v), real_view(u)
    if (p.dtype, g.dtype, v.dtype) not in _SUPPORTED_SET:
        return None
    return p, g, v, u


def settings() -> tuple:
    """What a CPU plan (:class:`backends.cpu.CpuPlan`) was made under: under other settings it is made again."""
    return (ENABLED, _failed, MIN_NUMEL)


def fail(exc: BaseException) -> None:
    """Switch this path off for the process after the library failed to build (one warning)."""
    global _failed
    _failed = True
    warnings.warn(f"triton_adadelta: the compiled CPU path is disabled ({exc}); using the PyTorch path",
                  RuntimeWarning, stacklevel=5)
