"""The update kernel as a GPU would compile it, without a GPU: registers, spills, occupancy, vectors, SASS.

Compiles every kernel variant the host can launch (or a representative cover, ``--cover``) for one
architecture with the installed Triton (``triton.compile`` on a ``GPUTarget``), then reads the
result with the tools Triton ships: ``ptxas -v`` for registers and spill bytes, ``cuobjdump -sass``
for the instruction count, the PTX for 128-bit loads and stores. Prints one table row a variant::

    python bench/codegen.py --arch 90            # every launchable variant, sm_90 (H100)
    python bench/codegen.py --arch 80 --cover    # a cover: every dtype and flag at least once

Columns: registers per thread; spill bytes (stores + loads); theoretical occupancy of an H100 SM
with the host's 4 warps a block (from the registers alone); ``ld.v4``/``st.v4``, the 128-bit global
accesses of the variant, and ``pg.vec``, how many of all vector accesses go through a parameter or
gradient pointer (0 is required of the unaligned specialisation); SASS instructions per element
(all instructions of the kernel divided by the elements a thread handles).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from triton_adadelta.backends import tables as _tables  # noqa: E402
from triton_adadelta.route import KERNEL_DTYPES as _KERNEL_PARAM_DTYPES  # noqa: E402
from triton_adadelta.route import KERNEL_DTYPES as _KERNEL_STATE_DTYPES  # noqa: E402
from triton_adadelta.route import has_16bit_write as _has_16bit_write  # noqa: E402
from triton_adadelta.state import MASTER_FP32, MASTER_NONE, MASTER_REMAINDER, StateKey  # noqa: E402

_NUM_WARPS = _tables.NUM_WARPS

_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
H100_REGISTERS, H100_MAX_WARPS, H100_MAX_BLOCKS = 65536, 64, 32


class Variant(NamedTuple):
    """One compile-time specialisation of the kernel, as the host launches it."""

    p: str  # parameter dtype
    g: str  # gradient dtype
    s: str  # state dtype
    master: int  # MASTER_NONE, MASTER_FP32, MASTER_REMAINDER
    stochastic: bool
    clip: bool
    scaler: bool
    aligned: bool

    @property
    def label(self) -> str:
        flags = [f for f, on in (("clip", self.clip), ("scaler", self.scaler), ("sr", self.stochastic)) if on]
        master = {MASTER_NONE: "", MASTER_FP32: " master", MASTER_REMAINDER: " remainder"}[self.master]
        return f"{self.p}/{self.g}/{self.s}{master}{' ' + '+'.join(flags) if flags else ''}" \
               f" {'aligned' if self.aligned else 'unaligned'}"

    @property
    def is_default(self) -> bool:
        """The two defaults: fp32 everything, or bf16 parameters and gradients with fp32 state."""
        plain = self.master == MASTER_NONE and not (self.stochastic or self.clip or self.scaler)
        return plain and self.s == "fp32" and self.p == self.g and self.p in ("fp32", "bf16")


def launchable() -> list[Variant]:
    """Every variant the host can launch, from its own rules (route.kernel_takes, state.state_key,
    _route_keys): gradient dtype = parameter dtype or float32; master weights only for 16-bit
    parameters, the remainder mode only for bfloat16; stochastic rounding only where an update writes
    a 16-bit value; clipping and the GradScaler independent; aligned and unaligned tensors."""
    out = []
    for p in _KERNEL_PARAM_DTYPES:
        for g in dict.fromkeys((p, torch.float32)):
            for s in _KERNEL_STATE_DTYPES:
                masters = [MASTER_NONE]
                if p != torch.float32:
                    masters.append(MASTER_FP32)
                if p == torch.bfloat16:
                    masters.append(MASTER_REMAINDER)
                for master in masters:
                    key = StateKey(torch.device("cuda"), p, s, master)
                    for stochastic in (False, True) if _has_16bit_write(key) else (False,):
                        for clip in (False, True):
                            for scaler in (False, True):
                                for aligned in (True, False):
                                    out.append(Variant(_NAME[p], _NAME[g], _NAME[s], master, stochastic,
                                                       clip, scaler, aligned))
    return out


def cover(variants: list[Variant], pairs: bool = True) -> list[Variant]:
    """A representative subset: both defaults; every (parameter, gradient, state, master) combination
    with stochastic rounding where launchable and (``pairs``, or where not) without; clipping and the GradScaler
    on the heaviest of them; each aligned and unaligned."""
    chosen: dict[tuple, Variant] = {}
    for v in variants:
        if v.is_default:
            chosen[v] = v
    by_dtypes: dict[tuple, list[Variant]] = {}
    for v in variants:
        by_dtypes.setdefault((v.p, v.g, v.s, v.master, v.aligned), []).append(v)
    for group in by_dtypes.values():
        srs = [v for v in group if v.stochastic and not v.clip and not v.scaler]
        plain = [v for v in group if not v.stochastic and not v.clip and not v.scaler]
        for pick in srs[:1] + plain[: 1 if pairs or not srs else 0]:  # pairs: the cost of the rounding shows
            chosen[pick] = pick
    for v in variants:  # every flag on at once, on the widest variants: the register peak
        if v.clip and v.scaler and v.master in (MASTER_FP32, MASTER_REMAINDER) and v.g == "fp32" and v.s == "fp32":
            chosen[v] = v
        if v.clip and v.scaler and v.stochastic and v.p == "bf16" and v.s == "bf16" and v.master == MASTER_NONE:
            chosen[v] = v
    return list(chosen)


# --block / --block-unaligned override the host's rule (tables.update_block) for experiments.
BLOCK_OVERRIDE: dict[bool, int] = {}


def block_of(v: Variant) -> int:
    """Elements a program, as the host launches ``v``."""
    return BLOCK_OVERRIDE.get(v.aligned) or _tables.update_block(v.aligned, v.stochastic)


def _kernel_params() -> tuple[Any, list[str], set[str]]:
    from triton_adadelta.kernels.adadelta import adadelta_kernel

    names = list(adadelta_kernel.arg_names)
    constexprs = {p.name for p in adadelta_kernel.params if p.is_constexpr}
    return adadelta_kernel, names, constexprs


def compile_variant(v: Variant, arch: int) -> Any:
    """The compiled kernel (``triton.compile``) for ``v`` on sm_``arch``, launched as the host launches it."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, names, constexpr_names = _kernel_params()
    tl_dtype = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    master_type = {MASTER_NONE: v.s, MASTER_FP32: "fp32", MASTER_REMAINDER: "i16"}[v.master]
    pointer = {"param_table": "i64", "tensor_meta": "i64", "chunk_tensor": "i32", "chunk_block": "i32",
               "square_avg": v.s, "acc_delta": v.s, "master": master_type}
    values = {"P_DTYPE": tl_dtype[v.p], "G_DTYPE": tl_dtype[v.g], "BLOCK": block_of(v),
              "VEC": 16 // min(2 if v.p != "fp32" else 4, 2 if v.g != "fp32" else 4),
              "HAS_CLIP": v.clip, "HAS_SCALER": v.scaler, "MASTER": v.master, "STOCHASTIC": v.stochastic,
              "ALIGNED": v.aligned}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name == "num_tensors":
            signature[name] = "i32"
        else:
            signature[name] = "*" + pointer.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations: 16-byte aligned, as Triton specialises them
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": _NUM_WARPS, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


