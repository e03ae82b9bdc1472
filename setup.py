"""Build of ghostops._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

Environment:
  GHOSTOPS_BUILD_CUDA=0/1   force the CUDA kernels off / on (default: on when torch is a CUDA
                            build and nvcc is found; a visible GPU is not needed)
  GHOSTOPS_CPU_ISA=avx512|avx2|default
                            vector ISA of the CPU kernels (default: the best the building
                            machine has; the build is for the machine that runs it)
  TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0")
"""

import glob
import os
import platform
import shutil

# torch.utils.cpp_extension reads CUDA_HOME when imported. Where nvcc on PATH is a wrapper,
# torch guesses a CUDA_HOME without headers; the toolkit's standard place is the better guess.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}  # fmt: skip


def cpu_isa() -> str:
    """The vector ISA for at::vec in the CPU kernels: env override, else the build machine's."""
    isa = os.environ.get("GHOSTOPS_CPU_ISA")
    if isa:
        if isa not in ISA_FLAGS:
            raise SystemExit(f"GHOSTOPS_CPU_ISA must be one of {sorted(ISA_FLAGS)}, got {isa!r}")
        return isa
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= set(flags):
        return "avx512"
    if {"avx2", "fma"} <= set(flags):
        return "avx2"
    return "default"


def build_cuda() -> bool:
    forced = os.environ.get("GHOSTOPS_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc or shutil.which("nvcc"))


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", *ISA_FLAGS[cpu_isa()]]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if build_cuda() and cuda_sources:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        return CUDAExtension(
            "ghostops._C",
            sources + cuda_sources,
            extra_compile_args={
                "cxx": [*cxx, "-DGHOSTOPS_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-DGHOSTOPS_WITH_CUDA"],
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "ghostops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
