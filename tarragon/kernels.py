"""The hot matmuls of both workers, with weights packed once at load.

A decode step multiplies a few rows by each weight matrix, so on a CPU the work is streaming each
weight once, and a BLAS call adds its set-up and (MKL) a copy of the weight into its kernel's
blocked layout every call: more time than the multiply at 1-16 rows. So float32 weights are
packed once, at load, in the layout of a small C kernel (csrc/kernels.c, built at first use:
native.py), which reads each once per call: `Linear` (one weight; the attention worker's
projections and LM head), `FusedExperts` (an expert worker's layer: all its experts in one call).
A row's result does not depend on what it is batched with (a replayed row is bit-identical).
Where the kernel is not built (no compiler, TARRAGON_MATMUL_KERNEL=torch), and for bf16, oneDNN's
packed weights (`_reorder_linear_weight`, `_linear_pointwise`, torch's own ops) run; for other
devices the plain `F.linear`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import native

log = logging.getLogger(__name__)
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


SPLIT_COLUMNS = 1024  # a call with this many output columns or more uses torch's thread count (up to 2)


class Linear:
    """y = x @ weight.T (+ bias) over x's last dimension, the weight packed once at load: float32
    on a CPU in csrc/kernels.c's layout (`pack`) for its C kernel, at any number of rows (up to
    1.5x less time than MKL or oneDNN from 1 to 1,024 rows here: bench/linear_kernels.py), on two
    threads for wide outputs where torch is given two (the LM head, while the expert workers
    wait); bf16 in oneDNN's layout where the CPU has it; plain `F.linear` elsewhere, and for
    outputs narrower than the kernel's block (a router: MKL is faster there). The packed copy
    replaces the weight: it is the only one kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias, self.itemsize, self.dtype = bias, weight.element_size(), weight.dtype
        cpu = weight.device.type == "cpu"
        lib = c_kernels() if cpu and weight.dtype == torch.float32 else None
        self.c = lib is not None and self.out_features >= lib.tarragon_block_width()
        self.onednn = not self.c and cpu and _onednn() and self.out_features >= 64 and (
            weight.dtype == torch.float32 or weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if self.c:
            block = lib.tarragon_block_width()
            self.weight = pack(weight, block)  # [blocks, in, block]
            if bias is not None:
                self.bias = torch.zeros(self.weight.shape[0] * block, dtype=bias.dtype)
                self.bias[: self.out_features] = bias
            self._call = lib.tarragon_linear_f32
            self._args = (self.weight.data_ptr(), self.bias.data_ptr() if bias is not None else None, self.in_features, self.out_features)
            self._split = self.out_features >= SPLIT_COLUMNS
        elif self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        else:
            self.weight = weight

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.itemsize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.c:
            flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            if flat.stride(-1) != 1 or flat.dtype != torch.float32:
                flat = flat.contiguous().float()
            rows = flat.shape[0]
            y = torch.empty(rows, self.out_features)
            self._call(flat.data_ptr(), flat.stride(0), rows, *self._args, y.data_ptr(), self.out_features,
                       torch.get_num_threads() if self._split else 1)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        if self.onednn:
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


@functools.cache
def _lib():
    """csrc/kernels.c, loaded and self-checked, or None (the reason is logged once)."""
    try:
        lib = native.library("kernels.c")
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("C matmul kernels unavailable (%s): torch's instead", native.failure(e))
        return None
    lib.tarragon_block_width.restype = ctypes.c_int64
    lib.tarragon_linear_f32.argtypes = [_P, _I, _I, _P, _P, _I, _I, _P, _I, ctypes.c_int]
    lib.tarragon_linear_f32.restype = None
    lib.tarragon_swiglu_experts_f32.argtypes = [_P, _P, _I, _I, _I, _P, _P, _P, _P]
    lib.tarragon_swiglu_experts_f32.restype = ctypes.c_int
    if not _experts_work(lib):
        log.warning("the C expert kernel disagrees with torch on this machine: torch's matmuls instead")
        return None
    return lib


def pack(w: torch.Tensor, block: int, k: int | None = None) -> torch.Tensor:
    """w [N, K] in the C kernel's layout: [ceil(N / block), k, block], w[n, :] in column n % block of
    block n // block, zeros past N (and past K, up to `k`)."""
    n, kw = w.shape
    k = k or kw
    padded = torch.zeros(-(-n // block) * block, k, dtype=w.dtype)
    padded[:n, :kw] = w
    return padded.view(-1, block, k).transpose(1, 2).contiguous()


def c_kernels():
    """csrc/kernels.c's library where it is built and checked here, and not switched off
    (TARRAGON_MATMUL_KERNEL=torch: torch's matmuls, oneDNN-packed where it can); else None."""
    return None if os.environ.get("TARRAGON_MATMUL_KERNEL", "auto") == "torch" else _lib()


def _experts_work(lib) -> bool:
    """One small call of odd sizes, checked against the plain formula: a miscompiled or
    mis-declared kernel fails here, not in the middle of serving."""
    g = torch.Generator().manual_seed(0)
    gate_up, down, x = torch.randn(3, 2 * 40, 24, generator=g), torch.randn(3, 24, 40, generator=g), torch.randn(9, 24, generator=g)
    y = FusedExperts(list(gate_up), list(down), lib)(x, [2, 0], [7, 2])
    want = []
    for rows, e in ((x[:7], 2), (x[7:], 0)):
        gate, up = F.linear(rows, gate_up[e]).chunk(2, dim=-1)
        want.append(F.linear(F.silu(gate) * up, down[e]))
    return torch.allclose(y, torch.cat(want), atol=1e-4, rtol=1e-4)


class FusedExperts:
    """One layer's SwiGLU experts on this worker, run by one call of C (csrc/kernels.c): rows
    grouped by expert, each expert's gate/up and down weights read once, packed at load in the
    kernel's layout. At decode sizes (1-16 rows an expert) 1.3-1.7x less time than zentorch's
    fused MoE and more still than one oneDNN call per expert (bench/expert_kernels.py); a row's
    result never depends on what it is batched with (a replayed row is bit-identical). Float32,
    CPU."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor], lib=None):
        self.lib = lib or c_kernels()
        block = self.lib.tarragon_block_width()
        self.hidden, inter = down[0].shape
        self.inter = -(-inter // block) * block  # gate and up each padded to whole blocks
        parts = []
        for gu, d in zip(gate_up, down):
            gate, up = gu.chunk(2)
            parts += [torch.cat([pack(gate, block), pack(up, block)]), pack(d, block, self.inter)]
        self.slab = torch.cat([p.flatten() for p in parts])  # one allocation: the layer's experts side by side
        views, offset = [], 0
        for p in parts:
            views.append(self.slab[offset : offset + p.numel()])
            offset += p.numel()
        self.w13 = (ctypes.c_void_p * len(gate_up))(*[v.data_ptr() for v in views[0::2]])
        self.w2 = (ctypes.c_void_p * len(gate_up))(*[v.data_ptr() for v in views[1::2]])
        self.expert_nbytes = (gate_up[0].numel() + down[0].numel()) * 4

    @property
    def nbytes(self) -> int:
        return self.slab.nbytes

    def __call__(self, x: torch.Tensor, experts: list[int], counts: list[int]) -> torch.Tensor:
        """x: rows grouped by expert, `counts[i]` rows for stacked expert `experts[i]`."""
        x = x.contiguous()
        y = torch.empty_like(x)
        n = len(experts)
        if self.lib.tarragon_swiglu_experts_f32(x.data_ptr(), y.data_ptr(), self.hidden, self.inter, n, (_I * n)(*experts),
                                                (_I * n)(*counts), self.w13, self.w2):
            raise MemoryError("expert kernel scratch")
        return y
