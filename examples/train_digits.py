"""Train a small GhostNet on scikit-learn's handwritten digits with ghostops, next to the same
network built from the paper's unfused Ghost modules, from the same initial weights.

    pip install scikit-learn      # the data set; ghostops itself does not need it
    python examples/train_digits.py [--epochs 8] [--size 32] [--threads N] [--double]

Prints, per epoch and for both networks, the training loss, the test accuracy and the seconds
the epoch took. Both networks see the same batches in the same order. In float32 the fused and
the unfused arithmetic round differently, and training amplifies that step after step (float32
and float64 runs of one network drift apart the same way), so the two curves follow each other
without being equal; with --double they agree to the digits printed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import ghostops
from ghostops.nn import GhostBottleneck


def small_ghostnet(num_classes: int = 10) -> nn.Module:
    """Stem, five Ghost bottlenecks (two with stride 2, one with squeeze-excite), head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        GhostBottleneck(16, 16, 16),
        GhostBottleneck(16, 48, 24, stride=2),
        GhostBottleneck(24, 72, 24),
        GhostBottleneck(24, 72, 40, dw_kernel_size=5, stride=2, se_ratio=0.25),
        GhostBottleneck(40, 120, 40),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(40, num_classes),
    )


def load_digits(size: int) -> tuple[torch.Tensor, ...]:
    """Digits (8x8, 16 grey levels) scaled to size x size, standardised; 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install scikit-learn")
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item()
                      for xb, yb in zip(x.split(256), y.split(256), strict=True))  # fmt: skip
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image size (default 32)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument(
        "--double",
        action="store_true",
        help="float64: rounding no longer drifts the two runs apart, the curves agree",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x_train, y_train, x_test, y_test = load_digits(args.size)
    torch.manual_seed(0)
    fused = small_ghostnet()
    if args.double:
        fused, x_train, x_test = fused.double(), x_train.double(), x_test.double()
    reference = ghostops.revert(copy.deepcopy(fused))  # the paper's modules, same weights
    nets = {"ghostops": fused, "reference": reference}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
            for k, m in nets.items()}  # fmt: skip
    print(f"digits: {len(y_train)} train / {len(y_test)} test images at {args.size}x"
          f"{args.size}; backends {ghostops.available_backends()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'epoch':>5} | {'ghostops loss  acc    s/epoch':<30} | reference loss  acc    s/epoch")
    totals = dict.fromkeys(nets, 0.0)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        cells = []
        for name, model in nets.items():
            model.train()
            start, loss_sum = time.perf_counter(), 0.0
            for idx in order.split(args.batch):
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                opts[name].zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                opts[name].step()
                loss_sum += loss.item() * len(idx)
            seconds = time.perf_counter() - start
            totals[name] += seconds
            acc = evaluate(model, x_test, y_test)
            cells.append(f"{loss_sum / len(y_train):>13.4f} {100 * acc:5.1f}% {seconds:8.2f}")
        print(f"{epoch:>5} | {cells[0]:<30} | {cells[1]}", flush=True)
    speedup = totals["reference"] / totals["ghostops"]
    print(f"training time: ghostops {totals['ghostops']:.1f} s, reference "
          f"{totals['reference']:.1f} s ({speedup:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
