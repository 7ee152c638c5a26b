"""Candidate bricks from a captured run, without re-capturing: co-activation partitions per layer
(METIS), per-category functional neuron sets, and neuron-map clusters; each with an enrichment
label, distinctive input tokens and a stability score, cached per parameters.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
from scipy import sparse

from core import configuration
from core.bricks import distinctive, neuron_map, scores
from core.bricks.firing import RunFiring
from core.bricks.neuron_map import MapParams
from core.capture import experts as expert_routes
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.live import experts as live_experts
from core.progress import Progress
from core.store import Run, Store

Method = Literal["coact", "functional", "map", "expert"]
METHODS = ("coact", "functional", "map", "expert")  # expert: a MoE run's trained experts
GRAPHS = ("jaccard", "pmi", "counts")
_WEIGHT_SCALE = 1000  # METIS wants integer edge weights: the strongest edge gets this
_METIS_NOPTIONS, _METIS_OPTION_SEED, _METIS_OK = 40, 9, 1  # from metis.h
_PARTITION_THREADS = 2  # layers at once: one builds its graphs while the other is in METIS
_METIS_LOCK = threading.Lock()
VERSION = 2  # part of every cache key: bump it when the way bricks are computed changes


@dataclass(frozen=True)
class BrickParams:
    method: Method = "coact"  # coact: per-layer partition; functional: per category; map: clusters
    size: int = 32  # coact: neurons per brick within a layer (MoEfication's expert size)
    graph: str = "jaccard"  # coact: edge weight from the counts; Jaccard keeps hubs from dominating
    neighbours: int = 64  # coact: edges kept per neuron (its strongest); 0 keeps the dense graph
    percent: float = 5.0  # functional: each category's top percent of neurons (the paper's 5%)
    exclude_resident: bool = False  # functional: leave out neurons strongly active for all categories
    rule: str = "ap"  # functional: how top neurons are selected, one of scores.MODEL_FREE_RULES
    label_percent: float = 1.0  # labels: a category's top percent of neurons (Emergent Modularity)
    alpha: float = 0.001  # labels: enrichment p-value at or below which a brick is functional
    n_tokens: int = 8  # top tokens listed per brick
    stability: bool = True  # also compute on two halves of the prompts (map: another seed)
    seed: int = 0  # METIS, the halves and the map
    map: MapParams = field(default_factory=MapParams)  # map: the neuron map to cluster

    def __post_init__(self):
        problems = [
            (self.method not in METHODS, f"method {self.method!r} is not one of {METHODS}"),
            (self.size < 1, f"size {self.size} must be at least 1"),
            (self.graph not in GRAPHS, f"graph {self.graph!r} is not one of {GRAPHS}"),
            (self.neighbours < 0, f"neighbours {self.neighbours} must be >= 0"),
            (not 0 < self.percent <= 100, f"percent {self.percent} must be in (0, 100]"),
            (not 0 < self.label_percent <= 100, f"label_percent {self.label_percent} must be in (0, 100]"),
            (
                self.rule not in scores.MODEL_FREE_RULES,
                f"rule {self.rule!r} is not one of {scores.MODEL_FREE_RULES}",
            ),
            (not 0 < self.alpha < 1, f"alpha {self.alpha} must be in (0, 1)"),
            (self.n_tokens < 0, f"n_tokens {self.n_tokens} must be >= 0"),
        ]
        for bad, problem in problems:
            if bad:
                raise BricklabError(f"Invalid brick parameters: {problem}.", "Fix the value and try again.")

    def key(self) -> dict:
        """The fields that shape this method's bricks: the cache key."""
        own = {
            "coact": ("size", "graph", "neighbours"),
            "functional": ("percent", "exclude_resident", "rule"),
        }
        keep = {
            "method",
            "label_percent",
            "alpha",
            "n_tokens",
            "stability",
            "seed",
            *own.get(self.method, ()),
        }
        out = {k: v for k, v in asdict(self).items() if k in keep} | {"version": VERSION}
        return out | ({"map": self.map.to_dict()} if self.method == "map" else {})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BrickParams:
        values = dict(values)
        map_params = MapParams.from_dict(values.pop("map", {}))
        return cls(**values, map=map_params)


