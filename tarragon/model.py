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

from dataclasses import dataclass
from typing import Generator

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kernels import Linear
from .weights import WeightFiles


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as transformers does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


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
    decode_slots: torch.Tensor  # [B, C] context slots of each decode sequence (padded)
    decode_mask: torch.Tensor  # [B, 1, 1, C] additive: 0 where attended, -inf on padding
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]  # (start, len, slots, mask|None=causal)
    logits_index: torch.Tensor  # [N] tokens whose next-token logits are needed

    def to(self, device: torch.device) -> "AttentionMetadata":
        """Built on the host (small tensors from Python lists), used where the KV cache is."""
        if device.type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return AttentionMetadata(
            move(self.positions), move(self.slot_mapping), move(self.decode_tokens), self.num_decode, move(self.decode_slots),
            move(self.decode_mask), [(s, n, move(slots), move(mask)) for s, n, slots, mask in self.prefills], move(self.logits_index))


@dataclass
class AttentionLayer:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor | None  # [E, H] on sparse layers
    dense: tuple[torch.Tensor, torch.Tensor] | None  # (gate_up, down) on dense layers
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (gate_up, down, gate[1,H])


class AttentionModel:
    """Everything but the routed experts."""

    def __init__(self, cfg: ModelConfig, files: WeightFiles, dtype: torch.dtype, device: str = "cpu"):
        self.cfg = cfg
        self.dtype = dtype

        def w(name: str) -> torch.Tensor:
            return files.get(name, dtype, device)

        def opt(name: str) -> torch.Tensor | None:
            return w(name) if name in files else None

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = Linear(self.embed if cfg.tie_word_embeddings and "lm_head.weight" not in files else w("lm_head.weight"))
        self.layers: list[AttentionLayer] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            biases = [opt(a + f"{n}_proj.bias") for n in "qkv"]
            mlp = p + cfg.expert_prefix + "."
            shared = None
            if cfg.is_sparse(i) and cfg.shared_expert_intermediate_size:
                s = mlp + "shared_expert."
                shared = (
                    torch.cat([w(s + "gate_proj.weight"), w(s + "up_proj.weight")]),
                    w(s + "down_proj.weight"),
                    w(mlp + "shared_expert_gate.weight"),
                )
            dense = None
            if not cfg.is_sparse(i):
                dense = (torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]), w(p + "mlp.down_proj.weight"))
            self.layers.append(
                AttentionLayer(
                    qkv=torch.cat([w(a + f"{n}_proj.weight") for n in "qkv"]),
                    qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                    o=w(a + "o_proj.weight"),
                    o_bias=opt(a + "o_proj.bias"),
                    q_norm=opt(a + "q_norm.weight"),
                    k_norm=opt(a + "k_norm.weight"),
                    input_norm=w(p + "input_layernorm.weight"),
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    router=w(mlp + "gate.weight") if cfg.is_sparse(i) else None,
                    dense=dense,
                    shared=shared,
                )
            )
        hd = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))
        self.q_size = cfg.num_heads * hd
        self.kv_size = cfg.num_kv_heads * hd

    # ---- pieces -------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    def route(self, layer: AttentionLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax in fp32, top-k, optional renormalisation: the families' shared router."""
        probs = torch.softmax(F.linear(x, layer.router).float(), dim=-1)
        weights, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def attention(self, i: int, x: torch.Tensor, meta: AttentionMetadata, rope, kv_cache) -> torch.Tensor:
        cfg, L = self.cfg, self.layers[i]
        T, hd = x.shape[0], cfg.head_dim
        qkv = F.linear(x, L.qkv, L.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if cfg.qk_norm == "full":
            q, k = rms_norm(q, L.q_norm, cfg.rms_norm_eps), rms_norm(k, L.k_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(T, -1, hd), k.view(T, -1, hd), v.view(T, -1, hd)
        if cfg.qk_norm == "head":
            q, k = rms_norm(q, L.q_norm, cfg.rms_norm_eps), rms_norm(k, L.k_norm, cfg.rms_norm_eps)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_pool, v_pool = kv_cache.layer(i)
        k_pool.index_copy_(0, meta.slot_mapping, k)
        v_pool.index_copy_(0, meta.slot_mapping, v)

        scale = hd**-0.5
        if meta.decode_tokens is None:  # a pure decode step: no scatter needed
            return F.linear(self.decode_attention(q, k_pool, v_pool, meta, scale).view(T, -1), L.o, L.o_bias)
        out = torch.empty_like(q)
        if meta.num_decode:
            out[meta.decode_tokens] = self.decode_attention(q[meta.decode_tokens], k_pool, v_pool, meta, scale)
        for start, n, slots, mask in meta.prefills:
            qp = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, nh, n, hd]
            kp = k_pool[slots].transpose(0, 1).unsqueeze(0)
            vp = v_pool[slots].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
            out[start : start + n] = op[0].transpose(0, 1)
        return F.linear(out.view(T, -1), L.o, L.o_bias)

    def decode_attention(self, q: torch.Tensor, k_pool, v_pool, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """One new token per sequence against its padded context, grouped-query heads batched:
        the eager computation (fp32 softmax), without materialising repeated K/V heads."""
        B, C = meta.decode_slots.shape
        kvh, hd = self.cfg.num_kv_heads, self.cfg.head_dim
        flat = meta.decode_slots.reshape(-1)
        k = k_pool.index_select(0, flat).view(B, C, kvh, hd).permute(0, 2, 3, 1)  # [B, kvh, hd, C]
        v = v_pool.index_select(0, flat).view(B, C, kvh, hd).transpose(1, 2)  # [B, kvh, C, hd]
        scores = torch.matmul(q.view(B, kvh, -1, hd), k) * scale + meta.decode_mask  # [B, kvh, g, C]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).view(B, -1, hd)

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
        for i, L in enumerate(self.layers):
            h = h + self.attention(i, rms_norm(h, L.input_norm, eps), meta, rope, kv_cache)
            x = rms_norm(h, L.post_norm, eps)
            if L.router is None:
                h = h + swiglu(x, *L.dense)
                continue
            weights, ids = self.route(L, x)
            routed = yield MoECall(i, x, ids, weights)
            if L.shared is not None:
                gate_up, down, gate = L.shared
                routed = routed + torch.sigmoid(F.linear(x, gate)) * swiglu(x, gate_up, down)
            h = h + routed
        return h if all_logits else h[meta.logits_index]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: next-token logits (fp32) of final hidden states."""
        return self.lm_head(rms_norm(h, self.norm, self.cfg.rms_norm_eps)).float()


class ExpertBank:
    """The routed experts one expert worker serves, keyed by (layer, expert)."""

    def __init__(self, cfg: ModelConfig, files: WeightFiles, assigned: list[tuple[int, int]], dtype: torch.dtype, device: str = "cpu"):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.experts: dict[tuple[int, int], tuple[Linear, Linear]] = {}
        names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for layer, e in assigned:
            p = f"model.layers.{layer}.{cfg.expert_prefix}.experts.{e}."
            gate, up, down = (files.get(p + n + ".weight", dtype, device) for n in names)
            self.experts[(layer, e)] = (Linear(torch.cat([gate, up])), Linear(down))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.experts.values())

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.experts

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.experts[(layer, expert)]
        gate, up = gate_up(x).chunk(2, dim=-1)
        return down(F.silu(gate) * up)
