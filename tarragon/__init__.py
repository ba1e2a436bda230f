"""Tarragon: resilient serving of Mixture-of-Experts language models.

Attention workers (stateful: KV cache) and expert workers (stateless: expert FFNs) run as
separate processes, each its own failure domain, joined by point-to-point channels.
"""

from .llm import LLM, RequestOutput, WorkerInfo
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "WorkerInfo"]
__version__ = "0.1.0"
