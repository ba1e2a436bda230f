"""Sampling parameters and the sampler.

Seeded sampling draws its noise from a generator seeded by (seed, position of the token), not
from a per-request stream: the same request gives the same tokens whatever it was batched with
and on whichever attention worker it runs (a request can move between workers on failover).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    import torch


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    prompt_logits: bool = False  # return the fp32 logits of every prompt position (tests, scoring)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row of `logits` [N, V] (fp32); `positions[i]` is the index of the token
    being generated (its count of earlier output tokens), which seeds random sampling."""
    import torch

    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].cpu() / p.temperature  # on the host: the same draw whatever the device
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(0) - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(0, order[drop], 0.0)
        gen = torch.Generator().manual_seed((p.seed * 1_000_003 + positions[i]) % 2**63)
        noise = torch.empty_like(probs).exponential_(generator=gen)
        out[i] = int((probs / noise).argmax())
    return out
