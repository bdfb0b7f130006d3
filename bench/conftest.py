"""Benchmark set-up: parameter sets, optimizers under test, the device and the size of the run.

Environment:
    BENCH_DEVICE   cuda or cpu (default: cuda when available)
    BENCH_QUICK=1  tiny sets only and one round: what CI runs, with --benchmark-disable (nothing timed)
    BENCH_SETS     comma-separated set names to run (default: by device, see DEFAULT_SETS)
    BENCH_THREADS  torch.set_num_threads for CPU runs (default: torch's own choice)
"""

from __future__ import annotations

import os

import pytest
import torch

# Benchmarks time real kernels: never the Triton interpreter.
os.environ["TRITON_INTERPRET"] = "0"

DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
if os.environ.get("BENCH_THREADS"):
    # On a CPU shared with other jobs, fewer threads than cores keeps OpenMP barriers from waiting on
    # descheduled threads, which otherwise dominates every short parallel region.
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def _uniform(total: int, count: int = 64) -> list[tuple[int, ...]]:
    """``total`` parameters in ``count`` vectors of nearly equal, odd-sized lengths (tails get exercised)."""
    base, extra = divmod(total, count)
    return [(base + (1 if i < extra else 0),) for i in range(count)]


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small (124M), as Hugging Face stores it: 148 tensors, head tied to the embedding."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_1b() -> list[tuple[int, ...]]:
    """A 1.24B Llama-like set (Llama 3.2 1B's shapes: 16 layers, width 2048, GQA 32/8, MLP 8192), 146 tensors."""
    d, vocab, layers, ffn, kv = 2048, 128256, 16, 8192, 512
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,)]


SETS = {
    "quick-10k": _uniform(10_007, 7),
    "uniform-1M": _uniform(1_000_000),
    "uniform-10M": _uniform(10_000_000),
    "uniform-100M": _uniform(100_000_000),
    "uniform-1B": _uniform(1_000_000_000),
    "gpt2-small-124M": gpt2_small(),
    "llama-1B": llama_1b(),
}
DEFAULT_SETS = {
    "cuda": ["uniform-1M", "uniform-10M", "uniform-100M", "uniform-1B", "gpt2-small-124M", "llama-1B"],
    "cpu": ["uniform-1M", "uniform-10M", "uniform-100M", "gpt2-small-124M"],
}


def selected_sets() -> list[str]:
    if QUICK:
        return ["quick-10k"]
    names = os.environ.get("BENCH_SETS")
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else DEFAULT_SETS[DEVICE.split(":")[0]]
    unknown = [n for n in chosen if n not in SETS]
    if unknown:
        raise ValueError(f"unknown BENCH_SETS {unknown}; known: {sorted(SETS)}")
    return chosen


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for k in s:
            n *= k
        total += n
    return total


def pytest_report_header(config):
    return f"bench: device {DEVICE}, quick {QUICK}, sets {selected_sets()}, torch threads {torch.get_num_threads()}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("BENCH_DEVICE=cuda but no CUDA device")
    return torch.device(DEVICE)