@functools.cache
def _tool(name: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    ptxas = getattr(ptxas, "path", ptxas)
    return ptxas if name == "ptxas" else os.path.join(os.path.dirname(ptxas), name)


_REG = re.compile(r"%[a-z]+\d+")


def pointer_table_accesses(ptx: str) -> list[str]:
    """The global loads and stores whose address comes from a pointer read out of the pointer table
    (the kernel's first argument): the parameter and gradient accesses, found by following PTX
    registers from the argument through the table loads to the addresses."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    table: set[str] = set()  # registers holding an address inside the table
    pointer: set[str] = set()  # registers holding (something computed from) a pointer read from it
    for ln in lines:
        m = re.match(r"ld\.param\.\w+\s+(%rd\d+),\s*\[\w+_param_0\]", ln)
        if m:
            table.add(m.group(1))
    accesses = []
    changed = True
    while changed:  # the kernel is straight-line code; iterate to a fixpoint anyway
        changed = False
        accesses = []
        for ln in lines:
            ln = re.sub(r"^@!?%p\d+\s+", "", ln)
            if not ln or ln.startswith(("//", ".", "{", "}", "$")):
                continue
            op, _, rest = re.sub(r"\s+", " ", ln).partition(" ")
            if op.startswith("st.global") or op.startswith("ld.global"):
                address = re.search(r"\[\s*(%rd\d+)", rest)
                if address and address.group(1) in pointer:
                    accesses.append(op)
            if op.startswith("st."):
                continue
            dest_part, _, src_part = rest.partition(",") if not rest.startswith("{") else \
                (rest[: rest.index("}") + 1], None, rest[rest.index("}") + 1:])
            dests, srcs = set(_REG.findall(dest_part)), set(_REG.findall(src_part))
            if op.startswith("ld.global"):
                address = re.search(r"\[\s*(%rd\d+)", rest)
                new = dests if address and address.group(1) in table else set()
                if new - pointer:
                    pointer |= new
                    changed = True
                continue
            if srcs & pointer and dests - pointer:
                pointer |= dests
                changed = True
            if srcs & table and dests - table - pointer:
                table |= dests - pointer
                changed = True
    return accesses


class Row(NamedTuple):
    variant: Variant
    registers: int
    spill_bytes: int
    occupancy: float
    ld_v4: int
    st_v4: int
    table_vector_accesses: int  # vector loads/stores through a parameter or gradient pointer (.v2 or .v4)
    table_v4_accesses: int  # of which 128-bit (.v4)
    table_accesses: int
    sass_per_element: float
    compile_s: float


def occupancy(registers: int, warps: int = _NUM_WARPS) -> float:
    """Theoretical occupancy of an H100 SM (sm_90) for blocks of ``warps`` warps from the registers alone:
    registers are allocated per warp in units of 256 (8 a thread)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(H100_REGISTERS // (per_warp * warps), H100_MAX_WARPS // warps, H100_MAX_BLOCKS)
    return blocks * warps / H100_MAX_WARPS


def _ptxas_flags(arch: int) -> list[str]:
    """The options Triton's own ptxas call uses (CUDABackend.make_cubin), so that ``-v`` reports on the same code."""
    import inspect

    from triton.backends.nvidia import compiler as nvidia

    flags = ["--fmad=false", f"--gpu-name={nvidia.sm_arch_from_capability(arch)}"]
    if "--regAllocOptLevel=2" in inspect.getsource(nvidia.CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")
    return flags


def measure(v: Variant, arch: int, sass_count: bool = True) -> Row:
    """Compile ``v`` and read the result. ``sass_count=False`` (the tests) reads only the cubin's resource
    usage (registers, stack and local memory: a spill lands there) and the PTX, skipping the SASS
    listing and the second ptxas run: half the time."""
    start = time.perf_counter()
    compiled = compile_variant(v, arch)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:  # Triton's own cubin: the code a launch would run
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump", arch), "--dump-resource-usage", cubin_path],
                               capture_output=True, text=True, check=True).stdout
        sass, info = "", ""
        if sass_count:
            sass = subprocess.run([_tool("cuobjdump", arch), "-sass", cubin_path],
                                  capture_output=True, text=True, check=True).stdout
            res = subprocess.run([_tool("ptxas", arch), *_ptxas_flags(arch), "-v", ptx_path,
                                  "-o", os.path.join(tmp, "again.cubin")], capture_output=True, text=True, check=True)
            info = res.stdout + res.stderr
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    if sass_count:
        assert registers == int(re.search(r"Used (\d+) registers", info).group(1)), "ptxas -v disagrees with the cubin"
    # Spills: what ptxas -v reports, and any stack or local memory in the cubin.
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    spills += sum(int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", usage))
    # SASS lines look like "/*0040*/   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;"; NOPs pad the end.
    instructions = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", ln)
                    and " NOP" not in ln]
    per_thread = block_of(v) // (32 * _NUM_WARPS)
    table = pointer_table_accesses(ptx)
    return Row(v, registers, spills, occupancy(registers),
               len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)), len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
               sum(".v2" in op or ".v4" in op for op in table), sum(".v4" in op for op in table), len(table),
               len(instructions) / per_thread, time.perf_counter() - start)


