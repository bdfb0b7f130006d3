"""Parameter sets of the benchmarks and the bytes an Adadelta step must move (no pytest, no environment).

Shared by the pytest-benchmark suite (bench/conftest.py, bench/test_step.py) and bench/run.py.
"""

from __future__ import annotations

import torch


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

# The pytest-benchmark suite's sets by device (bench/conftest.py; BENCH_SETS chooses others).
DEFAULT_SETS = {
    "cuda": ["uniform-1M", "uniform-10M", "uniform-100M", "uniform-1B", "gpt2-small-124M", "llama-1B"],
    "cpu": ["uniform-1M", "uniform-10M", "uniform-100M", "gpt2-small-124M"],
}

# mode: parameter and gradient dtype (ours keeps float32 state in both; torch's state follows the parameter)
MODES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for k in s:
            n *= k
        total += n
    return total


def roofline_bytes(param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """Bytes a parameter must move in one step: read p, g, square_avg, acc_delta; write p and both states."""
    p, s = param_dtype.itemsize, state_dtype.itemsize
    return 3 * p + 4 * s  # p read + written, g read; each state read + written


def state_dtype_of(impl: str, dtype: torch.dtype) -> torch.dtype:
    """The state dtype an implementation keeps: ours float32 by default, torch the parameter's dtype."""
    return torch.float32 if impl == "ours" else dtype
