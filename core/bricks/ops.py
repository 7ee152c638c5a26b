"""Brick operations on a configuration's bricks: grow, shrink, merge, split and rename, each with the
coherence (bricks.coherence) of its inputs and outputs, and an undoable log that the configuration records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from core.bricks import candidates as core_bricks
from core.bricks.coherence import Firing, affinity, coherence, member_counts
from core.configuration import Brick
from core.errors import BricklabError

OPS = ("grow", "shrink", "merge", "split", "rename")
Bricks = Mapping[str, Brick]  # the configuration's bricks by name, in order


@dataclass(frozen=True)
class Operation:
    """One operation as the configuration records it (its `operations` list)."""

    op: str  # one of OPS
    bricks: tuple[str, ...]  # the names it replaced
    result: tuple[str, ...]  # the names it made
    coherence_before: tuple[float | None, ...]  # one per input brick
    coherence_after: tuple[float | None, ...]  # one per result brick
    params: dict = field(default_factory=dict)  # e.g. {"n": 4, "neighbours": True}

    def to_dict(self) -> dict:
        out = {"op": self.op, "bricks": list(self.bricks), "result": list(self.result)}
        out |= {
            "coherence_before": list(self.coherence_before),
            "coherence_after": list(self.coherence_after),
        }
        return out | ({"params": dict(self.params)} if self.params else {})

    @classmethod
    def from_dict(cls, doc: dict) -> Operation:
        before, after = tuple(doc.get("coherence_before", ())), tuple(doc.get("coherence_after", ()))
        return cls(
            doc["op"], tuple(doc["bricks"]), tuple(doc["result"]), before, after, doc.get("params", {})
        )


@dataclass(frozen=True)
class Outcome:
    """What an operation made: new bricks that replace operation.bricks in the configuration."""

    operation: Operation
    bricks: tuple[Brick, ...]


def _score(firing: Firing, brick: Brick) -> float | None:
    firing.check(brick.neurons, brick.name)
    return coherence(firing, brick.neurons).score


def _outcome(firing: Firing, op: str, inputs: list[Brick], outputs: list[Brick], **params) -> Outcome:
    before = tuple(_score(firing, b) for b in inputs)
    after = tuple(_score(firing, b) for b in outputs)
    names = tuple(b.name for b in inputs), tuple(b.name for b in outputs)
    return Outcome(Operation(op, *names, before, after, params), tuple(outputs))


def _get(bricks: Bricks, name: str) -> Brick:
    if name not in bricks:
        known = ", ".join(list(bricks)[:8]) or "none"
        raise BricklabError(f"There is no brick {name!r} to edit (bricks: {known}).", "Pick one of them.")
    return bricks[name]


def _count(n, least: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < least:
        raise BricklabError(f"{what} must be a whole number >= {least}, got {n!r}.", "Change the number.")
    return int(n)


def _free(bricks: Bricks, name: str, replacing: tuple[str, ...]) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BricklabError(f"A brick name must not be blank (got {name!r}).", "Type a name.")
    if name in bricks and name not in replacing:
        raise BricklabError(f"There is already a brick named {name!r}.", "Pick another name.")
    return name


def _with(brick: Brick, neurons: dict[int, list[int]], name: str | None = None) -> Brick:
    return Brick(name or brick.name, neurons, brick.mode, brick.factor, brick.label)


def grow(firing: Firing, bricks: Bricks, name: str, n: int, neighbours: bool = False) -> Outcome:
    """Add the n neurons with the highest summed normalised co-activation with the brick, from its
    layers (and the layers next to them with neighbours=True); only neurons that co-fire with it."""
    brick, n = _get(bricks, name), _count(n, 1, "The number of neurons to add")
    firing.check(brick.neurons, name)
    layers = set(brick.neurons)
    if neighbours:
        layers |= {layer + d for layer in brick.neurons for d in (-1, 1)} & set(range(firing.n_layers))
    candidates = []
    for layer, sums in affinity(firing, brick.neurons, sorted(layers)).items():
        sums[list(brick.neurons.get(layer, ()))] = 0.0  # members are not candidates
        candidates += [(-s, layer, int(j)) for j, s in enumerate(sums) if s > 0]
    if not candidates:
        where = f"layer{'s' * (len(layers) > 1)} {sorted(layers)}"
        raise BricklabError(f"No neuron in {where} fires together with {name!r}.", "Try another brick.")
    neurons = {layer: list(indices) for layer, indices in brick.neurons.items()}
    for _, layer, j in sorted(candidates)[:n]:
        neurons.setdefault(layer, []).append(j)
    return _outcome(firing, "grow", [brick], [_with(brick, neurons)], n=n, neighbours=neighbours)


def shrink(firing: Firing, bricks: Bricks, name: str, n: int) -> Outcome:
    """Drop the brick's n neurons with the lowest summed normalised co-activation with the others."""
    brick, n = _get(bricks, name), _count(n, 1, "The number of neurons to drop")
    size = sum(len(v) for v in brick.neurons.values())
    if n >= size:
        raise BricklabError(
            f"Dropping {n} of the {size} neurons of {name!r} would leave none.",
            f"Drop at most {size - 1}.",
        )
    firing.check(brick.neurons, name)
    sums = affinity(firing, brick.neurons, sorted(brick.neurons))
    ranked = sorted((sums[layer][j], layer, j) for layer, indices in brick.neurons.items() for j in indices)
    dropped = {(layer, j) for _, layer, j in ranked[:n]}
    neurons = {layer: [j for j in v if (layer, j) not in dropped] for layer, v in brick.neurons.items()}
    neurons = {layer: v for layer, v in neurons.items() if v}
    return _outcome(firing, "shrink", [brick], [_with(brick, neurons)], n=n)


