"""The kernel as a GPU would compile it, checked without a GPU (bench/codegen.py does the compiling).

For sm_80 and sm_90 with the installed Triton: every variant within 128 registers a thread and
without spills, the two defaults within 80; the aligned specialisation reads and writes parameters
and gradients in 128-bit vectors, the unaligned one never in vectors (it carries no alignment
promise). The default run compiles a representative cover of the launchable variants (every dtype,
master mode and flag, both specialisations, the defaults: 78 an architecture, a few minutes on
a 2-core machine); ``ADADELTA_CODEGEN=all`` compiles every launchable variant (472 an architecture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_kernel
from helpers import make_params, random_grads, set_grads

from triton_adadelta import Adadelta
from triton_adadelta.backends.triton import is_aligned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import codegen  # noqa: E402

ARCHS = (80, 90)
FULL = os.environ.get("ADADELTA_CODEGEN") == "all"


@pytest.fixture(scope="session")
def compiled() -> dict[int, list[dict]]:
    """Every checked variant compiled once a session, both architectures at once (one process each)."""
    env = dict(os.environ, TRITON_INTERPRET="0")  # the interpreter compiles nothing
    cmd = [sys.executable, os.path.join(ROOT, "bench", "codegen.py"), "--json", "--no-sass"]
    if not FULL:
        cmd.append("--small-cover")
    procs = {arch: subprocess.Popen([*cmd, "--arch", str(arch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=ROOT) for arch in ARCHS}
    rows = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=3000)
        assert proc.returncode == 0, err[-3000:]
        rows[arch] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def _variant(row: dict) -> codegen.Variant:
    return codegen.Variant(**row["variant"])


def test_the_checked_variants_cover_every_dtype_mode_and_flag(compiled):
    """The cover is what it claims: the checks below then reach every dtype, master mode and flag,
    each with and without, both specialisations and both defaults."""
    for arch in ARCHS:
        variants = [_variant(r) for r in compiled[arch]]
        expected = codegen.launchable() if FULL else codegen.cover(codegen.launchable(), pairs=False)
        assert variants == expected
        for field in ("p", "g", "s", "master", "stochastic", "clip", "scaler", "aligned"):
            values = {getattr(v, field) for v in variants}
            allowed = {getattr(v, field) for v in codegen.launchable()}
            assert values == allowed, (field, values, allowed)
        assert sum(v.is_default for v in variants) == 4  # two defaults, aligned and unaligned


def test_launchable_variants_follow_the_hosts_rules():
    variants = codegen.launchable()
    assert len(variants) == len(set(variants)) == 472
    assert all(v.g in (v.p, "fp32") for v in variants)
    assert all(v.master == 0 or v.p != "fp32" for v in variants)
    assert all(v.master != 2 or v.p == "bf16" for v in variants)
    # Stochastic rounding only where something is rounded to 16 bits.
    assert all(not v.stochastic or v.s != "fp32" or (v.p != "fp32" and v.master == 0) for v in variants)


@pytest.mark.parametrize("arch", ARCHS)
def test_register_budget_and_no_spills(compiled, arch):
    """<= 128 registers (25% occupancy of an H100 with 4-warp blocks), no spills; defaults <= 80 (37.5%)."""
    for row in compiled[arch]:
        v = _variant(row)
        assert row["spill_bytes"] == 0, (v.label, row)
        assert row["registers"] <= 128, (v.label, row)
        if v.is_default:
            assert row["registers"] <= 80, (v.label, row)
            assert row["occupancy"] >= 0.375


@pytest.mark.parametrize("arch", ARCHS)
def test_aligned_accesses_are_128_bit_and_unaligned_ones_scalar(compiled, arch):
    """Parameter and gradient accesses (found by following the pointers read from the pointer table):
    all 128-bit in the aligned specialisation, none vectorised in the unaligned one."""
    for row in compiled[arch]:
        v = _variant(row)
        per_thread = codegen.block_of(v) // (32 * 4)
        if v.aligned:
            assert row["table_accesses"] > 0 and row["table_v4_accesses"] == row["table_accesses"], (v.label, row)
            assert row["ld_v4"] > 0 and row["st_v4"] > 0
        else:
            assert row["table_vector_accesses"] == 0, (v.label, row)
            # Every element's parameter and gradient load and parameter store, one at a time.
            loads = (1 if v.master == 1 else 2) * per_thread
            assert row["table_accesses"] >= loads + per_thread, (v.label, row)


# ------------------------------------------------------------------------------- the host's alignment decision
def test_alignment_needs_both_addresses_and_the_size():
    assert is_aligned(4096, 8192, 64, 8)
    assert not is_aligned(4096 + 2, 8192, 64, 8)  # a bf16 view one element in
    assert not is_aligned(4096, 8192 + 8, 64, 8)  # the gradient 8 bytes off
    assert not is_aligned(4096, 8192, 63, 8)  # a tail a vector would read past
    assert not is_aligned(4096, 8192, 9, 8)
    assert is_aligned(4096, 8192, 12, 4)  # fp32: 4 elements a vector
    assert not is_aligned(4096, 8192, 12, 8)


def _plan_launches(opt: Adadelta) -> list[tuple[bool, list[int]]]:
    """(aligned, tensors) of each launch of the optimizer's one launch plan."""
    (plan,) = opt._plans.values()
    return [(t.aligned, sorted(set(t.chunk_tensor.tolist()))) for t in plan.launches]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_misaligned_views_go_to_the_unaligned_launch_and_match_the_reference(dtype, monkeypatch):
    """A bucket mixing aligned tensors with misaligned views and odd sizes: two launches, each tensor in
    the right one, results equal to the reference path's. All-aligned buckets stay one launch."""
    from test_kernel import _count_launches, _tolerance_check

    counter = _count_launches(monkeypatch)
    vec = 16 // dtype.itemsize
    base = make_params([(4 * 1024 + vec,)], dtype, KERNEL_DEVICE, seed=11)[0].detach()
    params = [
        make_params([(2048 + vec,)], dtype, KERNEL_DEVICE, seed=12)[0],  # aligned, three blocks
        torch.nn.Parameter(base[1: 1 + 2048]),  # one element in: misaligned address
        make_params([(2 * vec + 1,)], dtype, KERNEL_DEVICE, seed=13)[0],  # odd size
        torch.nn.Parameter(base[2048 + vec: 3072 + 2 * vec]),  # a view 16 bytes past a vector: aligned
    ]
    ref_params = [p.detach().clone() for p in params]
    fused = Adadelta(params, fused=True, lr=0.5)
    ref = Adadelta(ref_params, fused=False, lr=0.5)
    for step in range(2):
        grads = random_grads(params, seed=20 + step)
        set_grads(params, grads)
        set_grads(ref_params, [g.clone() for g in grads])
        before = counter["n"]
        fused.step()
        ref.step()
        assert counter["n"] - before == 2
        assert _plan_launches(fused) == [(True, [0, 3]), (False, [1, 2])]
        for i, (p, q) in enumerate(zip(params, ref_params)):
            _tolerance_check(dtype, dtype, p.detach().cpu(), q.detach(), f"step {step} param {i}")

    aligned = [make_params([(8 * vec,)], dtype, KERNEL_DEVICE, seed=14)[0] for _ in range(3)]
    opt = Adadelta(aligned, fused=True)
    set_grads(aligned, random_grads(aligned, seed=30))
    before = counter["n"]
    opt.step()
    assert counter["n"] - before == 1
    assert _plan_launches(opt) == [(True, [0, 1, 2])]


