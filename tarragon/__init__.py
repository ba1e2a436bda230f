"""Tarragon: resilient serving of Mixture-of-Experts language models.

Attention workers (stateful: KV cache) and expert workers (stateless: expert FFNs) run as
separate processes, each its own failure domain, joined by point-to-point channels.
"""

__all__ = ["LLM", "SamplingParams", "RequestOutput", "WorkerInfo"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: worker processes import `tarragon.worker` without paying for the driver's imports.
    if name in ("LLM", "RequestOutput", "WorkerInfo"):
        from . import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tarragon' has no attribute {name!r}")
