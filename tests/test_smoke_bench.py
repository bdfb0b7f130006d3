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
        [sys.executable, "-m", "pytest", "bench", "-q", "--benchmark-disable", "-p", "no:cacheprovider", "-rs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    # 4 implementations x 2 modes (minus the skipped compiled bf16 one), 2 copies, 3 host-overhead runs.
    assert passed and int(passed.group(1)) == 12, out.stdout[-2000:]
    assert "failed" not in out.stdout and "error" not in out.stdout.lower().split("warnings summary")[0]
