"""The benchmark suite's CPU parts run in CI's environment, timing nothing.

`pytest bench --benchmark-disable` with BENCH_QUICK=1 runs every benchmark function once on a
tiny parameter set (each also checks that its step changed the parameters and kept them finite),
in a subprocess so that the suite's own conftest and environment apply. The compiled CPU path is
switched on for the tiny set (threshold 0) so its benchmark path runs too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------- bench/run.py, the runner
def _runner(tmp_path, *extra, wait=True):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--device", "cpu", "--results", str(tmp_path),
           "--doc", str(tmp_path / "benchmarks.md"), "--sets", "quick-10k", "--sections", "abd", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def _done(tmp_path):
    lines = (tmp_path / "run-cpu.jsonl").read_text().splitlines()
    return [rec for rec in map(json.loads, lines) if rec["event"] == "done"]


def _block(tmp_path):
    text = (tmp_path / "benchmarks.md").read_text()
    return text.split("<!-- BEGIN run:cpu -->", 1)[1].split("<!-- END run:cpu -->", 1)[0]


def test_runner_keeps_priority_order_writes_each_result_and_resumes(tmp_path):
    """bench/run.py on CPU with a small budget: (a) variants, then (b) steps, then (d), each result on disk
    and in the docs as it comes; a run killed in the middle keeps what it finished; the next run skips
    what is recorded and goes on where the last stopped."""
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\nhand-written text stays\n")
    # A run killed in the middle of its work: what finished before the kill is on disk.
    proc = _runner(tmp_path, "--budget", "600", "--max-items", "3", wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp_path / "run-cpu.jsonl").exists() and len(_done(tmp_path)) >= 2:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    first = _done(tmp_path)
    started = [json.loads(line)["id"] for line in (tmp_path / "run-cpu.jsonl").read_text().splitlines()]
    cut_off = set(started) - {rec["id"] for rec in first}  # started, never finished: goes last next time
    assert len(first) >= 2 and all(rec["status"] == "ok" for rec in first)
    assert [rec["id"] for rec in first] == [f"a/variant/{n}" for n in ("fp32-gfp32-sfp32", "fp32-gfp32-sbf16",
                                                                      "fp32-gfp32-sfp16")][: len(first)]
    block = _block(tmp_path)
    assert all(f"| {rec['id'].split('/')[-1]} | ok |" in block for rec in first)
    assert "hand-written text stays" in (tmp_path / "benchmarks.md").read_text()

    # Resumed within a budget: the recorded items are not run again, the rest follow in order.
    out = _runner(tmp_path, "--budget", "40", "--max-items", "3")
    assert f"{len(first)} already done (resumed)" in out
    done = _done(tmp_path)
    ids = [rec["id"] for rec in done]
    assert len(ids) == len(set(ids)), "an item ran twice"
    assert ids[: len(first)] == [rec["id"] for rec in first]
    assert not cut_off or ids[-1] in cut_off or "left for the next run" in out
    sections = [rec["section"] for rec in done if rec["id"] not in cut_off]
    assert sections == sorted(sections), sections  # a before b before d
    assert sum(rec["section"] == "a" for rec in done) == 3 and sum(s == "b" for s in sections) >= 1
    steps = [rec for rec in done if rec["section"] == "b"]
    assert all(rec["status"] == "ok" and rec["median_s"] > 0 and rec["set"] == "quick-10k" for rec in steps)
    block = _block(tmp_path)
    assert "| quick-10k | 10,007 | fp32 |" in block and "torch 2" in block

    # --fresh forgets this machine's results; a budget too small for anything leaves every item for later.
    out = _runner(tmp_path, "--budget", "0", "--fresh")
    assert "0 already done" in out and "left for the next run" in out and _done(tmp_path) == []


def test_runner_plan_order_and_variants():
    """The plan's sections come in priority order; (a) covers every dtype triple and every option; the
    variants are the class's options, (a) and (d) together the whole launchable product, once each."""
    sys.path[:0] = [os.path.join(ROOT, "bench")]
    import run
    import variants

    items = run.plan("cpu")
    sections = [it.section for it in items]
    assert sections == sorted(sections) and set(sections) == {"a", "b", "c", "d"}
    ids = [it.id for it in items]
    assert len(ids) == len(set(ids))
    b = [i.split("/", 2)[2] for i in ids if i.startswith("b/")]
    assert b[-2:] == ["uniform-1M/fp32/torch-compiled", "uniform-1M/bf16/torch-compiled"]
    covering = variants.covering_variants()
    every = variants.all_variants()
    assert set(covering) <= set(every)
    names = {v.name for v in every}
    assert len(names) == len(every)
    assert {i.split("/")[-1] for i in ids if "/variant/" in i} == names
    triples = {(v.param, v.grad, v.state) for v in every}
    assert triples == {(v.param, v.grad, v.state) for v in covering}
    for flag in ("stochastic", "master", "clip", "scaler"):
        for pd in variants.DTYPES.values():
            values = {getattr(v, flag) for v in every if v.param == pd}
            assert values == {getattr(v, flag) for v in covering if v.param == pd}, (flag, pd)
    assert "tests/test_gpu.py" in run.gpu_test_files()


