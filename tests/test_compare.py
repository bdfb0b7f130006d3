"""The main job (python -m triton_adadelta.compare) end to end on a tiny model, and its corpus."""

from __future__ import annotations

import os
import subprocess
import sys

from triton_adadelta import corpus
from triton_adadelta.compare import GPT, GPTConfig, state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: CPU tensors take the PyTorch path
    out = subprocess.run(
        [sys.executable, "-m", "triton_adadelta.compare", "--size", "tiny", "--steps", "6", "--no-progress",
         "--out", str(tmp_path), *extra],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in ("torch.optim.Adadelta(foreach=True)", "triton_adadelta.Adadelta"):
            rows[cells[0]] = cells[1:]
    return rows


def test_compare_runs_and_writes_report(tmp_path):
    stdout = _run(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report in stdout
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = _rows(report)
    assert set(rows) == {"torch.optim.Adadelta(foreach=True)", "triton_adadelta.Adadelta"}
    for cells in rows.values():
        tokens_s, step_ms, opt_ms, first_ms, train, held, nbytes = cells
        assert float(tokens_s.replace(",", "")) > 0 and float(step_ms) > float(opt_ms) > 0
        assert 0.5 < float(train) < 5.0 and 0.5 < float(held) < 5.0  # cross-entropy over ~46 characters
    # Same seed, same batches, fp32: the two optimizers follow the same trajectory.
    a, b = rows.values()
    assert abs(float(a[4]) - float(b[4])) < 1e-3
    assert "Optimizer step, ours / torch" in report
    # The path is read after the steps (before the first step there is no route to read).
    assert "Ours ran on: the fused CPU path" in report


def test_compare_bf16_parameters_keep_fp32_state(tmp_path):
    _run(tmp_path, "--dtype", "bf16")
    rows = _rows((tmp_path / "report.md").read_text())
    torch_bytes = int(rows["torch.optim.Adadelta(foreach=True)"][6].replace(",", ""))
    ours_bytes = int(rows["triton_adadelta.Adadelta"][6].replace(",", ""))
    # torch: bf16 square_avg and acc_delta; ours: float32 (padded segments), about twice the bytes.
    assert 1.8 < ours_bytes / torch_bytes < 2.3


def test_state_bytes_counts_flat_buffers_once():
    import torch

    from triton_adadelta import Adadelta

    model = GPT(GPTConfig(vocab=11, context=8, width=16, layers=1, heads=2))
    n = sum(p.numel() for p in model.parameters())
    theirs = torch.optim.Adadelta(model.parameters())
    ours = Adadelta(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    theirs.step()
    ours.step()
    assert state_bytes(theirs) >= 8 * n  # two float32 tensors per parameter, plus the step counts
    assert 8 * n <= state_bytes(ours) <= 8 * n + 8 * 64 * len(list(model.parameters())) + 4096


def test_shipped_corpus_is_the_generated_one():
    text = corpus.load()
    assert text == corpus.generate()
    assert 300_000 <= len(text) <= 400_000 and text.isascii()


def test_cuda_resolves_to_the_gpu_defaults_without_a_gpu():
    """--device cuda (or a machine with a GPU) trains GPT-2 small's shape in bf16 for 100 steps; the CPU
    keeps the small fp32 model. Resolved without touching a GPU."""
    import torch

    from triton_adadelta.compare import SIZES, parse_args

    for argv, available in ((["--device", "cuda"], False), ([], True), (["--device", "cuda:1"], False)):
        args = parse_args(argv, cuda_available=available)
        assert torch.device(args.device).type == "cuda"
        assert (args.size, args.dtype, args.steps, args.batch) == ("gpt2", "bf16", 100, 64)
    assert SIZES["gpt2"][:4] == (1024, 768, 12, 12)  # context, width, layers, heads: GPT-2 small
    args = parse_args([], cuda_available=False)
    assert (args.device, args.size, args.dtype, args.steps, args.batch) == ("cpu", "small", "fp32", 100, 16)
    args = parse_args(["--device", "cuda", "--size", "tiny", "--dtype", "fp32", "--steps", "7", "--batch", "3"],
                      cuda_available=False)
    assert (args.size, args.dtype, args.steps, args.batch) == ("tiny", "fp32", 7, 3)  # given options win


def test_gpt2_size_has_gpt2_small_shape():
    """The CUDA default model: 12 blocks of width 768 (GPT-2 small's 85M non-embedding parameters)."""
    import torch

    from triton_adadelta.compare import SIZES

    context, width, layers, heads, _ = SIZES["gpt2"]
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab=46, context=context, width=width, layers=layers, heads=heads))
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert blocks == layers * (12 * width * width + 13 * width) == 85_054_464
