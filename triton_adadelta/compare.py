"""The main job: train one small model with torch.optim.Adadelta and with ours, side by side.

    python -m triton_adadelta.compare [--steps N] [--device cpu|cuda]

Same seed, same data, same steps; prints step times and final losses next to each other.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .optimizer import Adadelta


def _model(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(32, width), nn.GELU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _train(make_opt, steps: int, device: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = _model(256, 4).to(device)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    target_w = torch.randn(32, 1, generator=gen)
    times, loss = [], torch.tensor(0.0)
    for _ in range(steps):
        x = torch.randn(128, 32, generator=gen)
        y = torch.sin(x @ target_w)
        x, y = x.to(device), y.to(device)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"final_loss": float(loss.detach()), "median_step_ms": 1e3 * times[len(times) // 2]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = {
        "torch.optim.Adadelta(foreach=True)": _train(
            lambda ps: torch.optim.Adadelta(ps, foreach=True), args.steps, args.device, args.seed),
        "triton_adadelta.Adadelta": _train(lambda ps: Adadelta(ps), args.steps, args.device, args.seed),
    }
    print(f"device={args.device} steps={args.steps} torch={torch.__version__}")
    print(f"{'optimizer':40s} {'step ms (median)':>18s} {'final loss':>12s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['median_step_ms']:18.3f} {r['final_loss']:12.6f}")


if __name__ == "__main__":
    main()
