"""The neuron map: every FFN neuron placed in 2-D by UMAP from its activation profile over the
prompts, and clustered with HDBSCAN; cached per parameters. umap and hdbscan load lazily.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from core.errors import BricklabError
from core.progress import Progress
from core.store import Store

STEPS = 3  # features, embedding, clustering
# umap-learn and pynndescent compile most of their numba kernels without numba's on-disk cache, so
# every fresh process spent ~85 s (a quiet 2-core machine) compiling them before the first map of
# 46k neurons. `_cache_kernels` turns the cache on for the modules a map runs through.
KERNEL_MODULES = (
    "umap.umap_", "umap.layouts", "umap.utils", "umap.distances",
    "pynndescent.pynndescent_", "pynndescent.utils", "pynndescent.kernels", "pynndescent.distances",
    "pynndescent.rp_trees", "pynndescent.graph_utils",
)  # fmt: skip


@dataclass(frozen=True)
class MapParams:
    pca: int = 32  # profile dimensions kept by PCA before UMAP (0: none); denoises and speeds UMAP
    n_neighbors: int = 15  # UMAP: neighbours per neuron; larger favours global structure
    min_dist: float = 0.0  # UMAP: 0 packs similar neurons tightly, which HDBSCAN needs
    n_epochs: int = 100  # UMAP optimisation passes; its default 200 takes twice as long, looks alike
    min_cluster_size: int = 100  # HDBSCAN: the smallest group of neurons that counts as a cluster
    min_samples: int = 10  # HDBSCAN: higher calls more neurons noise (label -1)
    selection: str = "leaf"  # HDBSCAN: "leaf" gives many fine clusters; "eom" a few large ones
    seed: int = 0  # PCA and UMAP randomness; a fixed seed makes the map reproducible

    def __post_init__(self):
        if self.pca < 0 or self.n_neighbors < 2 or self.min_dist < 0 or self.n_epochs < 1:
            raise BricklabError(
                f"Invalid map parameters: pca {self.pca}, n_neighbors {self.n_neighbors}, "
                f"min_dist {self.min_dist}, n_epochs {self.n_epochs}.",
                "Use pca >= 0, n_neighbors >= 2, min_dist >= 0 and n_epochs >= 1.",
            )
        if self.selection not in ("leaf", "eom"):
            raise BricklabError(f"Unknown cluster selection {self.selection!r}.", "Use 'leaf' or 'eom'.")
        if self.min_cluster_size < 2 or self.min_samples < 1:
            raise BricklabError(
                f"Invalid clustering parameters: min_cluster_size {self.min_cluster_size}, "
                f"min_samples {self.min_samples}.",
                "Use min_cluster_size >= 2 and min_samples >= 1.",
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MapParams:
        return cls(**values)


@dataclass(frozen=True, eq=False)
class NeuronMap:
    coords: np.ndarray  # (n_layers * d_ff, 2) float32 UMAP coordinates, row = global neuron id
    labels: np.ndarray  # (n_layers * d_ff,) int32 HDBSCAN cluster, -1 for noise
    params: MapParams

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def clusters(self) -> list[np.ndarray]:
        """Sorted global neuron ids (int32) of each cluster, in cluster order."""
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(self.n_clusters + 1))
        return [order[a:b].astype(np.int32) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def profile_features(store: Store, run_id: str | None, pca: int = 32, seed: int = 0) -> np.ndarray:
    """float32 (n_neurons, k): each neuron's per-prompt mean |a|, standardised over the prompts
    (so the map groups neurons by *when* they are active, not how strongly), then PCA."""
    run_id = store.require_run(run_id).run_id  # None: the newest complete run
    X = store.prompt_activations(run_id).astype(np.float32).T  # (n_neurons, n_prompts)
    X -= X.mean(axis=1, keepdims=True)
    std = X.std(axis=1, keepdims=True)
    X /= np.where(std > 0, std, 1.0)  # a neuron that never varies stays at the origin
    if 0 < pca < min(X.shape):
        from sklearn.decomposition import PCA

        X = PCA(n_components=pca, random_state=seed, svd_solver="randomized").fit_transform(X)
    return np.ascontiguousarray(X, dtype=np.float32)


def compute_map(
    store: Store, run_id: str | None, params: MapParams = MapParams(), progress: Progress | None = None
) -> NeuronMap:
    """The UMAP + HDBSCAN map of a run's neurons; cached per (run, params)."""
    run = store.require_run(run_id)
    n = run.n_layers * run.d_ff
    if n <= params.n_neighbors or run.n_prompts < 2:
        raise BricklabError(
            f"Run '{run.run_id}' has {n} neurons and {run.n_prompts} prompts: too few for a map "
            f"with n_neighbors {params.n_neighbors}.",
            "Lower n_neighbors, or capture more prompts.",
        )
    cached = store.get_arrays(run.run_id, "map", params.to_dict())
    if cached is not None:
        return _from_arrays(cached[0], params)
    with store.run_lock(f"{run.run_id}:map"):
        cached = store.get_arrays(run.run_id, "map", params.to_dict())
        if cached is not None:
            return _from_arrays(cached[0], params)
        result = _compute(store, run.run_id, params, progress)
        arrays = {"coords": result.coords, "labels": result.labels}
        store.put_arrays(run.run_id, "map", params.to_dict(), arrays)
    return result