@dataclass(frozen=True, eq=False)
class Candidate:
    """A brick found in a run (a group of neurons from a partition), with its evidence; `brick_to_config`
    turns it into the core.configuration.Brick that a configuration applies."""

    brick_id: str  # e.g. "coact-L03-07", "functional-coding", "map-12"
    method: str  # the BrickParams.method that made it
    neurons: np.ndarray  # sorted global ids (layer * d_ff + index), int32, read-only
    layers: tuple[int, ...]  # the layers it spans, ascending
    size: int  # number of neurons
    label: str | None  # the most enriched category with p <= alpha, else None
    p_values: dict[str, float]  # category -> hypergeometric enrichment p-value
    top_tokens: tuple[str, ...]  # input tokens most distinctive for its neurons (where they fire)
    stability: float | None  # best-match Jaccard with the bricks of the halves (None: not computed)


def compute_bricks(
    store: Store, run_id: str | None, params: BrickParams = BrickParams(), progress: Progress | None = None
) -> list[Candidate]:
    """The run's bricks for `params`; computed once, then read from the cache."""
    run = store.require_run(run_id)
    if params.method == "coact" and params.size > run.d_ff:
        raise BricklabError(
            f"Brick size {params.size} is larger than the layer width d_ff = {run.d_ff}.",
            f"Choose a size between 1 and {run.d_ff}.",
        )
    if (cached := store.get_arrays(run.run_id, "bricks", params.key())) is not None:
        return _from_arrays(*cached)
    with store.run_lock(f"{run.run_id}:bricks"):
        if (cached := store.get_arrays(run.run_id, "bricks", params.key())) is not None:
            return _from_arrays(*cached)
        report = progress or (lambda done, total, message: None)
        groups, ids, stability = _GROUPERS[params.method](store, run, params, report)
        bricks = _describe(store, run, params, groups, ids, stability)
        store.put_arrays(run.run_id, "bricks", params.key(), *_to_arrays(bricks))
    return bricks


def brick_to_config(brick: Candidate, n_layers: int, d_ff: int, mode: str = "off", factor: float = 1.0):
    """The brick as a core.configuration.Brick (layer -> indices) to apply or export."""
    if len(brick.neurons) and brick.neurons[-1] >= n_layers * d_ff:
        raise BricklabError(
            f"Brick {brick.brick_id} has neuron {brick.neurons[-1]}, outside a model of {n_layers} x {d_ff}.",
            "Use bricks computed on a run of this model.",
        )
    layers, index = np.divmod(brick.neurons.astype(np.int64), d_ff)
    neurons = {int(layer): index[layers == layer].tolist() for layer in np.unique(layers)}
    return configuration.Brick(brick.brick_id, neurons, mode, factor, brick.label)


def functional_share(bricks: list[Candidate]) -> float:
    return float(np.mean([b.label is not None for b in bricks])) if bricks else 0.0


def random_baseline_share(
    store: Store, run_id: str | None, bricks: list[Candidate], params: BrickParams, repeats: int = 10
) -> float:
    """Share labelled functional when each neuron id is swapped for a random one of the same
    layer (a random partition with the bricks' sizes and layer mix), averaged over `repeats`."""
    run = store.require_run(run_id)
    rng, offsets = np.random.default_rng(params.seed + 1), np.arange(run.n_layers)[:, None] * run.d_ff
    shares = []
    for _ in range(repeats if bricks else 0):
        perm = (np.argsort(rng.random((run.n_layers, run.d_ff)), axis=1) + offsets).ravel()
        p = _p_values(store, run, params, [perm[b.neurons] for b in bricks])
        shares.append(np.mean(p.min(axis=1, initial=1.0) <= params.alpha))
    return float(np.mean(shares)) if shares else 0.0


# --- the three ways to form bricks -----------------------------------------------------------


