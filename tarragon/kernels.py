"""The hot matmuls of both workers, with weights packed once at load.

A decode step multiplies a few rows by each weight matrix, so on a CPU the BLAS call's cost is
mostly re-packing the weight into its kernel's blocked layout, every call (MKL's sgemm copy
routines: more time than the multiply for an expert at 8-16 rows). oneDNN can pack a weight once
(`_reorder_linear_weight`) and multiply by the packed form (`_linear_pointwise`): the expert FFN of
the bench model at 8-16 rows takes ~0.7x the time of `torch.mm` over the same 32 experts, and
each row's result does not depend on what it is batched with (a replayed row is bit-identical).
These ops are torch's own (its CPU compiler uses them); where they are missing, or for other
devices and dtypes, the plain `F.linear` runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear:
    """y = x @ weight.T (+ bias) for 2-D x, the weight packed for the CPU when it pays."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias, self.itemsize = bias, weight.element_size()
        self.packed = weight.device.type == "cpu" and _onednn() and (
            weight.dtype == torch.float32 or weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        # The packed copy replaces the weight: it is the only one kept.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()) if self.packed else weight

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.itemsize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """The block's torch ops on `n` threads, then back: for one large op (the LM head) at a moment
    the other cores would idle. Idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, launcher.py)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
