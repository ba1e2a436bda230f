"""The Expert Routing Table (ERT): logical (layer, expert) -> ordered physical candidates.

Each attention worker holds its own copy, versioned, and resolves every expert dispatch through
it. The first candidate not known to be failed serves the call; the rest (shadows, replicas) are
the fallbacks a forwarding engine replays to.
"""

from __future__ import annotations

import msgspec


class RoutingTable(msgspec.Struct):
    version: int
    num_experts: int
    layers: list[int]
    # candidates[l][e]: worker names for expert e of layer self.layers[l], primary first
    candidates: list[list[list[str]]]

    @classmethod
    def even(cls, num_experts: int, layers: list[int], workers: list[str]) -> "RoutingTable":
        """Static even placement: contiguous expert ranges, sizes differing by at most one."""
        n = len(workers)
        owner = [workers[(e * n) // num_experts] for e in range(num_experts)]
        return cls(0, num_experts, list(layers), [[[owner[e]] for e in range(num_experts)] for _ in layers])

    def experts_of(self, worker: str) -> list[tuple[int, int]]:
        """Every (layer, expert) the worker appears for, as primary or fallback: what it loads."""
        return [(layer, e) for layer, row in zip(self.layers, self.candidates) for e, c in enumerate(row) if worker in c]

    def resolve(self, layer: int, failed: frozenset[str] = frozenset()) -> list[str]:
        """For each expert of `layer`, the worker that serves it now."""
        row = self.candidates[self.layers.index(layer)]
        out = []
        for e, cands in enumerate(row):
            alive = [w for w in cands if w not in failed]
            if not alive:
                raise LookupError(f"no live worker holds expert {e} of layer {layer}")
            out.append(alive[0])
        return out
