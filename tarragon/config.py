"""Model and engine configuration.

`ModelConfig` reads a Hugging Face `config.json` of one of the supported MoE families and
normalises the fields the way `transformers` interprets them, so every other module works from
one flat description instead of per-family special cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")


class ModelLoadError(RuntimeError):
    """A checkpoint cannot be used: missing file, corrupt file, unsupported architecture."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    expert_intermediate_size: int
    dense_intermediate_size: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    sparse_layers: tuple[int, ...]
    qk_norm: str  # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    qkv_bias: bool
    o_bias: bool
    clip_qkv: float | None
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    sliding_window: int | None

    @property
    def expert_prefix(self) -> str:
        """Name of the MoE block inside a decoder layer on disk."""
        return "block_sparse_moe" if self.family == "mixtral" else "mlp"

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint folder?)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, c: dict) -> "ModelConfig":
        family = c.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ModelLoadError(
                f"unsupported architecture model_type={family!r} ({c.get('architectures')}); "
                f"supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if c.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"hidden_act={c['hidden_act']!r} is not supported (only silu)")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelLoadError(f"rope type {rope_type!r} is not supported (only default)")
        rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0 if family != "mixtral" else 1e6))
        heads = c["num_attention_heads"]
        hidden = c["hidden_size"]
        layers = c["num_hidden_layers"]
        num_experts = c.get("num_experts", c.get("num_local_experts"))
        if family in ("qwen3_moe", "qwen2_moe"):
            step = c.get("decoder_sparse_step", 1)
            dense_only = set(c.get("mlp_only_layers") or [])
            sparse = tuple(i for i in range(layers) if i not in dense_only and num_experts > 0 and (i + 1) % step == 0)
            expert_inter = c["moe_intermediate_size"]
        else:
            sparse = tuple(range(layers))
            expert_inter = c["intermediate_size"]
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        window = c.get("sliding_window") if c.get("use_sliding_window", family == "mixtral") else None
        return cls(
            family=family,
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            num_experts=num_experts,
            top_k=c["num_experts_per_tok"],
            # Mixtral always renormalises the top-k weights; the others only when asked to.
            norm_topk_prob=True if family == "mixtral" else bool(c.get("norm_topk_prob", False)),
            expert_intermediate_size=expert_inter,
            dense_intermediate_size=c.get("intermediate_size", expert_inter),
            shared_expert_intermediate_size=c.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0,
            sparse_layers=sparse,
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
            qkv_bias=bool(c.get("qkv_bias", True)) if family == "qwen2_moe" else bool(c.get("attention_bias", False)),
            o_bias=family in ("qwen3_moe", "olmoe") and bool(c.get("attention_bias", False)),
            clip_qkv=c.get("clip_qkv") if family == "olmoe" else None,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=c.get("bos_token_id"),
            sliding_window=window or None,
        )


@dataclass
class EngineConfig:
    """Settings of one serving cluster (what `LLM(...)` and the CLI flags set)."""

    model_dir: str
    attention_workers: int = 2
    expert_workers: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_blocks: int | None = None  # KV pool size per AW, in blocks ...
    kv_cache_bytes: int = 256 << 20  # ... or in bytes when blocks are not given
    micro_batches: int = 2  # ping-pong halves of a decode step (overlap attention with experts)
    threads_per_worker: int = 1
    checkpoint: bool = True  # stream KV to the checkpoint store (needed by recovery="tarragon")
    store_max_bytes: int = 1 << 30
    checkpoint_queue: int = 1024  # KV writes in flight per attention worker before writes are dropped
    restore_timeout_s: float = 1.0  # then a restoring request falls back to recompute
    extra: dict = field(default_factory=dict)