@needs_kernel
def test_a_tensor_moving_to_a_misaligned_address_changes_launch(monkeypatch):
    """Alignment is decided from the step's addresses: a gradient replaced by a misaligned view moves its
    tensor to the unaligned launch."""
    params = make_params([(64,), (64,)], torch.bfloat16, KERNEL_DEVICE, seed=15)
    opt = Adadelta(params, fused=True)
    set_grads(params, random_grads(params, seed=31))
    opt.step()
    assert _plan_launches(opt) == [(True, [0, 1])]
    storage = torch.randn(65, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(KERNEL_DEVICE)
    params[1].grad = storage[1:]
    opt.step()
    assert _plan_launches(opt) == [(True, [0]), (False, [1])]


@needs_kernel
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_unaligned_launch_block_follows_the_hosts_rule(stochastic):
    """The unaligned launch takes 512 elements a program, or 1024 when it rounds stochastically (one
    Philox call per thread serves its eight elements); the compiled variants the budget checks are
    compiled with the same rule (codegen.block_of)."""
    from triton_adadelta.backends import tables

    params = make_params([(2 * 1024 + 3,), (5,)], torch.bfloat16, KERNEL_DEVICE, seed=16)  # odd sizes: unaligned
    opt = Adadelta(params, fused=True, stochastic_rounding=stochastic)
    set_grads(params, random_grads(params, seed=32))
    opt.step()
    (plan,) = opt._plans.values()
    (launch,) = plan.launches
    expected = 1024 if stochastic else 512
    assert not launch.aligned and launch.block == expected == tables.update_block(False, stochastic)
    # Three programs for the tensor of 2051 elements at 1024, five at 512; one for the tensor of 5.
    assert launch.num_chunks == (3 + 1 if stochastic else 5 + 1)
    assert codegen.block_of(codegen.Variant("bf16", "bf16", "fp32", codegen.MASTER_NONE, stochastic, False, False,
                                            False)) == expected
