"""config_from_bricks: candidates and modes (or configuration bricks) become a configuration for the
run's model, in every form the app, the CLI and the facade pass them."""

import pytest

from core import configuration
from core.bricks import candidates
from core.bricks.configure import config_from_bricks
from core.errors import BricklabError
from core.store import Store


@pytest.fixture(scope="module")
def found(small_run):
    path, run_id = small_run
    store = Store(path)
    run = store.require_run(run_id)
    bricks = candidates.compute_bricks(store, run_id, candidates.BrickParams(size=32, stability=False))
    store.close()
    return run, bricks


def test_every_form_gives_the_same_bricks_for_the_runs_model(found):
    run, (a, b, *_) = found
    by_mapping = config_from_bricks(run, {a: "off", b: ("scale", 0.5)})
    by_tuples = config_from_bricks(run, [(a, "off"), (b, "scale", 0.5)])
    plain = config_from_bricks(run, [a, candidates.brick_to_config(b, run.n_layers, run.d_ff, "scale", 0.5)])
    assert by_mapping == by_tuples == plain
    assert [(x.name, x.mode, x.factor) for x in plain.bricks] == [
        (a.brick_id, "off", 1.0),
        (b.brick_id, "scale", 0.5),
    ]
    assert (plain.fingerprint, plain.shape, plain.source) == (
        run.fingerprint,
        (2, 96),
        {"run_id": run.run_id},
    )
    assert sum(map(len, plain.bricks[0].neurons.values())) == a.size


def test_note_operations_and_adapters_are_carried(found):
    run, (a, *_) = found
    config = config_from_bricks(run, [a], note="one off", operations=[])
    assert (config.note, config.operations, config.adapters) == ("one off", None, ())
    assert configuration.loads(config.to_json()) == config


@pytest.mark.parametrize("item", ["coact-L00-00", ("coact-L00-00", "off"), 3])
def test_anything_else_is_refused_with_what_to_pass(found, item):
    run, _ = found
    with pytest.raises(BricklabError, match="Pass candidates from compute_bricks"):
        config_from_bricks(run, [item])


def test_an_unknown_mode_is_a_configuration_error(found):
    run, (a, *_) = found
    with pytest.raises(configuration.ConfigError, match="unknown mode"):
        config_from_bricks(run, {a: "dim"})
