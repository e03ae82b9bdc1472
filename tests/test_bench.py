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
    (summary,) = result["summary"]
    assert summary["batch"] == 1 and summary["shapes"] == 2 and summary["geomean_speedup"] > 0
    assert result["model"] == [] and result["model_skipped"] == "--no-model"
    train = result["train_modules"]
    assert [(r["in_channels"], r["batch"]) for r in train] == [(16, 2), (960, 2)]
    for r in train:
        assert r["ref_ms"] > 0 and r["fused_ms"] > 0 and r["max_rel_err"] < 1e-3
    assert result["train_summary"][0]["shapes"] == 2 and result["train_model"] == []

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
