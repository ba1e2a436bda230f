"""`LLM(...)`'s keyword arguments (and the CLI's flags), and their resolution into the one
configuration tree (`config.TarragonConfig`) that the driver, the orchestrator and every worker
read. The defaults are the tree's own, so they are written once; what depends on the model, the
host or other settings ("auto", None) is decided here, once, and checked here."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import (CacheConfig, ClusterConfig, ModelConfig, ModelSource, ResilienceConfig, SchedulerConfig,
                     TarragonConfig)
from .kv_cache import bytes_per_block
from .vocabulary import RecoveryPolicy
from .weights import WeightFiles, torch_dtype

PLACEMENTS = ("auto", "pack", "spread")
# Packed, a batch is split in micro-batches only from this many sequences each: on two cores, 32
# requests run faster as one (experts on both cores), 48 and 64 as two (2 x 2, bench model).
PACKED_SPLIT_MIN = 24
R, C, S, K = ResilienceConfig, ClusterConfig, SchedulerConfig, CacheConfig  # their defaults are ours


@dataclass(kw_only=True)
class EngineArgs:
    """`stall_timeout_s`: requests end with an error once the cluster has produced no token for
    this long while they wait; `progress_timeout_s`: `health()` fails after this long without a
    token while requests wait; `orchestrator_timeout_s`: an orchestrator silent this long is
    replaced (local launcher), or reported unhealthy; `stores`: checkpoint stores, each holding
    every checkpoint (default 2 with the local launcher, so a store's death loses no checkpoint;
    1 with ray or manual, where a second store wants a host and a join of its own).
    `probe_timeout_s` and `heartbeat_timeout_s` are floors: both timeouts grow with the latency
    the cluster shows (see tarragon/timeouts.py, which also holds the gray-failure settings)."""

    model: str | Path | None = None
    attention_workers: int = C.attention_workers
    expert_workers: int = C.expert_workers
    device: str = "cpu"
    dtype: str = "auto"
    shadows: int = R.shadows
    shadow_budget_bytes: int | None = R.shadow_budget_bytes
    replace_failed: bool = R.replace_failed
    probe_interval_s: float = R.probe_interval_s
    probe_timeout_s: float = R.probe_timeout_s
    heartbeat_timeout_s: float = R.heartbeat_timeout_s
    recovery: str = R.recovery
    startup_timeout: float = C.startup_timeout
    warmup: bool = C.warmup
    launcher: str = C.launcher
    placement: str = "auto"
    ray_address: str | None = None
    join_address: str | None = None
    nodes: dict[str, str] | None = None
    key_file: str | None = None
    insecure_transport: bool = C.insecure_transport
    log_dir: str | Path | None = None
    stall_timeout_s: float = R.stall_timeout_s
    progress_timeout_s: float = R.progress_timeout_s
    orchestrator_timeout_s: float = R.orchestrator_timeout_s
    stores: int | None = None
    max_model_len: int = S.max_model_len
    max_num_seqs: int = S.max_num_seqs
    max_num_batched_tokens: int = S.max_num_batched_tokens
    micro_batches: int = S.micro_batches
    block_size: int = K.block_size
    kv_cache_blocks: int | None = None  # the KV pool per attention worker in blocks, or else in bytes:
    kv_cache_bytes: int = 256 << 20
    threads_per_worker: int = C.threads_per_worker
    checkpoint: bool = R.checkpoint
    store_max_bytes: int = R.store_max_bytes
    checkpoint_queue: int = R.checkpoint_queue
    checkpoint_interval_ms: float = R.checkpoint_interval_ms
    restore_timeout_s: float = R.restore_timeout_s

    def create_config(self) -> tuple[TarragonConfig, ModelConfig]:
        """The resolved tree, and the model's architecture (read from its config.json)."""
        self.check()
        path = _model_path(self.model)
        model = ModelConfig.from_dir(path)
        WeightFiles(path).close()  # fail here, clearly, on a missing or corrupt checkpoint
        dtype = self.dtype if self.dtype != "auto" else "bfloat16" if self.device.startswith("cuda") else "float32"
        cfg = TarragonConfig(ModelSource(str(path), dtype, self.device), *(self._section(t) for t in (K, S, R, C)))
        r, c = cfg.resilience, cfg.cluster
        r.recovery = RecoveryPolicy(self.recovery)
        r.stores = self.stores if self.stores is not None else 2 if self.launcher == "local" else 1
        r.shadows = min(self.shadows, self.expert_workers - 1)  # a shadow never shares its primary's worker
        # auto: spread when every worker process can have a core of its own, else pack.
        processes = self.attention_workers + self.expert_workers + r.stores
        cores = os.cpu_count() or 1
        c.placement = self.placement if self.placement != "auto" else "spread" if cores >= processes else "pack"
        # Packed, one attention worker computes: a small batch runs as one micro-batch whose expert
        # phase has every core (primaries on one expert worker per core, the others standbys), so
        # each layer's weights are read once; a large one is split in two that overlap attention
        # with experts, each step's experts then on one expert worker (attention_worker.py).
        c.expert_primaries = self.expert_workers if c.placement == "spread" else min(self.expert_workers, cores)
        cfg.scheduler.split_min = PACKED_SPLIT_MIN if c.placement == "pack" and c.expert_primaries > 1 else 1
        c.ray_address, c.join_address, c.nodes = self.ray_address or "", self.join_address or "", dict(self.nodes or {})
        c.key_file, c.log_dir = self.key_file or "", str(self.log_dir or "")
        cfg.cache.kv_cache_blocks = self.kv_cache_blocks or self.kv_cache_bytes // bytes_per_block(model, self.block_size,
                                                                                                   torch_dtype(dtype))
        cfg.scheduler.max_model_len = context_limit(model, cfg)
        return cfg, model

    def check(self) -> None:
        """A clear ValueError for a setting out of range, before anything starts."""
        if self.attention_workers < 1 or self.expert_workers < 1:
            raise ValueError("need at least one attention worker and one expert worker")
        if self.stores is not None and self.stores < 1:
            raise ValueError(f"stores must be >= 1, got {self.stores}")
        if self.recovery not in list(RecoveryPolicy):
            raise ValueError(f"recovery must be one of {', '.join(RecoveryPolicy)}, not {self.recovery!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be auto, pack or spread, not {self.placement!r}")
        if self.shadows < 0:
            raise ValueError(f"shadows must be >= 0, got {self.shadows}")
        if self.checkpoint_interval_ms < 0:
            raise ValueError(f"checkpoint_interval_ms must be >= 0, got {self.checkpoint_interval_ms}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")

    def _section(self, cls: type) -> object:
        """A section of the tree with the fields of the same name taken from here."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if hasattr(self, f.name)})


def context_limit(model: ModelConfig, cfg: TarragonConfig) -> int:
    """The context length: what was asked, bounded by the model's positions, its sliding window
    (when every layer has one) and what one attention worker's KV pool holds."""
    limits = [cfg.scheduler.max_model_len, model.max_position_embeddings, cfg.cache.kv_cache_blocks * cfg.cache.block_size]
    return min(limits + ([model.sliding_window] if model.sliding_window else []))


def _model_path(model: str | Path | None) -> Path:
    """A folder: the demo model when none is named, a Hub id resolved into the Hugging Face cache."""
    from .hub import resolve_model

    if model is None:
        from .make_model import demo_model

        model = demo_model()
    return resolve_model(model)


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES ids, so each worker can be given one of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g for g in visible.split(",") if g] if visible is not None else [str(i) for i in range(torch.cuda.device_count())]
    if not ids:
        raise ValueError("device='cuda' but no GPU is visible")
    return ids