def merge(firing: Firing, bricks: Bricks, first: str, second: str, name: str | None = None) -> Outcome:
    """One brick with the neurons of both; mode and factor of the first, a label only if they agree."""
    a, b = _get(bricks, first), _get(bricks, second)
    if first == second:
        raise BricklabError(f"Cannot merge {first!r} with itself.", "Pick two different bricks.")
    name = _free(bricks, name or f"{first}+{second}", (first, second))
    layers = sorted({*a.neurons, *b.neurons})
    neurons = {layer: sorted({*a.neurons.get(layer, ()), *b.neurons.get(layer, ())}) for layer in layers}
    merged = Brick(name, neurons, a.mode, a.factor, a.label if a.label == b.label else None)
    return _outcome(firing, "merge", [a, b], [merged])


def split(
    firing: Firing, bricks: Bricks, name: str, names: tuple[str, str] | None = None, seed: int = 0
) -> Outcome:
    """Two halves (sizes differ by at most one) with the least co-activation between them: a METIS
    bisection of the brick's Jaccard co-activation graph, as core.bricks.candidates partitions a layer."""
    brick = _get(bricks, name)
    ids = [(layer, j) for layer, indices in sorted(brick.neurons.items()) for j in indices]
    if len(ids) < 2:
        raise BricklabError(f"Brick {name!r} has one neuron and cannot be split.", "Grow or merge it first.")
    names = names or (f"{name}-a", f"{name}-b")
    if names[0] == names[1]:
        raise BricklabError(f"The two halves need different names (both {names[0]!r}).", "Rename one.")
    for new in names:
        _free(bricks, new, (name,))
    firing.check(brick.neurons, name)
    counts = member_counts(firing, brick.neurons)
    params = core_bricks.BrickParams(size=math.ceil(len(ids) / 2), seed=seed)
    halves = []
    for new, part in zip(names, core_bricks.partition(counts, firing.n_tokens, params), strict=True):
        neurons: dict[int, list[int]] = {}
        for k in part:
            neurons.setdefault(ids[k][0], []).append(ids[k][1])
        halves.append(_with(brick, neurons, new))
    return _outcome(firing, "split", [brick], halves, seed=seed)


def rename(firing: Firing, bricks: Bricks, name: str, new_name: str, label: str | None) -> Outcome:
    """The same neurons under another name and/or label (None or "" clears the label)."""
    brick = _get(bricks, name)
    new = replace(brick, name=_free(bricks, new_name, (name,)), label=label or None)
    return _outcome(firing, "rename", [brick], [new])


@dataclass(frozen=True)
class OpLog:
    """The session's operations; each keeps the bricks from before it, so undo restores them exactly."""

    done: tuple[tuple[Operation, tuple[Brick, ...]], ...] = ()  # (operation, bricks before it)
    base: tuple[Operation, ...] = ()  # recorded earlier (a loaded configuration's); not undoable

    @classmethod
    def of_records(cls, records: list[dict] | None) -> OpLog:
        return cls(base=tuple(Operation.from_dict(r) for r in records or ()))

    def apply(self, bricks: Bricks, outcome: Outcome) -> tuple[dict[str, Brick], OpLog]:
        """The bricks with the outcome's in place of its inputs (where the first input was, else
        last: an input may come from outside the configuration), and the log with the operation."""
        replaced, out, placed = outcome.operation.bricks, {}, False
        for brick in outcome.bricks:
            _free(bricks, brick.name, replaced)
        for name, brick in bricks.items():
            if name not in replaced:
                out[name] = brick
            elif not placed:
                out |= {b.name: b for b in outcome.bricks}
                placed = True
        if not placed:
            out |= {b.name: b for b in outcome.bricks}
        entry = (outcome.operation, tuple(bricks.values()))
        return out, replace(self, done=(*self.done, entry))

    def undo(self) -> tuple[dict[str, Brick], OpLog]:
        """The bricks as they were before the last operation, and the log without it."""
        if not self.done:
            raise BricklabError("There is no brick operation to undo.", "Edit a brick first.")
        _, before = self.done[-1]
        return {b.name: b for b in before}, replace(self, done=self.done[:-1])

    @property
    def operations(self) -> tuple[Operation, ...]:
        return (*self.base, *(op for op, _ in self.done))

    def records(self) -> list[dict]:
        """The `operations` field of a configuration."""
        return [op.to_dict() for op in self.operations]
