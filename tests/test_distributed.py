"""FSDP2, DDP and distributed checkpoints with two ranks on CPU (gloo on 127.0.0.1).

One pair of processes is spawned for this file (starting torch twice costs more than all the
scenarios together) and runs every scenario in turn; each test below reads its scenario's outcome.
The assertions run inside the ranks (``torch.testing.assert_close`` and ``assert``); a failure
comes back as its traceback. Every scenario compares the distributed run with a single-process run
of the same model and data made in the same process. Kernel runs use the Triton interpreter.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import leave_rank, watch_rank

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
STEPS = 4
BATCH = 8  # split evenly: the mean of the ranks' mean losses is the full batch's mean loss
RANK_TIMEOUT_S = 300  # a whole run takes about 10 s
DOCS = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


# ---------------------------------------------------------------------------------------- in the ranks
def _build(seed: int = 0) -> torch.nn.Module:
    # Odd widths: FSDP2 shards unevenly (5 rows -> 3 + 2), and the last layer's single row leaves
    # rank 1 with empty shards of its weight and bias.
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    )


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    fully_shard = _fully_shard()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, steps, rank=None, first=0):
    """``steps`` steps; with ``rank`` each rank takes its half of every batch."""
    for step in range(first, first + steps):
        x, y = _batch(step)
        if rank is not None:
            half = BATCH // WORLD
            x, y = x[rank * half: (rank + 1) * half], y[rank * half: (rank + 1) * half]
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _compare(model, opt, ref, ref_opt, rtol=1e-5, atol=1e-7):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(_full(p.detach()), q.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
        st, rst = opt.state[p], ref_opt.state[q]
        assert float(st["step"]) == float(rst["step"]), name
        for key in ("square_avg", "acc_delta"):
            torch.testing.assert_close(_full(st[key]), rst[key], rtol=rtol, atol=atol * 1e-3,
                                       msg=lambda m, n=name, k=key: f"{n}.{k}: {m}")


def _norms_exceed(model_ref, threshold, per_tensor):
    """The unclipped gradient norms of the first batch, to show that a clipping test does clip."""
    x, y = _batch(0)
    model_ref.zero_grad()
    _loss(model_ref, x, y).backward()
    norms = [float(p.grad.norm()) for p in model_ref.parameters()]
    model_ref.zero_grad()
    return (max(norms) if per_tensor else sum(n * n for n in norms) ** 0.5) > threshold


def _scenario_fsdp2(rank, fused, clip):
    from torch.distributed.tensor import DTensor

    from triton_adadelta import Adadelta

    if clip:
        probe = _build()
        assert _norms_exceed(probe, next(iter(clip.values())), "clipnorm" in clip), "the clip would not clip"
    model, ref = _shard(_build()), _build()
    opt = Adadelta(model.parameters(), lr=1.0, weight_decay=0.01, fused=fused, **clip)
    ref_opt = Adadelta(ref.parameters(), lr=1.0, weight_decay=0.01, fused=fused, **clip)
    _train(model, opt, STEPS, rank)
    _train(ref, ref_opt, STEPS)
    assert bool(opt._plans) == fused, "the kernel path was (not) taken"
    for p in model.parameters():
        assert isinstance(p, DTensor)
        for key in ("square_avg", "acc_delta"):
            s = opt.state[p][key]
            assert isinstance(s, DTensor), key
            assert s.device_mesh == p.device_mesh and s.placements == p.placements
            assert s.shape == p.shape and s.to_local().shape == p.to_local().shape
        assert not isinstance(opt.state[p]["step"], DTensor)
    _compare(model, opt, ref, ref_opt)


def _scenario_fsdp2_mixed(rank):
    """Sharded parameters next to a plain one: only the shards' norms may be summed across ranks."""
    from torch.distributed.tensor import DTensor, Partial

    from triton_adadelta import Adadelta

    model, ref = _shard(_build()), _build()
    extra = torch.nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(3)))
    extra_ref = torch.nn.Parameter(extra.detach().clone())
    opt = Adadelta([*model.parameters(), extra], lr=1.0, global_clipnorm=0.05, fused=False)
    ref_opt = Adadelta([*ref.parameters(), extra_ref], lr=1.0, global_clipnorm=0.05, fused=False)
    for step in range(STEPS):
        x, y = _batch(step)
        half = BATCH // WORLD
        _loss(model, x[rank * half: (rank + 1) * half], y[rank * half: (rank + 1) * half]).backward()
        _loss(ref, x, y).backward()
        g = torch.randn(7, generator=torch.Generator().manual_seed(50 + step))  # the same on every rank
        extra.grad, extra_ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    torch.testing.assert_close(extra.detach(), extra_ref.detach(), rtol=1e-5, atol=1e-7)
    _compare(model, opt, ref, ref_opt)

    # An unreduced (Partial) gradient has no local norm: a clear error, and nothing changes.
    p = next(model.parameters())
    before = p.to_local().clone()
    p.grad = DTensor.from_local(torch.ones_like(p.to_local()), p.device_mesh, [Partial()], run_check=False,
                                shape=p.shape, stride=p.stride())
    try:
        opt.step()
    except RuntimeError as e:
        assert "clipping needs reduced gradients" in str(e), e
    else:
        raise AssertionError("a Partial gradient was clipped")
    assert torch.equal(p.to_local(), before)
    opt.zero_grad()


