"""Shared fixtures of the test suite."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors (slowly): set before
# triton is first imported (DESIGN.md section 5).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_outputs():
    """Every fresh tensor, the kernel's output included, starts as NaN: an element the kernel
    fails to write cannot pass for a right answer."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous)
