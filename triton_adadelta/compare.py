"""The main job: train a small GPT with torch.optim.Adadelta and with ours, side by side.

    python -m triton_adadelta.compare [--size tiny|small|medium|gpt2] [--steps N] [--device cpu|cuda]
                                      [--dtype fp32|bf16] [--batch B] [--seed S] [--out DIR]

Defaults by device (:data:`DEVICE_DEFAULTS`, resolved by :func:`parse_args`): on CPU the ``small``
model (1.8M parameters) in float32, about a minute on two cores; on CUDA GPT-2 small's shape
(``gpt2``: 12 layers, width 768, 12 heads, context 1024, with the corpus' character vocabulary,
86M parameters) in bfloat16, batch 64 (65,536 tokens a step). Both run 100 steps.

Two copies of the same character-level GPT (same initial weights, same batches, same steps) are
trained on the corpus shipped with the package (``triton_adadelta/data/corpus.txt``), one with
``torch.optim.Adadelta(foreach=True)`` and one with ``triton_adadelta.Adadelta``. Their steps are
interleaved, so a machine whose load changes during the run slows both alike. At the end a report
is printed and written to ``DIR/report.md`` and ``DIR/report.png``: tokens per second, step time,
optimizer-step time, final training and held-out loss, and optimizer-state bytes.

With ``--dtype bf16`` the parameters are bfloat16: torch keeps its state in bfloat16 (it follows
the parameter dtype), ours keeps float32 state (its default).

On CUDA ours runs the fused Triton kernel; on CPU it runs the fused CPU path
(:mod:`triton_adadelta.cpu_fused`). The first optimizer step then includes the one-time build of
that path (or its load from the on-disk cache); it is reported on its own and left out of the medians.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .corpus import load
from .optimizer import Adadelta

__all__ = ["GPT", "GPTConfig", "SIZES", "DEVICE_DEFAULTS", "parse_args", "state_bytes", "main"]


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    context: int
    width: int
    layers: int
    heads: int


# name: (context, width, layers, heads, batch)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (32, 48, 2, 4, 8),  # ~60K parameters: for tests
    "small": (64, 192, 4, 6, 16),  # ~1.8M parameters: the default, under a minute on two CPU cores
    "medium": (128, 384, 6, 6, 32),  # ~10.7M parameters: a GPU, or patience
    # GPT-2 small's shape with the character vocabulary, ~86M parameters: the default on CUDA. Two
    # models of 65,536 tokens a step, about 40 TFLOP each, are meant to take about a minute for 100 steps
    # on an H100 in bf16.
    "gpt2": (1024, 768, 12, 12, 64),
}
# What a run on each device type trains when --size, --dtype and --steps are not given.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": dict(size="small", dtype="fp32", steps=100),
    "cuda": dict(size="gpt2", dtype="bf16", steps=100),
}


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.out = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A decoder-only transformer: token and position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's initialisation; residual projections scaled down by depth.
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of predicting ``targets`` (the next characters) from ``idx``."""
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of memory held by an optimizer's state tensors (shared storages, like flat buffers, once)."""
    seen: dict[int, int] = {}
    for key, st in opt.state.items():
        if not isinstance(key, Tensor):  # not a parameter's state (a flag: any value)
            continue
        for v in st.values():
            if isinstance(v, Tensor):
                storage = v.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class _Run:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    opt_s: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(data: Tensor, context: int, batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
    x = torch.stack([data[s: s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1: s + 1 + context] for s in starts.tolist()])
    return x, y


def _train_step(run: _Run, x: Tensor, y: Tensor, device: torch.device) -> None:
    _sync(device)
    t0 = time.perf_counter()
    loss = run.model(x, y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    _sync(device)
    t1 = time.perf_counter()
    run.opt.step()
    _sync(device)
    t2 = time.perf_counter()
    run.losses.append(float(loss.detach()))
    run.step_s.append(t2 - t0)
    run.opt_s.append(t2 - t1)


@torch.no_grad()
def _eval_loss(model: nn.Module, data: Tensor, context: int, batch: int, seed: int, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(8):
        x, y = _batches(data, context, batch, gen)
        losses.append(float(model(x.to(device), y.to(device))))
    return sum(losses) / len(losses)


def _steady(values: list[float], skip: int) -> list[float]:
    """The steady-state part of a timing series: without the first ``skip`` steps (compilation, warm-up)."""
    return values[skip:] if len(values) > skip else values


def _environment(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    return {"hardware": hw, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _report(args: argparse.Namespace, cfg: GPTConfig, n_params: int, runs: list[_Run], evals: list[float],
            env: dict[str, str], skip: int, ours_path: str) -> str:
    tokens = args.batch * cfg.context
    lines = [
        "# triton_adadelta.compare",
        "",
        f"{env['hardware']}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}; {env['date']}.",
        "",
        f"GPT `{args.size}`: {n_params:,} parameters ({cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, "
        f"context {cfg.context}, vocabulary {cfg.vocab}), batch {args.batch} ({tokens} tokens a step), "
        f"{args.steps} steps, device `{args.device}`, parameters `{args.dtype}`, seed {args.seed}. "
        f"Ours ran on: {ours_path}. Medians leave out the first {skip} steps (warm-up; for ours on CPU "
        "also the one-time build or load of the fused CPU path, shown as 'first optimizer step').",
        "",
        "| | tokens/s | step ms (median) | optimizer step ms (median) | first optimizer step ms "
        "| final train loss (last 10) | held-out loss | optimizer state bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, ev in zip(runs, evals):
        steady = _steady(run.step_s, skip)
        step_ms = 1e3 * statistics.median(steady)
        opt_ms = 1e3 * statistics.median(_steady(run.opt_s, skip))
        tps = tokens * len(steady) / sum(steady)
        last = run.losses[-10:]
        lines.append(
            f"| {run.name} | {tps:,.0f} | {step_ms:.2f} | {opt_ms:.3f} | {1e3 * run.opt_s[0]:.1f} | "
            f"{sum(last) / len(last):.4f} | {ev:.4f} | {state_bytes(run.opt):,} |"
        )
    t_opt = statistics.median(_steady(runs[0].opt_s, skip))
    o_opt = statistics.median(_steady(runs[1].opt_s, skip))
    lines += ["", f"Optimizer step, ours / torch: {o_opt / t_opt:.3f} (median over the same steps, same process)."]
    return "\n".join(lines) + "\n"


def _plot(path: str, runs: list[_Run], skip: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        ax1.plot(run.losses, label=run.name, linewidth=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (cross-entropy, nats)")
    ax1.set_title("loss")
    ax1.legend()
    names = [run.name.replace("(", "\n(") for run in runs]
    opt_ms = [1e3 * statistics.median(_steady(run.opt_s, skip)) for run in runs]
    rest_ms = [1e3 * statistics.median(_steady(run.step_s, skip)) - o for run, o in zip(runs, opt_ms)]
    ax2.bar(names, rest_ms, label="forward + backward")
    ax2.bar(names, opt_ms, bottom=rest_ms, label="optimizer step")
    ax2.set_ylabel("ms per step (median)")
    ax2.set_title("step time")
    ax2.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ours_path(opt: torch.optim.Optimizer) -> str:
    """The path that updated most of the parameters in our optimizer's last step (route.path_of)."""
    from . import route

    names = {route.KERNEL: "the fused Triton kernel", route.CPU: "the fused CPU path (triton_adadelta.cpu_fused)",
             route.TORCH: "the PyTorch reference path"}
    counts = opt.path_counts() if isinstance(opt, Adadelta) else {}
    return names[max(counts, key=counts.__getitem__)] if counts else names[route.TORCH]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="model size (default: small on CPU, gpt2 on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 100)")
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="parameter dtype (default: fp32 on CPU, bf16 on CUDA); bf16: torch keeps bf16 state, "
                         "ours fp32 state")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: by size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("results", "compare"), help="folder for report.md/report.png")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def parse_args(argv: Optional[list[str]] = None, cuda_available: Optional[bool] = None) -> argparse.Namespace:
    """The command line with every default resolved: the device (cuda when ``cuda_available``, by default
    ``torch.cuda.is_available()``), then size, dtype and steps from :data:`DEVICE_DEFAULTS` for that
    device's type, then the batch from the size. Whether the device exists is checked by :func:`main`."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.device is None:
        available = torch.cuda.is_available() if cuda_available is None else cuda_available
        args.device = "cuda" if available else "cpu"
    kind = torch.device(args.device).type
    for name, value in DEVICE_DEFAULTS.get(kind, DEVICE_DEFAULTS["cpu"]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    args.batch = args.batch or SIZES[args.size][4]
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the comparison; returns the runs' numbers (also printed and written under ``--out``)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _parser().error("--device cuda: no CUDA device here")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    context, width, layers, heads, _ = SIZES[args.size]

    text = load()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * data.numel())
    train, held_out = data[:split], data[split:]
    cfg = GPTConfig(vocab=len(chars), context=context, width=width, layers=layers, heads=heads)

    torch.manual_seed(args.seed)
    base = GPT(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    makers: list[tuple[str, Callable[[Any], torch.optim.Optimizer]]] = [
        ("torch.optim.Adadelta(foreach=True)", lambda ps: torch.optim.Adadelta(ps, foreach=True)),
        ("triton_adadelta.Adadelta", lambda ps: Adadelta(ps)),
    ]
    runs = []
    for name, make in makers:
        model = GPT(cfg)
        model.load_state_dict(base.state_dict())
        model = model.to(device=device, dtype=dtype)
        runs.append(_Run(name, model, make(model.parameters())))
    env = _environment(device)
    print(f"{n_params:,} parameters on {env['hardware']}", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps = range(args.steps)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(steps, desc="training", unit="step", dynamic_ncols=True)
        steps = bar
    for i in steps:
        x, y = _batches(train, context, args.batch, gen)
        x, y = x.to(device), y.to(device)
        # Alternate which optimizer goes first, so neither always runs on a cache warmed by the other.
        for run in runs if i % 2 == 0 else runs[::-1]:
            _train_step(run, x, y, device)
        if bar is not None:
            bar.set_postfix(torch=f"{runs[0].losses[-1]:.3f}", ours=f"{runs[1].losses[-1]:.3f}")
    if bar is not None:
        bar.close()

    ours_path = _ours_path(runs[1].opt)  # read after the steps: the route exists only once one has run
    skip = min(5, args.steps - 1)
    evals = [_eval_loss(run.model, held_out, context, args.batch, args.seed + 2, device) for run in runs]
    report = _report(args, cfg, n_params, runs, evals, env, skip, ours_path)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    title = f"{n_params:,} params, {args.dtype}, {env['hardware']}, torch {env['torch']}, {env['date']}"
    _plot(os.path.join(args.out, "report.png"), runs, skip, title)
    print(f"wrote {os.path.join(args.out, 'report.md')} and report.png")
    return {
        "n_params": n_params,
        "ours_path": ours_path,
        "runs": {run.name: {"losses": run.losses, "step_s": run.step_s, "opt_s": run.opt_s,
                            "state_bytes": state_bytes(run.opt), "eval_loss": ev} for run, ev in zip(runs, evals)},
    }


if __name__ == "__main__":
    main()