def _scenario_ddp(rank, fused, clip):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from triton_adadelta import Adadelta

    model, ref = DDP(_build()), _build()
    opt = Adadelta(model.parameters(), lr=1.0, fused=fused, **clip)
    ref_opt = Adadelta(ref.parameters(), lr=1.0, fused=fused, **clip)
    _train(model, opt, STEPS, rank)
    _train(ref, ref_opt, STEPS)
    for p, q in zip(model.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["square_avg"], ref_opt.state[q]["square_avg"], rtol=1e-5,
                                   atol=1e-10)


def _snapshot(model, opt):
    out = {}
    for name, p in model.named_parameters():
        out[name] = _full(p.detach()).clone()
        for key, value in opt.state[p].items():
            out[f"{name}.{key}"] = _full(value).clone()
    return out


def _scenario_dcp(rank, tmp, fused):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from triton_adadelta import Adadelta

    kwargs = dict(lr=0.8, rho=0.85, fused=fused)
    path = os.path.join(tmp, f"dcp-{int(fused)}")
    model = _shard(_build())
    opt = Adadelta(model.parameters(), **kwargs)
    _train(model, opt, 3, rank)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    saved = _snapshot(model, opt)
    _train(model, opt, 3, rank, first=3)

    # The checkpoint holds the optimizer state in shards: one chunk per rank of the first weight.
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith("optim.") and k.endswith("square_avg") and ".0.weight" in k]
    assert len(keys) == 1, sorted(meta)
    chunks = sorted(tuple(c.offsets) for c in meta[keys[0]].chunks)
    assert chunks == [(0, 0), (5, 0)], chunks

    # A fresh model (other initial weights) and a fresh optimizer, loaded from the checkpoint.
    model2 = _shard(_build(seed=123))
    opt2 = Adadelta(model2.parameters(), **kwargs)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    ckpt = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(ckpt, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optim"])
    loaded = _snapshot(model2, opt2)
    assert loaded.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    for p in model2.parameters():  # loaded into the flat buffers, still sharded views of them
        flat = opt2._store.flat_of(p)
        assert opt2.state[p]["square_avg"].to_local().untyped_storage().data_ptr() == \
            flat.square_avg.untyped_storage().data_ptr()

    _train(model2, opt2, 3, rank, first=3)
    final, final2 = _snapshot(model, opt), _snapshot(model2, opt2)
    for key in final:
        torch.testing.assert_close(final2[key], final[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")

    # The sharded checkpoint is the state of an unsharded run: convert it and compare on rank 0.
    dist.barrier()
    if rank == 0:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        ref = _build()
        ref_opt = Adadelta(ref.parameters(), **kwargs)
        _train(ref, ref_opt, 3)
        dcp_to_torch_save(path, os.path.join(tmp, f"full-{int(fused)}.pt"))
        full = torch.load(os.path.join(tmp, f"full-{int(fused)}.pt"), weights_only=False)
        for (name, q) in ref.named_parameters():
            for key in ("square_avg", "acc_delta"):
                torch.testing.assert_close(full["optim"]["state"][name][key], ref_opt.state[q][key],
                                           rtol=1e-5, atol=1e-12)
    dist.barrier()


def _doc_examples() -> dict[str, str]:
    text = DOCS.read_text()
    return dict(re.findall(r"<!-- test: (\w+) -->\n```python\n(.*?)```", text, flags=re.S))


def _run_example(rank, name, code, port, tmp):
    """Run a docs example as torchrun would: env:// rendezvous, __main__, its own process group."""
    import runpy

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    workdir = os.path.join(tmp, f"example-{name}-{rank}" if name == "ddp" else f"example-{name}")
    os.makedirs(workdir, exist_ok=True)
    script = os.path.join(workdir, f"{name}_rank{rank}.py")
    with open(script, "w") as f:
        f.write(code)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        ns = runpy.run_path(script, run_name="__main__")
    finally:
        os.chdir(cwd)
    losses = ns["losses"]
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # the same 4 batches, first and last epoch
    assert last < first, f"the example did not train: {first} -> {last}"
    return ns, workdir


def _scenario_checkpoint_forms(rank, tmp):
    """The other ways a sharded optimizer is saved: torch.save / deepcopy of its state_dict and of the
    optimizer itself, a gathered full state_dict, and a DCP round trip that restores Keras' iterations
    (decay reads them) and in which DCP's template step leaves a schedule-driven model alone."""
    import copy
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )

    from triton_adadelta import Adadelta
    from triton_adadelta.keras import ExponentialDecay

    kwargs = dict(lr=0.8, rho=0.85, decay=0.3, fused=False)
    model = _shard(_build())
    opt = Adadelta(model.parameters(), **kwargs)
    _train(model, opt, 3, rank)
    saved = _snapshot(model, opt)

    for copied in (copy.deepcopy(opt.state_dict()), _roundtrip(opt.state_dict())):
        fresh = Adadelta(model.parameters(), **kwargs)
        fresh.load_state_dict(copied)
        assert int(fresh.iterations) == 3
        for name, p in model.named_parameters():
            for key in ("square_avg", "acc_delta", "step"):
                torch.testing.assert_close(_full(fresh.state[p][key]), saved[f"{name}.{key}"], rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(opt, buf)  # the optimizer object itself
    assert buf.tell() > 0
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    for name, _ in model.named_parameters():
        torch.testing.assert_close(full["state"][name]["square_avg"], saved[f"{name}.square_avg"], rtol=0, atol=0)

    path = os.path.join(tmp, "dcp-forms")
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    _train(model, opt, 3, rank, first=3)
    model2 = _shard(_build(seed=321))
    opt2 = Adadelta(model2.parameters(), **kwargs)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)  # makes opt2's state with a step at lr 0
    ckpt = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(ckpt, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optim"])
    assert int(opt2.iterations) == 3  # decay goes on from the saved count, not from the template step's
    _train(model2, opt2, 3, rank, first=3)
    final, final2 = _snapshot(model, opt), _snapshot(model2, opt2)
    for key in final:
        torch.testing.assert_close(final2[key], final[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")

    # A torch.optim.Adadelta checkpoint lacks our group keys: loaded with a partial-load planner.
    from torch.distributed.checkpoint import DefaultLoadPlanner

    tpath = os.path.join(tmp, "dcp-torch")
    tmodel = _shard(_build())
    topt = torch.optim.Adadelta(tmodel.parameters(), lr=0.8, rho=0.85)
    _train(tmodel, topt, 3, rank)
    t_model_sd, t_optim_sd = get_state_dict(tmodel, topt)
    dcp.save({"model": t_model_sd, "optim": t_optim_sd}, checkpoint_id=tpath)
    _train(tmodel, topt, 2, rank, first=3)
    model4 = _shard(_build(seed=99))
    opt4 = Adadelta(model4.parameters(), lr=0.8, rho=0.85, fused=False)
    model_sd4, optim_sd4 = get_state_dict(model4, opt4)
    ckpt = {"model": model_sd4, "optim": optim_sd4}
    dcp.load(ckpt, checkpoint_id=tpath, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model4, opt4, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optim"])
    _train(model4, opt4, 2, rank, first=3)
    for (name, p), q in zip(tmodel.named_parameters(), model4.parameters()):
        torch.testing.assert_close(_full(q.detach()), _full(p.detach()), rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")

    model3 = _shard(_build(seed=7))
    opt3 = Adadelta(model3.parameters(), learning_rate=ExponentialDecay(0.5, 2, 0.5), weight_decay=0.1, fused=False)
    before = {n: _full(p.detach()).clone() for n, p in model3.named_parameters()}
    get_state_dict(model3, opt3)
    for n, p in model3.named_parameters():
        assert torch.equal(_full(p.detach()), before[n]), n


def _roundtrip(sd):
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _worker(rank: int, port: int, example_ports: dict, tmp: str) -> None:
    watch_rank(RANK_TIMEOUT_S)
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: the kernel runs in the interpreter
    # These ranks are CPU-only (gloo), also on a GPU machine, where the docs examples would pick NCCL.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    results: dict[str, str] = {}

    def run(name, fn, *args):
        try:
            fn(*args)
            results[name] = "ok"
        except BaseException:
            results[name] = traceback.format_exc()

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        run("fsdp2-fused", _scenario_fsdp2, rank, True, {})
        run("fsdp2-pytorch", _scenario_fsdp2, rank, False, {})
        run("fsdp2-fused-global_clipnorm", _scenario_fsdp2, rank, True, dict(global_clipnorm=0.05))
        run("fsdp2-pytorch-clipnorm", _scenario_fsdp2, rank, False, dict(clipnorm=0.02))
        run("fsdp2-pytorch-global_clipnorm", _scenario_fsdp2, rank, False, dict(global_clipnorm=0.05))
        run("fsdp2-mixed-global_clipnorm", _scenario_fsdp2_mixed, rank)
        run("ddp", _scenario_ddp, rank, True, {})
        run("ddp-global_clipnorm", _scenario_ddp, rank, False, dict(global_clipnorm=0.05))
        run("dcp-fused", _scenario_dcp, rank, tmp, True)
        run("dcp-pytorch", _scenario_dcp, rank, tmp, False)
        run("checkpoint-forms", _scenario_checkpoint_forms, rank, tmp)
    finally:
        dist.destroy_process_group()

    kept = []

    def example(name):
        ns, workdir = _run_example(rank, name, _doc_examples()[name], example_ports[name], tmp)
        kept.append(ns)  # never freed in this process: see helpers.leave_rank
        if name == "fsdp2":
            # The resumed optimizer holds exactly the state that was trained and saved.
            a, b = ns["opt"], ns["opt2"]
            for p, q in zip(ns["model"].parameters(), ns["model2"].parameters()):
                torch.testing.assert_close(b.state[q]["square_avg"].to_local(), a.state[p]["square_avg"].to_local(),
                                           rtol=0, atol=0)
                torch.testing.assert_close(q.to_local(), p.to_local(), rtol=0, atol=0)
            assert ns["sched2"].last_epoch == 40
            assert any(f.endswith(".distcp") for f in os.listdir(os.path.join(workdir, "checkpoint", "step40")))
        elif rank == 0:
            assert os.path.exists(os.path.join(workdir, "ddp_checkpoint.pt"))

    # The examples run on the PyTorch path: the fused path is covered above, and the interpreter
    # would make 80 steps of it the slowest part of this file.
    os.environ["TRITON_INTERPRET"] = "0"
    for name in ("fsdp2", "ddp"):
        run(f"docs-{name}", example, name)

    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    leave_rank()  # every result is on disk; the kept examples still hold their destroyed groups


# ---------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = str(tmp_path_factory.mktemp("dist"))
    ports = {"fsdp2": _free_port(), "ddp": _free_port()}
    ctx = mp.start_processes(_worker, args=(_free_port(), ports, tmp), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + RANK_TIMEOUT_S + 60  # the ranks time out first, with their stacks
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the distributed workers did not finish in time")
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]


def _check(outcomes, name):
    for rank, res in enumerate(outcomes):
        assert name in res, f"rank {rank} did not run {name}"
        assert res[name] == "ok", f"rank {rank}, {name}:\n{res[name]}"


@pytest.mark.parametrize("path", ["fused", "pytorch"])
def test_fsdp2_equals_single_process(outcomes, path):
    _check(outcomes, f"fsdp2-{path}")


@pytest.mark.parametrize("name", ["fsdp2-fused-global_clipnorm", "fsdp2-pytorch-clipnorm",
                                  "fsdp2-pytorch-global_clipnorm", "fsdp2-mixed-global_clipnorm"])
def test_fsdp2_with_clipping_equals_single_process(outcomes, name):
    _check(outcomes, name)


@pytest.mark.parametrize("name", ["ddp", "ddp-global_clipnorm"])
def test_ddp_equals_single_process(outcomes, name):
    _check(outcomes, name)


@pytest.mark.parametrize("path", ["fused", "pytorch"])
def test_dcp_save_load_continues_identically(outcomes, path):
    _check(outcomes, f"dcp-{path}")


def test_sharded_state_saves_in_every_form_and_dcp_keeps_iterations(outcomes):
    _check(outcomes, "checkpoint-forms")


@pytest.mark.parametrize("name", ["fsdp2", "ddp"])
def test_docs_examples_run(outcomes, name):
    assert name in _doc_examples(), f"docs/distributed.md lost its '{name}' example"
    _check(outcomes, f"docs-{name}")