def _coact_groups(store: Store, run: Run, params: BrickParams, report: Progress):
    """Per layer, a METIS partition of the co-activation graph; for stability also of the graph
    of each half of the prompts (the halves' counts sum to the run's, so the kernel runs once).
    Two layers at a time: one thread's graph work (numpy, numba, without the GIL) runs beside the
    other's METIS call (also without the GIL, but one at a time: METIS's random state is global)."""
    firing = RunFiring(store, run)
    half = scores.prompt_halves(store, run.run_id, params.seed)
    n_a, n_b = firing.n_tokens(half), firing.n_tokens(~half)

    def layer_parts(layer: int) -> list[list[np.ndarray]]:
        if not params.stability:
            return [partition(firing.counts(layer), n_a + n_b, params)]
        a, b = firing.split_counts(layer, half)
        full = partition(a + b, n_a + n_b, params)
        return [full, partition(a, n_a, params), partition(b, n_b, params)]

    full, halves, ids = [], ([], []), []
    with ThreadPoolExecutor(max_workers=_PARTITION_THREADS) as pool:
        for layer, parts in enumerate(pool.map(layer_parts, range(run.n_layers))):
            report(layer, run.n_layers, f"co-activation partition of layer {layer}")
            offset = layer * run.d_ff
            full += [offset + g for g in parts[0]]
            ids += [f"coact-L{layer:02d}-{j:02d}" for j in range(len(parts[0]))]
            for mine, other in zip(halves, parts[1:], strict=False):
                mine.extend(offset + g for g in other)
    report(run.n_layers, run.n_layers, "partitioned")
    return full, ids, _stability(full, halves) if params.stability else None


def _functional_groups(store: Store, run: Run, params: BrickParams, report: Progress):
    _, names = scores.category_labels(store, run.run_id)
    if not names:
        raise BricklabError(
            f"Functional bricks need prompt categories, and run '{run.run_id}' has none.",
            "Use the coact or map method, or capture a prompt set whose prompts have a 'category'.",
        )

    def tops(half):
        report(0 if half is None else half + 1, 3, "functionality scores")
        return scores.rule_top_neurons(
            store, run.run_id, params.rule, params.percent, params.seed, half, params.exclude_resident
        )

    full = tops(None)
    stability = _stability(full, (tops(0), tops(1))) if params.stability else None
    return full, [f"functional-{name}" for name in names], stability


def _map_groups(store: Store, run: Run, params: BrickParams, report: Progress):
    report(0, 2, "neuron map")
    full = neuron_map.compute_map(store, run.run_id, params.map).clusters()
    stability = None
    if params.stability:
        report(1, 2, "neuron map with another seed")
        other = neuron_map.compute_map(store, run.run_id, replace(params.map, seed=params.map.seed + 1))
        stability = _stability(full, (other.clusters(),))
    return full, [f"map-{c:02d}" for c in range(len(full))], stability


def _expert_groups(store: Store, run: Run, params: BrickParams, report: Progress):
    """A mixture-of-experts run's trained experts, one brick each (core/experts.py numbers the neurons)."""
    layout = expert_routes.layout(store, run.run_id)
    if layout is None:
        raise BricklabError(
            f"Run '{run.run_id}' is not of a mixture-of-experts model, so it has no experts to offer.",
            "Use the coact, functional or map method, or capture a MoE model (e.g. mixtral, qwen2_moe).",
        )
    within = np.arange(layout.d_expert)
    pairs = [(layer, e) for layer in range(run.n_layers) for e in range(layout.n_experts)]
    groups = [layer * run.d_ff + e * layout.d_expert + within for layer, e in pairs]
    return groups, [live_experts.brick_id(layer, e) for layer, e in pairs], None


_GROUPERS = {
    "coact": _coact_groups,
    "functional": _functional_groups,
    "map": _map_groups,
    "expert": _expert_groups,
}


def partition(counts: np.ndarray, n_tokens: int, params: BrickParams) -> list[np.ndarray]:
    """One layer's neurons in ceil(d_ff / size) bricks of equal size (+-1), sorted ids each.

    METIS (as in MoEfication) cuts the co-activation graph with the least edge weight between
    bricks; a greedy pass then moves the neurons that fit worst until the sizes are equal."""
    d = len(counts)
    n_parts = math.ceil(d / params.size)
    weights = _graph(counts, n_tokens, params)
    if n_parts == 1:
        parts = np.zeros(d, np.int64)
    else:
        rows, cols = np.nonzero(weights)
        scale = _WEIGHT_SCALE / weights.max() if len(rows) else 0.0
        edge = np.maximum(np.rint(weights[rows, cols] * scale), 1).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=d))])
        parts = _metis(n_parts, starts, cols, edge, params.seed)
    parts = _balance(parts, weights, n_parts)
    order = np.argsort(parts, kind="stable")
    return np.split(order.astype(np.int32), np.cumsum(np.bincount(parts, minlength=n_parts))[:-1])


