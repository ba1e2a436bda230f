"""Checkpoint loading: sharded files, and clear errors for broken or unsupported checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import prompts_of_lengths
from tarragon import LLM, SamplingParams
from tarragon.config import ModelConfig, ModelLoadError
from tarragon.make_model import make_model
from tarragon.weights import WeightFiles


def test_sharded_checkpoint_gives_the_same_tokens(tiny_models, tmp_path):
    sharded = make_model(tmp_path / "sharded", "mixtral", "tiny", seed=1, shard_bytes=300_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    prompts = prompts_of_lengths([5, 17, 9], 1024)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for name, d in (("single", tiny_models["mixtral"]), ("sharded", sharded)):
        with LLM(d, attention_workers=1, expert_workers=2) as llm:
            outs[name] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["single"] == outs["sharded"]


def test_transformers_loads_our_checkpoints(tiny_models):
    """make-model writes exact HF layout: transformers finds every weight, none left over."""
    from transformers import AutoModelForCausalLM

    for family, d in tiny_models.items():
        _, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (family, info)


def broken_copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_files_give_clear_errors(tiny_models, tmp_path):
    d = broken_copy(tiny_models["mixtral"], tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="neither model.safetensors"):
        LLM(d, attention_workers=1, expert_workers=1)
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path), attention_workers=1, expert_workers=1)


def test_corrupt_files_give_clear_errors(tiny_models, tmp_path):
    d = broken_copy(tiny_models["mixtral"], tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        LLM(d, attention_workers=1, expert_workers=1)
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ModelConfig.from_dir(d)


def test_missing_shard_and_tensor(tmp_path):
    d = make_model(tmp_path / "m", "olmoe", "tiny", shard_bytes=300_000)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="shard listed in the index is missing"):
        WeightFiles(d)
    d2 = make_model(tmp_path / "m2", "olmoe", "tiny", shard_bytes=300_000)
    index = json.loads((d2 / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (d2 / "model.safetensors.index.json").write_text(json.dumps(index))
    with WeightFiles(d2) as files, pytest.raises(ModelLoadError, match="'model.norm.weight' missing"):
        files.get("model.norm.weight", dtype=None)


def test_unsupported_architecture_lists_supported(tiny_models, tmp_path):
    d = broken_copy(tiny_models["mixtral"], tmp_path / "llama")
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*supported: mixtral, qwen3_moe, olmoe, qwen2_moe, glm4_moe, deepseek_v3, gpt_oss"):
        LLM(d)
    # The CLI says it in one line, no traceback.
    r = subprocess.run([sys.executable, "-m", "tarragon", "generate", "--model", d, "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unsupported architecture" in r.stderr and "Traceback" not in r.stderr
