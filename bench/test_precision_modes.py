"""The mixed-precision modes of one optimizer step, and their memory, against torch.optim.Adadelta.

Each benchmark records in ``extra_info`` the persistent bytes a parameter costs in that mode
(parameter + gradient + optimizer state + any master copy, counted from the tensors themselves,
flat-buffer padding included) so docs/precision.md can quote measured figures.

Modes (parameter dtype, what the optimizer keeps):
    ours-*            triton_adadelta.Adadelta with the named options (float32 state unless "s16")
    torch-fp32        torch.optim.Adadelta(foreach=True) on float32 parameters
    torch-bf16        torch.optim.Adadelta(foreach=True) on bf16 parameters (bf16 state, round to nearest)
    torch-master      the usual recipe: bf16 model parameters, a float32 copy that torch.optim.Adadelta
                      updates; per step the bf16 gradients are copied to the float32 copy's .grad and the
                      result is copied back into the bf16 parameters (both copies are timed)

Set: PRECISION_SET (default uniform-1M on CPU, uniform-100M on CUDA; quick-10k under BENCH_QUICK=1).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICE, QUICK, SETS, numel

from triton_adadelta import Adadelta

OURS = {
    "ours-fp32": (torch.float32, {}),
    "ours-bf16-nearest": (torch.bfloat16, {}),
    "ours-bf16-stochastic": (torch.bfloat16, dict(stochastic_rounding=True)),
    "ours-bf16-stochastic-s16": (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    "ours-bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "ours-bf16-remainder": (torch.bfloat16, dict(master_weights="remainder")),
    "ours-bf16-remainder-s16": (torch.bfloat16, dict(master_weights="remainder", state_dtype=torch.bfloat16,
                                                     stochastic_rounding=True)),
    "ours-fp16-stochastic": (torch.float16, dict(stochastic_rounding=True)),
    "ours-fp16-master": (torch.float16, dict(master_weights=True)),
}
TORCH = ["torch-fp32", "torch-bf16", "torch-master"]


def _set_name() -> str:
    if QUICK:
        return "quick-10k"
    return os.environ.get("PRECISION_SET") or ("uniform-100M" if DEVICE.startswith("cuda") else "uniform-1M")


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:  # views into one flat buffer count once
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _params(shapes, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen).to(dtype)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("mode", list(OURS) + TORCH)
def test_precision_mode_step(benchmark, device, mode):
    shapes = SETS[_set_name()]
    n = numel(shapes)
    if mode in OURS:
        dtype, kw = OURS[mode]
        params = _params(shapes, dtype, device)
        opt = Adadelta(params, **kw)
        step = opt.step
        extra = []
    elif mode == "torch-master":
        params = _params(shapes, torch.bfloat16, device)
        master = [p.detach().float() for p in params]
        for m in master:
            m.grad = torch.empty_like(m)
        opt = torch.optim.Adadelta(master, foreach=True)
        extra = master + [m.grad for m in master]

        @torch.no_grad()
        def step():
            torch._foreach_copy_([m.grad for m in master], [p.grad for p in params])
            opt.step()
            torch._foreach_copy_(params, master)
    else:
        params = _params(shapes, torch.float32 if mode == "torch-fp32" else torch.bfloat16, device)
        opt = torch.optim.Adadelta(params, foreach=True)
        step = opt.step
        extra = []

    step()  # state, plans and compilation before timing
    _sync(device)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    persistent = _bytes(params) + _bytes([p.grad for p in params]) + _bytes(state) + _bytes(extra)
    benchmark.extra_info.update(
        params=n, tensors=len(shapes), bytes_per_param=round(persistent / n, 3),
        state_bytes_per_param=round((_bytes(state) + _bytes(extra)) / n, 3), device=str(device),
    )

    def run():
        step()
        _sync(device)

    benchmark.pedantic(run, rounds=1 if QUICK else 5, iterations=1, warmup_rounds=0 if QUICK else 1)
