"""The neuron map: standardised profiles, UMAP + HDBSCAN on the tiny run, and the cache."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from core.bricks import neuron_map
from core.bricks.neuron_map import MapParams
from core.errors import BricklabError
from core.store import Store
from tests.bricks.test_scores import fake_run

SMALL = MapParams(pca=8, n_neighbors=5, min_cluster_size=5, min_samples=2)


@pytest.fixture(scope="module")
def mapped(small_run, tmp_path_factory):
    """A private copy of the tiny run with its SMALL map computed once."""
    path, run_id = small_run
    copy = tmp_path_factory.mktemp("map") / "copy.duckdb"
    shutil.copy(path, copy)
    store = Store(copy)
    result = neuron_map.compute_map(store, run_id, SMALL)
    yield store, run_id, result
    store.close()


def test_profiles_are_standardised_per_neuron(store):
    X = np.random.default_rng(0).random((6, 2, 5)) + np.arange(5)
    X[:, 1, 2] = 0.5  # never varies
    fake_run(store, X, ["a", "b"] * 3)
    feats = neuron_map.profile_features(store, "fake", pca=0)
    assert feats.shape == (10, 6) and feats.dtype == np.float32
    varying = np.delete(feats, 7, axis=0)
    np.testing.assert_allclose(varying.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(varying.std(axis=1), 1, atol=1e-3)
    assert not feats[7].any()
    assert neuron_map.profile_features(store, "fake", pca=3).shape == (10, 3)


@pytest.mark.parametrize(
    "bad", [{"pca": -1}, {"n_neighbors": 1}, {"min_cluster_size": 1}, {"min_samples": 0}]
)
def test_bad_map_params_are_refused(bad):
    with pytest.raises(BricklabError):
        MapParams(**bad)


def test_map_places_and_clusters_every_neuron(mapped):
    store, run_id, result = mapped
    run = store.require_run(run_id)
    n = run.n_layers * run.d_ff
    assert result.coords.shape == (n, 2) and np.isfinite(result.coords).all()
    assert result.labels.shape == (n,) and result.labels.min() >= -1
    assert result.n_clusters >= 1
    clusters = result.clusters()
    assert sum(len(c) for c in clusters) == int((result.labels >= 0).sum())
    assert all(np.all(result.labels[c] == i) for i, c in enumerate(clusters))


def test_map_is_cached_per_params(mapped):
    store, run_id, result = mapped
    again = neuron_map.compute_map(store, run_id, SMALL)
    np.testing.assert_array_equal(again.coords, result.coords)
    np.testing.assert_array_equal(again.labels, result.labels)
    assert store.get_arrays(run_id, "map", SMALL.to_dict()) is not None
    assert store.get_arrays(run_id, "map", MapParams().to_dict()) is None


def test_map_refuses_runs_too_small_for_its_neighbourhood(store):
    fake_run(store, np.ones((4, 1, 8)), ["a", "b"] * 2)
    with pytest.raises(BricklabError, match="too few"):
        neuron_map.compute_map(store, "fake", MapParams(n_neighbors=15))


def test_umap_kernels_are_compiled_into_numbas_disk_cache():
    import umap.layouts
    from numba.core.caching import NullCache

    neuron_map._cache_kernels()
    kernel = umap.layouts._nb_optimize_layout_euclidean_single_epoch  # the layout's SGD epoch
    assert not isinstance(kernel._cache, NullCache) and kernel._cache.cache_path


COMPILED = """
from numba.core import event
names = []
class Names(event.Listener):
    def on_start(self, e):
        names.append(getattr(e.data.get("dispatcher"), "__qualname__", "?"))
    def on_end(self, e):
        pass
event.register("numba:compile", Names())
from core.bricks import neuron_map
neuron_map.warm_up()
print(",".join(names))
"""


@pytest.mark.slow  # compiles umap's kernels once (a minute or two of CPU), then loads them
def test_after_the_warm_up_a_fresh_process_compiles_no_umap_kernel(tmp_path):
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path)}  # an empty cache, as on a fresh clone

    def compiled() -> set[str]:
        out = subprocess.run([sys.executable, "-c", COMPILED], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return set(out.stdout.strip().splitlines()[-1].split(","))

    first, second = compiled(), compiled()
    umap_kernels = {
        "_optimize_layout_euclidean_single_epoch",
        "compute_membership_strengths",
        "smooth_knn_dist",
    }
    assert umap_kernels <= first
    assert not umap_kernels & second and len(second) < len(first) / 2
