"""The 2026 MoE families (GLM-4.5, DeepSeek-V3 / Kimi K2, gpt-oss): outputs equal to transformers,
routing equal to transformers' routers, MLA's latent KV in the cache and the checkpoint store,
gpt-oss's MXFP4 experts, failover."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from conftest import Reference, prompts_of_lengths
from failover import max_gap, run_with_fault, wait_replaced, wait_until
from tarragon import LLM, SamplingParams
from tarragon import protocol as P
from tarragon.checkpoint_store import CheckpointStore
from tarragon.config import ModelConfig
from tarragon.kv_cache import KVCache, bytes_per_block
from tarragon.make_model import hf_config, make_model
from tarragon.model import sigmoid_group_topk, softmax_topk, topk_softmax

LENGTHS = [3, 9, 20, 33, 5, 40]  # fewer than test_core: three families, two layouts each
MAX_TOKENS = 16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logits=True)
NEW_FAMILIES = ["glm4_moe", "deepseek_v3", "gpt_oss"]


@pytest.fixture(scope="module")
def references() -> dict:
    """transformers' greedy tokens and prompt logits, computed once per checkpoint (the slow part)."""
    cache: dict = {}

    def get(model_dir: str, lengths: list[int]):
        if model_dir not in cache:
            ref = Reference(model_dir)
            prompts = prompts_of_lengths(lengths, 1024, seed=len(model_dir))
            cache[model_dir] = prompts, [ref.greedy(p, MAX_TOKENS) for p in prompts], [ref.logits(p) for p in prompts]
        return cache[model_dir]

    return get


def check_against_reference(reference, model_dir: str, aws: int, ews: int, lengths=LENGTHS, staggered: bool = True, **engine) -> None:
    """Greedy tokens identical to transformers, prompt logits within 1e-4; with `staggered`,
    also for a second wave submitted while the first decodes (prefill mixed with decode)."""
    prompts, expected, logits = reference(model_dir, lengths)
    with LLM(model_dir, attention_workers=aws, expert_workers=ews, **engine) as llm:
        runs = [llm.generate(prompts, GREEDY)]
        if staggered:
            first = [llm.submit(p, GREEDY) for p in prompts[:3]]
            wait_until(lambda: min(len(r.tokens) for r in first) >= 3, 60, "first wave")
            second = [llm.submit(p, GREEDY) for p in prompts[3:]]
            runs.append([llm.wait(r, 120) for r in first + second])
    for outs in runs:
        assert [o.token_ids for o in outs] == expected
    for o, ref_logits in zip(runs[0], logits):
        torch.testing.assert_close(o.prompt_logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("aws,ews", [(2, 3), (1, 1)])
def test_matches_transformers(tiny_models, references, family, aws, ews):
    """2x3: batched and staggered. 1x1: prompts prefilled in chunks of at most 16 tokens, so later
    chunks attend to cached context (offset causal, sliding-window and sink masks, MLA latents)."""
    if aws > 1:
        check_against_reference(references, tiny_models[family], aws, ews)
    else:
        check_against_reference(references, tiny_models[family], aws, ews, staggered=False, max_num_batched_tokens=16)


def test_deepseek_without_q_lora_and_yarn(tmp_path, references):
    """DeepSeek-V2-Lite-style queries (q_proj, no low-rank bottleneck) and plain RoPE."""
    d = make_model(tmp_path / "ds", "deepseek_v3", "tiny", seed=2,
                   overrides=dict(q_lora_rank=None, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}))
    assert ModelConfig.from_dir(d).q_lora_rank is None
    check_against_reference(references, str(d), 1, 1, lengths=[5, 17, 30], staggered=False)


