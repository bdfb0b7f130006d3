"""The benchmark runner: a fixed priority order within a time budget, every result kept as it comes.

    python bench/run.py                      # on a GPU machine: everything that fits 480 s
    python bench/run.py --budget 300         # another budget; run again to resume where it stopped
    python bench/run.py --device cpu --budget 60
    python bench/run.py --fresh              # start over (forget this card/versions/commit's results)
    python bench/run.py --report-only        # rewrite docs/benchmarks.md from results/

Order (each item is checked against the budget before it starts):

(a) every kernel variant against the PyTorch path on the device (bench/variants.py): first the
    covering set (every dtype triple; every option with every parameter dtype; all options at once).
    On CPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1) on tiny sizes.
(b) one step (bench/steps.py) on GPT-2 small and a 1.24B Llama-like set (CPU: 1M parameters), fp32
    and bf16 (ours with fp32 state): ours, torch foreach, a copy of the same bytes (the roofline
    ceiling), CUDA-graph replay of ours, the host time of ours and of foreach; then torch.compile'd
    torch Adadelta, one fresh compilation per case (TorchDynamo reset).
(c) the test files that hold GPU tests (tests/ files using ``needs_gpu``), one pytest run each.
(d) everything else: the main job (python -m triton_adadelta.compare), bench/kernel_host_time.py,
    the pytest-benchmark suite one set at a time (tables in the ``bench:KIND`` block), the remaining
    kernel variants of the product of options, and on a GPU the rest of the test suite.

Every finished item appends one JSON line to ``results/bench/run-KIND.jsonl`` (``--results``) and
rewrites the ``run:KIND`` block of docs/benchmarks.md (``--doc``) with the card or CPU, the date, the
torch and triton versions and the commit, so a run cut off at any point keeps what it measured.
A later run skips the items already recorded for the same card, versions and commit, and does the
rest; an item cut off by a kill (started, never finished) goes to the end of the queue. An item's
time estimate is its duration in an earlier run when there is one, else a fixed guess; an item
whose estimate exceeds the budget left is left for the next run, and smaller items after it still
run. Subprocess items (tests, scripts) are stopped when the budget runs out.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, NamedTuple, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
IMPL_ORDER = ["torch-forloop", "torch-foreach", "torch-compiled", "ours"]
SECTIONS = {
    "a": "kernel variants against the PyTorch path",
    "b": "one optimizer step",
    "c": "GPU tests",
    "d": "everything else",
}
STEP_SETS = {"cuda": ["gpt2-small-124M", "llama-1B"], "cpu": ["uniform-1M"]}
STEP_IMPLS = {"cuda": ["ours", "torch-foreach", "copy", "graph-ours", "host-ours", "host-foreach"],
              "cpu": ["ours", "torch-foreach", "copy", "host-ours", "host-foreach"]}
# Seconds an item is expected to take when no earlier run timed it (compilation included).
GUESS = {
    ("cuda", "variant"): 4, ("cpu", "variant"): 1,
    ("cuda", "step"): 8, ("cpu", "step"): 6,
    ("cuda", "torch-compiled"): 90, ("cpu", "torch-compiled"): 120,
    ("cuda", "tests"): 90, ("cpu", "tests"): 60,
    ("cuda", "compare"): 120, ("cpu", "compare"): 90,
    ("cuda", "script"): 60, ("cpu", "script"): 60,
    ("cuda", "pytest-bench"): 120, ("cpu", "pytest-bench"): 240,
}
MARGIN_S = 2.0  # kept back from a subprocess's timeout for writing its result


class Item(NamedTuple):
    """One unit of work: its id (section/what), its section letter, a guessed duration and what runs it."""

    id: str
    section: str
    guess_s: float
    run: Callable[[Runner], dict[str, Any]]  # returns {"status": ok|fail|error|timeout|skipped, ...}


# ----------------------------------------------------------------------------- the environment
def context(kind: str) -> dict[str, str]:
    """What a result depends on: device kind, card or CPU, torch and triton versions, and the commit."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if kind == "cuda":
        hardware = torch.cuda.get_device_name(0)
    else:
        sys.path.insert(0, ROOT)
        from triton_adadelta.compare import _cpu_name

        hardware = f"{_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    return {"kind": kind, "hardware": hardware, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "cuda": str(torch.version.cuda), "commit": _commit()}


