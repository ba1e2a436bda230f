"""Shadow placement: where each logical expert's primary and its inactive copies live.

Primaries are spread evenly (contiguous expert ranges; experts not divisible by workers is fine)
over the first `primaries` expert workers, by default all of them. Packed (fewer cores than worker
processes), that is one per core: while one attention worker waits for a layer's experts, the
expert workers split them over every core, and more than one per core would only add messages
and passes over weights; the others hold only shadows (standbys), and the first holds a copy of
every expert (`pack`): when a large batch is split in two micro-batches, one expert worker serves
a whole step while the attention worker computes the other micro-batch. Each expert then gets up to
`shadows` pre-loaded copies on *other* expert workers, never on its primary's worker nor, when
workers carry node labels, on its primary's node, rotating over the candidates so copies spread
evenly, and within a per-worker memory budget. A shadow costs memory, not compute: it serves only
after its primary has failed, or, packed, for a split batch.
"""

from __future__ import annotations

import logging

from .routing_table import RoutingTable

log = logging.getLogger(__name__)


def place(
    num_experts: int,
    layers: list[int],
    workers: list[str],
    shadows: int = 1,
    expert_bytes: int = 0,
    budget_bytes: int | None = None,
    nodes: dict[str, str] | None = None,
    primaries: int | None = None,
    pack: bool = False,
) -> RoutingTable:
    """A version-0 routing table: candidates[l][e] = [primary, shadow, ...]."""
    n = max(1, min(primaries or len(workers), len(workers)))
    nodes = nodes or {}
    primary = [workers[(e * n) // num_experts] for e in range(num_experts)]
    used = {w: 0 for w in workers}  # shadow bytes placed per worker
    candidates = []
    turn = 0
    for _ in layers:
        row = []
        for e in range(num_experts):
            p = primary[e]
            ok = [w for w in workers if w != p and (p not in nodes or nodes.get(w) != nodes[p])]
            head = [workers[0]] if pack and workers[0] in ok else []  # packed: the first holds every expert
            rest = [w for w in ok if w not in head]
            copies: list[str] = []
            for w in head + [rest[(turn + i) % len(rest)] for i in range(len(rest))]:
                if len(copies) == shadows:
                    break
                if budget_bytes is not None and used[w] + expert_bytes > budget_bytes:
                    continue
                copies.append(w)
                used[w] += expert_bytes
            if len(copies) < shadows:
                log.warning("expert %d: %d of %d shadows placed (anti-affinity or memory budget)", e, len(copies), shadows)
            turn += 1
            row.append([p, *copies])
        candidates.append(row)
    return RoutingTable(0, num_experts, list(layers), candidates)
