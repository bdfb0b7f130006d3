"""Compile the update kernel for a GPU that is not here and print what the PTX says (run as a script)."""

import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_adadelta.kernels.adadelta import adadelta_kernel

DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def compile_ptx(arch: int, p: str, g: str, s: str) -> dict:
    signature = {
        "param_table": "*i64", "tensor_meta": "*i64", "chunk_tensor": "*i32", "chunk_block": "*i32",
        "square_avg": f"*{s}", "acc_delta": f"*{s}", "master": "*fp32", "steps": "*fp32", "hyper": "*fp32",
        "clip_coef": "*fp32", "grad_scale": "*fp32", "found_inf": "*fp32", "num_tensors": "i32",
    }
    constexprs = {"P_DTYPE": DTYPES[p], "G_DTYPE": DTYPES[g], "BLOCK": 2048,
                  "VEC": 16 // min(2 if p != "fp32" else 4, 2 if g != "fp32" else 4),
                  "HAS_CLIP": False, "HAS_SCALER": False, "MASTER": False, "STOCHASTIC": False}
    for k in constexprs:
        signature[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(12)}
    src = ASTSource(fn=adadelta_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": 4, "enable_fp_fusion": False}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    width = "b32" if p == "fp32" else "b16"
    scalar_loads = [ln for ln in ptx.splitlines() if "ld.global" in ln and ".v2" not in ln and ".v4" not in ln]
    return {
        # Loads of one parameter-sized element: the unaligned path must have them (no false promise).
        "scalar_param_loads": sum(f".{width}" in ln or f".u{width[1:]}" in ln for ln in scalar_loads),
        "ld_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "st_v4": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
        "local": len(re.findall(r"\.local", ptx)),
    }


if __name__ == "__main__":
    arch, p, g, s = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    print(json.dumps(compile_ptx(arch, p, g, s)))
