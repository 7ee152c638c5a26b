"""The configuration loader fuzzed against the real tiny model and a real cache: every input ends in a
configuration that applies, or clear errors, and never leaves the model or the cache changed."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event

from core import configuration
from core.configuration import ConfigError
from core.errors import BricklabError
from core.live import interventions
from core.store import Store
from tests.test_configuration import edit, json_values, paths

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDS = torch.tensor([[1, 2, 3]])


@pytest.fixture(scope="module")
def world(small_run, tiny_lm, tmp_path_factory):
    """The shared model, a private copy of the tiny run, and what both look like untouched."""
    path, run_id = small_run
    copy = tmp_path_factory.mktemp("fuzz-config") / "cache.duckdb"
    shutil.copy(path, copy)
    store = Store(copy)
    with torch.no_grad():
        logits = tiny_lm.model(IDS).logits.clone()
    params = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    yield tiny_lm, store, run_id, logits, params, cache_state(store)
    store.close()


def cache_state(store: Store) -> list:
    """Every table's row count and the cached results' keys: what a loader must never change."""
    cur = store.cursor()
    tables = [r[0] for r in cur.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
    counts = [(t, cur.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables]
    results = cur.execute("SELECT run_id, kind, params FROM results ORDER BY ALL").fetchall()
    return counts + results


def doc_for(lm, run_id) -> dict:
    info = lm.info
    return {
        "schema_version": 1,
        "model": {
            "id": info.model_id,
            "fingerprint": info.fingerprint,
            "n_layers": info.n_layers,
            "d_ff": info.d_ff,
        },  # fmt: skip
        "bricks": [
            {"name": "a", "neurons": {"0": [3, 1], "1": [5]}, "mode": "off"},
            {"name": "b", "neurons": {"1": [2, 7]}, "mode": "scale", "factor": 0.5},
            {"name": "c", "neurons": {"0": [9]}, "mode": "mean"},
        ],
        "source": {"run_id": run_id},
    }


def note(outcome: str) -> None:
    """Count outcomes in hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(outcome)


def check_one(world, text) -> None:
    """Load, list problems and (when valid) apply `text`; no hook is left behind."""
    lm, store, run_id, *_ = world
    try:
        config = configuration.loads(text, model=lm.info)
    except ConfigError as err:
        note("refused by the loader")
        assert err.path and err.problem
        found = configuration.problems(text, model=lm.info)
        assert found and all(isinstance(e, ConfigError) and e.path and e.problem for e in found)
    else:
        assert configuration.problems(text, model=lm.info) == []
        try:  # it may still be refused when applied (e.g. an adapter file that is not there) ...
            with interventions.configured(lm, config, store, run_id), torch.no_grad():
                lm.model(IDS)
            note("applied")
        except BricklabError as err:  # ... but only clearly, and before anything changed
            note("refused when applied")
            assert err.message and err.hint
    assert interventions.hook_count(lm.model) == 0


def assert_untouched(world) -> None:
    """Same weights, same logits, no hooks, same cache: checked after every fuzzing run."""
    lm, store, _, logits, params, state = world
    assert interventions.hook_count(lm.model) == 0
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, logits)
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, params[name]), name
    assert cache_state(store) == state


near_values = (
    json_values
    | st.integers(-2, 200)
    | st.sampled_from(["off", "mean", "scale", "keep", "0", "1", "-1", "", 0.5, 1e308, float("nan")])
    | st.sampled_from(["../../etc/passwd", "/etc/passwd", "a" * 64, "0" * 64, "'; DROP TABLE runs; --"])
)


def test_arbitrary_json_leaves_model_and_cache_untouched(world):
    @EXAMPLES
    @given(json_values)
    def fuzz(value):
        check_one(world, json.dumps(value))

    fuzz()
    assert_untouched(world)


def test_arbitrary_bytes_leave_model_and_cache_untouched(world):
    @EXAMPLES
    @given(st.binary(max_size=300) | st.text(max_size=300))
    def fuzz(data):
        check_one(world, data)

    fuzz()
    assert_untouched(world)


def test_near_valid_configurations_apply_or_are_refused_and_change_nothing(world):
    @EXAMPLES
    @given(st.data())
    def fuzz(data):
        check_one(world, json.dumps(near_valid(data, doc_for(world[0], world[2]))))

    fuzz()
    assert_untouched(world)


def test_random_valid_configurations_apply_and_leave_nothing_behind(world):
    lm, _, run_id, *_ = world
    L, D = lm.info.n_layers, lm.info.d_ff
    brick = st.fixed_dictionaries(
        {
            "neurons": st.dictionaries(
                st.integers(0, L - 1).map(str), st.lists(st.integers(0, D - 1), min_size=1), min_size=1
            ),
            "mode": st.sampled_from(configuration.MODES),
        },
        optional={"factor": st.floats(0, 4), "label": st.none() | st.text(max_size=5)},
    )

    @settings(EXAMPLES, max_examples=25)
    @given(st.lists(brick, max_size=4))
    def fuzz(found):
        bricks = [b | {"name": f"b{i}"} for i, b in enumerate(found)]
        for b in bricks:  # a factor belongs to "scale" bricks only
            if b["mode"] != "scale":
                b.pop("factor", None)
        check_one(world, json.dumps(doc_for(lm, run_id) | {"bricks": bricks}))

    fuzz()
    assert_untouched(world)


def near_valid(data, doc: dict) -> dict:
    """One to three random edits (replace, delete, add) anywhere in a valid document."""
    for _ in range(data.draw(st.integers(1, 3))):
        if not list(paths(doc)):
            break
        edit(data, doc, near_values)
    return doc


def test_the_valid_document_applies_and_changes_the_output_only_inside(world):
    """The fuzzing starts from a configuration that really does something while applied."""
    lm, store, run_id, logits, *_ = world
    config = configuration.loads(json.dumps(doc_for(lm, run_id)), model=lm.info)
    with interventions.configured(lm, config, store, run_id), torch.no_grad():
        assert not torch.equal(lm.model(IDS).logits, logits)
    check_one(world, json.dumps(doc_for(lm, run_id)))
    assert_untouched(world)


@pytest.mark.parametrize("sha", ["../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc", "A" * 64])
def test_an_adapter_reference_never_names_a_path(world, sha):
    lm, _, run_id, *_ = world
    doc = doc_for(lm, run_id) | {
        "adapters": [{"name": "x", "sha256": sha, "layers": [0], "modules": ["up"], "rank": 2, "mode": "on"}]
    }
    with pytest.raises(ConfigError, match="sha256"):
        configuration.loads(json.dumps(doc), model=lm.info)
