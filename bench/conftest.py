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
from sets import DEFAULT_SETS, SETS, gpt2_small, llama_1b, numel  # noqa: F401  (re-exported for the suite)

# Benchmarks time real kernels: never the Triton interpreter.
os.environ["TRITON_INTERPRET"] = "0"

DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
if os.environ.get("BENCH_THREADS"):
    # On a CPU shared with other jobs, fewer threads than cores keeps OpenMP barriers from waiting on
    # descheduled threads, which otherwise dominates every short parallel region.
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def selected_sets() -> list[str]:
    if QUICK:
        return ["quick-10k"]
    names = os.environ.get("BENCH_SETS")
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else DEFAULT_SETS[DEVICE.split(":")[0]]
    unknown = [n for n in chosen if n not in SETS]
    if unknown:
        raise ValueError(f"unknown BENCH_SETS {unknown}; known: {sorted(SETS)}")
    return chosen


def pytest_report_header(config):
    return f"bench: device {DEVICE}, quick {QUICK}, sets {selected_sets()}, torch threads {torch.get_num_threads()}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("BENCH_DEVICE=cuda but no CUDA device")
    return torch.device(DEVICE)
