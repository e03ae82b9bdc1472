"""Compile ghostops' Triton kernels for a GPU, without one, as their ops launch them.

Each op (eval in both forms, the training forward and its backward) is called on CPU tensors
of GhostNet shapes with Triton's launcher replaced by a recorder, so every kernel launch is
caught with its real arguments. Each distinct launch is then specialised as Triton's JIT would
specialise it (an integer equal to 1 becomes a constant, pointers and integers divisible by 16
are marked so: this is what lets a channels_last stride of 1 make a run of channels
contiguous), lowered for the target through Triton's ahead-of-time path and assembled with
ptxas. Whatever only a real compile rejects (a dtype a tl.dot cannot take, a loop-carried type
change) fails here as it would on the GPU, which the interpreter (TRITON_INTERPRET=1, how the
parity tests run without a GPU) never does; and the PTX says how wide each global load and
store is, the one measure of memory access quality a machine without a GPU can take.

Run by tests/test_triton.py in a subprocess (the interpreter must be off):
    python tests/triton_gpu_compile.py [--arch 90] [--dtypes fp16 fp32] [--layouts nchw]
One line per distinct kernel specialisation: registers and spilled bytes (``ptxas -v``), then
the global loads and stores by width in bytes (``ld 16Bx9 4Bx2``: nine 16-byte vector loads,
two 4-byte ones); exit status 1 if any failed. Reads triton internals (the launcher's binder,
``_pack_args``) of the version the project pins; the GPU itself never runs this.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import ghostops.backends.triton_kernels  # noqa: E402, F401 - registers the eval op
import ghostops.backends.triton_train  # noqa: E402, F401 - registers the training ops

# (inp, oup, map size) of GhostNet-1.0x modules: both eval forms, one and several row and K
# blocks, channel counts with and without a factor of 8 (24->72: 36 intrinsic channels).
SHAPES = [(16, 48, 112), (24, 72, 56), (72, 24, 56), (40, 120, 28), (960, 160, 7)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BATCH = 2


@contextlib.contextmanager
def recorded_launches(into: list):
    """Inside the block, ``kernel[grid](*args, **kwargs)`` appends (kernel, args, kwargs) to
    ``into`` instead of launching."""
    run = JITFunction.run

    def record(self, *args, grid, warmup=False, **kwargs):
        into.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = run


def op_launches(inp: int, oup: int, hw: int, dtype, layout) -> list:
    """Every kernel launch of the eval op (both forms), the training forward and backward on
    one module shape, as (kernel, args, kwargs)."""
    g = torch.Generator().manual_seed(0)
    init = -(-oup // 2)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x = rnd(BATCH, inp, hw, hw).contiguous(memory_format=layout)
    w1, w2 = rnd(init, inp, 1, 1), rnd(init, 1, 3, 3)
    bn = [torch.rand(init, generator=g) + 0.5 for _ in range(4)]
    launches: list = []
    with recorded_launches(launches):
        for form in ("one_pass", "two_kernels"):
            os.environ["GHOSTOPS_TRITON_EVAL"] = form
            torch.ops.ghostops.ghost_forward_eval_triton(
                x, w1, *bn, 1e-5, w2, *bn, 1e-5, oup, 1, "relu"
            )
        os.environ.pop("GHOSTOPS_TRITON_EVAL")
        y, z1, m1, v1, m2, v2 = torch.ops.ghostops.ghost_forward_train_triton(
            x, w1, bn[0], bn[1], 1e-5, w2, bn[2], bn[3], 1e-5, oup, 1, "relu"
        )
        gy = torch.ones_like(y)  # the kernels never ran: y holds no values worth reading
        torch.ops.ghostops.ghost_backward_triton(
            gy, x, z1, w1, bn[0], bn[1], m1, v1, 1e-5, w2, bn[2], bn[3], m2, v2, 1e-5, 1,
            "relu", [True, True],
        )  # fmt: skip
    return launches


def compile_launch(kernel, args, kwargs, target):
    """The kernel as Triton's JIT compiles it for these arguments on ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    key = (kernel.__name__, str(specialization), str(options))
    return key, lambda: triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )


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


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_ASYNC_COPY = re.compile(
    r"\bcp\.async\.\w+\.shared\.global\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)"
)


def access_widths(ptx: str) -> str:
    """Global loads (``ld``), stores (``st``) and asynchronous global-to-shared copies (``cp``,
    how Triton pipelines a tl.dot's operands) of the PTX by width in bytes, widest first:
    ``ld 16Bx9 2Bx1; st 16Bx1``."""
    counts = {"ld": collections.Counter(), "st": collections.Counter(), "cp": collections.Counter()}
    for kind, suffixes in _ACCESS.findall(ptx):
        vec = re.search(r"\.v(\d)", suffixes)
        bits = re.search(r"\.[bufs](\d+)\b", suffixes)
        if bits:
            counts[kind][(int(vec.group(1)) if vec else 1) * int(bits.group(1)) // 8] += 1
    for size in _ASYNC_COPY.findall(ptx):
        counts["cp"][int(size, 0)] += 1
    return "; ".join(
        kind + " " + " ".join(f"{w}Bx{n}" for w, n in sorted(c.items(), reverse=True))
        for kind, c in counts.items()
        if c
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--layouts", nargs="+", default=sorted(LAYOUTS), choices=sorted(LAYOUTS))
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed, seen = 0, set()
    for xd in args.dtypes:
        for layout in args.layouts:
            for inp, oup, hw in SHAPES:
                label = f"{xd} {layout} {inp}->{oup} {hw}x{hw}"
                for kernel, kargs, kwargs in op_launches(inp, oup, hw, DTYPES[xd], LAYOUTS[layout]):
                    key, build = compile_launch(kernel, kargs, kwargs, target)
                    if key in seen:
                        continue
                    seen.add(key)
                    name = f"sm_{args.arch} {label} {kernel.__name__}"
                    try:
                        ptx = build().asm["ptx"]
                    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                        failed += 1
                        last = " | ".join(str(e).strip().splitlines()[-3:])[:400]
                        print(f"FAIL {name}: {type(e).__name__}: {last}", flush=True)
                        continue
                    print(f"ok   {name}: {resources(ptx, args.arch)}; {access_widths(ptx)}",
                          flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
