"""Training runs for the checkpoint/resume and determinism tests (tests/test_resume.py).

Run as a script it is a separate process, so a resume really starts from nothing but the file::

    python resume_worker.py train  CKPT_DIR OUT_FILE   # per mode: steps 0..SAVE_AT-1, checkpoint, then to STEPS
    python resume_worker.py resume CKPT_DIR OUT_FILE   # per mode: fresh model and optimizer, load, SAVE_AT..STEPS

Each mode writes its final parameters and optimizer state_dict to OUT_FILE. Gradients depend on
the step, the tensor and the current parameter values, so any difference after a resume grows
instead of washing out. Without a GPU the fused modes run in the Triton interpreter.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton decorates kernels: before the import

from triton_adadelta import Adadelta  # noqa: E402

STEPS = 6
SAVE_AT = 3
SHAPES = [(37,), (5, 7), (), (130,)]
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
bf16, fp16, fp32, fp64, c64 = torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.complex64

# name: (parameter dtypes, device, optimizer options, steps whose gradients hold a NaN)
MODES = {
    # Default options: without a GPU, float64 takes the PyTorch path and the rest the interpreted kernel.
    "default": ([fp32, fp64, c64, bf16], KERNEL_DEVICE, {}, ()),
    "reference": ([fp32, fp64, c64, fp16], "cpu", dict(fused=False), ()),
    "fused": ([fp32, bf16, fp32, bf16], KERNEL_DEVICE, dict(fused=True), ()),
    "stochastic-reference": ([bf16] * 4, "cpu", dict(fused=False, stochastic_rounding=True, state_dtype=bf16), ()),
    "stochastic-fused": ([bf16] * 4, KERNEL_DEVICE, dict(fused=True, stochastic_rounding=True, state_dtype=bf16), ()),
    "master-fused": ([bf16, fp16, bf16, fp16], KERNEL_DEVICE, dict(fused=True, master_weights=True), ()),
    "skip-reference": ([fp32] * 4, "cpu", dict(fused=False, skip_nonfinite=True), (1, 4)),
    "skip-fused": ([bf16, fp32, bf16, fp32], KERNEL_DEVICE, dict(fused=True, skip_nonfinite=True), (1, 4)),
}


def make_params(mode: str, seed: int) -> list[torch.Tensor]:
    dtypes, device, _, _ = MODES[mode]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(SHAPES, dtypes):
        if dtype.is_complex:
            t = torch.view_as_complex(torch.randn((*shape, 2), generator=gen, dtype=torch.float64)).to(dtype)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        out.append(t.to(device))
    return out


def make_optimizer(mode: str, params: list[torch.Tensor]) -> Adadelta:
    _, _, options, _ = MODES[mode]
    groups = [dict(params=params[:2], lr=0.8, weight_decay=0.01), dict(params=params[2:], rho=0.85, maximize=True)]
    return Adadelta(groups, **options)


def set_gradients(mode: str, params: list[torch.Tensor], step: int) -> None:
    """g = noise(step, tensor) + 0.1 * p; the first tensor has no gradient at step 0 (its state comes later)."""
    nan_steps = MODES[mode][3]
    for i, p in enumerate(params):
        if step == 0 and i == 0:
            p.grad = None
            continue
        gen = torch.Generator().manual_seed(1000 * step + i)
        noise = torch.randn(torch.view_as_real(p).shape if p.is_complex() else p.shape, generator=gen,
                            dtype=torch.float64)
        if p.is_complex():
            noise = torch.view_as_complex(noise)
        g = (noise.to(p.device) + 0.1 * p.detach().to(noise.dtype)).to(p.dtype)
        if step in nan_steps and i == 1:
            g.view(-1)[0] = float("nan")
        p.grad = g


def train(mode: str, params: list[torch.Tensor], opt: Adadelta, steps: range) -> None:
    for step in steps:
        set_gradients(mode, params, step)
        opt.step()


def result(params: list[torch.Tensor], opt: Adadelta) -> dict:
    return {"params": [p.detach().cpu().clone() for p in params], "optimizer": opt.state_dict()}


def run_uninterrupted(mode: str) -> dict:
    """The reference run: all steps in one go, seeded as the train phase is."""
    torch.manual_seed(7)
    params = make_params(mode, seed=3)
    opt = make_optimizer(mode, params)
    train(mode, params, opt, range(STEPS))
    return result(params, opt)


def main(phase: str, ckpt_dir: str, out_file: str, modes: list[str]) -> None:
    results = {}
    for mode in modes:
        ckpt = os.path.join(ckpt_dir, f"{mode}.pt")
        if phase == "train":
            # torch's seed feeds the stochastic-rounding seed of each group; the resume process uses another
            # one, so only the checkpoint can make its rounding match.
            torch.manual_seed(7)
            params = make_params(mode, seed=3)
            opt = make_optimizer(mode, params)
            train(mode, params, opt, range(SAVE_AT))
            torch.save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}, ckpt)
            train(mode, params, opt, range(SAVE_AT, STEPS))
        else:
            torch.manual_seed(12345)
            params = make_params(mode, seed=99)  # other values: the checkpoint must supply them
            opt = make_optimizer(mode, params)
            saved = torch.load(ckpt, weights_only=True)
            with torch.no_grad():
                for p, value in zip(params, saved["params"]):
                    p.copy_(value)
            opt.load_state_dict(saved["optimizer"])
            train(mode, params, opt, range(SAVE_AT, STEPS))
        results[mode] = result(params, opt)
    torch.save(results, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",") if len(sys.argv) > 4 else list(MODES))
