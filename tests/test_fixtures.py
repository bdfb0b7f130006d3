"""Optimizers pickled and state_dicts saved by an older version (commit 79e4f0d, before the step was
split into modules) load with today's code and continue bit-identically.

The files and the script that wrote them are in tests/fixtures/ (see make_fixtures.py).
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


def _check(opt, params, expected) -> None:
    make_fixtures.run_steps(opt, expected_grads := expected["grads"])
    assert len(expected_grads) == make_fixtures.STEPS
    for i, (p, want) in enumerate(zip(params, expected["expected"]["params"])):
        _assert_same(p.detach(), want, f"param {i}")
    _assert_same(opt.state_dict(), expected["expected"]["state_dict"], "state_dict")


@pytest.mark.parametrize("path", PATHS)
def test_old_pickle_continues_bit_identically(path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "kernel" else "0")
    record = _fixture(path)
    opt = torch.load(io.BytesIO(record["pickled"]), weights_only=False)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, saved in zip(params, record["params"]):
        _assert_same(p.detach(), saved)
    _check(opt, params, record)


@pytest.mark.parametrize("path", PATHS)
def test_old_state_dict_continues_bit_identically(path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "kernel" else "0")
    record = _fixture(path)
    groups = make_fixtures.make_params()
    params = [p for g in groups for p in g]
    with torch.no_grad():
        for p, saved in zip(params, record["params"]):
            p.copy_(saved)
    opt = make_fixtures.make_optimizer(groups, path)
    opt.load_state_dict(torch.load(io.BytesIO(record["state_dict"]), weights_only=False))
    _check(opt, params, record)