def _has_aligned_specialisation() -> bool:
    return "ALIGNED" in _kernel_params()[1]


def main() -> None:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability: 90 = H100, 80 = A100")
    ap.add_argument("--cover", action="store_true", help="a representative cover instead of every variant")
    ap.add_argument("--small-cover", action="store_true",
                    help="the cover without the twin of each stochastic-rounding variant (the tests' default)")
    ap.add_argument("--match", default="", help="only variants whose label contains this text")
    ap.add_argument("--json", action="store_true", help="one JSON object a line instead of the table (tests)")
    ap.add_argument("--no-sass", action="store_true", help="skip the SASS count and the ptxas -v rerun (faster)")
    ap.add_argument("--block", type=int, help="elements a program for aligned tensors (default: the host's)")
    ap.add_argument("--block-unaligned", type=int, help="the same for unaligned tensors")
    args = ap.parse_args()
    if args.block:
        BLOCK_OVERRIDE[True] = args.block
    if args.block_unaligned:
        BLOCK_OVERRIDE[False] = args.block_unaligned
    variants = launchable()
    if not _has_aligned_specialisation():  # a kernel with both branches in one compile (before issue 14)
        variants = [v for v in variants if v.aligned]
    if args.cover or args.small_cover:
        variants = cover(variants, pairs=not args.small_cover)
    variants = [v for v in variants if args.match in v.label]
    if args.json:
        for v in variants:
            r = measure(v, args.arch, sass_count=not args.no_sass)
            fields = r._asdict()
            fields["variant"] = v._asdict()
            print(json.dumps(fields), flush=True)
        return
    print(f"# triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}, "
          f"BLOCK={BLOCK_OVERRIDE.get(True, _tables.UPDATE_BLOCK)} "
          f"(unaligned {BLOCK_OVERRIDE.get(False, _tables.UPDATE_BLOCK_UNALIGNED)}; "
          f"{_tables.UPDATE_BLOCK} with stochastic rounding), "
          f"{_NUM_WARPS} warps, {len(variants)} variants"
          + ("" if _has_aligned_specialisation() else " (each compile holds both the aligned and unaligned branch)"))
    print("| variant | regs | spill B | H100 occ. | ld.v4 | st.v4 | p/g vector/all | SASS/elem | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for v in variants:
        r = measure(v, args.arch, sass_count=not args.no_sass)
        rows.append(r)
        print(f"| {v.label}{' (default)' if v.is_default else ''} | {r.registers} | {r.spill_bytes} | "
              f"{r.occupancy:.1%} | {r.ld_v4} | {r.st_v4} | {r.table_vector_accesses}/{r.table_accesses} | "
              f"{r.sass_per_element:.1f} | {r.compile_s:.1f} |", flush=True)
    regs = [r.registers for r in rows]
    print(f"# registers {min(regs)}-{max(regs)}, spill bytes max {max(r.spill_bytes for r in rows)}, "
          f"defaults {sorted({r.registers for r in rows if r.variant.is_default})}, "
          f"total compile {sum(r.compile_s for r in rows):.0f} s")


if __name__ == "__main__":
    main()
