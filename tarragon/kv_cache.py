"""The attention worker's paged KV cache: a fixed pool of blocks, allocated per sequence.

The pool is allocated once at start-up (size from `kv_cache_blocks` or `kv_cache_bytes`), so
memory is bounded whatever the load; the scheduler makes requests wait or preempts them when the
pool is full.

Two pools per layer: K and V, or for multi-head latent attention (DeepSeek-V3) the compressed
latent and the shared rotated key (`ModelConfig.kv_shapes`), expanded to heads only when attended.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    (ha, da), (hb, db) = cfg.kv_shapes()
    return cfg.num_layers * block_size * (ha * da + hb * db) * elem


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str = "cpu"):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise kv_cache_bytes or kv_cache_blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape_k, shape_v = cfg.kv_shapes()
        self.k = torch.zeros((cfg.num_layers, num_blocks * block_size, *shape_k), dtype=dtype, device=device)
        self.v = torch.zeros((cfg.num_layers, num_blocks * block_size, *shape_v), dtype=dtype, device=device)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` to hold `num_tokens`; False (and no change) if the pool is short."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self.free):
            return False
        table.extend(self.free.pop() for _ in range(need))
        return True

    def release(self, table: list[int]) -> None:
        self.free.extend(reversed(table))
        table.clear()

    def slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices of token positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size
