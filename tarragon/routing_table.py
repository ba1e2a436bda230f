"""The Expert Routing Table (ERT): logical (layer, expert) -> ordered physical candidates.

Each attention worker holds its own copy, versioned, and resolves every expert dispatch through
it. The first candidate not known to be failed serves the call (or a worker the caller prefers,
wherever it holds a copy: packed, a split batch goes to one expert worker); the rest (shadows,
replicas) are the fallbacks a forwarding engine replays to. The orchestrator owns the
authoritative table and pushes new versions; an attention worker also skips workers it has
itself seen fail.
"""

from __future__ import annotations

import msgspec


class RoutingTable(msgspec.Struct):
    version: int
    num_experts: int
    layers: list[int]
    # candidates[l][e]: worker names for expert e of layer self.layers[l], primary first
    candidates: list[list[list[str]]]

    def experts_of(self, worker: str) -> list[tuple[int, int]]:
        """Every (layer, expert) the worker appears for, as primary or shadow: what it loads."""
        return [(layer, e) for layer, row in zip(self.layers, self.candidates) for e, c in enumerate(row) if worker in c]

    def shadows_of(self, worker: str) -> list[tuple[int, int]]:
        return [(layer, e) for layer, row in zip(self.layers, self.candidates) for e, c in enumerate(row) if worker in c[1:]]

    def owners(self, layer: int, failed: frozenset[str] | set[str] = frozenset(), prefer: str | None = None) -> list[str | None]:
        """For each expert of `layer`, the worker that serves it now (None: no live copy):
        `prefer` wherever it holds a live copy (a shadow is a full copy), else the first live one."""
        row = self.candidates[self.layers.index(layer)]
        prefer = None if prefer in failed else prefer
        return [prefer if prefer in cands else next((w for w in cands if w not in failed), None) for cands in row]

    def with_workers(self, version: int, current: dict[str, str | None]) -> "RoutingTable":
        """This (planned) table with each worker replaced by its live incarnation; planned
        workers mapped to None (dead, not yet replaced) are left out."""
        cands = [[[current[w] for w in c if current.get(w)] for c in row] for row in self.candidates]
        return RoutingTable(version, self.num_experts, self.layers, cands)

    def unavailable(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, row in zip(self.layers, self.candidates) for e, c in enumerate(row) if not c]
