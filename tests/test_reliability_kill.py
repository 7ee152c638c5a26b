"""Brick and map computations killed with SIGKILL (in a subprocess, at a random point): the
cache opens, nothing partial is served as a result, and a rerun equals an uninterrupted computation."""

import ast
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.bricks import candidates as bricks
from core.bricks.candidates import BrickParams
from core.bricks.neuron_map import MapParams
from core.store import Store, codec

ROOT = Path(__file__).resolve().parents[1]
SMALL_MAP = MapParams(pca=8, n_neighbors=5, min_cluster_size=5, min_samples=2, n_epochs=20)
PARAMS = {
    "coact": BrickParams(method="coact", size=16),
    "map": BrickParams(method="map", map=SMALL_MAP),  # three results: two maps, then the bricks
}

# argv: db, run id, what ("coact" or "map" bricks), n. The child counts events, each a point where
# it may be killed: a progress report of the bricks or of a neuron map (mid-computation), and the end
# of a write transaction (its statements ran, its COMMIT not yet). It kills itself at the n-th event.
KILLER = """
import os, signal, sys
from contextlib import contextmanager
from core.bricks import candidates as bricks
from core.bricks import neuron_map
from core.store import Store
from tests.test_reliability_kill import PARAMS

db, run_id, what, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
events = []

def event(name):
    events.append(name)
    if len(events) == n:
        os.kill(os.getpid(), signal.SIGKILL)

plain_write, plain_map = Store.write, neuron_map._compute

@contextmanager
def write(self, **kwargs):
    with plain_write(self, **kwargs) as cur:
        yield cur
        event("commit")

Store.write = write
neuron_map._compute = lambda store, run_id, params, progress: plain_map(
    store, run_id, params, lambda done, total, message: event(f"map {message}"))
bricks.compute_bricks(Store(db), run_id, PARAMS[what], lambda d, t, m: event(f"bricks {m}"))
print(events)
"""
EVENTS = {"coact": 5, "map": 14}  # events of an uninterrupted child (checked for coact below)


def run_child(db: Path, run_id: str, what: str, n: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", KILLER, str(db), run_id, what, str(n)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def decoded_results(store: Store) -> dict:
    """Every cached result of the store, decoded to comparable values, by (kind, params)."""
    rows = store.cursor().execute("SELECT kind, params, payload FROM results").fetchall()
    out = {}
    for kind, params, payload in rows:
        arrays, meta = codec.unpack(bytes(payload))
        out[kind, params] = ({k: (a.dtype.str, a.shape, a.tobytes()) for k, a in arrays.items()}, meta)
    return out


def private_copy(path, dest: Path) -> Path:
    """A copy of the run's cache without derived results: other tests of the session cache some
    (e.g. scores), which would skip steps of the computation and so change its events."""
    shutil.copy(path, dest)
    store = Store(dest)
    try:
        store.cursor().execute("DELETE FROM results")
    finally:
        store.close()
    return dest


@pytest.fixture(scope="module")
def reference(small_run, tmp_path_factory) -> dict:
    """Every result of an uninterrupted computation of each kind, on a private copy of the run."""
    path, run_id = small_run
    copy = private_copy(path, tmp_path_factory.mktemp("reference") / "cache.duckdb")
    store = Store(copy)
    try:
        out = {}
        for what in PARAMS:
            bricks.compute_bricks(store, run_id, PARAMS[what])
            out[what] = decoded_results(store)
            store.cursor().execute("DELETE FROM results")
        return out
    finally:
        store.close()


@pytest.mark.parametrize("what", PARAMS)
def test_a_killed_computation_serves_nothing_partial_and_reruns_to_the_same_result(
    small_run, reference, tmp_path, what
):
    """Killed at a random event (BRICKLAB_KILL_AT=n picks one, to replay a failure)."""
    path, run_id = small_run
    db = private_copy(path, tmp_path / "killed.duckdb")
    n = int(os.environ.get("BRICKLAB_KILL_AT", 0)) or random.SystemRandom().randint(1, EVENTS[what])
    proc = run_child(db, run_id, what, n)
    assert proc.returncode == -9, f"not killed at event {n}: {proc.stdout} {proc.stderr[-2000:]}"

    store = Store(db)  # opens: the kill left nothing that blocks the cache
    try:
        assert store.require_run(run_id).complete, n  # the run itself is untouched
        survived = decoded_results(store)
        expected = reference[what]
        assert set(survived) < set(expected), n  # not everything: the last write never committed
        for key, value in survived.items():  # whatever was committed is whole and right
            assert value == expected[key], (n, key)
        bricks.compute_bricks(store, run_id, PARAMS[what])  # the rerun finishes the work ...
        assert decoded_results(store) == expected, n  # ... with the uninterrupted results
    finally:
        store.close()


def test_the_child_reaches_every_event_when_not_killed(small_run, reference, tmp_path):
    """Without a kill the child runs to the end: a -9 above is the kill, not a crash."""
    path, run_id = small_run
    db = private_copy(path, tmp_path / "whole.duckdb")
    proc = run_child(db, run_id, "coact", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(ast.literal_eval(proc.stdout)) == EVENTS["coact"], proc.stdout
    store = Store(db)
    try:
        assert decoded_results(store) == reference["coact"]
    finally:
        store.close()
