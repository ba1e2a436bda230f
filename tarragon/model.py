"""The model, split along its failure boundary.

`AttentionModel` is what an attention worker runs: embeddings, attention over the paged KV cache,
norms, the router (gate), dense and shared-expert MLPs, the final norm and the LM head.
`ExpertBank` is what an expert worker runs: the routed expert FFNs it was assigned.

The attention side's forward pass is a generator: at each sparse layer it *yields* a `MoECall`
(the routed tokens) and is *sent* back the combined expert output. The caller decides how the
call travels (the forwarding engine, over the network) and can interleave several micro-batches,
so attention of one micro-batch overlaps the expert work of another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generator

import torch
import torch.nn.functional as F

from . import paged_attention
from .config import ModelConfig
from .kernels import FusedExperts, Linear, c_kernels
from .weights import WeightFiles


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as transformers does. In fp32 one pass of C over
    CPU rows (paged_attention.add_rms_norm: a step runs ~10 norms per layer pass, each a string of
    torch ops that costs ~8 us warm and several times that cold), else torch's own op."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if (got := paged_attention.add_rms_norm(x, None, weight, eps)) is not None:
            return got[1]
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum h + delta and its RMSNorm (between a layer's attention and its MLP)."""
    if (got := paged_attention.add_rms_norm(h, delta, weight, eps)) is not None:
        return got
    h = h + delta
    return h, rms_norm(h, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x: torch.Tensor, gate_up: Linear, down: Linear) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""
    gate, up = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(gate) * up)


def rope_frequencies(cfg: ModelConfig, device: str = "cpu") -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary dims and the factor cos/sin are scaled by: plain RoPE,
    or YaRN (interpolated low frequencies, extrapolated high ones, ramp between) as transformers has it."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    y = cfg.rope_scaling
    if y is None:
        return extrapolated, 1.0
    original = y["original_max_position_embeddings"]
    factor = y.get("factor") or cfg.max_position_embeddings / original
    factor_of = lambda m=1.0: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
    attention_factor = y.get("attention_factor")
    if attention_factor is None:
        m, m_all = y.get("mscale"), y.get("mscale_all_dim")
        attention_factor = factor_of(m) / factor_of(m_all) if m and m_all else factor_of()
    edge = lambda rot: dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = edge(y.get("beta_fast") or 32), edge(y.get("beta_slow") or 1)
    if y.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return extrapolated / factor * ramp + extrapolated * (1 - ramp), float(attention_factor)


