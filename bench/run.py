"""Run the benchmark suite (and on a GPU the test suite first) and write the results into docs/benchmarks.md.

    python bench/run.py                       # everything for this machine: GPU tests + all GPU benchmarks
    python bench/run.py --sets uniform-1M,llama-1B --skip-tests   # a part (results accumulate)
    python bench/run.py --device cpu          # the CPU tables
    python bench/run.py --report-only         # rebuild the tables from results/bench/*.json

Each benchmark run leaves a pytest-benchmark JSON file in ``results/bench/`` (``--results``); the
tables are built from every JSON file there for the device kind, the newest result of each
benchmark winning, so a suite that does not fit one session can run in parts. The tables go
between ``<!-- BEGIN bench:KIND -->`` and ``<!-- END bench:KIND -->`` in docs/benchmarks.md
(KIND is cuda or cpu), with the card or CPU, the date and the torch and triton versions of the
run that produced them; the rest of that file is left as it is.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPL_ORDER = ["torch-forloop", "torch-foreach", "torch-compiled", "ours"]


def _versions() -> dict[str, str]:
    code = (
        "import json, platform, torch\n"
        "try:\n import triton; tv = triton.__version__\n"
        "except ImportError:\n tv = 'not installed'\n"
        "d = {'torch': torch.__version__, 'triton': tv, 'python': platform.python_version(),\n"
        "     'cuda': str(torch.version.cuda), 'threads': str(torch.get_num_threads())}\n"
        "if torch.cuda.is_available():\n d['card'] = torch.cuda.get_device_name(0)\n"
        "print(json.dumps(d))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(cmd: list[str], env: dict[str, str], timeout: Optional[float]) -> tuple[int, str]:
    print("$", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, text + "\n[timed out]"
    sys.stdout.write(proc.stdout[-6000:])
    sys.stderr.write(proc.stderr[-3000:])
    return proc.returncode, proc.stdout


def _summary(stdout: str) -> str:
    lines = [ln.strip("= ").strip() for ln in stdout.splitlines()
             if re.search(r"\d+ (passed|failed|error)", ln) and " in " in ln]
    return lines[-1] if lines else "no summary (see the log)"


def _load(results: str, kind: str) -> tuple[dict[tuple, dict], Optional[dict]]:
    """Newest result per benchmark for this device kind, and the machine_info of the newest file."""
    best: dict[tuple, dict] = {}
    newest_info = None
    files = sorted(glob.glob(os.path.join(results, f"{kind}-*.json")), key=os.path.getmtime)
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        newest_info = dict(data.get("machine_info", {}), datetime=data.get("datetime", ""),
                           versions=data.get("versions"))
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            key = (info.get("kind"), info.get("set"), info.get("mode"), info.get("impl"))
            b["_file"] = path
            b["_versions"] = data.get("versions", {})
            b["_date"] = data.get("datetime", "")
            best[key] = b
    return best, newest_info


def _ms(b: Optional[dict]) -> Optional[float]:
    """Median milliseconds per step (a round may hold several steps: ``steps_per_round``)."""
    return None if b is None else 1e3 * b["stats"]["median"] / b["extra_info"].get("steps_per_round", 1)


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def render(results: str, kind: str) -> str:
    """The Markdown tables for one device kind from the JSON files in ``results``."""
    best, _ = _load(results, kind)
    if not best:
        return f"No {kind} results in {results} yet.\n"
    runs = {}
    for b in best.values():
        if b["extra_info"].get("kind") not in ("step", "copy", "host"):
            continue  # other benchmark files (e.g. test_precision_modes.py) report elsewhere
        v = b["_versions"]
        threads = b["extra_info"].get("threads")
        hw = v.get("hardware", "?") + (f", torch threads: {threads}" if kind == "cpu" and threads else "")
        runs[(hw, v.get("torch", "?"), v.get("triton", "?"), b["_date"][:16].replace("T", " "))] = True
    lines = ["Measured by `python bench/run.py` on:", ""]
    for hw, tv, trv, date in runs:
        lines.append(f"- {hw}; torch {tv}, triton {trv}; {date} UTC")
    lines += [
        "",
        "Median time of one `step()` in ms (lower is better; on CUDA, rounds of 10 steps back to back with one "
        "synchronisation, per step, so that host and GPU work overlap as in training). "
        "`ours GB/s` is the minimum traffic of our step "
        "(28 B/param fp32, 22 B/param bf16 params with fp32 state) over its time; `% copy` compares it with a "
        "device-to-device copy of as many bytes in the same run. `foreach / ours` is the speed-up over "
        "torch.optim.Adadelta(foreach=True). Peak: memory allocated above the resting level during one step "
        "(CUDA: the allocator's peak; CPU: bytes allocated by the step's operations, torch.profiler).",
        "",
        "| set | params | tensors | mode | torch for-loop | torch foreach | torch compiled | ours | foreach / ours "
        "| ours GB/s | % copy | peak MB foreach | peak MB ours |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sets = []
    for (k, s, m, _impl) in best:
        if k == "step" and (s, m) not in sets:
            sets.append((s, m))
    for s, m in sets:
        row = {impl: best.get(("step", s, m, impl)) for impl in IMPL_ORDER}
        copy = best.get(("copy", s, m, None))
        any_b = next(b for b in row.values() if b is not None)
        info = any_b["extra_info"]
        ours = row["ours"]
        foreach = row["torch-foreach"]
        speedup = _ms(foreach) / _ms(ours) if ours and foreach else None
        gbps = ours["extra_info"].get("gbps") if ours else None
        copy_gbps = copy["extra_info"].get("gbps") if copy else None
        pct = 100 * gbps / copy_gbps if gbps and copy_gbps else None

        def peak(b):
            v = None if b is None else b["extra_info"].get("peak_extra_bytes")
            return None if v is None or v < 0 else v / 2**20

        lines.append(
            f"| {s} | {info['params']:,} | {info['tensors']} | {m} | {_fmt(_ms(row['torch-forloop']))} "
            f"| {_fmt(_ms(foreach))} | {_fmt(_ms(row['torch-compiled']))} | {_fmt(_ms(ours))} "
            f"| {_fmt(speedup)}x | {_fmt(gbps, '.1f')} | {_fmt(pct, '.0f')} | {_fmt(peak(foreach), '.1f')} "
            f"| {_fmt(peak(ours), '.1f')} |"
        )
    host = {impl: best.get(("host", None, None, impl)) for impl in ("torch-forloop", "torch-foreach", "ours")}
    if any(host.values()):
        tensors = next(b for b in host.values() if b)["extra_info"]["tensors"]
        what = "host time to launch one step (no synchronisation)" if kind == "cuda" else "time of one step"
        lines += ["", f"Host overhead, {tensors} tensors of 4096 fp32 elements, {what}, median µs:", "",
                  "| torch for-loop | torch foreach | ours |", "|---:|---:|---:|",
                  "| " + " | ".join(_fmt(None if b is None else 1e6 * b["stats"]["median"], ".0f")
                                    for b in host.values()) + " |"]
    return "\n".join(lines) + "\n"


def plot(results: str, kind: str, path: str) -> bool:
    """A PNG of the step tables: ms per step against parameters (log-log), one panel per mode, one line
    per implementation, and ours as a percentage of the copy. Returns False when there is nothing to plot."""
    best, _ = _load(results, kind)
    steps = [b for (k, *_), b in best.items() if k == "step"]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({b["extra_info"]["mode"] for b in steps})
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5 * (len(modes) + 1), 4))
    for ax, mode in zip(axes, modes):
        for impl in IMPL_ORDER:
            pts = sorted((b["extra_info"]["params"], _ms(b)) for b in steps
                         if b["extra_info"]["mode"] == mode and b["extra_info"]["impl"] == impl)
            if pts:
                ax.plot([p for p, _ in pts], [t for _, t in pts], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"{mode}: one optimizer step")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for mode in modes:
        pts = []
        for b in steps:
            info = b["extra_info"]
            copy = best.get(("copy", info["set"], mode, None))
            if info["impl"] == "ours" and info["mode"] == mode and copy and info.get("gbps"):
                pts.append((info["params"], 100 * info["gbps"] / copy["extra_info"]["gbps"]))
        if pts:
            pts.sort()
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=f"ours, {mode}")
    ax.axhline(100, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("% of a copy's bandwidth")
    ax.set_title("ours: effective bandwidth / copy")
    ax.legend(fontsize=8)
    hw = sorted({b["_versions"].get("hardware", "?") for b in steps})
    fig.suptitle(f"{'; '.join(hw)} (bench/run.py; dates and versions in docs/benchmarks.md)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_docs(doc: str, kind: str, table: str) -> None:
    begin, end = f"<!-- BEGIN bench:{kind} -->", f"<!-- END bench:{kind} -->"
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else "# Benchmarks\n"
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {kind.upper()} results\n\n{block}\n"
    with open(doc, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--sets", default=None, help="comma-separated set names (bench/conftest.py SETS)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression for the benchmarks")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the test suite first (GPU)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the tables from the JSON files")
    ap.add_argument("--results", default=os.path.join(ROOT, "results", "bench"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds for each pytest run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for CPU benchmarks")
    args = ap.parse_args(argv)

    versions = _versions()
    kind = args.device or ("cuda" if "card" in versions else "cpu")
    if kind == "cuda" and "card" not in versions:
        print("no CUDA device here", file=sys.stderr)
        return 2
    os.makedirs(args.results, exist_ok=True)
    status = 0
    if not args.report_only:
        env = dict(os.environ, BENCH_DEVICE=kind)
        env.pop("BENCH_QUICK", None)
        if args.sets:
            env["BENCH_SETS"] = args.sets
        if args.threads:
            env["BENCH_THREADS"] = str(args.threads)
        if kind == "cuda" and not args.skip_tests:
            # On a GPU the tests run on the device (conftest leaves the interpreter off), sync-debug included.
            rc, out = _run([sys.executable, "-m", "pytest", "tests", "-q", "-rfEs"], env, args.timeout)
            print(f"tests: {_summary(out)} (exit {rc})")
            status |= rc
            with open(os.path.join(args.results, f"{kind}-tests.txt"), "w", encoding="utf-8") as f:
                now = datetime.datetime.now(datetime.timezone.utc)
                f.write(f"{now:%Y-%m-%d %H:%M} UTC, {versions.get('card')}, torch {versions['torch']}, "
                        f"triton {versions['triton']}: {_summary(out)} (exit {rc})\n")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        json_path = os.path.join(args.results, f"{kind}-{stamp}.json")
        cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={json_path}", "--benchmark-columns=median,min,max,rounds"]
        if args.keyword:
            cmd += ["-k", args.keyword]
        rc, out = _run(cmd, env, args.timeout)
        print(f"benchmarks: {_summary(out)} (exit {rc})")
        status |= rc
        if os.path.exists(json_path):
            # Record the versions with the results: pytest-benchmark's machine_info has no torch/triton.
            with open(json_path, encoding="utf-8") as f:
                data = json.load(f)
            hw = versions.get("card") if kind == "cuda" else _cpu(versions)
            data["versions"] = dict(versions, hardware=hw)
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
    table = render(args.results, kind)
    png = f"benchmarks-{kind}.png"
    if plot(args.results, kind, os.path.join(os.path.dirname(os.path.abspath(args.doc)), png)):
        table += f"\n![one optimizer step on {kind}: times and bandwidth]({png})\n"
    tests_file = os.path.join(args.results, f"{kind}-tests.txt")
    if kind == "cuda" and os.path.exists(tests_file):
        table = f"Test suite on this card: {open(tests_file, encoding='utf-8').read().strip()}\n\n" + table
    write_docs(args.doc, kind, table)
    print(table)
    print(f"wrote the {kind} tables into {args.doc}")
    return status


def _cpu(versions: dict[str, str]) -> str:
    sys.path.insert(0, ROOT)
    from triton_adadelta.compare import _cpu_name

    return f"{_cpu_name()}, {os.cpu_count()} logical CPUs"


if __name__ == "__main__":
    sys.exit(main())
