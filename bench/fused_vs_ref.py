"""Time the fused Ghost module (``ghostops.GhostModule``) against the unfused reference.

Cases: every unique Ghost module shape of GhostNet-1.0x (eval mode, no grad) at batch 1 and 32,
then the whole GhostNet-1.0x at 224x224, both built from the same randomised state dict. Every
fused output is checked against the reference first, so a wrong kernel fails loudly instead of
being timed. Reported: median ms of each, speedup, and the fused module's achieved bandwidth
(input + output + weights, each moved once) against the machine's measured copy bandwidth, and
its roofline fraction (the time the bytes take at the copy bandwidth or the flops at the
measured peak FMA rate, whichever is longer, over the measured time). The whole model also runs
under ``torch.compile`` (reference and ghostops) and, on the CPU, in ONNX Runtime
(bench/competitors.py). A PNG of the per-shape speedups is written beside the JSON when
matplotlib is installed (bench/plot.py).

Run from the repository root::

    python bench/fused_vs_ref.py                  # full run -> bench/results/cpu.json
    python bench/fused_vs_ref.py --quick          # < 1 min  -> bench/results/cpu-quick.json
    python bench/fused_vs_ref.py --device cuda    # -> bench/results/cuda-<gpu>.json

Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` (median) on the CPU with
``torch.get_num_threads()`` threads; ``triton.testing.do_bench`` (median, L2 flush) on a GPU.
Progress goes to stderr, the markdown table to stdout, the results to JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SHAPES_FILE_NAME = "ghostnet_module_shapes.json"
# The shape list lives beside the repository (../shared/); a copy in bench/ would win.
SHAPES_FILE_CANDIDATES = (
    REPO_ROOT / "bench" / SHAPES_FILE_NAME,
    REPO_ROOT.parent / "shared" / SHAPES_FILE_NAME,
)
WIDTH = "1.0"

try:
    import ghostops
except ImportError:  # run as `python bench/fused_vs_ref.py` from a source checkout
    sys.path.insert(0, str(REPO_ROOT))
    import ghostops
from ghostops.backends import select_backend  # noqa: E402
from ghostops.reference import ReferenceGhostModule  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import competitors  # noqa: E402

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Module outputs: elementwise ``assert_close`` bounds; model logits: relative L2 error."""

    rtol: float
    atol: float
    model_rel_err: float


# BN folding reorders the arithmetic, so the fused result differs from the reference by
# rounding; inputs and BN parameters are O(1), so these bounds are far above that.
TOLERANCES = {
    torch.float64: Tolerance(1e-9, 1e-9, 1e-7),
    torch.float32: Tolerance(1e-4, 1e-4, 1e-3),
    torch.float16: Tolerance(2e-2, 2e-2, 5e-2),
    torch.bfloat16: Tolerance(5e-2, 5e-2, 1e-1),
}
# cuDNN runs float32 convs in TF32 by default (torch.backends.cudnn.allow_tf32).
CUDA_FLOAT32_TOLERANCE = Tolerance(2e-3, 2e-3, 1e-2)

FULL = {
    "batches": (1, 32),
    "shapes": None,
    "min_run_time": 0.5,
    "model_batches": (1, 32),
    "train_batches": (32,),
    "model_train_batches": (32,),
    "compare": True,
}
QUICK = {
    "batches": (1, 8),
    "shapes": 6,
    "min_run_time": 0.1,
    "model_batches": (1,),
    "train_batches": (8,),
    "model_train_batches": (2,),
    "compare": False,
}


# --------------------------------------------------------------------------------------------
# Cases


SHAPE_FIELDS = ("in_channels", "out_channels", "height", "width", "relu")


