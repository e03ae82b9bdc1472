"""Smoke tests of bench/fused_vs_ref.py: it runs, checks outputs and writes its JSON (fast)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import ghostops

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fused_vs_ref.py"

# The quickest settings: tiny timings, a small copy, batch 1.
FAST = ["--quick", "--batch", "1", "--train-batch", "2", "--min-run-time", "0.001",
        "--copy-mib", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    """bench/fused_vs_ref.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("fused_vs_ref", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_shapes_are_the_unique_ghostnet_shapes(bench):
    shapes = bench.load_shapes(bench.find_shapes_file())
    assert len(shapes) == len(set(shapes)) == 22
    assert sum(s.count for s in shapes) == 32
    assert shapes[0] == bench.ModuleShape(16, 16, 112, 112, True, count=1)


def test_spread_keeps_first_and_last(bench):
    items = list(range(22))
    assert bench.spread(items, 2) == [0, 21]
    assert bench.spread(items, 6) == [0, 4, 8, 13, 17, 21]
    assert bench.spread(items, 1) == [0]
    assert bench.spread(items, None) == items
    assert bench.spread(items, 50) == items


def test_module_variants(bench, tmp_path, capsys):
    """--module-variants: the dense 1x1 Conv-BN-ReLU and torch.compile(ref) beside the fused
    module (on the CPU no other backend), in the JSON and the markdown table."""
    out = tmp_path / "cpu.json"
    args = [*FAST, "--shapes", "1", "--no-model", "--no-train", "--module-variants"]
    assert bench.main([*args, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["modules"]
    assert set(row["variants"]) == {"dense", "compile(ref)"}
    assert all(ms > 0 for ms in row["variants"].values())
    table = capsys.readouterr().out
    assert "| batch | module | fused | dense | compile(ref) | fused vs dense |" in table
    assert bench.gpu_backend_runs(torch.device("cpu")) == []


def test_quick_run_writes_results(bench, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert bench.main([*FAST, "--shapes", "2", "--no-model", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["quick"] is True
    machine = result["machine"]
    assert machine["device"] == "cpu"
    assert machine["threads"] == torch.get_num_threads()
    assert machine["torch"] == torch.__version__
    assert machine["copy_bandwidth_gbps"] > 0
    assert {"cpu", "date"} <= machine.keys()
    assert result["ghostops"]["available_backends"] == ghostops.available_backends()
    assert result["ghostops"]["backend"] in result["ghostops"]["available_backends"]

    rows = result["modules"]
    assert [(r["in_channels"], r["out_channels"], r["batch"]) for r in rows] == [
        (16, 16, 1),
        (960, 160, 1),
    ]
    for r in rows:
        assert r["ref_ms"] > 0 and r["fused_ms"] > 0 and r["fused_gbps"] > 0
        assert r["speedup"] == pytest.approx(r["ref_ms"] / r["fused_ms"])
        assert r["rel_err"] < 1e-4
    assert r["bytes"] == 4 * (1 * 960 * 7 * 7 + 1 * 160 * 7 * 7 + 960 * 80 + 80 * 9 + 4 * 160)
    assert r["flops"] == 2 * 7 * 7 * (960 * 80 + 80 * 9)
    assert machine["sgemm_gflops"] > 0 and machine["peak_gflops"] > 0
    for r in rows:
        assert r["fused_gflops"] == pytest.approx(r["flops"] / r["fused_ms"] / 1e6)
        bound_ms = (
            max(
                r["bytes"] / machine["copy_bandwidth_gbps"],
                r["flops"] / machine["peak_gflops"],
            )
            / 1e6
        )
        assert r["roofline_ms"] == pytest.approx(bound_ms)
        assert r["roofline_fraction"] == pytest.approx(bound_ms / r["fused_ms"])
    (summary,) = result["summary"]
    assert summary["batch"] == 1 and summary["shapes"] == 2 and summary["geomean_speedup"] > 0
    assert result["model"] == [] and result["model_skipped"] == "--no-model"
    train = result["train_modules"]
    assert [(r["in_channels"], r["batch"]) for r in train] == [(16, 2), (960, 2)]
    for r in train:
        assert r["ref_ms"] > 0 and r["fused_ms"] > 0 and r["max_rel_err"] < 1e-3
    assert result["train_summary"][0]["shapes"] == 2 and result["train_model"] == []
    png = tmp_path / "cpu-speedups.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = capsys.readouterr().out
    assert "| batch | module (in->out HxW) |" in table and "960->160 7x7" in table


def test_whole_model_row(bench, tmp_path):
    """The whole-GhostNet case, at a small input so that it stays fast. The training step has
    2x2 maps at the end: with 1x1 maps and batch 2, the last BatchNorms see two values per
    channel and amplify rounding differences past any fixed tolerance."""
    out = tmp_path / "model.json"
    args = [*FAST, "--shapes", "1", "--model-batch", "1", "--model-train-batch", "4",
            "--resolution", "64", "--out", str(out)]  # fmt: skip
    bench.main(args)
    result = json.loads(out.read_text())
    (row,) = result["model"]
    assert row["model"] == "ghostnet-1.0x" and row["batch"] == 1 and row["resolution"] == 64
    assert row["ghost_modules"] == 32
    assert row["ref_ms"] > 0 and row["fused_ms"] > 0 and row["rel_err"] < 1e-3
    (train,) = result["train_model"]
    assert train["batch"] == 4 and train["ref_ms"] > 0 and train["fused_ms"] > 0
    assert train["first_step_loss_fused"] == pytest.approx(train["first_step_loss_ref"], rel=1e-3)
    assert train["ref_peak_mib"] > 0 and train["fused_peak_mib"] > 0


def test_wrong_kernel_fails_loudly(bench, tmp_path, monkeypatch):
    """A fused module that returns a wrong answer must stop the benchmark, not be timed."""
    forward = ghostops.GhostModule.forward
    monkeypatch.setattr(ghostops.GhostModule, "forward", lambda self, x: forward(self, x) * 1.01)
    out = tmp_path / "wrong.json"
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench.main([*FAST, "--shapes", "1", "--no-model", "--out", str(out)])
    assert not out.exists()


def _module_pair(bench):
    """A small reference Ghost module and the ghostops one with its weights, eval mode."""
    ref = bench.randomize_batchnorm(bench.ReferenceGhostModule(16, 16)).eval()
    fused = ghostops.GhostModule(16, 16).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_competitors_run_checked_and_timed(bench):
    """torch.compile and AOTInductor of both networks and ONNX Runtime (where installed) on a
    small module: each is checked against the eager reference, then timed."""
    h = bench.make_harness(bench.parse_args(["--min-run-time", "0.001"]), 0.001)
    ref, fused = _module_pair(bench)
    x = torch.randn(2, 16, 9, 11)
    with torch.no_grad():
        others = bench.bench_competitors(h, ref, fused, x, ref(x), "test")
    assert list(others) == [
        "compile_ref",
        "onnxruntime",
        "compile_ghostops",
        "aoti_ref",
        "aoti_ghostops",
    ]
    assert [o["runs"] for o in others.values()] == ["ref", "ref", "fused", "ref", "fused"]
    onnx_here = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx"))
    for key, o in others.items():
        if key == "onnxruntime" and not onnx_here:
            assert o["ms"] is None and "not installed" in o["skipped"]
            continue
        assert o["ms"] is not None, f"{o['label']} did not run: {o.get('skipped')}"
        assert o["ms"] > 0 and o["setup_s"] > 0 and o["rel_err"] < 1e-5


def test_a_failed_onnx_export_is_reported_not_raised(bench, monkeypatch):
    pytest.importorskip("onnxruntime")  # without it the runner stops before exporting

    def broken_export(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    ref, _ = _module_pair(bench)
    with pytest.raises(bench.competitors.Unavailable, match="export failed: no exporter here"):
        bench.competitors.onnxruntime_runner(ref, torch.randn(1, 16, 5, 5), 1)


def test_a_failed_aot_compile_is_reported_not_raised(bench, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(torch.export, "export", broken_export)
    ref, _ = _module_pair(bench)
    with pytest.raises(bench.competitors.Unavailable, match="AOTInductor failed: no exporter"):
        bench.competitors.aot_inductor(ref, torch.randn(1, 16, 5, 5))


def test_wrong_competitor_fails_loudly(bench, monkeypatch):
    h = bench.make_harness(bench.parse_args(["--min-run-time", "0.001"]), 0.001)
    ref, fused = _module_pair(bench)
    x = torch.randn(1, 16, 5, 5)
    monkeypatch.setattr(bench.competitors, "compiled", lambda m, x: (lambda x: m(x) * 1.01, 0.0))
    with torch.no_grad(), pytest.raises(AssertionError, match="torch.compile.*differs"):
        bench.bench_competitors(h, ref, fused, x, ref(x), "test")


def test_model_table_best_vs_best(bench):
    """ "best vs best": the fastest way to run the reference over the fastest ghostops way."""
    row = {"model": "ghostnet-1.0x", "batch": 1, "resolution": 224, "ref_ms": 20.0,
           "fused_ms": 10.0, "speedup": 2.0, "others": {
               "compile_ref": {"label": "torch.compile(ref)", "runs": "ref", "ms": 8.0},
               "onnxruntime": {"label": "ONNX Runtime", "runs": "ref", "ms": None,
                               "skipped": "onnxruntime is not installed"},
               "compile_ghostops": {"label": "torch.compile(ghostops)", "runs": "fused",
                                    "ms": 4.0}}}  # fmt: skip
    text = "\n".join(bench.render_model([row]))
    assert "| 20.00 | 10.00 | 8.000 | skipped | 4.000 | 2.00x | 2.00x |" in text
    assert "ONNX Runtime skipped: onnxruntime is not installed." in text