def test_gpt_oss_mxfp4_bf16_checkpoint(tmp_path, references):
    """A checkpoint as gpt-oss is released (experts as MXFP4 blocks and scales, the rest bf16) serves
    exactly what transformers computes from the same weights, dequantised by transformers' own code."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    released = make_model(tmp_path / "mxfp4", "gpt_oss", "tiny", seed=3, mxfp4=True)
    tensors = load_file(released / "model.safetensors")
    assert any(k.endswith("_blocks") for k in tensors) and tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    plain = tmp_path / "plain"
    shutil.copytree(released, plain)
    for name in [k.removesuffix("_blocks") for k in tensors if k.endswith("_blocks")]:
        blocks, scales = tensors.pop(name + "_blocks"), tensors.pop(name + "_scales")
        tensors[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).contiguous()
    save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    lengths = [6, 19, 31]
    prompts, expected, logits = references(str(plain), lengths)
    with LLM(str(released), attention_workers=1, expert_workers=1) as llm:
        outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    for o, ref_logits in zip(outs, logits):
        torch.testing.assert_close(o.prompt_logits, ref_logits, atol=1e-4, rtol=0)


def test_routers_match_transformers():
    """The routing functions against transformers' own routers, on router logits with ties unlikely;
    the correction bias must change some choices (it is drawn, so ignoring it would show)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralTopKRouter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    raw = hf_config("deepseek_v3", "tiny") | dict(hidden_size=32, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    ref = DeepseekV3TopkRouter(DeepseekV3Config(**raw))
    with torch.no_grad():
        ref.weight.normal_(0, 0.3, generator=g)
        ref.e_score_correction_bias.normal_(0, 0.1, generator=g)
    cfg = ModelConfig.from_dict(raw)
    _, ref_w, ref_ids = ref(x)
    logits = torch.nn.functional.linear(x, ref.weight)
    w, ids = sigmoid_group_topk(logits, ref.e_score_correction_bias, cfg)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order))
    _, unbiased = sigmoid_group_topk(logits, None, cfg)
    assert not torch.equal(unbiased.sort(-1)[0], ids.sort(-1)[0])

    mcfg = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    mref = MixtralTopKRouter(mcfg)
    with torch.no_grad():
        mref.weight.normal_(0, 0.3, generator=g)
    _, ref_w, ref_ids = mref(x)
    w, ids = softmax_topk(torch.nn.functional.linear(x, mref.weight), None, ModelConfig.from_dict(hf_config("mixtral", "tiny")))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w.float())

    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    oref = GptOssTopKRouter(GptOssConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=3))
    with torch.no_grad():
        oref.weight.normal_(0, 0.3, generator=g)
        oref.bias.normal_(0, 0.3, generator=g)
    _, ref_w, ref_ids = oref(x)
    raw = hf_config("gpt_oss", "tiny") | dict(num_experts_per_tok=3)
    w, ids = topk_softmax(torch.nn.functional.linear(x, oref.weight, oref.bias), None, ModelConfig.from_dict(raw))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_mla_caches_the_latent_not_heads(tiny_models):
    """The KV pool and the checkpoint store hold kv_lora_rank + rope dims per token and layer."""
    cfg = ModelConfig.from_dir(tiny_models["deepseek_v3"])
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    expanded = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert bytes_per_block(cfg, 16, torch.float32) == cfg.num_layers * 16 * latent * 4
    kv = KVCache(cfg, 4, 16, torch.float32)
    assert kv.k.shape == (cfg.num_layers, 64, 1, cfg.kv_lora_rank) and kv.v.shape == (cfg.num_layers, 64, 1, cfg.qk_rope_head_dim)
    store = CheckpointStore(1 << 20)
    k, v = kv.k[:, :10], kv.v[:, :10]
    store.write("aw0", P.KVWrite(0, ["r"], [0], [10], P.tensor_meta(k), P.tensor_meta(v), []), k, v)
    per_token = store.stats()["bytes"] / 10
    assert per_token == cfg.num_layers * latent * 4 < cfg.num_layers * expanded * 4
    committed, rk, rv = store.restore("r")
    assert committed == 10 and torch.equal(rk, k) and torch.equal(rv, v)
    print(f"\ncheckpoint bytes per token: latent {per_token:.0f}, expanded heads {cfg.num_layers * expanded * 4} (fp32)")


FAILOVER_PROMPTS = prompts_of_lengths([4 + 5 * i for i in range(8)], 1024, seed=13)
FAILOVER_PARAMS = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)


def test_deepseek_failover_expert_and_attention_worker(tiny_models):
    """On DeepSeek-V3: an EW SIGKILLed mid-decode (shadows take over), then a busy AW SIGKILLed
    mid-decode (its requests restored from latent KV checkpoints): failure-free tokens."""
    with LLM(tiny_models["deepseek_v3"], attention_workers=2, expert_workers=3, shadows=1, recovery="tarragon") as llm:
        baseline = [o.token_ids for o in llm.generate(FAILOVER_PROMPTS, FAILOVER_PARAMS)]
        victim = {}

        def kill_ready_ew():  # a ready one: on a loaded machine a slow EW may already have been replaced
            victim["name"] = next(w.name for w in llm.workers() if w.role == "expert" and w.state == "ready")
            llm.kill(victim["name"], signal.SIGKILL)

        outs = run_with_fault(llm, kill_ready_ew, 30, FAILOVER_PROMPTS, FAILOVER_PARAMS)
        assert [o.token_ids for o in outs] == baseline
        assert any(e.kind == "worker_failed" and e.worker == victim["name"] for e in llm.events())
        wait_replaced(llm, victim["name"])

        def kill_busy_aw():
            held = {r.worker for r in llm.in_flight() if not r.done.is_set()}
            victim["name"] = next(w.name for w in llm.workers() if w.role == "attention" and w.state == "ready" and w.name in held)
            llm.kill(victim["name"], signal.SIGKILL)

        outs = run_with_fault(llm, kill_busy_aw, 30, FAILOVER_PROMPTS, FAILOVER_PARAMS)
        assert [o.token_ids for o in outs] == baseline
        restored = [e for e in llm.events() if e.kind == "restored"]
        assert restored and any(" 0 of " not in e.detail for e in restored)  # KV really came from the store
        print(f"\nAW {victim['name']} killed: max gap {1000 * max_gap(outs):.0f} ms")
