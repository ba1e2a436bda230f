"""Model names as vLLM users type them: a checkpoint folder, or a Hugging Face Hub id
(`org/name`) that huggingface_hub resolves into its standard cache, downloading what is missing
unless offline mode (HF_HUB_OFFLINE=1) forbids it."""

from __future__ import annotations

import re
from pathlib import Path

from .config import ModelLoadError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
FILES = ["*.json", "*.safetensors", "*.jinja"]  # what a checkpoint needs here: config, weights, tokenizer, template


def resolve_model(model: str | Path) -> Path:
    """The local folder of `model`; a one-line ModelLoadError when there is none."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if not REPO_ID.fullmatch(name) or name.startswith((".", "/")):
        raise ModelLoadError(f"{name}: no such folder, and not a Hugging Face Hub id (org/name)")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=FILES))
    except Exception as e:  # huggingface_hub raises many kinds: missing repo, no network, offline miss
        if constants.HF_HUB_OFFLINE:
            raise ModelLoadError(f"{name}: no such folder, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                                 "HF_HUB_OFFLINE=1 forbids downloading it") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{name}: no such folder, and the Hugging Face Hub cannot provide it ({first})") from None