def attention_scale(cfg: ModelConfig) -> float:
    """Softmax scale; DeepSeek's YaRN also multiplies it by mscale(mscale_all_dim) squared."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim if cfg.mla else cfg.head_dim) ** -0.5
    y = cfg.rope_scaling
    if cfg.mla and y and y.get("mscale_all_dim"):
        factor = y.get("factor") or 1.0
        m = 1.0 if factor <= 1 else 0.1 * y["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dims of each head (partial rotary leaves the rest).
    Interleaved (DeepSeek): pairs (x0, x1), (x2, x3)... rotate and come out de-interleaved."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    if interleave:
        c, s_ = cos[..., : d // 2], sin[..., : d // 2]
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1)
    else:
        rot = rot * cos + rotate_half(rot) * sin
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def softmax_topk(logits: torch.Tensor, score_bias, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral, Qwen-MoE, OLMoE: softmax in fp32, top-k, optional renormalisation."""
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sigmoid_group_topk(logits: torch.Tensor, score_bias, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3, GLM-4.5: sigmoid scores; the correction bias only chooses (groups ranked by
    their two best biased scores, top-k within the best `topk_group` groups), the unbiased
    scores weigh; optional renormalisation, then `routed_scaling_factor`."""
    scores = torch.sigmoid(logits)
    choice = scores + score_bias if score_bias is not None else scores
    T, E, G = scores.shape[0], cfg.num_experts, cfg.n_group
    group_scores = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    groups = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    ids = torch.topk(choice, cfg.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def topk_softmax(logits: torch.Tensor, score_bias, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: top-k of the (biased) logits, softmax over those k only."""
    top, ids = torch.topk(logits, cfg.top_k, dim=-1)
    return torch.softmax(top, dim=-1), ids


# The router is chosen by `ModelConfig.router`: a new family's routing is one function here.
ROUTERS = {"softmax": softmax_topk, "sigmoid_group": sigmoid_group_topk, "topk_softmax": topk_softmax}


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities; a sink (gpt-oss) is one more logit per head that takes probability
    mass and no value. `sinks` broadcasts against scores[..., :1]."""
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    combined = torch.cat([scores, sinks.expand(*scores.shape[:-1], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def gather_blocks(pool: torch.Tensor, blocks: torch.Tensor, block_size: int, context: int) -> torch.Tensor:
    """The first `context` cached entries [B, context, *entry] of each sequence, from its block
    table [B, n]: one contiguous copy per whole block (B * n copies of block_size entries) rather
    than one per token; the result is a view, padding the last block would only cost compute."""
    B, n = blocks.shape
    entry = pool.shape[1:]
    gathered = pool.view(-1, block_size, *entry).index_select(0, blocks.reshape(-1)).view(B, n * block_size, *entry)
    return gathered if context == n * block_size else gathered[:, :context]


@dataclass
class MoECall:
    """Routed work of one sparse layer: each token goes to `top_k` experts with these weights."""

    layer: int
    hidden: torch.Tensor  # [T, H]
    expert_ids: torch.Tensor  # [T, k] int64
    weights: torch.Tensor  # [T, k] fp32


@dataclass
class AttentionMetadata:
    """Where each token of a (micro-)batch reads and writes the paged KV cache.

    Decode tokens (one new token per sequence) are attended as one padded batch; each prefill
    chunk is attended on its own, causally, against its sequence's whole context.
    """

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV slot each new token is written to
    decode_tokens: torch.Tensor | None  # [B] token indices of decode sequences (None: all tokens)
    num_decode: int
    decode_blocks: torch.Tensor  # [B, ceil(C / block_size)] KV blocks of each decode sequence (padded)
    decode_mask: torch.Tensor  # [B, 1, 1, C] additive: 0 where attended, -inf on padding
    decode_lens: torch.Tensor  # [B] context length of each decode sequence (its new token included)
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]  # (start, len, slots, mask|None=causal)
    logits_index: torch.Tensor  # [N] tokens whose next-token logits are needed

    def to(self, device: torch.device) -> "AttentionMetadata":
        """Built on the host (small tensors from Python lists), used where the KV cache is."""
        if device.type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return AttentionMetadata(
            move(self.positions), move(self.slot_mapping), move(self.decode_tokens), self.num_decode, move(self.decode_blocks),
            move(self.decode_mask), move(self.decode_lens), [(s, n, move(slots), move(mask)) for s, n, slots, mask in self.prefills], move(self.logits_index))


@dataclass
class MLAWeights:
    """Multi-head latent attention's projections (DeepSeek-V3): queries direct (`q`) or through
    a low-rank bottleneck (`q_a` -> norm -> `q_b`); keys and values through the latent (`kv_a`
    -> norm), expanded per head by `kv_b` when attended."""

    q: torch.Tensor | None
    q_a: torch.Tensor | None
    q_a_bias: torch.Tensor | None
    q_a_norm: torch.Tensor | None
    q_b: torch.Tensor | None
    kv_a: torch.Tensor
    kv_a_bias: torch.Tensor | None
    kv_a_norm: torch.Tensor
    kv_b: torch.Tensor


MLA_NORM_EPS = 1e-6  # DeepSeek's q_a/kv_a norms keep RMSNorm's default eps, not rms_norm_eps
DECODE_CHUNK_BYTES = 2 << 20  # gathered context attended at once on a CPU: about one core's L2 cache


@dataclass
class AttentionLayer:
    qkv: Linear | None  # q, k and v projections in one (None with MLA)
    o: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    router: Linear | None  # [E, H] on sparse layers (gpt-oss: with a bias)
    score_bias: torch.Tensor | None  # [E] selection-only correction bias (sigmoid_group routing)
    dense: tuple[Linear, Linear] | None  # (gate_up, down) on dense layers
    shared: tuple[Linear, Linear, Linear | None] | None  # (gate_up, down, gate [1, H] or None)
    mla: MLAWeights | None = None
    sinks: torch.Tensor | None = None  # [nh] (gpt-oss)


class AttentionModel:
    """Everything but the routed experts."""

    def __init__(self, cfg: ModelConfig, files: WeightFiles, dtype: torch.dtype, device: str = "cpu"):
        self.cfg = cfg
        self.dtype = dtype

        def w(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            return files.get(name, as_dtype, device)

        # Loading helpers, only while the files are open.
        self._w, self._has = w, files.__contains__
        self._opt = lambda name: w(name) if name in files else None
        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = Linear(self.embed if cfg.tie_word_embeddings and "lm_head.weight" not in files else w("lm_head.weight"))
        self.layers = [self._load_layer(i) for i in range(cfg.num_layers)]
        del self._w, self._has, self._opt
        self.inv_freq, self.rope_factor = rope_frequencies(cfg, device)
        self.scale = attention_scale(cfg)
        self.router_fn = ROUTERS[cfg.router]
        self.q_size = cfg.num_heads * cfg.head_dim
        self.plain_rope = cfg.qk_norm == "none" and cfg.clip_qkv is None and not cfg.rope_interleave  # (see attention)
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.v_dim = cfg.v_head_dim if cfg.mla else cfg.head_dim

    def _load_layer(self, i: int) -> AttentionLayer:
        cfg, w, opt = self.cfg, self._w, self._opt
        p = f"model.layers.{i}."
        a = p + "self_attn."
        mlp = p + cfg.expert_prefix + "."
        shared = None
        if cfg.is_sparse(i) and cfg.shared_expert_intermediate_size:
            s = f"{mlp}{cfg.shared_prefix}."
            gate = Linear(w(mlp + "shared_expert_gate.weight")) if cfg.shared_expert_gated else None
            shared = (Linear(torch.cat([w(s + "gate_proj.weight"), w(s + "up_proj.weight")])), Linear(w(s + "down_proj.weight")), gate)
        dense = None
        if not cfg.is_sparse(i):
            dense = (Linear(torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])), Linear(w(p + "mlp.down_proj.weight")))
        router = score_bias = None
        gate = mlp + ("router." if cfg.family == "gpt_oss" else "gate.")
        if cfg.is_sparse(i):  # transformers routes sigmoid families in fp32 whatever the model dtype
            router_dtype = torch.float32 if cfg.router == "sigmoid_group" else self.dtype
            router = Linear(w(gate + "weight", router_dtype), opt(gate + "bias"))
            if self._has(mlp + "gate.e_score_correction_bias"):
                score_bias = w(mlp + "gate.e_score_correction_bias", torch.float32)
        biases = [opt(a + f"{n}_proj.bias") for n in "qkv"]
        return AttentionLayer(
            qkv=None if cfg.mla else Linear(torch.cat([w(a + f"{n}_proj.weight") for n in "qkv"]),
                                            torch.cat(biases) if all(b is not None for b in biases) else None),
            o=Linear(w(a + "o_proj.weight"), opt(a + "o_proj.bias")),
            q_norm=opt(a + "q_norm.weight"),
            k_norm=opt(a + "k_norm.weight"),
            input_norm=w(p + "input_layernorm.weight"),
            post_norm=w(p + "post_attention_layernorm.weight"),
            router=router,
            score_bias=score_bias,
            dense=dense,
            shared=shared,
            mla=self._load_mla(a) if cfg.mla else None,
            sinks=w(a + "sinks") if cfg.attention_sinks else None,
        )

    def _load_mla(self, a: str) -> MLAWeights:
        w, opt = self._w, self._opt
        low_rank_q = self.cfg.q_lora_rank is not None
        return MLAWeights(
            q=None if low_rank_q else w(a + "q_proj.weight"),
            q_a=w(a + "q_a_proj.weight") if low_rank_q else None,
            q_a_bias=opt(a + "q_a_proj.bias"),
            q_a_norm=w(a + "q_a_layernorm.weight") if low_rank_q else None,
            q_b=w(a + "q_b_proj.weight") if low_rank_q else None,
            kv_a=w(a + "kv_a_proj_with_mqa.weight"),
            kv_a_bias=opt(a + "kv_a_proj_with_mqa.bias"),
            kv_a_norm=w(a + "kv_a_layernorm.weight"),
            kv_b=w(a + "kv_b_proj.weight"),
        )

    # ---- pieces -------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_factor != 1.0:
            cos, sin = cos * self.rope_factor, sin * self.rope_factor
        return cos.to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    def route(self, layer: AttentionLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits in fp32, then the family's routing function (ROUTERS)."""
        logits = layer.router(x.to(layer.router.dtype)).float()
        return self.router_fn(logits, layer.score_bias, self.cfg)

    def project(self, L: AttentionLayer, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [T, nh, hd] and what the two KV pools store for these tokens: k and v."""
        cfg = self.cfg
        T, hd = x.shape[0], cfg.head_dim
        qkv = L.qkv(x)
        if cfg.qk_norm == "none" and cfg.clip_qkv is None:  # q and k heads side by side: rotated in one pass
            cos, sin = rope
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(T, -1, hd), cos, sin, cfg.rope_interleave)
            return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :], qkv[:, self.q_size + self.kv_size :].view(T, -1, hd)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if cfg.qk_norm == "full":
            q, k = rms_norm(q, L.q_norm, cfg.rms_norm_eps), rms_norm(k, L.k_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(T, -1, hd), k.view(T, -1, hd), v.view(T, -1, hd)
        if cfg.qk_norm == "head":
            q, k = rms_norm(q, L.q_norm, cfg.rms_norm_eps), rms_norm(k, L.k_norm, cfg.rms_norm_eps)
        cos, sin = rope
        return apply_rope(q, cos, sin, cfg.rope_interleave), apply_rope(k, cos, sin, cfg.rope_interleave), v

    def project_mla(self, M: MLAWeights, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [T, nh, nope+rope] and what MLA's pools store: the normalised latent
        [T, 1, kv_lora_rank] and the shared rotated key [T, 1, qk_rope_head_dim]."""
        cfg = self.cfg
        T, nope = x.shape[0], cfg.qk_nope_head_dim
        if M.q is not None:
            q = F.linear(x, M.q)
        else:
            q = F.linear(rms_norm(F.linear(x, M.q_a, M.q_a_bias), M.q_a_norm, MLA_NORM_EPS), M.q_b)
        q = q.view(T, cfg.num_heads, -1)
        latent, k_rot = F.linear(x, M.kv_a, M.kv_a_bias).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        cos, sin = rope
        q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin, cfg.rope_interleave)], dim=-1)
        k_rot = apply_rope(k_rot.view(T, 1, -1), cos, sin, cfg.rope_interleave)
        return q, rms_norm(latent, M.kv_a_norm, MLA_NORM_EPS).view(T, 1, -1), k_rot

    def expand_mla(self, M: MLAWeights, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values of cached latents ([..., 1, r], [..., 1, rope] -> [..., nh, d])."""
        cfg = self.cfg
        kv = F.linear(latent.squeeze(-2), M.kv_b).unflatten(-1, (cfg.num_heads, -1))
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        return torch.cat([k_nope, k_rot.expand(*k_nope.shape[:-1], -1)], dim=-1), v

    def attention(self, i: int, x: torch.Tensor, meta: AttentionMetadata, rope, kv_cache, masks) -> torch.Tensor:
        """`masks`: (decode mask, one mask per prefill chunk), the layer's own (see window_masks)."""
        L = self.layers[i]
        pool_a, pool_b = kv_cache.layer(i)
        q = None
        if L.mla is None and self.plain_rope:  # rotated and written to the pools in one pass (paged_attention.rope_store)
            q = paged_attention.rope_store(L.qkv(x), *rope, pool_a, pool_b, meta.slot_mapping, self.cfg.num_heads)
        if q is None:
            q, new_a, new_b = self.project_mla(L.mla, x, rope) if L.mla else self.project(L, x, rope)
            pool_a.index_copy_(0, meta.slot_mapping, new_a)
            pool_b.index_copy_(0, meta.slot_mapping, new_b)

        def cached(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """What the two pools hold [*slots.shape, heads, dim] for these cache slots."""
            flat = slots.reshape(-1)
            a = pool_a.index_select(0, flat).view(*slots.shape, *pool_a.shape[1:])
            return a, pool_b.index_select(0, flat).view(*slots.shape, *pool_b.shape[1:])

        def kv(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Keys and values [*slots.shape, heads, dim] of these cache slots."""
            return self.expand_mla(L.mla, *cached(slots)) if L.mla else cached(slots)

        decode_mask, prefill_masks = masks

        def decode(qd: torch.Tensor) -> torch.Tensor:
            if L.mla is None and paged_attention.usable(qd, pool_a, pool_b):  # (CPU, float32)
                return paged_attention.decode_attention(qd, pool_a, pool_b, meta.decode_blocks, meta.decode_lens, kv_cache.block_size,
                                                        self.scale, self.cfg.window(i) or 0, L.sinks)
            return self.decode_in_chunks(L, qd, (pool_a, pool_b), meta.decode_blocks, decode_mask, kv_cache.block_size)

        T = x.shape[0]
        if meta.decode_tokens is None:  # a pure decode step: no scatter needed
            return L.o(decode(q).reshape(T, -1))
        out = q.new_empty(T, q.shape[1], self.v_dim)
        if meta.num_decode:
            out[meta.decode_tokens] = decode(q[meta.decode_tokens])
        for (start, n, slots, _), mask in zip(meta.prefills, prefill_masks):
            out[start : start + n] = self.prefill_attention(q[start : start + n], *kv(slots), mask, L.sinks)
        return L.o(out.view(T, -1))

    def decode_in_chunks(self, L: AttentionLayer, q: torch.Tensor, pools: tuple[torch.Tensor, torch.Tensor],
                         blocks: torch.Tensor, mask: torch.Tensor, block_size: int) -> torch.Tensor:
        """Decode attention of B sequences q [B, nh, d] over their cached contexts where the paged
        kernel does not apply (MLA, other devices and dtypes), a few sequences at a time on a CPU:
        each chunk's context is gathered and attended while it is still in the core's cache
        (DECODE_CHUNK_BYTES); gathering every context first and attending after runs 1.5-2x slower
        once they outgrow it (64 sequences x 200 tokens, 32 x 400)."""
        B, context = q.shape[0], mask.shape[-1]
        (pool_a, pool_b), rows = pools, B
        if q.is_cpu:
            rows = max(1, DECODE_CHUNK_BYTES // (context * (pool_a.stride(0) + pool_b.stride(0)) * pool_a.element_size()))

        def attend(q: torch.Tensor, blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            a, b = gather_blocks(pool_a, blocks, block_size, context), gather_blocks(pool_b, blocks, block_size, context)
            if L.mla:
                return self.latent_decode_attention(L.mla, q, a, b, mask)
            return self.decode_attention(q, a, b, mask, L.sinks)

        if rows >= B:
            return attend(q, blocks, mask)
        return torch.cat([attend(q[r : r + rows], blocks[r : r + rows], mask[r : r + rows]) for r in range(0, B, rows)])

    def latent_decode_attention(self, M: MLAWeights, q, latent, k_rot, mask: torch.Tensor) -> torch.Tensor:
        """MLA decode in the latent space (weights absorbed): the query's no-rope part is moved
        through kv_b's key half, scores are taken against the cached latents directly, and the
        attended latent goes through kv_b's value half; the context is never expanded to heads.
        q [B, nh, nope+rope], latent [B, C, 1, r], k_rot [B, C, 1, rope] -> [B, nh, v]."""
        cfg = self.cfg
        nope = cfg.qk_nope_head_dim
        w = M.kv_b.view(cfg.num_heads, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        latent, k_rot = latent.squeeze(2), k_rot.squeeze(2)
        q_latent = torch.einsum("bhn,hnr->bhr", q[..., :nope], w[:, :nope])
        scores = torch.matmul(q_latent, latent.transpose(1, 2)) + torch.matmul(q[..., nope:], k_rot.transpose(1, 2))
        probs = softmax_with_sinks(scores * self.scale + mask.view(mask.shape[0], 1, -1), None)  # [B, nh, C]
        return torch.einsum("bhr,hvr->bhv", torch.matmul(probs, latent), w[:, nope:])

    def prefill_attention(self, q, k, v, mask: torch.Tensor | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """A prefill chunk's queries [n, nh, d] against its context [C, kvh, d]; `mask` [n, C]
        bool (None: causal). SDPA, or with sinks the eager computation transformers does."""
        if sinks is None:
            qp, kp, vp = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, d]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
            return op[0].transpose(0, 1)
        n, C, kvh = q.shape[0], k.shape[0], k.shape[1]
        if mask is None:
            mask = torch.arange(C, device=q.device)[None, :] <= torch.arange(C - n, C, device=q.device)[:, None]
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        qg = q.view(n, kvh, -1, q.shape[-1]).permute(1, 2, 0, 3)  # [kvh, g, n, d]
        scores = torch.matmul(qg, k.permute(1, 2, 0).unsqueeze(1)) * self.scale + additive  # [kvh, g, n, C]
        probs = softmax_with_sinks(scores, sinks.view(kvh, -1, 1, 1))
        o = torch.matmul(probs, v.transpose(0, 1).unsqueeze(1))  # [kvh, g, n, dv]
        return o.permute(2, 0, 1, 3).reshape(n, -1, v.shape[-1])

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks) -> torch.Tensor:
        """One new token per sequence q [B, nh, d] against its padded context k, v [B, C, kvh, d]
        (strided views of the gathered blocks), grouped-query heads batched: the g query heads of
        a group are g rows against their one KV head, so no KV head is repeated and no context is
        copied again. SDPA (CPU: a flash kernel, no score tensor); with sinks, the eager
        computation transformers does (fp32 softmax)."""
        B, kvh = q.shape[0], k.shape[2]
        qg, kt, vt = q.view(B, kvh, -1, q.shape[-1]), k.transpose(1, 2), v.transpose(1, 2)  # [B, kvh, g|C, d]
        if sinks is None:
            return F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask, scale=self.scale).view(B, -1, v.shape[-1])
        scores = torch.matmul(qg, kt.transpose(2, 3)) * self.scale + mask
        probs = softmax_with_sinks(scores, sinks.view(1, kvh, -1, 1))  # [B, kvh, g, C]
        return torch.matmul(probs, vt).view(B, -1, v.shape[-1])

    def window_masks(self, meta: AttentionMetadata, window: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Masks of a sliding-window layer: keys `window` or more positions behind the query hidden."""
        decode_mask, device = meta.decode_mask, meta.positions.device
        if meta.num_decode:
            q_pos = meta.positions if meta.decode_tokens is None else meta.positions[meta.decode_tokens]
            k_pos = torch.arange(decode_mask.shape[-1], device=device)
            old = k_pos[None, :] <= q_pos[:, None] - window
            decode_mask = decode_mask.masked_fill(old[:, None, None, :], float("-inf"))
        prefill_masks = []
        for _, n, slots, _ in meta.prefills:
            C = slots.shape[0]
            behind = torch.arange(C - n, C, device=device)[:, None] - torch.arange(C, device=device)[None, :]
            prefill_masks.append((behind >= 0) & (behind < window))
        return decode_mask, prefill_masks

    # ---- the forward pass -----------------------------------------------------------------

    def forward(
        self, tokens: torch.Tensor, meta: AttentionMetadata, kv_cache, all_logits: bool = False
    ) -> Generator[MoECall, torch.Tensor, torch.Tensor]:
        """Run the step; yields at every sparse layer; returns the final hidden states of
        `meta.logits_index` tokens, or of every token when `all_logits`: the caller applies the LM
        head (`logits`) once over every micro-batch of a step, one pass over its weights."""
        eps = self.cfg.rms_norm_eps
        h = self.embed[tokens]
        rope = self.rope(meta.positions)
        full = (meta.decode_mask, [mask for *_, mask in meta.prefills])
        windowed = {w: self.window_masks(meta, w) for w in set(self.cfg.layer_windows) if w}
        for i, L in enumerate(self.layers):
            masks = windowed.get(self.cfg.window(i), full)
            h, x = add_rms_norm(h, self.attention(i, rms_norm(h, L.input_norm, eps), meta, rope, kv_cache, masks), L.post_norm, eps)
            if L.router is None:
                h = h + swiglu(x, *L.dense)
                continue
            weights, ids = self.route(L, x)
            routed = yield MoECall(i, x, ids, weights)
            if L.shared is not None:
                gate_up, down, gate = L.shared
                shared = swiglu(x, gate_up, down)
                routed = routed + (shared if gate is None else torch.sigmoid(gate(x)) * shared)
            h = h + routed
        return h if all_logits else h[meta.logits_index]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: next-token logits (fp32) of final hidden states."""
        return self.lm_head(rms_norm(h, self.norm, self.cfg.rms_norm_eps)).float()


class ExpertBank:
    """The routed experts one expert worker serves, keyed by (layer, expert): per layer one
    grouped kernel over all of them (`FusedExperts`) where it is installed and fits (CPU, float32,
    SwiGLU), else one packed (gate_up, down) pair of matmuls per expert."""

    def __init__(self, cfg: ModelConfig, files: WeightFiles, assigned: list[tuple[int, int]], dtype: torch.dtype, device: str = "cpu"):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.experts: dict[tuple[int, int], tuple[Linear, Linear]] = {}
        self.fused: dict[int, FusedExperts] = {}  # layer -> its experts, stacked in `slot` order
        self.slot: dict[tuple[int, int], int] = {}
        if cfg.expert_act == "clamped_swiglu":
            load_fused_experts(self, files, assigned)
            return
        names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        fuse = self.device.type == "cpu" and dtype == torch.float32 and c_kernels() is not None
        for layer in sorted({layer for layer, _ in assigned}):
            gate_ups, downs = [], []
            for e in sorted(e for lay, e in assigned if lay == layer):
                p = f"model.layers.{layer}.{cfg.expert_prefix}.experts.{e}."
                gate, up, down = (files.get(p + n + ".weight", dtype, device) for n in names)
                if fuse:
                    self.slot[(layer, e)] = len(gate_ups)
                    gate_ups.append(torch.cat([gate, up]))
                    downs.append(down)
                else:
                    self.experts[(layer, e)] = (Linear(torch.cat([gate, up])), Linear(down))
            if fuse:
                self.fused[layer] = FusedExperts(gate_ups, downs)

    @property
    def nbytes(self) -> int:
        return sum(self.expert_nbytes(key) for key in self.keys())

    def expert_nbytes(self, key: tuple[int, int]) -> int:
        if key in self.slot:
            return self.fused[key[0]].expert_nbytes
        a, b = self.experts[key]
        return a.nbytes + b.nbytes

    def keys(self) -> list[tuple[int, int]]:
        return [*self.slot, *self.experts]

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.slot or key in self.experts

    def run_layer(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor) -> torch.Tensor:
        """Rows x grouped by expert (`counts[i]` rows for `experts[i]`, all of this layer) through
        their experts, in the same order."""
        if layer in self.fused:
            return self.fused[layer](x, [self.slot[(layer, e)] for e in experts], counts)
        out, start = torch.empty_like(x), 0
        for e, n in zip(experts, counts):
            out[start : start + n] = self.run(layer, e, x[start : start + n])
            start += n
        return out

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        if layer in self.fused:
            return self.run_layer(layer, [expert], [x.shape[0]], x)
        if self.cfg.expert_act == "clamped_swiglu":
            return clamped_swiglu_expert(self, layer, expert, x)
        gate_up, down = self.experts[(layer, expert)]
        gate, up = gate_up(x).chunk(2, dim=-1)
        return down(F.silu(gate) * up)


# ---- per-family expert variants (kept apart from ExpertBank's common path) ---------------------


def load_fused_experts(bank: ExpertBank, files: WeightFiles, assigned: list[tuple[int, int]]) -> None:
    """gpt-oss stores each layer's experts fused: gate_up_proj [E, H, 2I] with gate and up
    interleaved by column, down_proj [E, I, H], and biases; the released checkpoints hold the two
    matrices as MXFP4 (`*_blocks`, `*_scales`), dequantised here. Kept as ExpertBank keeps every
    expert: (gate_up, down) Linears, gate rows first, here with their biases."""
    from .weights import fused_expert_weight

    dtype, device = bank.dtype, bank.device
    for layer in sorted({layer for layer, _ in assigned}):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up, down = (fused_expert_weight(files, p + n, dtype) for n in ("gate_up_proj", "down_proj"))
        gate_up_bias, down_bias = (files.get(p + n, dtype) for n in ("gate_up_proj_bias", "down_proj_bias"))
        for e in (e for lay, e in assigned if lay == layer):
            w, b = gate_up[e].t(), gate_up_bias[e]  # [2I, H], rows gate, up, gate, up, ...
            bank.experts[(layer, e)] = (
                Linear(torch.cat([w[0::2], w[1::2]]).to(device), torch.cat([b[0::2], b[1::2]]).to(device)),
                Linear(down[e].t().contiguous().to(device), down_bias[e].clone().to(device)),
            )


def clamped_swiglu_expert(bank: ExpertBank, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """gpt-oss's expert: biased projections; gate clamped above at `limit`, up to [-limit, limit];
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate_up, down = bank.experts[(layer, expert)]
    limit, alpha = bank.cfg.swiglu_limit, bank.cfg.swiglu_alpha
    gate, up = gate_up(x).chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return down((up + 1) * (gate * torch.sigmoid(gate * alpha)))
