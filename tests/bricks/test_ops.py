"""Brick operations: coherence against its numpy twin, each operation on planted groups and on the
tiny run, invalid inputs, undo, and the configuration's `operations` round trip."""

import numpy as np
import pytest

from core import configuration
from core.bricks import ops as brick_ops
from core.bricks.coherence import Firing, affinity, affinity_numpy, coherence, coherence_numpy, member_counts
from core.bricks.ops import OpLog
from core.configuration import Brick, BrickConfig, ConfigError
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.store import Store


def random_bits(n_layers=3, d_ff=70, n_tokens=300, seed=0):
    """Token-major bits per layer; d_ff is not a multiple of 64, and neuron 1 of layer 0 never fires."""
    rng = np.random.default_rng(seed)
    fired = rng.random((n_layers, n_tokens, d_ff)) < rng.uniform(0.05, 0.4, (n_layers, 1, d_ff))
    fired[0, :, 1] = False
    return {layer: kernels.pack_bits(fired[layer]) for layer in range(n_layers)}


def firing_of(bits, d_ff):
    return Firing(lambda layer: bits[layer], len(bits), d_ff)


BRICKS = [
    {0: (1, 5, 9, 66), 2: (3, 4)},  # two layers, one silent neuron, one in the last word
    {1: (7, 8, 9)},
    {0: (0,)},  # one neuron: no inside pairs
    {2: tuple(range(70))},  # the whole layer: no outside
]


@pytest.mark.parametrize("neurons", BRICKS)
def test_coherence_matches_the_numpy_twin(neurons):
    bits = random_bits()
    fast, slow = coherence(firing_of(bits, 70), neurons), coherence_numpy(bits, neurons, 70)
    for field in ("inside", "outside", "score"):
        got, want = getattr(fast, field), getattr(slow, field)
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, rel=1e-9)
    assert (fast.inside is None) == (sum(map(len, neurons.values())) == 1)
    assert (fast.outside is None) == (neurons == BRICKS[3])


def test_affinity_and_member_counts_match_the_numpy_twins():
    bits, neurons = random_bits(), BRICKS[0]
    fast = affinity(firing_of(bits, 70), neurons, [0, 1, 2])
    slow = affinity_numpy(bits, neurons, 70, [0, 1, 2])
    for layer in (0, 1, 2):
        np.testing.assert_allclose(fast[layer], slow[layer], rtol=1e-9, atol=1e-12)
    fired = np.concatenate([kernels.unpack_bits(bits[0], 70)[:, [1, 5, 9, 66]],
                            kernels.unpack_bits(bits[2], 70)[:, [3, 4]]], axis=1)  # fmt: skip
    want = fired.T.astype(np.int64) @ fired.astype(np.int64)
    np.testing.assert_array_equal(member_counts(firing_of(bits, 70), neurons), want)


# --- planted groups: neurons that fire with their own group only ------------------------------


def planted(n_groups=4, per_group=8, n_tokens=2000, seed=0):
    """One layer of n_groups * per_group neurons in shuffled order, and the members of each group."""
    rng = np.random.default_rng(seed)
    group = rng.permutation(np.repeat(np.arange(n_groups), per_group))
    active = rng.random((n_tokens, n_groups)) < 0.2
    fired = active[:, group] & (rng.random((n_tokens, len(group))) < 0.8)
    members = [tuple(np.flatnonzero(group == g).tolist()) for g in range(n_groups)]
    return firing_of({0: kernels.pack_bits(fired)}, len(group)), members


def brick(name, *indices, layer=0, mode="scale", factor=1.0, label=None):
    return Brick(name, {layer: list(indices)}, mode, factor, label)


def test_grow_adds_the_missing_members_of_a_planted_group():
    firing, groups = planted()
    out = brick_ops.grow(firing, {"g": brick("g", *groups[0][:6])}, "g", 2)
    assert out.bricks[0].neurons == {0: groups[0]}
    (before,), (after,) = out.operation.coherence_before, out.operation.coherence_after
    assert after > before > 1


def test_shrink_drops_the_intruders():
    firing, groups = planted()
    out = brick_ops.shrink(firing, {"g": brick("g", *groups[0], *groups[1][:2])}, "g", 2)
    assert out.bricks[0].neurons == {0: groups[0]}
    assert out.operation.coherence_after[0] > out.operation.coherence_before[0]


