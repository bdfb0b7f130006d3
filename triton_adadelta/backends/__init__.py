"""The update backends. Each takes a step's members, gradients, tables and numbers, never the optimizer:

- :mod:`.triton`: the Triton kernel, one launch per bucket (its :class:`~.triton.LaunchPlan`);
- :mod:`.cpu`: the fused CPU path (kernels/adadelta_cpu.c through :mod:`triton_adadelta.cpu_fused`);
- :mod:`.torch`: the PyTorch path (reference.py tensor by tensor) and the differentiable path;
- :mod:`.tables`: what the launches share: uploads, chunk and pointer tables, device and stream.
"""