def _metis(n_parts: int, starts: np.ndarray, cols: np.ndarray, edge: np.ndarray, seed: int) -> np.ndarray:
    """pymetis.part_graph's partition: recursive bisection up to 8 parts through pymetis, k-way beyond
    through ctypes into pymetis's own METIS with its options, which releases the GIL (pymetis holds
    it for the whole call). One call at a time: METIS keeps its random state in globals."""
    import pymetis
    import pymetis._internal

    if n_parts <= 8:
        with _METIS_LOCK:
            graph = pymetis.CSRAdjacency(starts, cols)
            options = pymetis.Options(seed=seed)
            return np.asarray(pymetis.part_graph(n_parts, graph, eweights=edge, options=options).vertex_part)
    lib = _metis_library(pymetis._internal.__file__)
    options = np.zeros(_METIS_NOPTIONS, np.int64)  # idx_t is 64 bits in pymetis's METIS
    lib.METIS_SetDefaultOptions(options.ctypes.data)
    options[_METIS_OPTION_SEED] = seed
    xadj, adjncy, adjwgt = (np.ascontiguousarray(a, np.int64) for a in (starts, cols, edge))
    n, ncon, nparts, cut = (ctypes.c_int64(v) for v in (len(starts) - 1, 1, n_parts, 0))
    parts = np.zeros(len(starts) - 1, np.int64)
    with _METIS_LOCK:
        status = lib.METIS_PartGraphKway(
            ctypes.byref(n), ctypes.byref(ncon), xadj.ctypes.data, adjncy.ctypes.data, None, None,
            adjwgt.ctypes.data, ctypes.byref(nparts), None, None, options.ctypes.data,
            ctypes.byref(cut), parts.ctypes.data,
        )  # fmt: skip
    if status != _METIS_OK:
        raise BricklabError(f"METIS failed to partition a layer (status {status}).", "Report this as a bug.")
    return parts


@functools.cache
def _metis_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.METIS_PartGraphKway.argtypes = [ctypes.c_void_p] * 13
    lib.METIS_PartGraphKway.restype = ctypes.c_int
    lib.METIS_SetDefaultOptions.argtypes = [ctypes.c_void_p]
    return lib


def _graph(counts: np.ndarray, n_tokens: int, params: BrickParams) -> np.ndarray:
    """float32 (d, d) symmetric non-negative edge weights with a zero diagonal."""
    if params.graph == "counts":
        w = counts.astype(np.float32)
    else:
        w = kernels.normalised_coactivation(counts, n_tokens, params.graph)
        w = np.maximum(w, 0)  # positive PMI: pairs that fire together less than chance get no edge
    np.fill_diagonal(w, 0)
    k = params.neighbours
    if 0 < k < len(w) - 1:
        strongest = np.argpartition(-w, k, axis=1)[:, :k]
        keep = np.zeros(w.shape, dtype=bool)
        np.put_along_axis(keep, strongest, True, axis=1)
        w = np.where(keep | keep.T, w, 0)  # an edge stays if either end ranks it in its top k
    return w


