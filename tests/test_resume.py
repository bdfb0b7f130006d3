"""Checkpoint and resume in a fresh process, and determinism: both bit for bit.

tests/resume_worker.py does the training. One process trains every mode, saves a checkpoint half
way (torch.save of the parameters and the optimizer's state_dict) and goes on to the end; a second,
fresh process builds the model with other values and the optimizer under another torch seed, loads
the checkpoint and trains the second half. Both ends must agree to the last bit: parameters, every
state tensor, step counts, skipped-step counters, and the settings in param_groups.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import resume_worker as worker
import torch
from conftest import needs_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = [pytest.param(m, marks=needs_kernel) if "fused" in m else m for m in worker.MODES]


def _flatten(obj, prefix=""):
    """(path, leaf) pairs of a nested structure; tensors as (dtype, shape, raw bytes) so NaNs compare too."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        if t.is_complex():
            t = torch.view_as_real(t).reshape(-1)
        return [(prefix, (obj.dtype, tuple(obj.shape), t.view(torch.uint8)))]
    if isinstance(obj, dict):
        return [kv for k in obj for kv in _flatten(obj[k], f"{prefix}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def assert_bit_identical(a, b, what: str) -> None:
    fa, fb = _flatten(a), _flatten(b)
    assert [k for k, _ in fa] == [k for k, _ in fb], f"{what}: different structure"
    for (key, x), (_, y) in zip(fa, fb):
        if isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], torch.Tensor):
            assert x[:2] == y[:2] and torch.equal(x[2], y[2]), f"{what}: {key} differs"
        else:
            assert x == y, f"{what}: {key} differs ({x!r} != {y!r})"


def _run(phase: str, ckpt_dir: str, out: str) -> None:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "resume_worker.py"), phase, ckpt_dir, out],
                          cwd=HERE, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{phase} process failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted results, resumed results), each from its own process."""
    d = tmp_path_factory.mktemp("resume")
    _run("train", str(d), str(d / "train.pt"))
    _run("resume", str(d), str(d / "resume.pt"))
    return torch.load(d / "train.pt", weights_only=True), torch.load(d / "resume.pt", weights_only=True)


@pytest.mark.parametrize("mode", MODES)
def test_resume_in_fresh_process_is_bit_identical(runs, mode):
    uninterrupted, resumed = runs
    assert_bit_identical(uninterrupted[mode], resumed[mode], f"{mode}: resumed vs uninterrupted")
    steps = [float(s["step"]) for s in resumed[mode]["optimizer"]["state"].values()]
    nan_steps = worker.MODES[mode][3]
    # Every tensor was updated after the resume (the first one skipped step 0 only).
    assert sorted(steps) == sorted([worker.STEPS - 1 - len(nan_steps)] + [worker.STEPS - len(nan_steps)] * 3)
    if nan_steps:
        assert int(resumed[mode]["optimizer"]["skipped_steps"]) == len(nan_steps)


@pytest.mark.parametrize("mode", MODES)
def test_same_run_twice_is_bit_identical(runs, mode):
    """The worker process ran it once; this process, with its own history (other tests, compiled
    kernels, allocator state), runs it again: the bits must agree."""
    with torch.random.fork_rng(devices=[]):
        again = worker.run_uninterrupted(mode)
    assert_bit_identical(again, runs[0][mode], f"{mode}: this process vs the worker process")


def test_resume_check_is_sensitive():
    """Controls: resuming without the optimizer state, or with the state but another torch seed and no
    saved seed, gives different bits, so the equality above is not an accident."""
    mode = "stochastic-reference"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        params = worker.make_params(mode, seed=3)
        opt = worker.make_optimizer(mode, params)
        worker.train(mode, params, opt, range(worker.SAVE_AT))
        saved_params = [p.detach().clone() for p in params]
        saved_state = copy.deepcopy(opt.state_dict())
        worker.train(mode, params, opt, range(worker.SAVE_AT, worker.STEPS))
        full = worker.result(params, opt)

        def resume(load_state: bool, keep_seed: bool):
            torch.manual_seed(12345)
            ps = [p.clone() for p in saved_params]
            o = worker.make_optimizer(mode, ps)
            if load_state:
                sd = copy.deepcopy(saved_state)
                if not keep_seed:
                    for g in sd["param_groups"]:
                        del g["seed"]
                o.load_state_dict(sd)
            worker.train(mode, ps, o, range(worker.SAVE_AT, worker.STEPS))
            return worker.result(ps, o)

        assert_bit_identical(full, resume(True, True), "control: proper resume")
        for load_state, keep_seed in ((False, True), (True, False)):
            other = resume(load_state, keep_seed)
            assert any(not torch.equal(a, b) for a, b in zip(full["params"], other["params"])), (
                f"resume(load_state={load_state}, keep_seed={keep_seed}) matched: the check cannot fail")
