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


def test_report_tables_and_plot_from_results(tmp_path):
    """bench/run.py's tables and plot from a results file: per-step times, ratios and % of copy as computed."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import run

    def bench(kind, impl, median, mode="fp32", steps=1, gbps=None):
        info = dict(kind=kind, set="s-1M", mode=mode, impl=impl, params=1_000_000, tensors=3,
                    steps_per_round=steps, peak_extra_bytes=0)
        if gbps is not None:
            info["gbps"] = gbps
        return {"extra_info": info, "stats": {"median": median}}

    data = {"datetime": "2026-11-25T19:00:00", "versions": {"hardware": "a CPU", "torch": "t", "triton": "tr"},
            "benchmarks": [bench("step", "torch-foreach", 0.040, steps=10), bench("step", "ours", 0.010, steps=10,
                                                                                 gbps=28.0),
                           bench("copy", None, 0.010, steps=10, gbps=20.0)]}
    (tmp_path / "cuda-1.json").write_text(json.dumps(data))
    table = run.render(str(tmp_path), "cuda")
    row = next(line for line in table.splitlines() if line.startswith("| s-1M"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "4.00" and cells[7] == "1.00"  # ms per step: the round's median / steps_per_round
    assert cells[8] == "4.00x" and cells[10] == "140"  # foreach / ours, and 28 / 20 GB/s as % of copy
    png = tmp_path / "plot.png"
    assert run.plot(str(tmp_path), "cuda", str(png)) and png.stat().st_size > 1000
    assert not run.plot(str(tmp_path), "cpu", str(tmp_path / "none.png"))  # no cpu results: no plot