@functools.cache
def _cache_kernels() -> None:
    """Keep the compiled machine code of umap's and pynndescent's numba kernels on disk (numba's
    cache, beside their sources or in the user's cache folder): the next process loads it instead of
    compiling again. Same code, same machine, so the same map; numba recompiles on its own when a
    package or the CPU changes. (pynndescent's `nn_descent` cannot be cached: ~20 s stay.)"""
    import importlib

    from numba.core.dispatcher import Dispatcher

    for name in KERNEL_MODULES:
        for value in vars(importlib.import_module(name)).values():
            if isinstance(value, Dispatcher):
                value.enable_caching()


def warm_up(n: int = 4096, seed: int = 0) -> float:
    """Fill numba's cache with a map of `n` random points (at least 4096: the size from which UMAP
    searches neighbours with pynndescent, as on a real model); `make setup` runs it once, so a user's
    first map does not compile. Returns the seconds it took."""
    started = time.perf_counter()
    X = np.random.default_rng(seed).normal(size=(max(n, 4096), 8)).astype(np.float32)
    _embed(X, MapParams(n_epochs=2, min_cluster_size=50))
    return time.perf_counter() - started


def _compute(store: Store, run_id: str, params: MapParams, progress: Progress | None) -> NeuronMap:
    report = progress or (lambda done, total, message: None)
    report(0, STEPS, "profiles")
    X = profile_features(store, run_id, params.pca, params.seed)
    report(1, STEPS, "UMAP")
    coords, labels = _embed(X, params, lambda: report(2, STEPS, "HDBSCAN"))
    report(STEPS, STEPS, "done")
    return NeuronMap(coords, labels, params)


def _embed(X: np.ndarray, params: MapParams, clustering=lambda: None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, 2) UMAP coordinates, int32 (n,) HDBSCAN labels) of the rows of X."""
    import hdbscan
    import umap
    from numba.core.errors import NumbaWarning

    _cache_kernels()
    reducer = umap.UMAP(
        n_neighbors=params.n_neighbors,
        min_dist=params.min_dist,
        n_components=2,
        n_epochs=params.n_epochs,
        init="pca",  # spectral initialisation of ~50k points costs more than the whole optimisation
        random_state=params.seed,
        n_jobs=1,  # a seed makes UMAP single-threaded anyway; saying so keeps it quiet
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Cannot cache compiled function", NumbaWarning)
        coords = reducer.fit_transform(X).astype(np.float32)
    clustering()
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=params.min_cluster_size,
        min_samples=params.min_samples,
        cluster_selection_method=params.selection,
        core_dist_n_jobs=1,  # its default 4 starts worker processes (~20 s under load) for ~2 s of work
    )
    return coords, clusterer.fit_predict(coords).astype(np.int32)


def _from_arrays(arrays: dict[str, np.ndarray], params: MapParams) -> NeuronMap:
    coords, labels = arrays["coords"], arrays["labels"]
    coords.flags.writeable = labels.flags.writeable = False
    return NeuronMap(coords, labels, params)