def test_split_separates_two_planted_groups_and_merge_joins_them():
    firing, groups = planted()
    both = {"x": brick("x", *groups[0], *groups[1], label="math")}
    out = brick_ops.split(firing, both, "x")
    assert [b.name for b in out.bricks] == ["x-a", "x-b"]
    assert sorted(b.neurons[0] for b in out.bricks) == sorted(groups[:2])
    assert all(b.label == "math" and b.mode == "scale" for b in out.bricks)
    assert min(out.operation.coherence_after) > out.operation.coherence_before[0]
    halves = {b.name: b for b in out.bricks}
    merged = brick_ops.merge(firing, halves, "x-a", "x-b", "x")
    assert merged.bricks[0].neurons == both["x"].neurons and merged.bricks[0].label == "math"
    assert merged.operation.coherence_after[0] == pytest.approx(out.operation.coherence_before[0])


# --- every operation on the tiny run ------------------------------------------------------------


@pytest.fixture
def run_firing(small_run):
    path, run_id = small_run
    store = Store(path)
    yield Firing.of_run(store, run_id), {layer: store.firing_bits(run_id, layer) for layer in (0, 1)}
    store.close()


def start():
    a, b = brick("a", *range(10), mode="off"), brick("b", *range(10, 20), label="coding")
    return {"a": a, "b": b, "c": brick("c", *range(8), layer=1)}


def check_scores(bits, outcome, inputs):
    """The recorded coherence is the twin's, before (of the inputs) and after (of the outputs)."""
    op = outcome.operation
    for scores, bricks in ((op.coherence_before, inputs), (op.coherence_after, outcome.bricks)):
        want = [coherence_numpy(bits, b.neurons, 96).score for b in bricks]
        assert scores == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("neighbours", [False, True])
def test_grow_on_the_run_adds_the_best_connected_neurons(run_firing, neighbours):
    firing, bits = run_firing
    bricks = start()
    out = brick_ops.grow(firing, bricks, "a", 3, neighbours=neighbours)
    grown = out.bricks[0]
    assert (grown.name, grown.mode, sum(map(len, grown.neurons.values()))) == ("a", "off", 13)
    layers = [0, 1] if neighbours else [0]
    sums = affinity_numpy(bits, bricks["a"].neurons, 96, layers)
    members = {(0, j) for j in range(10)}
    added = {(layer, j) for layer, v in grown.neurons.items() for j in v} - members
    rest = {(layer, j) for layer in layers for j in range(96)} - members - added
    assert len(added) == 3
    assert min(sums[layer][j] for layer, j in added) >= max(sums[layer][j] for layer, j in rest) - 1e-12
    check_scores(bits, out, [bricks["a"]])
    assert out.operation.params == {"n": 3, "neighbours": neighbours}


def test_shrink_merge_split_rename_on_the_run(run_firing):
    firing, bits = run_firing
    bricks = start()
    shrunk = brick_ops.shrink(firing, bricks, "c", 2)
    kept = set(shrunk.bricks[0].neurons[1])
    sums = affinity_numpy(bits, bricks["c"].neurons, 96, [1])[1]
    assert len(kept) == 6 and max(sums[j] for j in set(range(8)) - kept) <= min(sums[j] for j in kept)
    check_scores(bits, shrunk, [bricks["c"]])
    merged = brick_ops.merge(firing, bricks, "a", "b")
    assert merged.bricks[0] == Brick("a+b", {0: list(range(20))}, "off", 1.0, None)
    check_scores(bits, merged, [bricks["a"], bricks["b"]])
    cross = {"ac": Brick("ac", {0: list(range(10)), 1: list(range(8))}, "keep")}
    halves = brick_ops.split(firing, cross, "ac", ("left", "right")).bricks
    ids = [(layer, j) for h in halves for layer, v in h.neurons.items() for j in v]
    assert sorted(ids) == sorted((layer, j) for layer, v in cross["ac"].neurons.items() for j in v)
    assert sorted(sum(map(len, h.neurons.values())) for h in halves) == [9, 9]
    renamed = brick_ops.rename(firing, bricks, "b", "syntax", "linguistic")
    assert renamed.bricks[0] == Brick("syntax", bricks["b"].neurons, "scale", 1.0, "linguistic")
    assert renamed.operation.coherence_before == renamed.operation.coherence_after
    assert bricks == start()  # the operations left their inputs alone


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f, b: brick_ops.merge(f, b, "a", "a"), "with itself"),
        (lambda f, b: brick_ops.split(f, b | {"one": brick("one", 3)}, "one"), "one neuron"),
        (lambda f, b: brick_ops.shrink(f, b, "c", 8), "would leave none"),
        (lambda f, b: brick_ops.shrink(f, b, "c", 0), ">= 1"),
        (lambda f, b: brick_ops.grow(f, b, "nope", 2), "no brick 'nope'"),
        (lambda f, b: brick_ops.grow(f, b, "a", 1.5), "whole number"),
        (lambda f, b: brick_ops.rename(f, b, "a", "b", None), "already a brick named 'b'"),
        (lambda f, b: brick_ops.rename(f, b, "a", "  ", None), "blank"),
        (lambda f, b: brick_ops.split(f, b, "a", ("h", "h")), "different names"),
        (lambda f, b: brick_ops.grow(f, {"far": brick("far", 1, layer=5)}, "far", 1), "outside this run"),
    ],
)
def test_invalid_operations_are_refused_clearly(run_firing, call, message):
    with pytest.raises(BricklabError, match=message):
        call(run_firing[0], start())


