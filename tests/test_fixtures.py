"""Optimizers pickled and state_dicts saved by an older version (commit 79e4f0d, before the step was
split into modules) load with today's code and continue bit-identically.

The files and the script that wrote them are in tests/fixtures/ (see make_fixtures.py). One group
rounds stochastically: issue 14 changed the random words that rounding draws (16-bit noise, one
Philox call per eight elements), so by design that group cannot continue as 79e4f0d did. It must
continue the same way from the pickle and from the state_dict (the flat layout, which keys the random
stream, comes back the same), and stay within one bfloat16 ulp a step of 79e4f0d's continuation.
"""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
from conftest import needs_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_fixtures  # noqa: E402

PATHS = [pytest.param("kernel", marks=needs_kernel), "cpu"]


def _fixture(path: str) -> dict:
    return torch.load(os.path.join(make_fixtures.HERE, f"compat_{path}.pt"), weights_only=False)


def _assert_same(a, b, where: str = "") -> None:
    """Equal values, tensors bit for bit (dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                           b.view(-1).view(torch.uint8) if b.numel() else b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} != {getattr(b, 'keys', None)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# Parameters (param_groups order) of the stochastic-rounding group: group 2 of make_fixtures.make_params.
STOCHASTIC = (4, 5)


def _within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int, where: str) -> None:
    """|actual - expected| <= ulps bfloat16 ulps of ``expected``, element by element."""
    a, e = actual.float(), expected.float()
    ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(2.0 ** -126)))) * 2.0 ** -7
    assert ((a - e).abs() <= ulps * ulp).all(), where


def _continue(opt, params, record) -> dict:
    """Run the recorded steps; check everything outside the stochastic group bit for bit against the old
    code's continuation; return the continued parameters and state_dict."""
    make_fixtures.run_steps(opt, record["grads"])
    assert len(record["grads"]) == make_fixtures.STEPS
    expected = record["expected"]
    sd = opt.state_dict()
    for i, (p, want) in enumerate(zip(params, expected["params"])):
        if i in STOCHASTIC:
            _within_ulps(p.detach(), want, make_fixtures.STEPS, f"param {i}")
            for name in ("square_avg", "acc_delta"):
                _within_ulps(sd["state"][i][name], expected["state_dict"]["state"][i][name], make_fixtures.STEPS,
                             f"state {i} {name}")
            _assert_same(sd["state"][i]["step"], expected["state_dict"]["state"][i]["step"], f"state {i} step")
        else:
            _assert_same(p.detach(), want, f"param {i}")
            _assert_same(sd["state"][i], expected["state_dict"]["state"][i], f"state {i}")
    _assert_same({k: v for k, v in sd.items() if k != "state"},
                 {k: v for k, v in expected["state_dict"].items() if k != "state"}, "state_dict")
    return {"params": [p.detach().clone() for p in params], "state_dict": sd}


def _from_pickle(record) -> dict:
    opt = torch.load(io.BytesIO(record["pickled"]), weights_only=False)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, saved in zip(params, record["params"]):
        _assert_same(p.detach(), saved)
    return _continue(opt, params, record)


def _from_state_dict(record, path) -> dict:
    groups = make_fixtures.make_params()
    params = [p for g in groups for p in g]
    with torch.no_grad():
        for p, saved in zip(params, record["params"]):
            p.copy_(saved)
    opt = make_fixtures.make_optimizer(groups, path)
    opt.load_state_dict(torch.load(io.BytesIO(record["state_dict"]), weights_only=False))
    return _continue(opt, params, record)


@pytest.mark.parametrize("path", PATHS)
def test_old_pickle_continues_bit_identically(path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "kernel" else "0")
    _from_pickle(_fixture(path))


@pytest.mark.parametrize("path", PATHS)
def test_old_state_dict_continues_bit_identically(path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "kernel" else "0")
    _from_state_dict(_fixture(path), path)


@pytest.mark.parametrize("path", PATHS)
def test_old_pickle_and_state_dict_continue_alike(path, monkeypatch):
    """The stochastic group included: the same flat layout, hence the same random words, either way."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "kernel" else "0")
    record = _fixture(path)
    _assert_same(_from_pickle(record), _from_state_dict(record, path), "pickle vs state_dict")
