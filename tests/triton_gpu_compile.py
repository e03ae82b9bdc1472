"""Compile every Triton kernel of ghostops for a GPU, without one: Triton's ahead-of-time path
(``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``) lowers each kernel to a cubin with
the ptxas Triton ships, so whatever only a real compile rejects (a dtype a ``tl.dot`` cannot
take, a loop-carried type change, a block shape) fails here as it would on the GPU, which the
interpreter (``TRITON_INTERPRET=1``, how the parity tests run without a GPU) never does.

Run by tests/test_triton.py in a subprocess (the interpreter must be off):
    python tests/triton_gpu_compile.py [--arch 90] [--dtypes fp16 fp32]
Prints one line per kernel with its registers and spilled bytes (``ptxas -v``); exit status 1
if any failed.
The eval kernels are compiled with the block sizes ``eval_plan`` gives GhostNet's shapes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ghostops.backends import triton_kernels as tk  # noqa: E402
from ghostops.backends import triton_train as tt  # noqa: E402

# (inp, oup) of GhostNet-1.0x modules whose plans cover both forms and the block-size range.
SHAPES = [(16, 48), (24, 72), (72, 24), (240, 80), (960, 160)]
ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def kernels(xd: str):
    """(name, kernel, pointer dtypes by argument name (others fp32), constexprs, num_warps)."""
    specs = []
    for inp, oup in SHAPES:
        init = -(-oup // 2)
        plan = tk.eval_plan(inp, init, oup, init, 3, ITEMSIZE[xd])
        blocks = {k: plan[k] for k in ("BLOCK_M", "BLOCK_K", "BLOCK_P")}
        common = {"RELU": True, "DOT_F32": False, **blocks}
        label = f"{inp}->{oup}"
        if plan["form"] == "one_pass":
            specs.append((f"one_pass {label}", tk._one_pass_kernel,
                          {"x_ptr": xd, "w1_ptr": xd, "y_ptr": xd}, {"D": 3, **common},
                          plan["num_warps"]))  # fmt: skip
        else:
            specs.append((f"primary {label}", tk._primary_kernel,
                          {"x_ptr": xd, "w_ptr": xd, "y_ptr": xd}, common,
                          plan["num_warps"]))  # fmt: skip
    specs.append(("cheap", tk._cheap_kernel, {"y_ptr": xd}, {"D": 3, "RELU": True, "BLOCK_P": 128},
                  4))  # fmt: skip
    z = "fp32"  # z1, statistics and the backward's buffers are float32 for half inputs
    train = {"D": 3, "RELU": True, "BLOCK": tt.BLOCK_P}
    specs += [
        ("f1_primary", tt._f1_primary, {"x_ptr": xd, "w_ptr": xd, "z_ptr": z},
         {"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK": tt.BLOCK_P, "DOT_F32": False}, 4),
        ("f2_cheap", tt._f2_cheap, {"y_ptr": xd, "w2_ptr": xd}, train, 4),
        ("f3_affine_act", tt._f3_affine_act, {"y_ptr": xd},
         {"RELU": True, "BLOCK": tt.BLOCK_P}, 4),
        ("b1_ghost_sums", tt._b1_ghost_sums, {"gy_ptr": xd, "w2_ptr": xd}, train, 4),
        ("b2_dz2", tt._b2_dz2, {"gy_ptr": xd, "w2_ptr": xd}, train, 4),
        ("b3_dx1", tt._b3_dx1, {"gy_ptr": xd, "w2_ptr": xd}, train, 4),
    ]  # fmt: skip
    return specs


def signature(fn, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "fp32")
        else:
            sig[name] = "i32"
    return sig


def resources(ptx: str, arch: int) -> str:
    """Registers and spilled bytes a thread, as ``ptxas -v`` reports them for the kernel's PTX
    (the toolkit's ptxas; "ptxas not found" without one)."""
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    if not os.path.exists(ptxas):
        return "ptxas not found"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        target = re.search(r"\.target\s+(sm_\w+)", ptx)  # sm_90a for Hopper's own features
        gpu = target.group(1) if target else f"sm_{arch}"
        run = subprocess.run([ptxas, "-v", f"-arch={gpu}", str(src), "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
    info = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    if regs is None or spills is None:
        return "ptxas: " + " | ".join(info.strip().splitlines()[-2:])[:200]
    return f"{regs.group(1)} registers, {spills.group(1)} bytes spilled"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=sorted(ITEMSIZE))
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for xd in args.dtypes:
        for name, kernel, pointers, constexprs, warps in kernels(xd):
            src = ASTSource(kernel, signature(kernel, pointers, constexprs), constexprs=constexprs)
            try:
                k = triton.compile(src, target=target, options={"num_warps": warps})
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failed += 1
                last = " | ".join(str(e).strip().splitlines()[-3:])[:400]
                print(f"FAIL sm_{args.arch} {xd} {name}: {type(e).__name__}: {last}", flush=True)
                continue
            print(f"ok   sm_{args.arch} {xd} {name}: {resources(k.asm['ptx'], args.arch)}",
                  flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