@dataclasses.dataclass(frozen=True)
class ModuleShape:
    """One Ghost module of GhostNet (kernel_size=1, ratio=2, dw_size=3, stride=1)."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    relu: bool
    count: int = 1  # how often the shape occurs in the network

    @classmethod
    def from_row(cls, row: dict) -> ModuleShape:
        """The shape of a result row."""
        return cls(*(row[name] for name in SHAPE_FIELDS), count=row.get("count", 1))

    @property
    def label(self) -> str:
        relu = " relu" if self.relu else ""
        return f"{self.in_channels}->{self.out_channels} {self.height}x{self.width}{relu}"


def find_shapes_file() -> Path:
    """The GhostNet module shape list (see DESIGN.md section 1)."""
    for path in SHAPES_FILE_CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SHAPES_FILE_NAME} not found in {[str(p) for p in SHAPES_FILE_CANDIDATES]}; "
        "pass --shapes-file"
    )


def load_shapes(path: Path, width: str = WIDTH) -> list[ModuleShape]:
    """Unique module shapes of GhostNet at ``width``, in network order, with occurrence counts."""
    data = json.loads(Path(path).read_text())
    fields = data["fields"]
    counts: dict[tuple, int] = {}
    for row in data["widths"][width]:
        key = tuple(row[fields.index(name)] for name in SHAPE_FIELDS)
        counts[key] = counts.get(key, 0) + 1
    return [ModuleShape(*key, count=count) for key, count in counts.items()]


def spread(items: Sequence, n: int | None) -> list:
    """``n`` items evenly spread over ``items`` (first and last included), all if n is None.

    Taking the first n instead would keep only the 112x112 shapes of the network's stem.
    """
    if n is None or n >= len(items):
        return list(items)
    if n <= 1:
        return list(items[:n])
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


# --------------------------------------------------------------------------------------------
# Harness


@dataclasses.dataclass(frozen=True)
class Timing:
    """A timing in milliseconds: median and interquartile range over the measured runs."""

    median_ms: float
    iqr_ms: float
    runs: int | None  # None where the timer does not say (do_bench)


@dataclasses.dataclass
class Harness:
    """Where and how cases run: device, dtype, memory format, timer settings."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    min_run_time: float
    threads: int
    use_do_bench: bool  # triton.testing.do_bench on a GPU when triton imports

    @property
    def timer_name(self) -> str:
        if self.use_do_bench:
            return "triton.testing.do_bench (median)"
        return "torch.utils.benchmark.Timer.blocked_autorange (median)"

    @property
    def tolerance(self) -> Tolerance:
        if self.device.type == "cuda" and self.dtype == torch.float32:
            return CUDA_FLOAT32_TOLERANCE
        return TOLERANCES[self.dtype]

    def time(self, fn: Callable[[], object], min_run_time: float | None = None) -> Timing:
        """Time ``fn()``; the caller sets the grad mode (it holds across the timer's loop)."""
        min_run_time = self.min_run_time if min_run_time is None else min_run_time
        if self.use_do_bench:
            import triton.testing

            rep_ms = max(1, round(min_run_time * 1e3))
            median, q25, q75 = triton.testing.do_bench(fn, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
            return Timing(median, q75 - q25, None)
        from torch.utils import benchmark

        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=self.threads)
        m = timer.blocked_autorange(min_run_time=min_run_time)
        return Timing(m.median * 1e3, m.iqr * 1e3, m.number_per_run * len(m.times))

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` in eval mode, on the harness's device, dtype and memory format."""
        module = module.to(device=self.device, dtype=self.dtype).eval()
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def randn(self, *shape: int) -> torch.Tensor:
        x = torch.randn(*shape, device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics (a trained-like
    network; fresh BNs are the identity, which would hide a kernel that ignores them)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_rel_err(err: float, limit: float, what: str) -> None:
    """Fail loudly, naming the case, if a relative error is over its limit (or NaN)."""
    if not err <= limit:
        raise AssertionError(
            f"{what} differs from the reference (relative error {err:.3g} > {limit:g})"
        )


def check_close(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance, what: str) -> None:
    """Fail loudly, naming the case, if the fused output is not the reference's."""
    try:
        torch.testing.assert_close(out, ref, rtol=tol.rtol, atol=tol.atol)
    except AssertionError as err:
        raise AssertionError(f"{what}: fused output differs from the reference\n{err}") from None


def state_bytes(module: nn.Module, element_size: int) -> int:
    """Bytes of the module's floating-point parameters and buffers at ``element_size``."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors if t.is_floating_point()) * element_size


def copy_bandwidth(h: Harness, mib: int) -> float:
    """Measured copy bandwidth in GB/s (1e9 bytes/s), counting the read and the write."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=h.device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touch the pages before timing
    t = h.time(lambda: dst.copy_(src), min_run_time=max(h.min_run_time, 0.5))
    return 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9


def sgemm_gflops(h: Harness) -> float:
    """A large square matmul's rate in GFLOP/s (1e9 flops/s, an FMA counted as two) in the
    harness's dtype, as torch's BLAS runs it (for reference: on the AMD dev machine it reaches
    about 40 % of the measured FMA peak)."""
    n = 4096 if h.device.type == "cuda" else 1536
    a, b = h.randn(n, n).contiguous(), h.randn(n, n).contiguous()
    t = h.time(lambda: torch.mm(a, b), min_run_time=max(h.min_run_time, 0.5))
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e9


def peak_gflops(h: Harness, sgemm: float) -> tuple[float, str]:
    """The roofline's compute bound: on the CPU the measured peak FMA rate (float32, the
    extension's vector ISA, independent FMA chains in registers; best of 5 runs of ~0.1 s);
    on a GPU, or without the compiled extension, the large matmul's rate."""
    try:
        from ghostops import _C
    except ImportError:
        _C = None
    if h.device.type != "cpu" or _C is None or not hasattr(_C, "cpu_peak_gflops"):
        return sgemm, "large torch.mm (no FMA microbenchmark here)"
    start = time.perf_counter()
    _C.cpu_peak_gflops(10**5)
    iterations = max(1, int(10**5 * 0.1 / (time.perf_counter() - start)))  # ~0.1 s a run
    best = max(_C.cpu_peak_gflops(iterations) for _ in range(5))
    return best, "FMA chains in registers (csrc/cpu/peak.cpp), float32, best of 5"


def module_flops(shape: ModuleShape, batch: int, dw_size: int = 3) -> int:
    """Multiply-adds x 2 of one Ghost module (ratio 2): the primary 1x1 conv over the input
    channels, the depthwise conv for the ghost channels kept (BN and activation not counted)."""
    init = (shape.out_channels + 1) // 2
    ghost = shape.out_channels - init
    pixels = batch * shape.height * shape.width
    return 2 * pixels * (shape.in_channels * init + ghost * dw_size * dw_size)


# --------------------------------------------------------------------------------------------
# Module and model cases


def bench_module(
    h: Harness,
    shape: ModuleShape,
    batch: int,
    copy_gbps: float,
    peak_gflops: float,
    variants_on: bool = False,
) -> dict:
    """Time one Ghost module shape, reference vs fused, same weights; return a result row (with
    ``module_variants``'s timings under "variants" when ``variants_on``)."""
    args = (shape.in_channels, shape.out_channels)
    kwargs = {"kernel_size": 1, "ratio": 2, "dw_size": 3, "stride": 1, "relu": shape.relu}
    ref = randomize_batchnorm(ReferenceGhostModule(*args, **kwargs))
    fused = ghostops.GhostModule(*args, **kwargs)
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref, fused = h.prepare(ref), h.prepare(fused)
    x = h.randn(batch, shape.in_channels, shape.height, shape.width)

    y_ref, y = ref(x), fused(x)  # also the warm-up call of each
    check_close(y, y_ref, h.tolerance, f"module {shape.label}, batch {batch}")
    t_ref = h.time(lambda: ref(x))
    t_fused = h.time(lambda: fused(x))
    variants = module_variants(h, shape, ref, fused, x, y_ref) if variants_on else None

    element_size = x.element_size()
    nbytes = (x.numel() + y.numel()) * element_size + state_bytes(fused, element_size)
    gbps = nbytes / (t_fused.median_ms * 1e-3) / 1e9
    flops = module_flops(shape, batch)
    roofline_ms = max(nbytes / (copy_gbps * 1e9), flops / (peak_gflops * 1e9)) * 1e3
    return {
        **dataclasses.asdict(shape),
        "batch": batch,
        "ref_ms": t_ref.median_ms,
        "ref_iqr_ms": t_ref.iqr_ms,
        "ref_runs": t_ref.runs,
        "fused_ms": t_fused.median_ms,
        "fused_iqr_ms": t_fused.iqr_ms,
        "fused_runs": t_fused.runs,
        "speedup": t_ref.median_ms / t_fused.median_ms,
        "bytes": nbytes,
        "fused_gbps": gbps,
        "fraction_of_copy_bandwidth": gbps / copy_gbps,
        "flops": flops,
        "fused_gflops": flops / (t_fused.median_ms * 1e-3) / 1e9,
        "roofline_ms": roofline_ms,
        "roofline_fraction": roofline_ms / t_fused.median_ms,
        "max_abs_err": (y.double() - y_ref.double()).abs().max().item(),
        "rel_err": relative_error(y, y_ref),
        **({} if variants is None else {"variants": variants}),
    }


def gpu_backend_runs(device: torch.device) -> list[tuple[str, str, dict]]:
    """(label, backend, environment) of each way ghostops runs a GPU module here: the Triton
    and the CUDA C++ backends, those available, each in both of its eval forms
    (``GHOSTOPS_TRITON_EVAL``, ``GHOSTOPS_CUDA_EVAL``), and the CUDA two-kernel form with its
    GEMM held to 32-row tiles (``GHOSTOPS_CUDA_GEMM_ROWS``: what the automatic 64 / 128 rows
    gain). Empty on the CPU, where the fused time is the ``cpu`` backend's."""
    if device.type != "cuda":
        return []
    available = ghostops.available_backends()
    runs = []
    if "triton" in available:
        runs += [(f"triton {f}", "triton", {"GHOSTOPS_TRITON_EVAL": f})
                 for f in ("one_pass", "two_kernels")]  # fmt: skip
    if "cuda" in available:
        runs += [(f"cuda {f}", "cuda", {"GHOSTOPS_CUDA_EVAL": f})
                 for f in ("one_pass", "two_kernels")]  # fmt: skip
        rows32 = {"GHOSTOPS_CUDA_EVAL": "two_kernels", "GHOSTOPS_CUDA_GEMM_ROWS": "32"}
        runs.append(("cuda two_kernels rows 32", "cuda", rows32))
    return runs


def module_variants(
    h: Harness, shape: ModuleShape, ref: nn.Module, fused: nn.Module, x, y_ref
) -> dict[str, float]:
    """Other ways to compute the shape, timed like the fused module, in ms (each output but the
    dense layer's, which has other weights, checked against the reference's first): ``dense``,
    the 1x1 Conv-BN(-ReLU, where the module has it) with the same in / out channels that a
    Ghost module replaces; ``compile(ref)``, ``torch.compile`` of the reference module; and on a
    GPU ghostops under each backend and eval form (``gpu_backend_runs``)."""
    dense = nn.Sequential(
        nn.Conv2d(shape.in_channels, shape.out_channels, 1, bias=False),
        nn.BatchNorm2d(shape.out_channels),
        nn.ReLU(inplace=True) if shape.relu else nn.Identity(),
    )
    dense = h.prepare(randomize_batchnorm(dense))
    dense(x)
    out = {"dense": h.time(lambda: dense(x)).median_ms}
    compiled, _ = competitors.compiled(ref, x)
    check_close(compiled(x), y_ref, h.tolerance, f"compile(ref) {shape.label}")
    out["compile(ref)"] = h.time(lambda: compiled(x)).median_ms
    for label, backend, env in gpu_backend_runs(h.device):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with ghostops.use_backend(backend):
                check_close(fused(x), y_ref, h.tolerance, f"{label} {shape.label}")
                out[label] = h.time(lambda: fused(x)).median_ms
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def count_modules(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def build_models(h: Harness) -> tuple[nn.Module, nn.Module]:
    """GhostNet-1.0x twice from one randomised state dict: (reference, ghostops)."""
    width = float(WIDTH)
    ref = ghostops.models.ghostnet(width=width, ghost_module_cls=ReferenceGhostModule)
    randomize_batchnorm(ref)
    fused = ghostops.models.ghostnet(width=width)
    fused.load_state_dict(ref.state_dict(), strict=True)
    # A builder that ignored ghost_module_cls would time one network against itself.
    if count_modules(ref, ReferenceGhostModule) == 0:
        raise RuntimeError("the reference GhostNet has no ReferenceGhostModule")
    if count_modules(fused, ghostops.GhostModule) == 0:
        raise RuntimeError("the ghostops GhostNet has no ghostops.GhostModule")
    return h.prepare(ref), h.prepare(fused)


def bench_model(
    h: Harness, ref: nn.Module, fused: nn.Module, batch: int, resolution: int, compare: bool
) -> dict:
    """Time whole-network inference, reference vs ghostops (and with ``compare`` the other ways
    to run it fast: see bench_competitors); return a result row."""
    x = h.randn(batch, 3, resolution, resolution)
    y_ref, y = ref(x), fused(x)
    err = relative_error(y, y_ref)
    check_rel_err(err, h.tolerance.model_rel_err, f"GhostNet-{WIDTH}x, batch {batch}: output")
    t_ref = h.time(lambda: ref(x))
    t_fused = h.time(lambda: fused(x))
    row = {
        "model": f"ghostnet-{WIDTH}x",
        "batch": batch,
        "resolution": resolution,
        "ghost_modules": count_modules(fused, ghostops.GhostModule),
        "parameters": sum(p.numel() for p in fused.parameters()),
        "ref_ms": t_ref.median_ms,
        "ref_iqr_ms": t_ref.iqr_ms,
        "fused_ms": t_fused.median_ms,
        "fused_iqr_ms": t_fused.iqr_ms,
        "speedup": t_ref.median_ms / t_fused.median_ms,
        "rel_err": err,
    }
    if compare:
        row["others"] = bench_competitors(h, ref, fused, x, y_ref, f"batch {batch}")
    return row


# The other ways to run GhostNet, in table order: (key, label, model, make(model, x, h)).
COMPETITORS = (
    ("compile_ref", "torch.compile(ref)", "ref", lambda m, x, h: competitors.compiled(m, x)),
    ("onnxruntime", "ONNX Runtime", "ref",
     lambda m, x, h: competitors.onnxruntime_runner(m, x, h.threads)),
    ("compile_ghostops", "torch.compile(ghostops)", "fused",
     lambda m, x, h: competitors.compiled(m, x)),
    ("aoti_ref", "AOTInductor(ref)", "ref", lambda m, x, h: competitors.aot_inductor(m, x)),
    ("aoti_ghostops", "AOTInductor(ghostops)", "fused",
     lambda m, x, h: competitors.aot_inductor(m, x)),
)  # fmt: skip


def bench_competitors(
    h: Harness, ref: nn.Module, fused: nn.Module, x: torch.Tensor, y_ref: torch.Tensor, what: str
) -> dict:
    """``torch.compile`` and AOTInductor of the reference and of ghostops, and ONNX Runtime on an
    export of the reference, each checked against the eager reference and timed on ``x``. A
    way that cannot run here (onnxruntime not installed, a GPU) is reported with the reason,
    not timed."""
    out = {}
    for key, label, which, make in COMPETITORS:
        try:
            fn, setup_s = make(ref if which == "ref" else fused, x, h)
        except competitors.Unavailable as e:
            out[key] = {"label": label, "runs": which, "ms": None, "skipped": str(e)}
            progress(f"[model] {label} skipped: {e}")
            continue
        with torch.no_grad():
            err = relative_error(fn(x), y_ref)
            check_rel_err(err, h.tolerance.model_rel_err, f"GhostNet-{WIDTH}x {label}, {what}")
            t = h.time(lambda fn=fn: fn(x))
        out[key] = {
            "label": label,
            "runs": which,  # "ref" or "fused": which network this way runs
            "ms": t.median_ms,
            "iqr_ms": t.iqr_ms,
            "setup_s": setup_s,
            "rel_err": err,
        }
    return out


# --------------------------------------------------------------------------------------------
# Training cases


def bench_module_train(h: Harness, shape: ModuleShape, batch: int) -> dict:
    """Time one training forward + backward of a Ghost module (gradients of the input and of
    every parameter, batch statistics, running statistics updated), reference vs fused."""
    args = (shape.in_channels, shape.out_channels)
    kwargs = {"kernel_size": 1, "ratio": 2, "dw_size": 3, "stride": 1, "relu": shape.relu}
    ref = randomize_batchnorm(ReferenceGhostModule(*args, **kwargs))
    fused = ghostops.GhostModule(*args, **kwargs)
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref, fused = h.prepare(ref).train(), h.prepare(fused).train()
    x = h.randn(batch, shape.in_channels, shape.height, shape.width).requires_grad_()
    grad_y = h.randn(batch, shape.out_channels, shape.height, shape.width)

    def step(module: nn.Module) -> tuple[torch.Tensor, ...]:
        y = module(x)
        return (y, *torch.autograd.grad(y, [x, *module.parameters()], grad_y))

    outs_ref, outs = step(ref), step(fused)  # also the warm-up call of each
    err = max(relative_error(o, r) for o, r in zip(outs, outs_ref, strict=True))
    what = f"training {shape.label}, batch {batch}: output or a gradient"
    check_rel_err(err, h.tolerance.model_rel_err, what)
    t_ref = h.time(lambda: step(ref))
    t_fused = h.time(lambda: step(fused))
    return {
        **dataclasses.asdict(shape),
        "batch": batch,
        "ref_ms": t_ref.median_ms,
        "ref_iqr_ms": t_ref.iqr_ms,
        "fused_ms": t_fused.median_ms,
        "fused_iqr_ms": t_fused.iqr_ms,
        "speedup": t_ref.median_ms / t_fused.median_ms,
        "max_rel_err": err,
    }


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, target) -> float:
    """One SGD step on cross-entropy; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    return loss.item()


def peak_step_memory_mib(which: str, batch: int, resolution: int, threads: int) -> float:
    """Peak resident memory that one GhostNet training step adds above the model, its input and
    its optimizer, in MiB: measured in a fresh process (``--peak-memory``) from the kernel's
    peak-RSS mark."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-memory", which,
           "--model-train-batch", str(batch), "--resolution", str(resolution),
           "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak_memory(which: str, batch: int, resolution: int) -> float:
    """The ``--peak-memory`` child: build the model, input and optimizer state, reset the
    kernel's peak-RSS mark (/proc/self/clear_refs), run one training step and print how far the
    peak rose above the resident memory before it, in MiB."""
    ref = which == "reference"
    cls = ReferenceGhostModule if ref else ghostops.GhostModule
    model = ghostops.models.ghostnet(width=float(WIDTH), ghost_module_cls=cls).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, resolution, resolution)
    target = torch.randint(0, 1000, (batch,))
    for p in model.parameters():  # the momentum buffers, before the baseline
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    baseline = _status_kib("VmRSS")
    training_step(model, optimizer, x, target)
    return (_status_kib("VmHWM") - baseline) / 1024


def bench_model_train(h: Harness, batch: int, resolution: int) -> dict:
    """Time a whole GhostNet-1.0x SGD training step (cross-entropy, momentum 0.9) from the same
    weights, reference vs ghostops, check that both give the same loss, and measure each one's
    peak memory in a fresh process."""
    ref, fused = (m.train() for m in build_models(h))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    x = h.randn(batch, 3, resolution, resolution)
    target = torch.randint(0, 1000, (batch,), device=h.device)
    torch.manual_seed(1)  # the same dropout mask in both
    loss_ref = training_step(ref, opt_ref, x, target)
    torch.manual_seed(1)
    loss = training_step(fused, opt_fused, x, target)
    what = f"GhostNet-{WIDTH}x training step, batch {batch}: loss {loss:.6g}"
    check_rel_err(abs(loss - loss_ref) / abs(loss_ref), h.tolerance.model_rel_err, what)
    t_ref = h.time(lambda: training_step(ref, opt_ref, x, target))
    t_fused = h.time(lambda: training_step(fused, opt_fused, x, target))
    row = {
        "model": f"ghostnet-{WIDTH}x",
        "batch": batch,
        "resolution": resolution,
        "optimizer": "SGD(lr=0.01, momentum=0.9), cross-entropy",
        "ref_ms": t_ref.median_ms,
        "fused_ms": t_fused.median_ms,
        "speedup": t_ref.median_ms / t_fused.median_ms,
        "first_step_loss_ref": loss_ref,
        "first_step_loss_fused": loss,
    }
    if h.device.type == "cpu" and Path("/proc/self/clear_refs").exists():
        row["ref_peak_mib"] = peak_step_memory_mib("reference", batch, resolution, h.threads)
        row["fused_peak_mib"] = peak_step_memory_mib("ghostops", batch, resolution, h.threads)
        row["peak_memory_ratio"] = row["fused_peak_mib"] / row["ref_peak_mib"]
    return row


# --------------------------------------------------------------------------------------------
# Summary, machine info, output


def summarize(rows: list[dict]) -> list[dict]:
    """Per batch size: geometric-mean speedup over the shapes and the worst shape."""
    out = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        group = [r for r in rows if r["batch"] == batch]
        worst = min(group, key=lambda r: r["speedup"])
        out.append({
            "batch": batch,
            "shapes": len(group),
            "geomean_speedup": math.exp(sum(math.log(r["speedup"]) for r in group) / len(group)),
            "worst_speedup": worst["speedup"],
            "worst_shape": ModuleShape.from_row(worst).label,
        })  # fmt: skip
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def cpu_busy_fraction(interval: float = 0.3) -> float | None:
    """Fraction of all CPUs busy with other work over ``interval`` seconds (we sleep meanwhile);
    None where /proc/stat is missing."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(interval)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def warn_if_busy(busy: float | None) -> None:
    """Other work on the CPU (a compile, a profiler) distorts timings badly: say so."""
    if busy is not None and busy > 0.2:
        progress(
            f"warning: {100 * busy:.0f} % of the CPU was busy with other processes just before "
            "the run; the timings will be distorted"
        )


def device_slug(device: torch.device) -> str:
    """``cpu``, or ``cuda-<gpu name>`` (e.g. cuda-nvidia-h100-80gb-hbm3)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine_info(h: Harness, copy_gbps: float, copy_mib: int, busy: float | None) -> dict:
    return {
        "device": device_slug(h.device),
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(h.device) if h.device.type == "cuda" else None,
        "logical_cpus": os.cpu_count(),
        "threads": h.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": copy_gbps,
        "copy_bandwidth_method": f"{copy_mib} MiB tensor copy_, read + write, median",
        "cpu_busy_before_run": busy,
    }


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def render(result: dict) -> str:
    """The results as markdown, fit for pasting into a README."""
    m, g, s = result["machine"], result["ghostops"], result["settings"]
    where = m["gpu"] or f"{m['cpu']}, {m['threads']} threads"
    lines = [
        f"## ghostops fused vs reference: {m['device']} ({where})",
        "",
        f"{s['dtype']}{', channels_last' if s['channels_last'] else ''}, eval, no grad; "
        f"torch {m['torch']}; backend `{g['backend']}` "
        f"(available: {', '.join(g['available_backends'])}); {s['timer']}; "
        f"copy bandwidth {m['copy_bandwidth_gbps']:.1f} GB/s; peak {m['peak_gflops']:.0f} GFLOP/s "
        f"({m['peak_method']}; torch.mm 1536^3: {m['sgemm_gflops']:.0f}). % roofline: the time "
        "at whichever bound applies, bytes at the copy bandwidth or flops at the peak, over the "
        "fused time.",
    ]
    if g["backend"] == "reference":
        lines += ["", "**The fused module ran the unfused reference path (no fused kernel here).**"]
    lines += [
        "",
        "| batch | module (in->out HxW) | uses | ref ms | fused ms | speedup | fused GB/s "
        "| % copy BW | fused GFLOP/s | % roofline |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["modules"]:
        shape = ModuleShape.from_row(r)
        lines.append(
            f"| {r['batch']} | {shape.label} | {r['count']} | {fmt_ms(r['ref_ms'])} | "
            f"{fmt_ms(r['fused_ms'])} | {r['speedup']:.2f}x | {r['fused_gbps']:.1f} | "
            f"{100 * r['fraction_of_copy_bandwidth']:.0f} % | {r['fused_gflops']:.0f} | "
            f"{100 * r['roofline_fraction']:.0f} % |"
        )
    lines += render_summary(result["summary"])
    lines += render_variants(result["modules"])
    if result["model"]:
        lines += render_model(result["model"])
    elif result["model_skipped"]:
        lines += ["", f"Whole model skipped: {result['model_skipped']}."]
    lines += render_training(result)
    return "\n".join(lines)


def render_model(rows: list[dict]) -> list[str]:
    """Whole-model inference: eager reference and ghostops, and where they ran, the other
    ways (torch.compile, ONNX Runtime, AOTInductor). "best vs best": the fastest way to run the
    reference network over the fastest way to run ghostops's (eager or compiled)."""
    labels = {k: o["label"] for r in rows for k, o in r.get("others", {}).items()}
    head = "| model | batch | input | eager ref ms | ghostops ms | "
    lines = ["", head + "".join(f"{v} ms | " for v in labels.values())]
    lines[-1] += "ghostops vs eager | best vs best |"
    lines.append("|---|---:|---:|---:|---:|" + "---:|" * len(labels) + "---:|---:|")
    for r in rows:
        others = r.get("others", {})
        cells = [others.get(k, {}).get("ms") for k in labels]
        best = {"ref": r["ref_ms"], "fused": r["fused_ms"]}
        for o in others.values():
            if o["ms"] is not None:
                best[o["runs"]] = min(best[o["runs"]], o["ms"])
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['resolution']}x{r['resolution']} | "
            f"{fmt_ms(r['ref_ms'])} | {fmt_ms(r['fused_ms'])} | "
            + "".join("skipped | " if c is None else f"{fmt_ms(c)} | " for c in cells)
            + f"{r['speedup']:.2f}x | {best['ref'] / best['fused']:.2f}x |"
        )
    skipped = {o["label"]: o["skipped"] for r in rows for o in r.get("others", {}).values()
               if o["ms"] is None}  # fmt: skip
    lines += [f"\n{label} skipped: {why}." for label, why in skipped.items()]
    return lines


def render_variants(rows: list[dict]) -> list[str]:
    """Per module, ghostops' time beside the other ways to compute it (``module_variants``)."""
    rows = [r for r in rows if "variants" in r]
    if not rows:
        return []
    labels = list(dict.fromkeys(k for r in rows for k in r["variants"]))
    lines = [
        "",
        "Module variants, ms (dense: the 1x1 Conv-BN-ReLU of the same channels, which a Ghost "
        "module replaces; fused vs dense > 1 means the Ghost module is the faster):",
        "",
        "| batch | module | fused | " + " | ".join(labels) + " | fused vs dense |",
        "|---:|---|---:|" + "---:|" * len(labels) + "---:|",
    ]
    for r in rows:
        v = r["variants"]
        cells = " | ".join(fmt_ms(v[k]) if k in v else "-" for k in labels)
        lines.append(
            f"| {r['batch']} | {ModuleShape.from_row(r).label} | {fmt_ms(r['fused_ms'])} | "
            f"{cells} | {v['dense'] / r['fused_ms']:.2f}x |"
        )
    return lines


def render_summary(summary: list[dict]) -> list[str]:
    """Geometric-mean and worst speedup per batch size, as a markdown table."""
    lines = [
        "",
        "| batch | shapes | geomean speedup | worst speedup | worst shape |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['batch']} | {r['shapes']} | {r['geomean_speedup']:.2f}x | "
            f"{r['worst_speedup']:.2f}x | {r['worst_shape']} |"
        )
    return lines


def render_training(result: dict) -> list[str]:
    """The training tables: module forward + backward, and the whole-model SGD step."""
    if not result.get("train_modules") and not result.get("train_model"):
        return []
    lines = [
        "",
        "Training (train mode, batch statistics): module forward + backward (gradients of the "
        "input and every parameter); whole model: one SGD step with cross-entropy.",
    ]
    if result["train_modules"]:
        lines += [
            "",
            "| batch | module (in->out HxW) | ref fwd+bwd ms | fused fwd+bwd ms | speedup |",
            "|---:|---|---:|---:|---:|",
        ]
        for r in result["train_modules"]:
            lines.append(
                f"| {r['batch']} | {ModuleShape.from_row(r).label} | {fmt_ms(r['ref_ms'])} | "
                f"{fmt_ms(r['fused_ms'])} | {r['speedup']:.2f}x |"
            )
        lines += render_summary(result["train_summary"])
    if result["train_model"]:
        lines += [
            "",
            "| model | batch | input | ref step ms | ghostops step ms | speedup | ref peak MiB "
            "| ghostops peak MiB | memory ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["train_model"]:
            memory = (
                f"{r['ref_peak_mib']:.0f} | {r['fused_peak_mib']:.0f} | "
                f"{100 * r['peak_memory_ratio']:.0f} %"
                if "ref_peak_mib" in r
                else "- | - | -"
            )
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['resolution']}x{r['resolution']} | "
                f"{fmt_ms(r['ref_ms'])} | {fmt_ms(r['fused_ms'])} | {r['speedup']:.2f}x | "
                f"{memory} |"
            )
    return lines


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and weights")
    p.add_argument(
        "--quick",
        action="store_true",
        help="fast pass: batch 1 and 8, 6 shapes, short runs; writes <device>-quick.json",
    )
    p.add_argument(
        "--batch", type=int, nargs="+", help="module batch sizes (default 1 32; quick: 1 8)"
    )
    p.add_argument(
        "--shapes", type=int, help="time N of the unique shapes, evenly spread over the network"
    )
    p.add_argument(
        "--min-run-time", type=float, help="seconds per timing (default 0.5; quick: 0.1)"
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: torch.get_num_threads())")
    p.add_argument("--no-model", action="store_true", help="skip the whole-GhostNet timing")
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="whole model: skip torch.compile, AOTInductor and ONNX Runtime (always skipped "
        "with --quick)",
    )
    p.add_argument(
        "--model-batch",
        type=int,
        nargs="+",
        help="whole-model batch sizes (default 1 32; quick: 1)",
    )
    p.add_argument(
        "--resolution", type=int, default=224, help="whole-model input size (default 224)"
    )
    p.add_argument("--copy-mib", type=int, default=256, help="size of the bandwidth-measuring copy")
    p.add_argument(
        "--module-variants",
        action="store_true",
        help="per module also time the dense 1x1 Conv-BN-ReLU, torch.compile(ref) (one compile "
        "per shape and batch: minutes) and, on a GPU, each backend and Triton eval form",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training timings")
    p.add_argument(
        "--train-batch", type=int, nargs="+", help="module training batch sizes (default 32)"
    )
    p.add_argument(
        "--model-train-batch",
        type=int,
        nargs="+",
        help="whole-model training-step batch sizes (default 32; quick: 2)",
    )
    p.add_argument("--peak-memory", choices=("reference", "ghostops"), help=argparse.SUPPRESS)
    p.add_argument(
        "--shapes-file", type=Path, help=f"module shape list (default {SHAPES_FILE_NAME})"
    )
    p.add_argument(
        "--out", type=Path, help="JSON output (default bench/results/<device>[-quick].json)"
    )
    return p.parse_args(argv)


def make_harness(args: argparse.Namespace, min_run_time: float) -> Harness:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fused_vs_ref: --device cuda, but torch sees no GPU")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    use_do_bench = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the reference gets its best cuDNN algorithms
        try:
            import triton.testing  # noqa: F401

            use_do_bench = True
        except ImportError:
            progress("triton is missing: timing with torch.utils.benchmark (CUDA-synchronised)")
    return Harness(
        device,
        DTYPES[args.dtype],
        args.channels_last,
        min_run_time,
        torch.get_num_threads(),
        use_do_bench,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; return the exit status."""
    args = parse_args(argv)
    if args.peak_memory:  # the child process of peak_step_memory_mib
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        batch = (args.model_train_batch or FULL["model_train_batches"])[0]
        print(measure_peak_memory(args.peak_memory, batch, args.resolution))
        return 0
    preset = QUICK if args.quick else FULL
    batches = tuple(args.batch or preset["batches"])
    model_batches = () if args.no_model else tuple(args.model_batch or preset["model_batches"])
    min_run_time = args.min_run_time if args.min_run_time is not None else preset["min_run_time"]
    shapes_file = args.shapes_file or find_shapes_file()
    all_shapes = load_shapes(shapes_file)
    shapes = spread(all_shapes, args.shapes if args.shapes is not None else preset["shapes"])
    h = make_harness(args, min_run_time)
    busy = cpu_busy_fraction()
    warn_if_busy(busy)
    torch.manual_seed(0)

    backend = select_backend(h.device.type)
    copy_gbps = copy_bandwidth(h, args.copy_mib)
    sgemm = sgemm_gflops(h)
    peak, peak_method = peak_gflops(h, sgemm)
    compare = preset["compare"] and not args.no_compare
    variants_on = args.module_variants
    progress(
        f"{device_slug(h.device)}, {h.threads} threads, backend {backend!r}, "
        f"copy bandwidth {copy_gbps:.1f} GB/s, peak {peak:.0f} GFLOP/s, sgemm {sgemm:.0f}; "
        f"{len(shapes)}/{len(all_shapes)} shapes x batch {batches}"
    )

    rows, model_rows, model_skipped = [], [], None
    with torch.no_grad():
        cases = [(b, s) for b in batches for s in shapes]
        for i, (batch, shape) in enumerate(cases, 1):
            row = bench_module(h, shape, batch, copy_gbps, peak, variants_on)
            rows.append(row)
            progress(
                f"[{i:>2}/{len(cases)}] batch {batch:>3} {shape.label:<22} "
                f"ref {fmt_ms(row['ref_ms']):>7} ms  fused {fmt_ms(row['fused_ms']):>7} ms  "
                f"{row['speedup']:.2f}x"
                + "".join(f"  {k} {fmt_ms(v)}" for k, v in row.get("variants", {}).items())
            )
        if model_batches:
            try:
                ref_model, fused_model = build_models(h)
            except NotImplementedError:
                model_skipped = "ghostops.models.ghostnet is not implemented yet"
                progress(f"whole model skipped: {model_skipped}")
            else:
                for batch in model_batches:
                    row = bench_model(h, ref_model, fused_model, batch, args.resolution, compare)
                    model_rows.append(row)
                    others = "".join(
                        f"  {o['label']} {fmt_ms(o['ms'])} ms"
                        for o in row.get("others", {}).values()
                        if o["ms"] is not None
                    )
                    progress(
                        f"[model] batch {batch:>3} ghostnet-{WIDTH}x "
                        f"{args.resolution}x{args.resolution}  ref {fmt_ms(row['ref_ms'])} ms  "
                        f"ghostops {fmt_ms(row['fused_ms'])} ms  {row['speedup']:.2f}x{others}"
                    )
    if args.no_model:
        model_skipped = "--no-model"

    train_batches = () if args.no_train else tuple(args.train_batch or preset["train_batches"])
    model_train_batches = (
        ()
        if args.no_train or args.no_model
        else tuple(args.model_train_batch or preset["model_train_batches"])
    )
    train_rows, model_train_rows = [], []
    cases = [(b, s) for b in train_batches for s in shapes]
    for i, (batch, shape) in enumerate(cases, 1):
        row = bench_module_train(h, shape, batch)
        train_rows.append(row)
        progress(
            f"[train {i:>2}/{len(cases)}] batch {batch:>3} {shape.label:<22} "
            f"ref {fmt_ms(row['ref_ms']):>7} ms  fused {fmt_ms(row['fused_ms']):>7} ms  "
            f"{row['speedup']:.2f}x"
        )
    for batch in model_train_batches:
        row = bench_model_train(h, batch, args.resolution)
        model_train_rows.append(row)
        memory = (
            f"  peak {row['ref_peak_mib']:.0f} vs {row['fused_peak_mib']:.0f} MiB"
            if "ref_peak_mib" in row
            else ""
        )
        progress(
            f"[train model] batch {batch:>3} ref {fmt_ms(row['ref_ms'])} ms  "
            f"ghostops {fmt_ms(row['fused_ms'])} ms  {row['speedup']:.2f}x{memory}"
        )

    result = {
        "benchmark": "ghostops fused Ghost module vs unfused reference (bench/fused_vs_ref.py)",
        "quick": args.quick,
        "machine": {
            **machine_info(h, copy_gbps, args.copy_mib, busy),
            "peak_gflops": peak,
            "peak_method": peak_method,
            "sgemm_gflops": sgemm,
        },
        "ghostops": {
            "version": ghostops.__version__,
            "available_backends": ghostops.available_backends(),
            "backend": backend,
        },
        "settings": {
            "dtype": args.dtype,
            "channels_last": args.channels_last,
            "mode": "eval, torch.no_grad(); training: forward + backward, batch statistics",
            "timer": h.timer_name,
            "min_run_time_s": min_run_time,
            "batches": list(batches),
            "model_batches": list(model_batches),
            "train_batches": list(train_batches),
            "model_train_batches": list(model_train_batches),
            "shapes_file": str(shapes_file),
            "width": WIDTH,
            "module_config": {"kernel_size": 1, "ratio": 2, "dw_size": 3, "stride": 1},
            "bytes": "input + output + floating-point parameters and buffers, each once",
            "flops": "2 x multiply-adds: primary 1x1 conv + kept ghost channels' depthwise conv",
            "roofline": "max(bytes / copy bandwidth, flops / peak FMA rate) / measured time",
            "tolerance": dataclasses.asdict(h.tolerance),
        },
        "modules": rows,
        "summary": summarize(rows),
        "model": model_rows,
        "model_skipped": model_skipped,
        "train_modules": train_rows,
        "train_summary": summarize(train_rows),
        "train_model": model_train_rows,
    }
    out = args.out or RESULTS_DIR / f"{device_slug(h.device)}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    progress(f"wrote {out}")
    try:
        import plot
    except ImportError as e:  # matplotlib missing
        progress(f"no plot: {e}")
    else:
        png = plot.plot_speedups(result, out.with_name(out.stem + "-speedups.png"))
        progress(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
