"""Decode attention read straight from the paged KV cache: a small C kernel (csrc/paged_attention.c).

torch has no paged attention for CPUs. Without one, each layer of a decode step copies every
sequence's cached blocks into a padded batch and runs SDPA over it: for the bench model at 32
sequences of 66 tokens, 345 us a layer warm, 760 us with the cache cold, most of it the copy
and SDPA's set-up per (sequence, head) of tiny problems. The kernel reads each cached key and
value row once where it lies: 163 / 495 us (bench/decode_attention.py: 1.5-2.9x at 1-64
sequences of 66-200 tokens). vLLM and SGLang ship such kernels for CPUs in their own C++; this
one is ~100 lines of C. Its library also has the step's rotary embedding and KV write in one pass
(`rope_store`: seven torch ops of a few microseconds each, per layer, at one to a few tokens),
and the RMSNorm with the residual sum before it (`add_rms_norm`).

It is built at first use for this CPU (native.py). No compiler, a failed build or self-check,
another device or dtype, MLA, or TARRAGON_ATTENTION_KERNEL=torch: the gather + SDPA path runs
(model.py).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess

import torch

from . import native

log = logging.getLogger(__name__)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_ARGS = [_P, _I, _P, _I, _I, _P, _I, _I, _P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float]


@functools.cache
def _kernel():
    """The loaded, self-checked kernel, or None (the reason is logged once)."""
    if os.environ.get("TARRAGON_ATTENTION_KERNEL", "auto") == "torch":
        return None
    try:
        fn = native.library("paged_attention.c").tarragon_paged_decode_f32
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("paged attention kernel unavailable (%s): gather + SDPA instead", native.failure(e))
        return None
    fn.argtypes, fn.restype = _ARGS, None
    if not _self_check(fn):
        log.warning("paged attention kernel disagrees with SDPA on this machine: gather + SDPA instead")
        return None
    return fn


# The library's other functions: name -> argument types (see csrc/paged_attention.c).
_PASSES = {"tarragon_rope_store_f32": [_P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P, _I, _P],
           "tarragon_add_rms_norm_f32": [_P, _P, _P, ctypes.c_float, _I, _I, _P, _P]}


@functools.cache
def _pass(name: str):
    """One of the library's other functions, loaded; None where the kernel is not available."""
    if _kernel() is None:
        return None
    fn = getattr(native.library("paged_attention.c"), name)
    fn.argtypes, fn.restype = _PASSES[name], None
    return fn


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               slots: torch.Tensor, heads: int) -> torch.Tensor | None:
    """One step's rotary embedding and KV write in one pass (csrc: bit-identical to apply_rope and
    index_copy_): qkv [T, (heads + 2 kvh) d], cos and sin [T, 1, rot] (contiguous), the pools
    [slots, kvh, d]. Returns the rotated q [T, heads, d], or None where the kernel does not apply
    (then nothing was written)."""
    fn = _pass("tarragon_rope_store_f32")
    T, (kvh, d) = qkv.shape[0], k_pool.shape[1:]
    if (fn is None or qkv.dtype != torch.float32 or not qkv.is_cpu or qkv.stride(1) != 1 or qkv.shape[1] != (heads + 2 * kvh) * d
            or not (cos.is_contiguous() and sin.is_contiguous() and k_pool.is_contiguous() and v_pool.is_contiguous() and slots.is_contiguous())
            or cos.dtype != torch.float32 or v_pool.shape[1:] != k_pool.shape[1:]):
        return None
    q = torch.empty(T, heads, d)
    fn(qkv.data_ptr(), T, qkv.stride(0), heads, kvh, d, cos.shape[-1], cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
       k_pool.data_ptr(), k_pool.stride(0), v_pool.data_ptr(), v_pool.stride(0), q.data_ptr())
    return q


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(h + delta, RMSNorm of it) for 2-D CPU float32 rows in one pass of C (delta None: h and its
    RMSNorm); None where the kernel does not apply."""
    fn = _pass("tarragon_add_rms_norm_f32")
    if (fn is None or h.dim() != 2 or h.dtype != torch.float32 or not h.is_cpu or not h.is_contiguous() or weight.dtype != torch.float32
            or not weight.is_contiguous() or (delta is not None and (delta.shape != h.shape or delta.dtype != h.dtype or not delta.is_contiguous()))):
        return None
    T, n = h.shape
    out = torch.empty_like(h)
    summed = torch.empty_like(h) if delta is not None else h
    fn(h.data_ptr(), delta.data_ptr() if delta is not None else None, weight.data_ptr(), eps, T, n, summed.data_ptr(), out.data_ptr())
    return summed, out


def available() -> bool:
    return _kernel() is not None


def usable(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether this call can take the kernel: CPU float32 tensors, unit-stride head dimensions."""
    return (q.device.type == "cpu" and q.dtype == k_pool.dtype == v_pool.dtype == torch.float32
            and q.stride(2) == 1 and q.stride(1) == q.shape[2] and k_pool.stride(2) == 1 and v_pool.stride(2) == 1
            and available())


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, blocks: torch.Tensor, lens: torch.Tensor,
                     block_size: int, scale: float, window: int = 0, sinks: torch.Tensor | None = None, kernel=None) -> torch.Tensor:
    """q [B, kvh*g, d] of one new token per sequence against its cached context: the pools
    [slots, kvh, d|dv], `blocks` [B, n] int64 block tables, `lens` [B] int64 context lengths
    (the new token's included), `window` > 0 a sliding window, `sinks` [kvh*g] (gpt-oss).
    Returns [B, kvh*g, dv]. Only for tensors `usable` accepts (`kernel`: the self-check's)."""
    B, nh, d = q.shape
    kvh, dv = k_pool.shape[1], v_pool.shape[2]
    blocks, lens = blocks.contiguous(), lens.contiguous()
    sinks = sinks.float().contiguous() if sinks is not None else None
    out = torch.empty(B, nh, dv)
    longest = int(lens.max()) if window <= 0 else min(int(lens.max()), window)
    scores = torch.empty(nh * max(longest, 1))
    (kernel or _kernel())(q.data_ptr(), q.stride(0), k_pool.data_ptr(), k_pool.stride(0), k_pool.stride(1),
              v_pool.data_ptr(), v_pool.stride(0), v_pool.stride(1), blocks.data_ptr(), blocks.shape[1], block_size,
              lens.data_ptr(), sinks.data_ptr() if sinks is not None else None, out.data_ptr(), scores.data_ptr(),
              B, kvh, nh // kvh, d, dv, window, scale)
    return out


def _self_check(fn) -> bool:
    """A small call against the plain formula: a miscompiled or mis-declared kernel fails here,
    not while serving."""
    g = torch.Generator().manual_seed(0)
    bs, kvh, heads, d = 4, 2, 4, 8
    k, v = torch.randn(6 * bs, kvh, d, generator=g), torch.randn(6 * bs, kvh, d, generator=g)
    q = torch.randn(2, heads, d, generator=g)
    blocks, lens = torch.tensor([[3, 1, 5], [0, 2, 4]]), torch.tensor([9, 12])
    out = decode_attention(q, k, v, blocks, lens, bs, d ** -0.5, kernel=fn)
    for b in range(2):
        slots = (blocks[b][:, None] * bs + torch.arange(bs)).reshape(-1)[: lens[b]]
        kb, vb = k[slots].repeat_interleave(heads // kvh, 1), v[slots].repeat_interleave(heads // kvh, 1)  # [C, heads, d]
        p = torch.softmax(torch.einsum("hd,chd->hc", q[b], kb) * d ** -0.5, dim=-1)
        if not torch.allclose(out[b], torch.einsum("hc,chd->hd", p, vb), atol=1e-5, rtol=1e-4):
            return False
    return True
