"""What `tarragon bench` sends: the requests (random token ids, or ShareGPT conversations) and
when each is sent (gamma-distributed arrivals).

Apart from the client so that a workload can be built, checked and reused (tests, bench/ scripts)
without a server; the same seed gives the same requests and arrival times.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

BUILTIN_DATASET = Path(__file__).parent.parent / "data" / "conversations.json"


@dataclass
@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (the random dataset)
    prompt_len: int
    output_len: int


def random_requests(n: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0, range_ratio: float = 0.0) -> list[BenchRequest]:
    """Token-id prompts (ids from 3 up, clear of the usual special tokens); lengths drawn
    uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)], as `vllm bench serve`."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    out = []
    for _ in range(n):
        i, o = length(input_len), length(output_len)
        out.append(BenchRequest([rng.randrange(3, vocab_size) for _ in range(i)], i, o))
    return out


def sharegpt_requests(path: str | Path, n: int, tokenizer, max_model_len: int, output_len: int | None = None,
                      seed: int = 0) -> list[BenchRequest]:
    """The first human turn of each conversation as the prompt; the reply's length in tokens as
    the output length (or `output_len`). Conversations too long for the context are skipped."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the dataset {path}: {e}") from None
    pairs = []
    for conv in data if isinstance(data, list) else []:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"{path}: no conversations in ShareGPT format ([{{'conversations': [{{'from', 'value'}}, ...]}}, ...])")
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        plen = len(tokenizer.encode(prompt))
        olen = output_len or max(4, len(tokenizer.encode(reply, add_special_tokens=False)))
        if plen and plen + olen <= max_model_len:
            out.append(BenchRequest(prompt, plen, olen))
    if not out:
        raise ValueError(f"{path}: every conversation is longer than the context ({max_model_len} tokens)")
    return [out[i % len(out)] for i in range(n)]  # repeat the set if asked for more


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """When each request is sent, in seconds from the start: gamma-distributed gaps with mean
    1/rate (burstiness 1 is Poisson; lower is burstier, higher more regular); rate inf: all at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out

