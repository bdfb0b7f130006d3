"""skip_nonfinite with sharded (DTensor) parameters: every rank takes the same decision.

tests/dist_skip_worker.py spawns two gloo ranks on CPU and checks, inside the ranks, that a NaN in
one rank's shard skips the step on both, counts it on both, and that the sharded run equals a
single-process run on plain tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_skip_nonfinite_agrees_across_ranks():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dist_skip_worker.py")], cwd=HERE,
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the ranks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
