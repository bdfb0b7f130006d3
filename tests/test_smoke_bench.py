"""The benchmark suite's CPU parts run in CI's environment, timing nothing.

`pytest bench --benchmark-disable` with BENCH_QUICK=1 runs every benchmark function once on a
tiny parameter set (each also checks that its step changed the parameters and kept them finite),
in a subprocess so that the suite's own conftest and environment apply. The compiled CPU path is
switched on for the tiny set (threshold 0) so its benchmark path runs too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_suite_runs_on_cpu_without_timing():
    env = dict(os.environ, BENCH_QUICK="1", BENCH_DEVICE="cpu", TRITON_ADADELTA_CPU_COMPILE_MIN_NUMEL="0")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-v", "--benchmark-disable", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    passed = set(re.findall(r"::(\S+) PASSED", out.stdout))
    # Every step benchmark (4 implementations x 2 modes, less the compiled bf16 one skipped in quick
    # runs), both copies and the three host-overhead runs of bench/test_step.py ran and passed.
    expected = {f"test_step[quick-10k-{mode}-{impl}]" for mode in ("fp32", "bf16")
                for impl in ("torch-forloop", "torch-foreach", "torch-compiled", "ours")}
    expected.discard("test_step[quick-10k-bf16-torch-compiled]")
    expected |= {"test_copy[quick-10k-fp32]", "test_copy[quick-10k-bf16]"}
    expected |= {f"test_host_overhead[{impl}]" for impl in ("torch-forloop", "torch-foreach", "ours")}
    assert expected <= passed, sorted(expected - passed)
    assert " FAILED" not in out.stdout and " ERROR" not in out.stdout