def _commit() -> str:
    """The checkout's commit; where there is no git (a copy of the tree), a digest of the sources instead."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        digest = hashlib.sha1()
        for folder in ("triton_adadelta", "kernels", "bench"):
            for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.[pc]*"), recursive=True)):
                if path.endswith((".py", ".c")):
                    with open(path, "rb") as f:
                        digest.update(f.read())
        return "sources-" + digest.hexdigest()[:10]


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("kind", "hardware", "torch", "triton", "commit"))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------- the items
def _variant_item(v: Any, section: str, kind: str) -> Item:
    def run(r: Runner) -> dict[str, Any]:
        import variants

        out = variants.check(v, r.device)
        return dict(status="ok" if out.pop("ok") else "fail", **out)

    return Item(f"{section}/variant/{v.name}", section, GUESS[(kind, "variant")], run)


def _step_item(set_name: str, mode: str, impl: str, kind: str, section: str = "b") -> Item:
    """One case of bench/steps.py: in this process, except torch.compile's, which run in a process of their
    own (a fresh TorchDynamo; and a compilation that outlasts the budget is stopped)."""
    def run(r: Runner) -> dict[str, Any]:
        import steps

        try:
            return dict(status="ok", **steps.measure(set_name, mode, impl, r.device))
        finally:
            steps.release(r.device)

    def run_apart(r: Runner) -> dict[str, Any]:
        res = _subprocess(r, [sys.executable, os.path.join("bench", "steps.py"), "--set", set_name, "--mode", mode,
                              "--impl", impl, "--device", kind])
        if res["status"] != "ok":
            return res
        return dict(status="ok", **json.loads(res["last_line"]))

    guess = GUESS[(kind, "torch-compiled" if impl == "torch-compiled" else "step")]
    if kind == "cuda" and set_name == "llama-1B":
        guess *= 2  # 35 GB a step in fp32: the allocation and the first touch alone take seconds
    return Item(f"{section}/step/{set_name}/{mode}/{impl}", section, guess,
                run_apart if impl == "torch-compiled" else run)


def _summary(stdout: str) -> str:
    lines = [ln.strip("= ").strip() for ln in stdout.splitlines()
             if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln) and " in " in ln]
    return lines[-1] if lines else "no summary"


def _subprocess(r: Runner, cmd: list[str], env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``cmd`` in the checkout within the budget left; its exit, last output lines and elapsed time."""
    timeout = max(1.0, r.left() - MARGIN_S)
    full_env = dict(os.environ, **(env or {}))
    # This process may have switched the interpreter on (CPU variants); each program decides for itself
    # (the test suite's conftest switches it on where there is no GPU).
    full_env.pop("TRITON_INTERPRET", None)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, full_env.get("PYTHONPATH")) if p)  # this checkout
    print("  $", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return dict(status="timeout", summary=f"stopped after {timeout:.0f} s (budget)", tail=out[-2000:])
    text = proc.stdout + proc.stderr
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    last = ([ln for ln in proc.stdout.splitlines() if ln.strip()] or [""])[-1]
    return dict(status="ok" if proc.returncode == 0 else "fail", returncode=proc.returncode,
                summary=_summary(proc.stdout), failed=failed[:20], tail=text[-3000:], last_line=last)


def _pytest_item(path: str, section: str, kind: str) -> Item:
    def run(r: Runner) -> dict[str, Any]:
        return _subprocess(r, [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-rfEs"])

    return Item(f"{section}/pytest/{path}", section, GUESS[(kind, "tests")], run)


def _compare_item(kind: str) -> Item:
    def run(r: Runner) -> dict[str, Any]:
        out_dir = os.path.join(r.results, f"compare-{kind}")
        res = _subprocess(r, [sys.executable, "-m", "triton_adadelta.compare", "--device", kind, "--no-progress",
                              "--out", out_dir])
        report = os.path.join(out_dir, "report.md")
        if res["status"] == "ok" and os.path.exists(report):
            res["report"] = open(report, encoding="utf-8").read()
        return res

    return Item("d/compare", "d", GUESS[(kind, "compare")], run)


def _script_item(name: str, args: list[str], kind: str) -> Item:
    def run(r: Runner) -> dict[str, Any]:
        res = _subprocess(r, [sys.executable, os.path.join("bench", name), *args])
        if res["status"] == "ok":
            res["output"] = res.pop("tail")
        return res

    return Item(f"d/script/{name}", "d", GUESS[(kind, "script")], run)


def _pytest_bench_item(name: str, kind: str, target: str, keyword: str, set_name: str = "") -> Item:
    """A part of the pytest-benchmark suite: its JSON joins results/bench/KIND-*.json and the bench:KIND tables."""
    def run(r: Runner) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        json_path = os.path.join(r.results, f"{kind}-{name}-{stamp}.json")
        env = dict(BENCH_DEVICE=kind, **({"BENCH_SETS": set_name} if set_name else {}))
        res = _subprocess(r, [sys.executable, "-m", "pytest", target, "-q", "-p", "no:cacheprovider", "-k", keyword,
                              f"--benchmark-json={json_path}", "--benchmark-columns=median,min,max,rounds"], env=env)
        if os.path.exists(json_path):
            with open(json_path, encoding="utf-8") as f:
                data = json.load(f)
            data["versions"] = dict(r.ctx, hardware=r.ctx["hardware"])
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            update_bench_tables(r.results, kind, r.doc)
            res["json"] = os.path.relpath(json_path, ROOT)
        return res

    return Item(f"d/pytest-bench/{name}", "d", GUESS[(kind, "pytest-bench")], run)


def gpu_test_files() -> list[str]:
    """The test files that hold tests needing a GPU (they use ``needs_gpu``), found when the run starts."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        if "needs_gpu" in open(path, encoding="utf-8").read():
            out.append(os.path.relpath(path, ROOT))
    return out


def plan(kind: str, sets: Optional[list[str]] = None) -> list[Item]:
    """Every item for this device kind, in priority order."""
    import variants

    covering = variants.covering_variants()
    items = [_variant_item(v, "a", kind) for v in covering]
    step_sets = sets or STEP_SETS[kind]
    for set_name in step_sets:
        for mode in ("fp32", "bf16"):
            items += [_step_item(set_name, mode, impl, kind) for impl in STEP_IMPLS[kind]]
    for set_name in step_sets:  # the compilations last: each costs a minute or more
        for mode in ("fp32", "bf16"):
            items.append(_step_item(set_name, mode, "torch-compiled", kind))
    gpu_files = gpu_test_files()
    items += [_pytest_item(path, "c", kind) for path in gpu_files]
    items.append(_compare_item(kind))
    items.append(_script_item("kernel_host_time.py", ["--steps", "100"], kind))
    from sets import DEFAULT_SETS

    items += [_pytest_bench_item(s, kind, "bench/test_step.py", "test_step or test_copy", s)
              for s in DEFAULT_SETS[kind]]
    items.append(_pytest_bench_item("host-overhead", kind, "bench/test_step.py", "test_host_overhead"))
    items.append(_pytest_bench_item("precision-modes", kind, "bench/test_precision_modes.py", "test_"))
    items += [_variant_item(v, "d", kind) for v in variants.all_variants() if v not in set(covering)]
    if kind == "cuda":
        rest = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
        items += [_pytest_item(path, "d", kind) for path in rest if path not in gpu_files]
    return items


# ----------------------------------------------------------------------------- pytest-benchmark tables (d)
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


# ----------------------------------------------------------------------------- records and the run
def load_records(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a results file (a line cut off by a kill is ignored)."""
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


class Runner:
    """Runs the plan within the budget, appending each result to the results file and the docs."""

    def __init__(self, kind: str, budget: float, results: str, doc: str, fresh: bool) -> None:
        import torch

        self.kind = kind
        self.device = torch.device(kind)
        self.budget = budget
        self.results = results
        self.doc = doc
        self.start = time.monotonic()
        self.ctx = context(kind)
        os.makedirs(results, exist_ok=True)
        self.path = os.path.join(results, f"run-{kind}.jsonl")
        records = load_records(self.path)
        if fresh:
            records = [rec for rec in records if not _same(rec["context"], self.ctx)]
            self._rewrite(records)
        self.records = records

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, self.path)

    def _append(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _mine(self) -> list[dict[str, Any]]:
        return [rec for rec in self.records if _same(rec["context"], self.ctx)]

    def estimate(self, item: Item) -> float:
        """The item's duration in the latest earlier run on this kind of device, else its guess;
        doubled when that run stopped it at the budget."""
        for rec in reversed(self.records):
            if rec["id"] == item.id and rec["context"]["kind"] == self.kind and rec["event"] == "done":
                return rec["seconds"] * (2 if rec["status"] == "timeout" else 1)
        return item.guess_s

    def run(self, items: list[Item]) -> int:
        """Run what is not yet done, in order; returns 1 when a check failed or an item broke, else 0."""
        mine = self._mine()
        done = {rec["id"] for rec in mine if rec["event"] == "done" and rec["status"] != "timeout"}
        started = {rec["id"] for rec in mine if rec["event"] == "start"}
        cut_off = started - {rec["id"] for rec in mine if rec["event"] == "done"}
        queue = [it for it in items if it.id not in cut_off] + [it for it in items if it.id in cut_off]
        todo = [it for it in queue if it.id not in done]
        print(f"{self.ctx['hardware']}; torch {self.ctx['torch']}, triton {self.ctx['triton']}, commit "
              f"{self.ctx['commit']}; budget {self.budget:.0f} s; {len(items)} items, {len(items) - len(todo)} "
              f"already done (resumed), {len(todo)} to do" + (f", {len(cut_off)} cut off last time (last)"
                                                           if cut_off else ""), flush=True)
        status = 0
        self.write_docs(items)
        later: dict[str, int] = {}
        for item in todo:
            est = self.estimate(item)
            left = self.left()
            if est > left:
                if item.section not in later:  # the first of each section; the rest are counted
                    print(f"[{item.section}] {item.id}: needs ~{est:.1f} s, {max(left, 0):.1f} s left: left for "
                          "the next run", flush=True)
                later[item.section] = later.get(item.section, 0) + 1
                continue
            self._append(dict(context=self.ctx, id=item.id, section=item.section, event="start", date=_now()))
            t0 = time.monotonic()
            try:
                data = item.run(self)
            except Exception as exc:  # one broken item must not lose the others: recorded, the run goes on
                data = dict(status="error", error=f"{type(exc).__name__}: {exc}", tail=traceback.format_exc()[-3000:])
            seconds = time.monotonic() - t0
            self._append(dict(context=self.ctx, id=item.id, section=item.section, event="done", date=_now(),
                              seconds=round(seconds, 3), **data))
            print(f"[{item.section}] {item.id}: {data['status']} ({seconds:.1f} s) {_brief(data)}", flush=True)
            if data["status"] in ("fail", "error"):
                status = 1
            self.write_docs(items)
            if data["status"] == "error" and not self._device_alive():
                print("the device is in an error state: stopping; run again to resume", file=sys.stderr)
                return 1
        if later:
            print("left for the next run (over the budget): " + ", ".join(f"({s}) {n}" for s, n in later.items()))
        print(f"finished in {time.monotonic() - self.start:.0f} s; results in {self.path}, docs in {self.doc}")
        return status

    def _device_alive(self) -> bool:
        if self.kind != "cuda":
            return True
        import torch

        try:
            torch.cuda.synchronize()
            return True
        except RuntimeError:
            return False

    def write_docs(self, items: list[Item]) -> None:
        write_block(self.doc, f"run:{self.kind}", render_run(self._mine(), self.ctx, items))


def _brief(data: dict[str, Any]) -> str:
    if "median_s" in data:
        return f"median {1e3 * data['median_s']:.3f} ms" + (f", {data['gbps']:.1f} GB/s" if "gbps" in data else "")
    if "ulps16" in data:
        return f"fp32 rel {data['fp32_rel']:.1e}, 16-bit max {data['ulps16']:.0f} ulp ({data['differ16']} differ)"
    return data.get("summary") or data.get("error", "")


# ----------------------------------------------------------------------------- the report
def render_run(records: list[dict[str, Any]], ctx: dict[str, str], items: list[Item]) -> str:
    """Markdown for one context's finished items: per section, with what is still to do."""
    done = {}
    for rec in records:
        if rec["event"] == "done":
            done[rec["id"]] = rec
    dates = sorted(rec["date"] for rec in done.values())
    span = f"{dates[0]} to {dates[-1]} UTC" if dates else "nothing finished yet"
    lines = [f"Written by `python bench/run.py` on {ctx['hardware']}; torch {ctx['torch']}, triton "
             f"{ctx['triton']}, Python {ctx['python']}, CUDA {ctx['cuda']}; commit {ctx['commit']}; {span}.", ""]
    pending = [it for it in items if it.id not in done or done[it.id]["status"] == "timeout"]
    order = {it.id: i for i, it in enumerate(items)}
    by_section: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    for rec in sorted(done.values(), key=lambda r: order.get(r["id"], len(order))):
        by_section.setdefault(rec["section"], []).append(rec)
    variant_recs = [rec for rec in by_section["a"] + by_section["d"] if "/variant/" in rec["id"]]
    if variant_recs:
        bad = [rec for rec in variant_recs if rec["status"] != "ok"]
        lines += [f"**(a) kernel variants against the PyTorch path on the device** (fused=True against "
                  f"fused=False, same options, fresh random inputs, 2 steps): {len(variant_recs) - len(bad)} "
                  f"of {len(variant_recs)} agree; the (a) rows below, then any (d) variant that does not.", "",
                  "| variant | result | fp32 max rel. error | 16-bit max ulp | 16-bit elements differing |",
                  "|---|---|---:|---:|---:|"]
        for rec in variant_recs:
            if rec["section"] == "a" or rec["status"] != "ok":
                lines.append(_variant_row(rec))
        lines.append("")
    steps = [rec for rec in by_section["b"] if rec["status"] == "ok"]
    if steps:
        lines += _step_table(steps)
    broken = [rec for rec in by_section["b"] if rec["status"] != "ok"]
    for rec in broken:
        lines.append(f"- {rec['id']}: {rec['status']}: {rec.get('error', '')}")
    if broken:
        lines.append("")
    for sec in ("c", "d"):
        recs = [rec for rec in by_section[sec] if "/variant/" not in rec["id"]]
        if recs:
            lines += [f"**({sec}) {SECTIONS[sec]}**", "", "| item | result | seconds | summary |", "|---|---|---:|---|"]
            for rec in recs:
                summary = (rec.get("summary") or rec.get("error") or "").replace("|", "/")
                lines.append(f"| {rec['id'][2:]} | {rec['status']} | {rec['seconds']:.0f} | {summary} |")
            lines.append("")
    reports = [rec for rec in by_section["d"] if rec["id"] == "d/compare" and rec.get("report")]
    for rec in reports:
        lines += ["The main job's report:", "", rec["report"].replace("# triton_adadelta.compare", "").strip(), ""]
    if pending:
        counts = {s: sum(1 for it in pending if it.section == s) for s in SECTIONS}
        lines.append("Not done yet (the next run resumes here): " + ", ".join(
            f"({s}) {n}" for s, n in counts.items() if n) + f" items; first: `{pending[0].id}`.")
    else:
        lines.append("Every item is done.")
    return "\n".join(lines) + "\n"


def _variant_row(rec: dict[str, Any]) -> str:
    if rec["status"] == "error":
        return f"| {rec['id'].split('/')[-1]} | error: {rec['error'][:120]} | | | |"
    return (f"| {rec['id'].split('/')[-1]} | {rec['status']} | {rec['fp32_rel']:.1e} | {rec['ulps16']:.0f} | "
            f"{rec['differ16']} of {rec['total16']} |")


def _step_table(recs: list[dict[str, Any]]) -> list[str]:
    cell: dict[tuple[str, str, str], dict[str, Any]] = {(r["set"], r["mode"], r["impl"]): r for r in recs}
    cases = list(dict.fromkeys((r["set"], r["mode"]) for r in recs))
    lines = ["**(b) one optimizer step**: median ms per `step()` (CUDA: CUDA events, L2 flushed before each call; "
             "CPU: wall clock). `copy`: a device copy of ours' minimum traffic (28 B a parameter in fp32, 22 B "
             "in bf16 with fp32 state), the ceiling. `graph`: replay of a CUDA graph holding our step. `host`: "
             "`step()` on the host clock with new gradient tensors each step (queue drained first). `compiled`: "
             "torch.compile'd torch Adadelta, one fresh compilation per case (its compile time in brackets).", "",
             "| set | params | mode | ours | foreach | compiled | copy | graph | host ours µs | host foreach µs "
             "| ours GB/s | ours % of copy | foreach / ours |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, m in cases:
        case = {impl: r for (s2, m2, impl), r in cell.items() if (s2, m2) == (s, m)}
        get = case.get

        def ms(impl: str, case: dict[str, dict[str, Any]] = case) -> str:
            r = case.get(impl)
            return "—" if r is None else f"{1e3 * r['median_s']:.3f}"

        comp = get("torch-compiled")
        comp_txt = "—" if comp is None else f"{1e3 * comp['median_s']:.3f} ({comp.get('compile_s', 0):.0f} s)"
        ours, foreach, copy = get("ours"), get("torch-foreach"), get("copy")
        host = [get(f"host-{x}") for x in ("ours", "foreach")]
        pct = f"{100 * ours['gbps'] / copy['gbps']:.0f}" if ours and copy else "—"
        ratio = f"{foreach['median_s'] / ours['median_s']:.2f}x" if ours and foreach else "—"
        params = next(r for r in (ours, foreach, copy, comp, *host) if r is not None)["params"]
        lines.append(f"| {s} | {params:,} | {m} | {ms('ours')} | {ms('torch-foreach')} | {comp_txt} | {ms('copy')} "
                     f"| {ms('graph-ours')} | "
                     + " | ".join("—" if h is None else f"{1e6 * h['median_s']:.0f}" for h in host)
                     + f" | {'—' if ours is None else format(ours['gbps'], '.1f')} | {pct} | {ratio} |")
    return lines + [""]


def write_block(doc: str, name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``doc`` (appended as a
    new section when absent); written to a temporary file and moved, so a kill never leaves half a file."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else "# Benchmarks\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
    tmp = doc + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, doc)


def write_docs(doc: str, kind: str, table: str) -> None:
    write_block(doc, f"bench:{kind}", table)


def update_bench_tables(results: str, kind: str, doc: str) -> None:
    """The pytest-benchmark tables and plot (the ``bench:KIND`` block) from every JSON file in ``results``;
    left as they are when there is none (the tables in the docs may come from another machine's files)."""
    if not glob.glob(os.path.join(results, f"{kind}-*.json")):
        return
    table = render(results, kind)
    png = f"benchmarks-{kind}.png"
    if plot(results, kind, os.path.join(os.path.dirname(os.path.abspath(doc)), png)):
        table += f"\n![one optimizer step on {kind}: times and bandwidth]({png})\n"
    write_docs(doc, kind, table)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--fresh", action="store_true", help="forget this card/versions/commit's results first")
    ap.add_argument("--sets", default=None, help="comma-separated sets for (b) (bench/sets.py SETS)")
    ap.add_argument("--sections", default="abcd", help="the sections to run, e.g. ab (default abcd)")
    ap.add_argument("--max-items", type=int, default=None, help="at most this many items of each section")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the docs from the results")
    ap.add_argument("--results", default=os.path.join(ROOT, "results", "bench"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = ap.parse_args(argv)

    import torch

    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if kind == "cpu":
        # The kernel's variants run in the interpreter on CPU; the step benchmarks switch it off for
        # their items (the route reads the variable at every step). Set before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path[:0] = [BENCH, ROOT]
    from sets import SETS

    sets = [s.strip() for s in args.sets.split(",")] if args.sets else None
    unknown = [s for s in sets or [] if s not in SETS]
    if unknown:
        ap.error(f"unknown sets {unknown}; known: {sorted(SETS)}")
    items = [it for it in plan(kind, sets) if it.section in args.sections]
    if args.max_items is not None:
        items = [it for s in SECTIONS for it in [x for x in items if x.section == s][: args.max_items]]
    if kind == "cpu":
        items = [it if it.section != "b" else it._replace(run=_without_interpreter(it.run)) for it in items]
    runner = Runner(kind, args.budget, args.results, args.doc, args.fresh)
    if args.report_only:
        runner.write_docs(items)
        update_bench_tables(args.results, kind, args.doc)
        return 0
    return runner.run(items)


def _without_interpreter(fn: Callable[[Runner], dict[str, Any]]) -> Callable[[Runner], dict[str, Any]]:
    """A CPU step benchmark times the fused CPU path, not the Triton interpreter."""
    def run(r: Runner) -> dict[str, Any]:
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            return fn(r)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"

    return run


if __name__ == "__main__":
    sys.exit(main())
