"""Device placement: GPU workers each get a GPU of their own; asking for CUDA without one is a
clear error. (The CUDA datapath itself runs on a GPU machine: bench/gpu_check.sh.)"""

from __future__ import annotations

import pytest

from tarragon import LLM
from tarragon.launcher import LocalLauncher
from tarragon.config import ModelSource, TarragonConfig
from tarragon.worker import WorkerSpec


def spec(name: str, role: str, device: str = "cuda") -> WorkerSpec:
    return WorkerSpec(name=name, role=role, config=TarragonConfig(ModelSource("", "bfloat16", device)), orch_endpoint="", parent_pid=0)


def test_gpu_workers_take_the_visible_gpus_in_turn(tmp_path):
    launcher = LocalLauncher(tmp_path, gpus=["2", "5"])
    seen = [launcher.gpu_env(spec(n, r)) for n, r in (("ew0", "expert"), ("store", "store"), ("ew1", "expert"), ("aw0", "attention"))]
    assert seen == [{"CUDA_VISIBLE_DEVICES": "2"}, {}, {"CUDA_VISIBLE_DEVICES": "5"}, {"CUDA_VISIBLE_DEVICES": "2"}]
    assert launcher.gpu_env(spec("aw1", "attention", device="cuda:1")) == {}  # pinned by the user: left alone
    assert LocalLauncher(tmp_path).gpu_env(spec("ew2", "expert", device="cpu")) == {}


def test_cuda_without_a_visible_gpu_is_a_clear_error(tiny_models, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="no GPU is visible"):
        LLM(tiny_models["mixtral"], attention_workers=1, expert_workers=1, device="cuda")
