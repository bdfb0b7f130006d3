"""Triton device code of triton-adadelta; shipped in the wheel as ``triton_adadelta.kernels``.

Importing this package imports triton: the host side only does so where triton is available.
"""
