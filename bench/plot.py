"""A PNG of the per-shape speedups in a fused_vs_ref.py result: one horizontal bar per GhostNet
module shape for each eval batch size and for training (forward + backward), ghostops over
the unfused reference, on a log axis with 1x marked. Needs matplotlib (pip install matplotlib).

    python bench/plot.py bench/results/cpu.json     # -> bench/results/cpu-speedups.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _label(row: dict) -> str:
    act = "" if row["relu"] else " (no act)"
    h, w = row["height"], row["width"]
    return f"{row['in_channels']}->{row['out_channels']} {h}x{w}{act}"


def series(result: dict) -> dict[str, dict[str, float]]:
    """{series name: {shape label: speedup}}, in the result's order."""
    out: dict[str, dict[str, float]] = {}
    for r in result.get("modules", []):
        out.setdefault(f"eval, batch {r['batch']}", {})[_label(r)] = r["speedup"]
    for r in result.get("train_modules", []):
        out.setdefault(f"training fwd+bwd, batch {r['batch']}", {})[_label(r)] = r["speedup"]
    return out


def plot_speedups(result: dict, path: Path) -> Path:
    """Draw the speedups of ``result`` (the JSON of fused_vs_ref.py) into ``path``."""
    data = series(result)
    if not data:
        raise ValueError("the result has no module rows to plot")
    shapes = list(dict.fromkeys(label for s in data.values() for label in s))
    height = 0.8 / len(data)
    fig, ax = plt.subplots(figsize=(9, 0.34 * len(shapes) * max(1, len(data) / 2) + 1.6))
    for i, (name, values) in enumerate(data.items()):
        ys = [shapes.index(label) + (i - (len(data) - 1) / 2) * height for label in values]
        ax.barh(ys, list(values.values()), height=height, label=name)
    ax.set_xscale("log")
    speedups = [v for s in data.values() for v in s.values()]
    lo, hi = min(min(speedups), 1.0), max(speedups)
    ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo / 2 <= t <= hi * 2]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shapes)), shapes, fontsize=8)
    ax.invert_yaxis()  # network order, top to bottom
    ax.set_xlabel("speedup of ghostops over the unfused reference (log scale; 1x = same speed)")
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} threads"
    dtype = result["settings"]["dtype"]
    ax.set_title(f"GhostNet-1.0x Ghost modules, {dtype}: {where}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    print(plot_speedups(json.loads(src.read_text()), src.with_name(src.stem + "-speedups.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
