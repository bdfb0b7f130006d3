"""Checks that need a CUDA GPU: no host synchronisation in step(), and larger parity runs on the device.

Skipped on machines without a GPU (CI); the kernel's numbers are covered there by the interpreter tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_gpu
from helpers import assert_close_rel, make_params, random_grads, set_grads

from triton_adadelta import Adadelta

pytestmark = needs_gpu


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_has_no_host_sync(pdtype):
    params = make_params([(1 << 20,), (4097,), (3, 5)], pdtype, "cuda", seed=0)
    groups = [dict(params=params[:1], lr=0.5), dict(params=params[1:], lr=torch.tensor(0.3, device="cuda"))]
    opt = Adadelta(groups)
    set_grads(params, random_grads(params, seed=1))
    opt.step()  # the first step builds plans and state; the steady state must not synchronise
    torch.cuda.synchronize()
    set_grads(params, random_grads(params, seed=2))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_rerouting_a_step_has_no_host_sync():
    """A step whose route is rebuilt (a parameter changing dtype, a new group) still never waits for the GPU."""
    params = make_params([(4097,), (3, 5), (1 << 16,)], torch.float32, "cuda", seed=4)
    opt = Adadelta(params[:2])
    set_grads(params[:2], random_grads(params[:2], seed=5))
    opt.step()
    grads6 = random_grads(params[:2], seed=6)  # made before the guard: a copy from pageable host memory waits
    grads6[0] = grads6[0].to(torch.bfloat16)
    grads7 = random_grads(params, seed=7)
    grads7[0] = grads7[0].to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        params[0].data = params[0].data.to(torch.bfloat16)
        set_grads(params[:2], grads6)
        opt.step()
        opt.add_param_group(dict(params=params[2:], lr=0.5))
        set_grads(params, grads7)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
    assert [float(opt.state[p]["step"]) for p in params] == [3.0, 3.0, 1.0]


def test_large_fp32_matches_torch_on_gpu():
    params = make_params([(1 << 22,), (1023, 1025), (7,)], torch.float32, "cuda", seed=3)
    theirs = [p.clone() for p in params]
    ours, torch_opt = Adadelta(params, weight_decay=0.01), torch.optim.Adadelta(theirs, weight_decay=0.01)
    for step in range(5):
        grads = random_grads(params, seed=10 + step)
        set_grads(params, grads)
        set_grads(theirs, grads)
        ours.step()
        torch_opt.step()
    for p, q in zip(params, theirs):
        assert_close_rel(p, q, rtol=1e-5)


# ---------------------------------------------------------------------------------------- devices and streams
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@needs_two_gpus
@pytest.mark.parametrize("clip", [{}, {"clipnorm": 0.5}], ids=["noclip", "clipnorm"])
def test_parameters_on_two_gpus_with_cuda0_current(clip):
    """One optimizer over parameters on cuda:1 and cuda:0 while cuda:0 is current: each device gets its
    own launches on its own stream, and the results are the PyTorch path's."""
    torch.cuda.set_device(0)
    params = make_params([(4097,), (3, 5)], torch.float32, "cuda:1", seed=20) + \
        make_params([(1000,)], torch.float32, "cuda:0", seed=21)
    theirs = [p.detach().clone().requires_grad_() for p in params]
    ours, ref = Adadelta(params, lr=0.7, **clip), Adadelta(theirs, lr=0.7, fused=False, **clip)
    for step in range(3):
        grads = random_grads(params, seed=22 + step)
        set_grads(params, grads)
        set_grads(theirs, grads)
        ours.step()
        ref.step()
    assert torch.cuda.current_device() == 0
    assert ours.path_counts() == {"kernel": 3}
    assert {b.key.state.device for b in ours._route.buckets} == {torch.device("cuda", 0), torch.device("cuda", 1)}
    for p, q in zip(params, theirs):
        assert_close_rel(p, q, rtol=1e-5)


def test_steps_on_a_side_stream_match_the_default_stream():
    """Gradients made on a side stream and steps run there (the flat buffers were allocated on the
    default stream): results equal a run on the default stream."""
    params = make_params([(1 << 16,), (4097,)], torch.float32, "cuda", seed=30)
    theirs = [p.detach().clone().requires_grad_() for p in params]
    ours, ref = Adadelta(params, clipnorm=1.0), Adadelta(theirs, clipnorm=1.0)
    set_grads(params, random_grads(params, seed=31))
    ours.step()  # state and tables made on the default stream
    set_grads(theirs, random_grads(params, seed=31))
    ref.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            grads = random_grads(params, seed=32 + step)
            set_grads(params, [g * 1.0 for g in grads])  # made on the side stream
            ours.step()
    for step in range(3):
        set_grads(theirs, random_grads(params, seed=32 + step))
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, theirs):
        assert torch.equal(p, q)


_OPTIONS = [
    dict(route=route, clip=clip, scaler=scaler, skip_nonfinite=skip, capturable=cap, master=master,
         stochastic=sr)
    for route in ("kernel", "mixed")
    for clip in ("none", "clipnorm", "global+value")
    for scaler in (False, True)
    for skip in (False, True)
    for cap in (False, True)
    for master in (False, True, "remainder")
    for sr in (False, True)
]


@pytest.mark.parametrize("options", _OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_no_host_sync_for_any_option_combination(options):
    """step() never waits for the GPU, whatever the options: fused kernel or mixed routes (a float64
    parameter on the PyTorch path), Keras clipping, GradScaler's scale and flag, skip_nonfinite,
    capturable, master weights, stochastic rounding, and a decaying learning rate."""
    clips = {"none": {}, "clipnorm": {"clipnorm": 0.5}, "global+value": {"global_clipnorm": 0.5, "clipvalue": 0.1}}
    params = make_params([(4097,)], torch.float32, "cuda", seed=40) + \
        make_params([(3, 5), (1000,)], torch.bfloat16, "cuda", seed=41)
    groups = [dict(params=params)]
    if options["route"] == "mixed":
        extra = make_params([(7,)], torch.float64, "cuda", seed=42)
        groups.append(dict(params=extra))
        params = params + extra
    opt = Adadelta(groups, lr=0.5, decay=0.01, skip_nonfinite=options["skip_nonfinite"],
                   capturable=options["capturable"], master_weights=options["master"],
                   stochastic_rounding=options["stochastic"], **clips[options["clip"]])
    scale = torch.tensor(4.0, device="cuda")
    flags = [torch.tensor(v, device="cuda") for v in (0.0, 1.0, 0.0)]
    grads = [random_grads(params, seed=43 + i) for i in range(4)]  # made before the guard
    kwargs = dict(grad_scale=scale, found_inf=flags[0]) if options["scaler"] else {}
    set_grads(params, grads[0])
    opt.step(**kwargs)  # the first step builds plans and state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            set_grads(params, grads[i + 1])
            opt.step(**(dict(grad_scale=scale, found_inf=flags[i]) if options["scaler"] else {}))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
    assert int(opt.iterations) == (3 if options["scaler"] else 4)
