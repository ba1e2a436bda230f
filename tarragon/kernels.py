"""The hot matmuls of both workers, with weights packed once at load.

A decode step multiplies a few rows by each weight matrix, so on a CPU the BLAS call's cost is
mostly re-packing the weight into its kernel's blocked layout, every call (MKL's sgemm copy
routines: more time than the multiply for an expert at 8-16 rows). oneDNN can pack a weight once
(`_reorder_linear_weight`) and multiply by the packed form (`_linear_pointwise`): the expert FFN of
the bench model at 8-16 rows takes ~0.7x the time of `torch.mm` over the same 32 experts, and
each row's result does not depend on what it is batched with (a replayed row is bit-identical).
These ops are torch's own (its CPU compiler uses them); where they are missing, or for other
devices and dtypes, the plain `F.linear` runs.

An expert worker's layer runs faster still as one grouped kernel over all its experts
(`FusedExperts`): zentorch's fused MoE, AMD's PyTorch plugin for EPYC CPUs (vLLM-CPU can call
the same op), an optional extra (`pip install 'tarragon[zen]'`).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
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


def fused_experts_available() -> bool:
    """zentorch's fused MoE op is installed, and not switched off (TARRAGON_EXPERT_KERNEL=torch).
    Only its op library is loaded: importing the package also sets up its torch.compile backend
    (about 2 s at every expert worker's start, for nothing used here)."""
    if os.environ.get("TARRAGON_EXPERT_KERNEL", "auto") == "torch":
        return False
    if not hasattr(torch.ops.zentorch, "zentorch_fused_moe"):
        spec = importlib.util.find_spec("zentorch")
        libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")) if spec and spec.submodule_search_locations else []
        if not libs:
            return False
        try:
            torch.ops.load_library(libs[0])
        except OSError:  # built for another torch
            return False
    return hasattr(torch.ops.zentorch, "zentorch_fused_moe") and _fused_experts_work()


PLANS = 4096  # padding plans a FusedExperts keeps (see FusedExperts._padding)
_KEPT: list["FusedExperts"] = []  # the self-check's weights, never freed (below)


@functools.cache
def _fused_experts_work() -> bool:
    """One small call, checked against the plain formula: a CPU the library does not support
    raises or gives garbage here, not in the middle of serving. The kernel caches its packed
    weights by their address, so these weights are kept: no later weight may reuse it."""
    g = torch.Generator().manual_seed(0)
    gate_up, down, x = torch.randn(2, 32, 16, generator=g), torch.randn(2, 16, 16, generator=g), torch.randn(4, 16, generator=g)
    _KEPT.append(FusedExperts(list(gate_up), list(down)))
    try:
        y = _KEPT[-1](x, [0, 1], [2, 2])
    except RuntimeError:
        return False
    gate, up = torch.cat([F.linear(x[:2], gate_up[0]), F.linear(x[2:], gate_up[1])]).chunk(2, dim=-1)
    want = torch.cat([F.linear(r, w) for r, w in zip((F.silu(gate) * up).split(2), down)])
    return torch.allclose(y, want, atol=1e-3, rtol=1e-3)


class FusedExperts:
    """One layer's experts on this worker, run as one grouped kernel: rows of every expert in a
    single call, so each expert's weights stream from memory once: 1.2-1.7x less time than one
    oneDNN call per expert (bench model, 2-128 rows a layer, cold weights: bench/expert_kernels.py).

    The kernel computes an expert that has one row differently from one that has several, needs
    two experts with rows, and caches its packed form of a weight by the weight's address (each
    layer's stacks are made once, kept, and always passed whole). So that a row's result never
    depends on what it is batched with (a replayed row must be bit-identical), a single row is
    computed twice, and a call with one expert gets two spare rows on another: on a worker
    holding one expert of the layer, a zero expert stacked beside it. Float32 SwiGLU experts
    only (gate rows, then up rows)."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor]):
        if len(gate_up) == 1:
            gate_up, down = gate_up + [torch.zeros_like(gate_up[0])], down + [torch.zeros_like(down[0])]
        self.w13 = torch.stack(gate_up).contiguous()  # [experts, 2I, H]
        self.w2 = torch.stack(down).contiguous()  # [experts, H, I]
        self.ones = torch.ones(64, 1)
        self._plans: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # see _padding

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def __call__(self, x: torch.Tensor, experts: list[int], counts: list[int]) -> torch.Tensor:
        """x: rows grouped by expert, `counts[i]` rows for stacked expert `experts[i]`."""
        padded = len(experts) < 2 or 1 in counts
        if padded:
            rows, ids, keep = self._padding(experts, counts)
            x = x.index_select(0, rows)
        else:
            ids = torch.tensor([e for e, n in zip(experts, counts) for _ in range(n)], dtype=torch.int32)[:, None]
        n = x.shape[0]
        if self.ones.shape[0] < n:  # the kernel's per-row weights: always 1 here (kept, grown as needed)
            self.ones = torch.ones(max(n, 2 * self.ones.shape[0]), 1)
        out = torch.empty_like(x)
        torch.ops.zentorch.zentorch_fused_moe(out, x, self.w13, self.w2, None, None, self.ones[:n], ids, True, "silu")
        return out.index_select(0, keep) if padded else out

    def _padding(self, experts: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a call with single rows or a single expert: which input rows the kernel gets (single
        rows twice, a spare expert's two), its expert ids, and which output rows are kept. Small
        batches repeat the same few patterns: kept (at most PLANS of them)."""
        key = (*experts, -1, *counts)
        plan = self._plans.get(key)
        if plan is None:
            ids, rows, keep, start = [], [], [], 0
            for e, n in zip(experts, counts):
                keep += range(len(rows), len(rows) + n)
                ids += [e] * max(n, 2)
                rows += range(start, start + n)
                if n == 1:
                    rows.append(start)
                start += n
            if len(experts) < 2:  # a spare expert with two rows (discarded)
                ids += [1 if experts[0] == 0 else 0] * 2
                rows += [0, 0]
            if len(self._plans) >= PLANS:
                self._plans.clear()
            plan = self._plans[key] = torch.tensor(rows), torch.tensor(ids, dtype=torch.int32)[:, None], torch.tensor(keep)
        return plan