def test_variant_check_catches_a_wrong_result(monkeypatch):
    """The comparison can fail: with the reference optimizer given another learning rate it does."""
    sys.path[:0] = [os.path.join(ROOT, "bench")]
    import torch
    import variants

    v = variants.Variant(torch.float32, torch.float32, torch.float32, clip="clipnorm")
    assert variants.check(v, "cpu", seed=5)["ok"]
    calls = []
    real = variants._groups

    def other_lr_for_the_reference(params):
        calls.append(1)
        groups = real(params)
        if len(calls) % 2 == 0:  # the second optimizer built is the reference
            groups[0]["lr"] = 5.0
        return groups

    monkeypatch.setattr(variants, "_groups", other_lr_for_the_reference)
    out = variants.check(v, "cpu", seed=5)
    assert not out["ok"] and out["fp32_rel"] > 1e-3


def test_runner_report_computes_ratios_from_records():
    """The generated step table: ms from the medians, GB/s against the copy's, foreach / ours; (a) rows
    with their distances; what is still to do named."""
    sys.path[:0] = [os.path.join(ROOT, "bench")]
    import run

    ctx = dict(kind="cuda", hardware="a card", torch="t", triton="tr", python="p", cuda="c", commit="abc")

    def rec(item_id, section, **data):
        return dict(context=ctx, id=item_id, section=section, event="done", date="2026-12-07 05:00:00",
                    seconds=1.0, status="ok", **data)

    def step(impl, median, gbps=None):
        extra = {"gbps": gbps} if gbps is not None else {}
        return rec(f"b/step/s/bf16/{impl}", "b", set="s", mode="bf16", impl=impl, params=1_000_000, tensors=3,
                   median_s=median, **extra)

    records = [rec("a/variant/bf16-gbf16-sfp32", "a", fp32_rel=2e-7, ulps16=1.0, differ16=3, total16=100),
               step("ours", 0.002, gbps=11.0), step("torch-foreach", 0.006, gbps=3.0), step("copy", 0.001, gbps=22.0),
               step("host-ours", 0.00015)]
    items = [run.Item(r["id"], r["section"], 1.0, lambda r: {}) for r in records]
    items.append(run.Item("c/pytest/tests/test_gpu.py", "c", 1.0, lambda r: {}))
    text = run.render_run(records, ctx, items)
    assert "| bf16-gbf16-sfp32 | ok | 2.0e-07 | 1 | 3 of 100 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| s |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:6] == ["2.000", "6.000", "—"] and cells[6] == "1.000" and cells[8] == "150"
    assert cells[10:] == ["11.0", "50", "3.00x"]
    assert "(c) 1 items; first: `c/pytest/tests/test_gpu.py`" in text and "a card" in text