def _balance(parts: np.ndarray, weights: np.ndarray, n_parts: int) -> np.ndarray:
    """Move neurons from oversized to undersized parts, each time the one that loses the least
    affinity (edge weight to its part) and gains the most, until sizes differ by at most one."""
    parts = parts.copy()
    sizes = np.bincount(parts, minlength=n_parts)
    target = np.full(n_parts, len(parts) // n_parts)
    target[np.argsort(-sizes, kind="stable")[: len(parts) % n_parts]] += 1
    affinity = weights @ np.eye(n_parts, dtype=np.float32)[parts]  # (d, n_parts)
    while (sizes > target).any():
        movable = np.flatnonzero((sizes > target)[parts])
        open_parts = np.flatnonzero(sizes < target)
        gain = affinity[np.ix_(movable, open_parts)] - affinity[movable, parts[movable]][:, None]
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        v, old, new = movable[i], parts[movable[i]], open_parts[j]
        affinity[:, old] -= weights[:, v]
        affinity[:, new] += weights[:, v]
        parts[v], sizes[old], sizes[new] = new, sizes[old] - 1, sizes[new] + 1
    return parts


def _stability(groups: list[np.ndarray], others: tuple[list[np.ndarray], ...]) -> np.ndarray:
    """Per group: the Jaccard index of its best match in each other grouping, averaged."""
    return np.mean([best_match_jaccard(groups, other) for other in others], axis=0)


def best_match_jaccard(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """float (len(a),): max over the groups of b of |a_i & b_j| / |a_i | b_j|."""
    if not a or not b:
        return np.zeros(len(a))
    n = 1 + max(int(g.max(initial=0)) for g in (*a, *b))
    ma, mb = _membership(a, n), _membership(b, n)
    inter = (ma @ mb.T).toarray()
    union = np.add.outer(ma.sum(axis=1).A1, mb.sum(axis=1).A1) - inter
    return np.max(np.divide(inter, union, out=np.zeros_like(inter, float), where=union > 0), axis=1)


def _membership(groups: list[np.ndarray], n: int) -> sparse.csr_matrix:
    cols = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    return sparse.csr_matrix((np.ones(len(cols), np.float64), (rows, cols)), shape=(len(groups), n))


# --- labels, tokens, the cache ---------------------------------------------------------------


def _p_values(store: Store, run: Run, params: BrickParams, groups: list[np.ndarray]) -> np.ndarray:
    """float64 (n_groups, n_categories) enrichment p-values; no columns for a run without categories."""
    if not run.categories:
        return np.ones((len(groups), 0))
    top = scores.top_neurons(scores.functionality_scores(store, run.run_id), params.label_percent)
    return scores.enrichment(groups, top, run.n_layers, run.d_ff)


def _describe(store: Store, run: Run, params: BrickParams, groups, ids, stability) -> list[Candidate]:
    _, names = scores.category_labels(store, run.run_id)
    p = _p_values(store, run, params, groups)
    tokens = top_tokens(store, run, groups, params.n_tokens)
    bricks = []
    for i, (g, brick_id) in enumerate(zip(groups, ids, strict=True)):
        best = int(np.argmin(p[i])) if len(names) else -1
        label = names[best] if best >= 0 and p[i, best] <= params.alpha else None
        stable = None if stability is None else float(stability[i])
        pv = {name: float(p[i, c]) for c, name in enumerate(names)}
        bricks.append(_brick(brick_id, params.method, g, run.d_ff, label, pv, tokens[i], stable))
    return bricks


def _brick(brick_id, method, neurons, d_ff, label, p_values, tokens, stability) -> Candidate:
    neurons = np.sort(np.asarray(neurons, dtype=np.int32))
    neurons.flags.writeable = False
    layers = tuple(int(x) for x in np.unique(neurons // d_ff))
    size = len(neurons)
    return Candidate(brick_id, method, neurons, layers, size, label, p_values, tuple(tokens), stability)


def top_tokens(store: Store, run: Run, groups: list[np.ndarray], n: int) -> list[list[str]]:
    """Per group: the n input tokens most distinctive for its neurons (where they fire, against the
    run's token frequencies; core.bricks.distinctive)."""
    return distinctive.distinctive_tokens(store, run, groups, n)


def by_significance(bricks: list[Candidate]) -> list[Candidate]:
    """Labelled (functional) bricks first, most significant (lowest p-value) first; then the
    unlabelled ones, also by p-value; ties by id."""
    return sorted(bricks, key=lambda b: (b.label is None, min(b.p_values.values(), default=1.0), b.brick_id))


def _to_arrays(bricks: list[Candidate]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The bricks as the store caches them: all neuron ids in one array, the rest as JSON."""
    meta = [{k: v for k, v in vars(b).items() if k != "neurons"} for b in bricks]
    neurons = np.concatenate([b.neurons for b in bricks]) if bricks else np.zeros(0, np.int32)
    sizes = np.array([b.size for b in bricks], np.int64)
    return {"neurons": neurons, "sizes": sizes}, meta


def _from_arrays(arrays: dict[str, np.ndarray], meta: list[dict]) -> list[Candidate]:
    neurons = np.split(arrays["neurons"], np.cumsum(arrays["sizes"])[:-1]) if meta else []
    out = []
    for m, ids in zip(meta, neurons, strict=True):
        ids.flags.writeable = False
        fields = m | {"neurons": ids, "layers": tuple(m["layers"]), "top_tokens": tuple(m["top_tokens"])}
        out.append(Candidate(**fields))
    return out
