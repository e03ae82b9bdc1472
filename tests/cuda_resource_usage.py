"""Compile ghostops' CUDA kernels (csrc/cuda/*.cu) for a GPU, without one, and report what
ptxas says of each: registers, spilled bytes, shared memory; and whether it uses the tensor
cores.

A machine without a GPU cannot run the CUDA backend, but it can compile it for the target and
read ptxas's resource report (``nvcc --resource-usage``): a kernel that spills registers to
local memory, or asks for more shared memory than a block may have, shows here. setup.py's
build compiles the same files with the same defines (tests/test_cuda.py runs this tool).

    python tests/cuda_resource_usage.py [--arch 90] [--jobs 2]

One line per kernel instantiation (demangled): ``ok`` or ``SPILL``, registers, spill stores /
loads in bytes, shared memory in bytes, tensor-core instructions in its PTX (``mma.sync``,
WMMA's included), then the kernel; exit status 1 if a file failed to compile or a kernel
spilled. Needs nvcc (``CUDA_HOME``, else /usr/local/cuda, as setup.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py's nvcc options; torch's cpp_extension adds its COMMON_NVCC_FLAGS and the standard.
NVCC_FLAGS = ["-O3", "--use_fast_math", "-DGHOSTOPS_WITH_CUDA", "-std=c++20"]

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
PTX_ENTRY = re.compile(r"\.entry (\w+)\(")


def nvcc() -> str:
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # setup.py's guess, before cpp_extension's
    home = os.environ.get("CUDA_HOME")
    path = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not path or not os.path.exists(path):
        raise SystemExit("nvcc not found: set CUDA_HOME")
    return path


def torch_flags() -> list[str]:
    """torch's own nvcc defines and its include directories, as cpp_extension passes them."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    return [*COMMON_NVCC_FLAGS, *(f"-I{d}" for d in include_paths()), f"-I{ROOT / 'csrc'}"]


def compile_file(source: Path, nvcc_cmd: list[str], outdir: str) -> tuple[Path, int, str, str]:
    """(source, nvcc's exit status, its output: the ptxas report or the errors, the PTX)."""
    keep = os.path.join(outdir, source.stem)
    os.makedirs(keep)
    cubin = os.path.join(keep, source.stem + ".cubin")
    run = subprocess.run([*nvcc_cmd, "-keep", "-keep-dir", keep, "-o", cubin, str(source)],
                         capture_output=True, text=True)  # fmt: skip
    ptx = "".join(Path(f).read_text() for f in sorted(Path(keep).glob("*.ptx")))
    return source, run.returncode, run.stdout + run.stderr, ptx


def mma_counts(ptx: str) -> dict[str, int]:
    """Tensor-core instructions (``mma.sync``, WMMA's included) in each kernel (entry) of the
    PTX; device functions are inlined into their kernels here."""
    counts, name = {}, None
    for line in ptx.splitlines():
        if m := PTX_ENTRY.search(line):
            name = m.group(1)
            counts[name] = 0
        elif name and "mma.sync" in line:
            counts[name] += 1
    return counts


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, out.stdout.splitlines(), strict=True))


def kernels(report: str) -> list[dict]:
    """The report's kernels: name, arch, registers, spill stores / loads, smem."""
    found = []
    for line in report.splitlines():
        if m := ENTRY.search(line):
            found.append({"name": m.group(1), "arch": m.group(2), "regs": 0, "spill_st": 0,
                          "spill_ld": 0, "smem": 0})  # fmt: skip
        elif found and (m := SPILLS.search(line)):
            found[-1]["spill_st"], found[-1]["spill_ld"] = int(m.group(1)), int(m.group(2))
        elif found and (m := USED.search(line)):
            found[-1]["regs"] = int(m.group(1))
            if s := SMEM.search(line):
                found[-1]["smem"] = int(s.group(1))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability, e.g. 80 or 90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    cmd = [nvcc(), "-cubin", f"-arch=sm_{args.arch}", "--resource-usage", *NVCC_FLAGS,
           *torch_flags()]  # fmt: skip
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda s: compile_file(s, cmd, tmp), sources))
    for source, rc, report, ptx in results:
        if rc != 0:
            print(f"FAIL {source.name}\n{report}")
            failed = True
            continue
        found = kernels(report)
        names = demangle([k["name"] for k in found])
        mma = mma_counts(ptx)
        for k in found:
            spilled = k["spill_st"] + k["spill_ld"] > 0
            failed |= spilled
            print(f"{'SPILL' if spilled else 'ok':5} {k['arch']} {source.name}: {k['regs']} regs, "
                  f"spill {k['spill_st']}/{k['spill_ld']} B, smem {k['smem']} B, "
                  f"mma {mma.get(k['name'], 0)}; {names[k['name']]}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