def test_grow_refuses_a_brick_that_never_fires_with_anything():
    silent = {"s": brick("s", 1)}  # neuron 1 of layer 0 never fires
    with pytest.raises(BricklabError, match="No neuron in layer"):
        brick_ops.grow(firing_of(random_bits(), 70), silent, "s", 1)
    assert brick_ops.grow(firing_of(random_bits(), 70), silent | {"t": brick("t", 2)}, "t", 1)


# --- undo and the configuration record ----------------------------------------------------------


def test_undo_goes_back_through_several_steps_exactly(run_firing):
    firing, _ = run_firing
    bricks, log, states = start(), OpLog(), []
    steps = [
        lambda b: brick_ops.grow(firing, b, "b", 4),
        lambda b: brick_ops.merge(firing, b, "b", "c", "bc"),
        lambda b: brick_ops.split(firing, b, "bc"),
        lambda b: brick_ops.shrink(firing, b, "bc-a", 3),
        lambda b: brick_ops.rename(firing, b, "a", "first", "knowledge"),
    ]
    for step in steps:
        states.append(list(bricks.items()))
        bricks, log = log.apply(bricks, step(bricks))
    assert list(bricks) == ["first", "bc-a", "bc-b"]  # results sit where their first input was
    assert [op.op for op in log.operations] == ["grow", "merge", "split", "shrink", "rename"]
    for state in reversed(states):
        bricks, log = log.undo()
        assert list(bricks.items()) == state
    assert bricks == start() and log == OpLog()
    with pytest.raises(BricklabError, match="nothing|no brick operation"):
        log.undo()


def test_apply_places_an_outside_brick_last_and_refuses_a_clash(run_firing):
    firing, _ = run_firing
    bricks = start()
    outside = bricks | {"d": brick("d", 30, 31, 32)}  # a computed brick not in the configuration yet
    new, log = OpLog().apply(bricks, brick_ops.grow(firing, outside, "d", 1))
    assert list(new) == ["a", "b", "c", "d"] and len(new["d"].neurons[0]) == 4
    assert log.undo()[0] == bricks
    clash = brick_ops.rename(firing, bricks | {"x": brick("x", 50)}, "x", "y", None)
    with pytest.raises(BricklabError, match="already a brick named"):
        OpLog().apply(bricks | {"x": brick("x", 50), "y": brick("y", 51)}, clash)


def test_the_configuration_records_operations_and_round_trips(run_firing):
    firing, _ = run_firing
    bricks, log = start(), OpLog()
    bricks, log = log.apply(bricks, brick_ops.merge(firing, bricks, "a", "b"))
    bricks, log = log.apply(bricks, brick_ops.split(firing, bricks, "c"))
    config = BrickConfig("tiny", "f" * 8, 2, 96, tuple(bricks.values()), operations=log.records())
    back = configuration.loads(config.to_json())
    assert back == config and back.operations == log.records()
    merge = back.operations[0]
    assert (merge["op"], merge["bricks"], merge["result"]) == ("merge", ["a", "b"], ["a+b"])
    assert merge["coherence_before"] == list(log.operations[0].coherence_before)
    assert len(merge["coherence_before"]) == 2 and all(x > 0 for x in merge["coherence_before"])
    assert OpLog.of_records(back.operations).operations == log.operations
    assert "operations" not in BrickConfig("tiny", "f" * 8, 2, 96, ()).to_dict()


@pytest.mark.parametrize(
    ("operation", "where"),
    [
        ({"op": "explode", "bricks": ["a"], "result": ["a"]}, "operations[0].op"),
        ({"op": "grow", "bricks": ["a"]}, "operations[0].result"),
        ({"op": "grow", "bricks": [], "result": ["a"]}, "operations[0].bricks"),
        ({"op": "grow", "bricks": ["a"], "result": ["a"], "coherence_after": ["high"]}, "coherence_after"),
        ({"op": "grow", "bricks": ["a"], "result": ["a"], "when": 3}, "operations[0].when"),
    ],
)
def test_a_malformed_operation_record_is_refused(operation, where):
    doc = BrickConfig("tiny", "f" * 8, 2, 96, ()).to_dict() | {"operations": [operation]}
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        BrickConfig.from_dict(doc)
