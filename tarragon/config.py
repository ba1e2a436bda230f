"""Model and engine configuration.

`ModelConfig` reads a Hugging Face `config.json` of one of the supported MoE families and
normalises the fields the way `transformers` interprets them, so every other module works from
one flat description instead of per-family special cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .vocabulary import RecoveryPolicy

# The one registry of each: the CLI's choices, the checks and the demo models read these.
DTYPES = ("float32", "bfloat16", "float16")  # weights and activations ("auto" resolves to one of them)
SUPPORTED_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "glm4_moe", "deepseek_v3", "gpt_oss")
# Families routed by sigmoid scores, a selection-only correction bias and group-limited top-k.
SIGMOID_GROUP_FAMILIES = ("glm4_moe", "deepseek_v3")


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
    # Routing (see model.ROUTERS): "softmax" top-k, or "sigmoid_group" (DeepSeek-V3, GLM-4.5).
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid gate on the shared expert
    # Rotary embedding: how many leading dims of each head rotate, pairing, scaling.
    rotary_dim: int = 0  # 0: the whole rotary head
    rope_interleave: bool = False  # DeepSeek: pairs (x0, x1), (x2, x3), ... instead of halves
    rope_scaling: dict | None = None  # YaRN parameters (rope_type "yarn"), else None
    # Multi-head latent attention (DeepSeek-V3): kv_lora_rank > 0 turns it on.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # gpt-oss: a learned sink logit per head, a window per layer (None: full), clamped SwiGLU experts.
    attention_sinks: bool = False
    layer_windows: tuple[int | None, ...] = ()  # empty: no layer is windowed
    expert_act: str = "swiglu"  # "swiglu" | "clamped_swiglu" (gpt-oss: biases, alpha, limit)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def expert_prefix(self) -> str:
        """Name of the MoE block inside a decoder layer on disk."""
        return "block_sparse_moe" if self.family == "mixtral" else "mlp"

    @property
    def shared_prefix(self) -> str:
        """Name of the shared-expert MLP inside the MoE block on disk."""
        return "shared_expert" if self.family == "qwen2_moe" else "shared_experts"

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """Dimensions of a head that rotate."""
        return self.qk_rope_head_dim if self.mla else (self.rotary_dim or self.head_dim)

    def kv_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, dim) per token of the two KV pools: K and V, or for MLA the compressed latent
        (kv_lora_rank, normalised) and the shared rotated key (qk_rope_head_dim), not expanded heads."""
        if self.mla:
            return (1, self.kv_lora_rank), (1, self.qk_rope_head_dim)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers

    def window(self, layer: int) -> int | None:
        """Tokens a layer attends back (itself included); None: the whole context."""
        return self.layer_windows[layer] if self.layer_windows else None

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
        quant = (c.get("quantization_config") or {}).get("quant_method")
        if quant is not None and (quant, family) != ("mxfp4", "gpt_oss"):
            raise ModelLoadError(f"quantization {quant!r} is not supported for {family} (only gpt_oss's mxfp4); use a bf16 checkpoint")
        if c.get("hidden_act", "silu") != "silu" and family != "gpt_oss":  # gpt-oss's experts use their own activation
            raise ModelLoadError(f"hidden_act={c['hidden_act']!r} is not supported (only silu)")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ModelLoadError(f"rope type {rope_type!r} is not supported (only default and yarn)")
        default_theta = {"mixtral": 1e6, "gpt_oss": 150000.0}.get(family, 10000.0)
        rope_theta = rope.get("rope_theta", c.get("rope_theta", default_theta))
        heads = c["num_attention_heads"]
        hidden = c["hidden_size"]
        layers = c["num_hidden_layers"]
        num_experts = c.get("num_experts", c.get("num_local_experts", c.get("n_routed_experts")))
        sparse, expert_inter = cls._sparse_layout(family, c, layers, num_experts)
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
            shared_expert_intermediate_size=cls._shared_size(family, c, expert_inter),
            sparse_layers=sparse,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=c.get("bos_token_id"),
            sliding_window=window or None,
            **cls._attention(family, c),
            **cls._routing(family, c),
            **cls._rope(family, c, rope, rope_type),
            **cls._mla(c),
            **cls._gpt_oss(family, c, layers),
        )

    @staticmethod
    def _sparse_layout(family: str, c: dict, layers: int, num_experts: int) -> tuple[tuple[int, ...], int]:
        """Which layers are MoE, and the width of one expert's FFN."""
        if family in SIGMOID_GROUP_FAMILIES:
            return tuple(range(c.get("first_k_dense_replace", 0), layers)), c["moe_intermediate_size"]
        if family in ("qwen3_moe", "qwen2_moe"):
            step = c.get("decoder_sparse_step", 1)
            dense_only = set(c.get("mlp_only_layers") or [])
            sparse = tuple(i for i in range(layers) if i not in dense_only and num_experts > 0 and (i + 1) % step == 0)
            return sparse, c["moe_intermediate_size"]
        return tuple(range(layers)), c["intermediate_size"]

    @staticmethod
    def _attention(family: str, c: dict) -> dict:
        """Per-family attention details: q/k norms, biases, clipping."""
        return dict(
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, "head" if c.get("use_qk_norm") else "none"),
            qkv_bias=bool(c.get("qkv_bias", True)) if family == "qwen2_moe" else bool(c.get("attention_bias", False)),
            o_bias=family in ("qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss") and bool(c.get("attention_bias", False)),
            clip_qkv=c.get("clip_qkv") if family == "olmoe" else None,
        )

    @staticmethod
    def _gpt_oss(family: str, c: dict, layers: int) -> dict:
        if family != "gpt_oss":
            return {}
        types = c.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        window = c.get("sliding_window")
        return dict(router="topk_softmax", attention_sinks=True, expert_act="clamped_swiglu",
                    layer_windows=tuple(window if t == "sliding_attention" else None for t in types),
                    swiglu_alpha=float(c.get("swiglu_alpha", 1.702)), swiglu_limit=float(c.get("swiglu_limit", 7.0)))

    @staticmethod
    def _shared_size(family: str, c: dict, expert_inter: int) -> int:
        if family == "qwen2_moe":
            return c.get("shared_expert_intermediate_size", 0)
        return expert_inter * c.get("n_shared_experts", 0) if family in SIGMOID_GROUP_FAMILIES else 0

    @staticmethod
    def _routing(family: str, c: dict) -> dict:
        if family not in SIGMOID_GROUP_FAMILIES:
            return {}
        return dict(router="sigmoid_group", n_group=c.get("n_group") or 1, topk_group=c.get("topk_group") or 1,
                    routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)), shared_expert_gated=False)

    @staticmethod
    def _rope(family: str, c: dict, rope: dict, rope_type: str) -> dict:
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5 if family == "glm4_moe" else 1.0))
        out = dict(rotary_dim=int(head_dim * partial) if family != "deepseek_v3" else 0,
                   rope_interleave=family == "deepseek_v3" and bool(c.get("rope_interleave", True)))
        if rope_type == "yarn":
            yarn = dict(rope)
            yarn.setdefault("original_max_position_embeddings", c.get("max_position_embeddings", 4096))
            out["rope_scaling"] = yarn
        return out

    @staticmethod
    def _mla(c: dict) -> dict:
        if not c.get("kv_lora_rank"):
            return {}
        return dict(q_lora_rank=c.get("q_lora_rank"), kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
                    qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"])


# ---- the serving configuration: one tree, resolved once by the driver (engine_args.py) ----------
# It travels to the orchestrator inside its ClusterSpec and to each worker inside its WorkerSpec,
# which reads its settings from it (no copies to keep in step).


@dataclass
class ModelSource:
    """Which checkpoint, loaded how."""

    path: str  # a local folder (a Hub id is resolved to one before)
    dtype: str = "float32"  # resolved: "auto" becomes bfloat16 on CUDA, float32 elsewhere
    device: str = "cpu"


@dataclass
class CacheConfig:
    """The attention workers' paged KV cache."""

    block_size: int = 16
    kv_cache_blocks: int = 0  # KV pool size per AW, in blocks (resolved from LLM(kv_cache_bytes=) when not given)


@dataclass
class SchedulerConfig:
    """What one attention worker batches."""

    max_model_len: int = 2048  # resolved: also bounded by the model's positions, its window and the KV pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    micro_batches: int = 2  # groups of a decode step in flight at once (overlap attention with experts)
    split_min: int = 1  # resolved: sequences per micro-batch below which a batch is not split


@dataclass
class ResilienceConfig:
    """What failures cost: copies kept, checkpoints written, how failures are detected and undone."""

    recovery: RecoveryPolicy = RecoveryPolicy.TARRAGON
    shadows: int = 1  # inactive copies of each expert on other expert workers (at most expert_workers - 1)
    shadow_budget_bytes: int | None = None
    replace_failed: bool = True
    checkpoint: bool = True  # stream KV to the checkpoint stores (needed by recovery="tarragon")
    stores: int = 2  # checkpoint stores, each holding every checkpoint: one may die and restores still find the KV
    store_max_bytes: int = 1 << 30  # per store
    checkpoint_queue: int = 1024  # KV writes in flight per attention worker before writes are dropped
    checkpoint_interval_ms: float = 10.0  # steps' KV gathered into one write per this long (0: a write each step)
    restore_timeout_s: float = 1.0  # then a restoring request falls back to recompute
    heartbeat_s: float = 0.05
    heartbeat_timeout_s: float = 1.0  # a floor: it grows with the latency the cluster shows (timeouts.py)
    probe_interval_s: float = 0.01
    probe_timeout_s: float = 0.1  # a floor, as heartbeat_timeout_s
    stall_timeout_s: float = 60.0  # requests end with an error after this long without a token
    progress_timeout_s: float = 10.0  # health() fails after this long without a token while requests wait
    orchestrator_timeout_s: float = 3.0  # a silent orchestrator is replaced (local) or reported unhealthy


@dataclass
class ClusterConfig:
    """The processes and where they run."""

    attention_workers: int = 2
    expert_workers: int = 2
    threads_per_worker: int = 1
    placement: str = "pack"  # resolved: "auto" becomes spread when every process can have a core, else pack
    expert_primaries: int = 0  # resolved: how many expert workers (the first ones) hold primaries; the rest stand by
    launcher: str = "local"  # "local" | "ray" | "manual" (workers join by hand)
    ray_address: str = ""
    join_address: str = ""
    nodes: dict[str, str] = field(default_factory=dict)  # planned worker -> its node
    key_file: str = ""  # resolved: the file the cluster's CURVE key is read from ("" with insecure_transport)
    insecure_transport: bool = False
    startup_timeout: float = 120.0
    warmup: bool = True  # one batch as large as the scheduler runs, before the first request (LLM._warm_up)
    log_dir: str = ""  # where the workers' logs are kept at shutdown ("": deleted with the run)


@dataclass
class TarragonConfig:
    """Everything `LLM(...)` and the CLI flags set, resolved once."""

    model: ModelSource
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
