"""Reading Hugging Face safetensors checkpoints, single-file or sharded.

Each worker opens the checkpoint itself and reads only the tensors it serves (an expert worker
never touches the attention weights, and vice versa), so a large model is never loaded whole into
one process. Tensor names are the on-disk Hugging Face names, unchanged.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import DTYPES, ModelLoadError


class WeightFiles:
    """Name -> tensor access across the shards of one checkpoint."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{index}: corrupt index ({e!r})") from None
            self.where = {name: self.dir / shard for name, shard in weight_map.items()}
        elif single.is_file():
            self.where = {name: single for name in self._keys(single)}
        else:
            raise ModelLoadError(f"{self.dir}: neither model.safetensors nor model.safetensors.index.json found")
        for shard in sorted(set(self.where.values())):
            if not shard.is_file():
                raise ModelLoadError(f"{shard}: shard listed in the index is missing")
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
        if name not in self.where:
            raise ModelLoadError(f"{self.dir}: tensor {name!r} missing from the checkpoint")
        path = self.where[name]
        try:
            if path not in self._open:
                self._open[path] = self._stack.enter_context(safe_open(str(path), "pt"))
            t = self._open[path].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: cannot read tensor {name!r} ({e})") from None
        return t.to(device=device, dtype=dtype)

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}")
    return getattr(torch, name)


# MXFP4 (OCP microscaling FP4, how gpt-oss is released): E2M1 values, two per byte (low nibble
# first), one power-of-two scale (a biased exponent byte) per 32 values.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., rows, G, 16] uint8 and scales [..., rows, G] uint8 -> [..., rows, G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1).to(dtype))
    return values.flatten(-2)


def fused_expert_weight(files: WeightFiles, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A fused expert matrix as the model multiplies by it ([E, in, out]): stored plain, or as
    MXFP4 blocks and scales ([E, out, in] once dequantised, so transposed back)."""
    if name in files:
        return files.get(name, dtype)
    if name + "_blocks" not in files:
        raise ModelLoadError(f"{files.dir}: neither {name!r} nor its MXFP4 blocks are in the checkpoint")
    blocks, scales = files.get(name + "_blocks", torch.uint8), files.get(name + "_scales", torch.uint8)
    return mxfp4_dequantize(blocks, scales, torch.float32).transpose(-1, -2).to(dtype)
