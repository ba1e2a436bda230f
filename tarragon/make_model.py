"""Random-weight checkpoints in exact Hugging Face layout, for the demo, tests and benchmarks.

No weights can be downloaded here, so Tarragon makes its own: `config.json` as transformers
writes it, `model.safetensors` (or shards plus an index) with the on-disk tensor names of each
family, and a byte-level BPE tokenizer trained on the Python standard library's sources.
Weights are drawn with a large enough spread that routing and greedy decoding are not near-ties.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import SUPPORTED_FAMILIES

FAMILIES = SUPPORTED_FAMILIES  # a demo checkpoint of every family served
SIZES = {
    # tiny: fast tests; bench: the performance reference point (Mixtral layout).
    "tiny": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 num_experts=8, top_k=2, intermediate_size=128, moe_intermediate_size=64, std=0.2),
    "bench": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  num_experts=8, top_k=2, intermediate_size=512, moe_intermediate_size=512, std=0.15),
    # gpu: sized to give a GPU real work (~1.9B parameters, 3.8 GB in bf16) yet build in a minute.
    "gpu": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                num_experts=8, top_k=2, intermediate_size=4096, moe_intermediate_size=4096, std=0.05),
}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hf_config(family: str, size: str) -> dict:
    s = SIZES[size]
    base = dict(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        num_experts_per_tok=s["top_k"], hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, tie_word_embeddings=False,
        initializer_range=s["std"], bos_token_id=0, eos_token_id=1, pad_token_id=2, attention_dropout=0.0,
        use_cache=True, dtype="float32", output_router_logits=False, router_aux_loss_coef=0.001,
    )
    if family == "mixtral":
        return dict(base, architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=s["intermediate_size"],
                    num_local_experts=s["num_experts"], router_jitter_noise=0.0, sliding_window=None, head_dim=None)
    if family == "qwen3_moe":
        return dict(base, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=s["num_experts"],
                    intermediate_size=s["intermediate_size"], moe_intermediate_size=s["moe_intermediate_size"],
                    head_dim=2 * s["hidden_size"] // s["num_attention_heads"],  # explicit, not hidden/heads
                    decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True, attention_bias=False,
                    use_sliding_window=False, sliding_window=None)
    if family == "olmoe":
        return dict(base, architectures=["OlmoeForCausalLM"], model_type="olmoe", num_experts=s["num_experts"],
                    intermediate_size=s["moe_intermediate_size"], norm_topk_prob=False, attention_bias=False, clip_qkv=None)
    if family == "qwen2_moe":
        return dict(base, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=s["num_experts"],
                    num_hidden_layers=s["num_hidden_layers"] + 1, intermediate_size=s["intermediate_size"],
                    moe_intermediate_size=s["moe_intermediate_size"], shared_expert_intermediate_size=s["intermediate_size"],
                    decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False, qkv_bias=True,
                    use_sliding_window=False, sliding_window=None, max_window_layers=28)
    if family == "glm4_moe":  # GLM-4.5's layout: half-rotary heads, q/k norm, biased q/k/v, one shared expert
        return dict(base, architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", n_routed_experts=s["num_experts"],
                    intermediate_size=s["intermediate_size"], moe_intermediate_size=s["moe_intermediate_size"],
                    head_dim=2 * s["hidden_size"] // s["num_attention_heads"], n_shared_experts=1, first_k_dense_replace=1,
                    n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True,
                    attention_bias=True, rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5})
    if family == "deepseek_v3":  # DeepSeek-V3's layout, scaled down: MLA, 4 groups of experts, YaRN
        H, context = s["hidden_size"], 256 if size == "tiny" else 4096
        return dict(base, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", n_routed_experts=s["num_experts"],
                    num_key_value_heads=s["num_attention_heads"], intermediate_size=s["intermediate_size"],
                    moe_intermediate_size=s["moe_intermediate_size"], n_shared_experts=1, first_k_dense_replace=1,
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=3 * H // 4,
                    kv_lora_rank=H // 2, qk_nope_head_dim=H // 4, qk_rope_head_dim=H // 8, v_head_dim=H // 4,
                    rope_interleave=True, attention_bias=False, num_nextn_predict_layers=0, max_position_embeddings=context,
                    rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": context // 4,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8})
    if family == "gpt_oss":  # gpt-oss's layout: sinks, sliding/full layers, biases, clamped SwiGLU, YaRN
        return dict(base, architectures=["GptOssForCausalLM"], model_type="gpt_oss", num_local_experts=s["num_experts"],
                    intermediate_size=s["moe_intermediate_size"], head_dim=2 * s["hidden_size"] // s["num_attention_heads"],
                    attention_bias=True, sliding_window=8 if size == "tiny" else 128, max_position_embeddings=256 if size == "tiny" else 4096,
                    layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(s["num_hidden_layers"])],
                    swiglu_alpha=1.702, swiglu_limit=1.5,  # a small limit, so that clamping happens in a tiny model
                    rope_parameters={"rope_theta": 150000.0, "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def fused_experts(cfg, m: str, mat, g: torch.Generator, mxfp4: bool) -> dict[str, torch.Tensor]:
    """gpt-oss's fused experts of one layer (plain, or MXFP4 blocks and scales as released)."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    t = {m + "experts.gate_up_proj_bias": mat(E, 2 * I), m + "experts.down_proj_bias": mat(E, H)}
    for name, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
        if not mxfp4:
            t[m + f"experts.{name}"] = mat(E, rows, cols).transpose(1, 2)  # [E, in, out]
            continue
        # Random FP4 codes, scales 2^-5..2^-3: a spread like mat()'s, every value exactly representable.
        t[m + f"experts.{name}_blocks"] = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
        t[m + f"experts.{name}_scales"] = torch.randint(122, 125, (E, rows, cols // 32), generator=g, dtype=torch.uint8)
    return t


def attention_weights(cfg, a: str, mat, norm) -> dict[str, torch.Tensor]:
    """One layer's attention tensors under their on-disk names (biases drawn, not zero)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    t = {}
    if cfg.mla:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            t[a + "q_proj.weight"] = mat(cfg.num_heads * qk, H)
        else:
            t[a + "q_a_proj.weight"], t[a + "q_a_layernorm.weight"] = mat(cfg.q_lora_rank, H), norm(cfg.q_lora_rank)
            t[a + "q_b_proj.weight"] = mat(cfg.num_heads * qk, cfg.q_lora_rank)
        t[a + "kv_a_proj_with_mqa.weight"] = mat(cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
        t[a + "kv_a_layernorm.weight"] = norm(cfg.kv_lora_rank)
        t[a + "kv_b_proj.weight"] = mat(cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        t[a + "o_proj.weight"] = mat(H, cfg.num_heads * cfg.v_head_dim)
        return t
    for n, rows in (("q", cfg.num_heads * hd), ("k", cfg.num_kv_heads * hd), ("v", cfg.num_kv_heads * hd)):
        t[a + f"{n}_proj.weight"] = mat(rows, H)
        if cfg.qkv_bias:
            t[a + f"{n}_proj.bias"] = mat(rows)
    t[a + "o_proj.weight"] = mat(H, cfg.num_heads * hd)
    if cfg.o_bias:
        t[a + "o_proj.bias"] = mat(H)
    if cfg.attention_sinks:  # zero-initialised in transformers: drawn here, so they must be used
        t[a + "sinks"] = mat(cfg.num_heads, scale=1.0)
    if cfg.qk_norm == "head":
        t[a + "q_norm.weight"], t[a + "k_norm.weight"] = norm(hd), norm(hd)
    elif cfg.qk_norm == "full":
        t[a + "q_norm.weight"], t[a + "k_norm.weight"] = norm(cfg.num_heads * hd), norm(cfg.num_kv_heads * hd)
    return t


def random_weights(raw: dict, seed: int = 0, mxfp4: bool = False) -> dict[str, torch.Tensor]:
    from .config import ModelConfig

    cfg = ModelConfig.from_dict(raw)
    g = torch.Generator().manual_seed(seed)
    std = raw["initializer_range"]
    H = cfg.hidden_size

    def mat(*shape, scale: float = std):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):  # near one, but not one: a norm loaded into the wrong place shows
        return 1.0 + 0.05 * torch.randn(n, generator=g)

    t = {"model.embed_tokens.weight": mat(cfg.vocab_size, H), "model.norm.weight": norm(H), "lm_head.weight": mat(cfg.vocab_size, H)}
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        t[p + "input_layernorm.weight"] = norm(H)
        t[p + "post_attention_layernorm.weight"] = norm(H)
        t.update(attention_weights(cfg, a, mat, norm))
        if not cfg.is_sparse(i):
            I = cfg.dense_intermediate_size
            t.update({p + "mlp.gate_proj.weight": mat(I, H), p + "mlp.up_proj.weight": mat(I, H), p + "mlp.down_proj.weight": mat(H, I)})
            continue
        m = p + cfg.expert_prefix + "."
        if cfg.family == "gpt_oss":
            t.update({m + "router.weight": mat(cfg.num_experts, H), m + "router.bias": mat(cfg.num_experts)})
            t.update(fused_experts(cfg, m, mat, g, mxfp4))
            continue
        t[m + "gate.weight"] = mat(cfg.num_experts, H)
        if cfg.router == "sigmoid_group":  # zero in a fresh transformers model: drawn, so it must be used
            t[m + "gate.e_score_correction_bias"] = 0.1 * torch.randn(cfg.num_experts, generator=g)
        I = cfg.expert_intermediate_size
        for e in range(cfg.num_experts):
            x = m + f"experts.{e}."
            t[x + names[0] + ".weight"], t[x + names[1] + ".weight"], t[x + names[2] + ".weight"] = mat(I, H), mat(I, H), mat(H, I)
        if cfg.shared_expert_intermediate_size:
            S = cfg.shared_expert_intermediate_size
            s = f"{m}{cfg.shared_prefix}."
            t.update({s + "gate_proj.weight": mat(S, H), s + "up_proj.weight": mat(S, H), s + "down_proj.weight": mat(H, S)})
            if cfg.shared_expert_gated:
                t[m + "shared_expert_gate.weight"] = mat(1, H)
    return {k: v.contiguous() for k, v in t.items()}


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the standard library's own sources: real, offline, ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in lib.glob("*.py"))[:400]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return tok


def make_model(out: str | Path, family: str = "mixtral", size: str = "tiny", seed: int = 0, shard_bytes: int | None = None,
               overrides: dict | None = None, mxfp4: bool = False) -> Path:
    """Write a checkpoint folder; `shard_bytes` splits the weights into an indexed, sharded set;
    `overrides` replaces config.json fields (e.g. a variant's q_lora_rank=None) before drawing;
    `mxfp4` (gpt_oss) writes the expert matrices as MXFP4 blocks and scales, as gpt-oss is released."""
    if mxfp4 and family != "gpt_oss":
        raise ValueError("MXFP4 experts are gpt_oss's release format; other families are written plain")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config(family, size) | (overrides or {})
    raw["transformers_version"] = "5.0.0"
    if mxfp4:  # as released: experts MXFP4, everything else bf16
        raw["quantization_config"], raw["dtype"] = MXFP4_CONFIG, "bfloat16"
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, indent=2))
    tensors = random_weights(raw, seed, mxfp4)
    if mxfp4:
        tensors = {k: t if t.dtype == torch.uint8 else t.to(torch.bfloat16) for k, t in tensors.items()}
    meta = {"format": "pt"}
    if not shard_bytes:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size_now = 0
        for name, t in tensors.items():
            if size_now and size_now + t.nbytes > shard_bytes:
                shards.append({})
                size_now = 0
            shards[-1][name] = t
            size_now += t.nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok = train_tokenizer(raw["vocab_size"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": raw["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("TARRAGON_CACHE", Path.home() / ".cache" / "tarragon"))


def demo_model() -> Path:
    """The built-in demo model (Mixtral layout, bench size), built on first use."""
    path = cache_dir() / "demo-mixtral-bench"
    if not (path / "tokenizer.json").is_file():
        print(f"building the demo model in {path} (once)...", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
        make_model(tmp, "mixtral", "bench")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path
