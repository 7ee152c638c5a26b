"""Brick configurations: round trip, merge/diff, and every rejected input (plans: tests/live/test_plan.py)."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import configuration as cfg
from core.configuration import Brick, BrickConfig, ConfigError, loads

L, D = 4, 16  # a tiny model: 4 layers of 16 FFN neurons


@dataclass(frozen=True)
class Model:
    """Stands in for core.models.ModelInfo, which the loader duck-types."""

    model_id: str = "tiny"
    fingerprint: str = "fp-1"
    n_layers: int = L
    d_ff: int = D


def make_doc() -> dict:
    return {
        "schema_version": 1,
        "model": {"id": "tiny", "fingerprint": "fp-1", "n_layers": L, "d_ff": D},
        "bricks": [
            {"name": "a", "neurons": {"0": [3, 1], "2": [5]}, "mode": "off"},
            {"name": "b", "label": "coding", "neurons": {"1": [2]}, "mode": "scale", "factor": 0.5},
        ],
        "source": {"run_id": 7, "method": "metis", "extra": [1, {"x": None}]},
        "note": "hand-made",
        "created": "2025-01-01T00:00:00Z",
    }


def config(*bricks: Brick, **fields) -> BrickConfig:
    return BrickConfig("tiny", "fp-1", L, D, bricks, **fields)


def rejected(text, model=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, model)
    return info.value


# --- round trip, load, merge, diff -----------------------------------------------------------


def test_round_trip_is_lossless_and_stable():
    c = loads(json.dumps(make_doc()))
    assert loads(c.to_json()) == c
    assert loads(c.to_json().encode()) == c
    assert c.to_json() == loads(c.to_json()).to_json()
    assert json.loads(c.to_json()) == make_doc() | {
        "bricks": [
            {"name": "a", "label": None, "mode": "off", "neurons": {"0": [1, 3], "2": [5]}},
            {"name": "b", "label": "coding", "mode": "scale", "factor": 0.5, "neurons": {"1": [2]}},
        ]
    }
    assert BrickConfig.from_dict(c.to_dict()) == c


def test_duplicate_indices_are_merged_and_layers_sorted_numerically():
    brick = Brick("x", {3: [5, 1, 5, 1], 1: (2,), 2: []}, "off")
    assert brick.neurons == {1: (2,), 3: (1, 5)}
    text = BrickConfig("m", "f", 12, D, (Brick("y", {10: [0], 2: [1]}, "keep"),)).to_json()
    assert text.index('"2"') < text.index('"10"')


def test_factor_is_ignored_outside_scale_mode():
    assert Brick("x", {0: [1]}, "off", factor=3.0).factor == 1.0
    assert Brick("x", {0: [1]}, "scale", factor=3).factor == 3.0


def test_source_is_carried_through_untouched():
    c = loads(json.dumps(make_doc()))
    assert c.source == make_doc()["source"]
    assert json.loads(c.to_json())["source"] == make_doc()["source"]


def test_load_reads_a_file_and_names_a_missing_one(tmp_path):
    path = tmp_path / "bricks.json"
    path.write_text(json.dumps(make_doc()))
    assert cfg.load(path, Model()) == loads(json.dumps(make_doc()))
    err = pytest.raises(ConfigError, cfg.load, tmp_path / "nope.json").value
    assert "nope.json" in str(err) and "check the path" in str(err)


def test_merge_lets_b_win_by_name_in_place_and_appends_new_bricks():
    a = config(Brick("x", {0: [1]}, "off"), Brick("y", {1: [1]}, "off"), source={"run_id": 1})
    b = config(Brick("z", {2: [2]}, "keep"), Brick("x", {0: [9]}, "scale", 2.0))
    merged = cfg.merge(a, b)
    assert [brick.name for brick in merged.bricks] == ["x", "y", "z"]
    assert merged.bricks[0] == b.bricks[1]
    assert merged.source == {"run_id": 1}


def test_merge_refuses_different_models():
    other = BrickConfig("tiny", "fp-2", L, D, ())
    with pytest.raises(ConfigError, match="^model: .*different models"):
        cfg.merge(config(), other)


def test_diff_lists_added_removed_and_changed_bricks():
    a = config(Brick("x", {0: [1, 2]}, "off"), Brick("y", {1: [1]}, "off"), Brick("k", {0: [0]}, "keep"))
    b = config(Brick("x", {0: [2, 3], 1: [4]}, "scale", 0.5), Brick("z", {2: [2]}, "keep"), a.bricks[2])
    assert cfg.diff(a, b) == {
        "added": ["z"],
        "removed": ["y"],
        "changed": {
            "x": {
                "mode": {"from": "off", "to": "scale"},
                "factor": {"from": 1.0, "to": 0.5},
                "neurons": {"added": {0: [3], 1: [4]}, "removed": {0: [1]}},
            }
        },
    }
    assert cfg.diff(a, a) == {"added": [], "removed": [], "changed": {}}


# --- rejected inputs -------------------------------------------------------------------------


def mutated(edit) -> str:
    doc = make_doc()
    edit(doc)
    return json.dumps(doc)


def set_at(*path_and_value):
    *path, value = path_and_value

    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


DELETE = object()
B0, B1 = ("bricks", 0), ("bricks", 1)
NEURONS = (*B0, "neurons")

REJECTED = {
    "malformed JSON": ('{"schema_version": 1,\n  "model": }', "document", "line 2, column 12"),
    "not an object": ("[1, 2]", "document", "JSON object"),
    "empty text": ("", "document", "invalid JSON"),
    "not UTF-8": (b'{"a": "\xff"}', "document", "UTF-8"),
    "deep nesting": ("[" * 100_000, "document", "unreadable JSON"),
    "deep source": (
        mutated(set_at("source", "a", json.loads("[" * 99 + "]" * 99))),
        "source.a" + "[0]" * 31,
        "deep",
    ),
    "too many digits": ("1" * 5000, "document", "unreadable JSON"),
    "unknown schema_version": (mutated(set_at("schema_version", 2)), "schema_version", "(1)"),
    "bool schema_version": (mutated(set_at("schema_version", True)), "schema_version", "(1)"),
    "missing schema_version": (mutated(set_at("schema_version", DELETE)), "schema_version", "add"),
    "missing model field": (mutated(set_at("model", "fingerprint", DELETE)), "model.fingerprint", "add"),
    "wrong-typed n_layers": (mutated(set_at("model", "n_layers", "4")), "model.n_layers", "an integer"),
    "float n_layers": (mutated(set_at("model", "n_layers", 4.0)), "model.n_layers", "an integer"),
    "zero d_ff": (mutated(set_at("model", "d_ff", 0)), "model.d_ff", ">= 1"),
    "bricks not a list": (mutated(set_at("bricks", {})), "bricks", "a list"),
    "missing brick name": (mutated(set_at(*B0, "name", DELETE)), "bricks[0].name", "add"),
    "blank brick name": (mutated(set_at(*B0, "name", "  ")), "bricks[0].name", "non-blank"),
    "wrong-typed label": (mutated(set_at(*B1, "label", 3)), "bricks[1].label", "a string or null"),
    "unknown field": (mutated(set_at(*B0, "colour", "red")), "bricks[0].colour", "unknown field"),
    "unknown top-level field": (mutated(set_at("sauce", 1)), "sauce", "unknown field"),
    "duplicate JSON key": ('{"schema_version": 1, "schema_version": 1}', "schema_version", "twice"),
    "layer out of range": (mutated(set_at(*NEURONS, "4", [1])), 'bricks[0].neurons["4"]', "layer 4"),
    "neuron out of range": (mutated(set_at(*NEURONS, "0", [16])), 'bricks[0].neurons["0"]', "(0-15)"),
    "negative neuron": (mutated(set_at(*NEURONS, "0", [-1])), 'bricks[0].neurons["0"][0]', ">= 0"),
    "float index": (mutated(set_at(*NEURONS, "0", [1, 2.0])), 'bricks[0].neurons["0"][1]', "integer"),
    "bool index": (mutated(set_at(*NEURONS, "0", [True])), 'bricks[0].neurons["0"][0]', "integer"),
    "string index": (mutated(set_at(*NEURONS, "0", ["3"])), 'bricks[0].neurons["0"][0]', "integer"),
    "non-integer layer": (mutated(set_at(*NEURONS, "x", [1])), 'bricks[0].neurons["x"]', "layer"),
    "negative layer": (mutated(set_at(*NEURONS, "-1", [1])), 'bricks[0].neurons["-1"]', "layer"),
    "zero-padded layer": (mutated(set_at(*NEURONS, "01", [1])), 'bricks[0].neurons["01"]', '"3"'),
    "layer with newline": (mutated(set_at(*NEURONS, "1\n", [1])), 'bricks[0].neurons["1\\n"]', '"3"'),
    "empty layer list": (mutated(set_at(*NEURONS, "0", [])), 'bricks[0].neurons["0"]', "at least one"),
    "no neurons": (mutated(set_at(*B0, "neurons", {})), "bricks[0].neurons", "at least one"),
    "unknown mode": (mutated(set_at(*B0, "mode", "zero")), "bricks[0].mode", "off, mean, scale, keep"),
    "negative factor": (mutated(set_at(*B1, "factor", -0.5)), "bricks[1].factor", ">= 0"),
    "string factor": (mutated(set_at(*B1, "factor", "2")), "bricks[1].factor", "a number"),
    "huge factor": (mutated(set_at(*B1, "factor", 1e300)), "bricks[1].factor", "<= 1000000"),
    "NaN factor": (mutated(set_at(*B1, "factor", float("nan"))), "bricks[1].factor", "finite"),
    "Infinity factor": (mutated(set_at(*B1, "factor", float("inf"))), "bricks[1].factor", "finite"),
    "-Infinity factor": (mutated(set_at(*B1, "factor", -float("inf"))), "bricks[1].factor", "finite"),
    "overflowing factor": (
        mutated(set_at(*B1, "factor", 0.5)).replace("0.5", "1e999"),
        "bricks[1].factor",
        "finite",
    ),
    "NaN in source": (mutated(set_at("source", "x", float("nan"))), "source.x", "finite"),
    "scale without factor": (mutated(set_at(*B1, "factor", DELETE)), "bricks[1].factor", "needs"),
    "factor without scale": (mutated(set_at(*B0, "factor", 2)), "bricks[0].factor", 'mode "scale"'),
    "duplicate brick names": (mutated(set_at(*B1, "name", "a")), "bricks[1].name", "bricks[0]"),
    "too many entries": (mutated(set_at(*NEURONS, "0", [1] * (4 * L * D))), "bricks", "n_layers x d_ff"),
    "too large a document": (" " * (cfg.MAX_BYTES + 1), "document", "bytes"),
}


@pytest.mark.parametrize("text,path,words", REJECTED.values(), ids=REJECTED)
def test_rejected_with_the_field_named(text, path, words):
    err = rejected(text)
    assert err.path == path and str(err).startswith(f"{path}: ")
    assert words in err.problem


def test_too_many_bricks_are_refused_before_any_brick_is_checked(monkeypatch):
    # The document declares the largest shape, so no count relative to it could refuse this.
    model = {"id": "m", "fingerprint": "f", "n_layers": 4096, "d_ff": 2**20}
    brick = {"name": "b", "neurons": {"0": [float("nan")]}, "mode": "off"}  # bad, and never reached
    text = json.dumps({"schema_version": 1, "model": model, "bricks": [brick] * 1001})

    def walked(*_):
        raise AssertionError("a brick-by-brick check ran")

    for check in ("_check_values", "_skeleton", "_brick"):
        monkeypatch.setattr(cfg, check, walked)
    monkeypatch.setattr(cfg, "MAX_BRICKS", 1000)  # the real limit's document takes seconds to decode
    assert str(rejected(text)) == (
        "bricks: 1,001 bricks, over the limit of 1,000; merge small bricks or split the configuration"
    )
    assert [str(e) for e in cfg.problems(text)] == [str(rejected(text))]  # alone: nothing past it is checked


def test_the_brick_limit_is_the_schemas_and_fits_one_brick_per_neuron_of_the_default_model():
    assert cfg.MAX_BRICKS == cfg.SCHEMA["properties"]["bricks"]["maxItems"] >= 30 * 1536


def test_non_text_input_is_rejected():
    assert "str or bytes" in rejected(None).problem
    assert "str or bytes" in rejected(12).problem


@pytest.mark.parametrize(
    "key,value,words",
    [("fingerprint", "fp-2", '"fp-2"'), ("n_layers", 5, "has 5"), ("d_ff", 32, "has 32")],
)
def test_model_mismatch_is_rejected(key, value, words):
    err = rejected(json.dumps(make_doc()), Model(**{key: value}))
    assert err.path == f"model.{key}" and words in err.problem and "load the model" in err.problem


def test_out_of_range_layer_message_says_what_is_wrong():
    bricks = [{"name": f"b{i}", "neurons": {"0": [i]}, "mode": "off"} for i in range(3)]
    bricks[2]["neurons"] = {"31": [0]}
    doc = make_doc() | {"model": {"id": "m", "fingerprint": "f", "n_layers": 30, "d_ff": 8}, "bricks": bricks}
    assert str(rejected(json.dumps(doc))).startswith(
        'bricks[2].neurons["31"]: layer 31 is out of range for a model with 30 layers (0-29); '
    )


def test_config_error_is_a_value_error_and_a_bricklab_error():
    from core.errors import BricklabError

    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, BricklabError)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"^bricks\[1\]\.name: "):
        config(Brick("x", {0: [1]}, "off"), Brick("x", {1: [1]}, "off"))
    with pytest.raises(ConfigError, match=r'^bricks\[0\]\.neurons\["0"\]: neuron 99'):
        config(Brick("x", {0: [99]}, "off"))
    with pytest.raises(ConfigError, match="^factor: "):
        Brick("x", {0: [1]}, "scale", float("nan"))
    with pytest.raises(ConfigError, match=r'^neurons\["0"\]: neuron true'):
        Brick("x", {0: [True]}, "off")
    assert Brick("x", {np.int64(1): np.array([3, 2])}, "off").neurons == {1: (2, 3)}


def test_schema_file_is_a_valid_draft_2020_12_schema():
    cfg.Draft202012Validator.check_schema(cfg.SCHEMA)


# --- properties ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
near_values = (
    json_values
    | st.integers(-2, 2 * D)
    | st.sampled_from(["off", "mean", "scale", "keep", "0", "3", "-1", "", 0.5])
)


def paths(value, prefix=()):
    """Every (path to a container, key) in a parsed document."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield prefix, key
        yield from paths(item, (*prefix, key))


def only_config_errors(text) -> None:
    listed = cfg.problems(text)  # the field-by-field listing agrees with loads, first error first
    try:
        result = loads(text)
    except ConfigError as err:
        assert err.path and err.problem
        assert listed and str(listed[0]) == str(err) and all(isinstance(e, ConfigError) for e in listed)
    else:
        assert isinstance(result, BrickConfig) and loads(result.to_json()) == result
        assert listed == []


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_raises_only_config_errors(value):
    only_config_errors(json.dumps(value))
    only_config_errors(json.dumps(value).encode())


@settings(max_examples=100, deadline=None)
@given(st.text() | st.binary())
def test_arbitrary_text_raises_only_config_errors(text):
    only_config_errors(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_near_valid_configs_raise_only_config_errors(data):
    doc = make_doc()
    edit(data, doc, near_values)
    only_config_errors(json.dumps(doc))


def edit(data, doc, values) -> None:
    """One random edit of a parsed document in place: replace, delete or add a value anywhere."""
    prefix, key = data.draw(st.sampled_from(list(paths(doc))))
    target = doc
    for step in prefix:
        target = target[step]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        target[key] = data.draw(values)
    elif action == "delete":
        del target[key]
    elif isinstance(target, dict):
        target[data.draw(st.text(max_size=4))] = data.draw(values)
    else:
        target.append(data.draw(values))


bricks_strategy = st.lists(
    st.builds(
        Brick,
        name=st.text(min_size=1, max_size=3).filter(str.strip),
        neurons=st.dictionaries(
            st.integers(0, L - 1), st.lists(st.integers(0, D - 1), min_size=1), min_size=1
        ),
        mode=st.sampled_from(cfg.MODES),
        factor=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    ),
    max_size=5,
    unique_by=lambda brick: brick.name,
)


@settings(max_examples=150, deadline=None)
@given(bricks_strategy)
def test_random_configs_round_trip(bricks):
    c = config(*bricks, source={"run_id": 1})
    assert loads(c.to_json(), Model()) == c


# --- every problem at once, for the upload form -------------------------------------------------


def test_problems_lists_every_bad_field_not_just_the_first():
    doc = make_doc()
    doc["bricks"][0]["mode"] = "explode"
    doc["bricks"][1]["factor"] = "big"
    doc["note"] = 5
    listed = [e.path for e in cfg.problems(json.dumps(doc))]
    assert set(listed) == {"bricks[0].mode", "bricks[1].factor", "note"}


def test_problems_checks_each_brick_against_the_model():
    doc = make_doc()
    doc["bricks"][0]["neurons"]["0"] = [D + 4]
    doc["bricks"][1]["neurons"] = {str(L + 1): [0]}
    doc["bricks"].append({"name": "a", "neurons": {"0": [1]}, "mode": "off"})
    listed = {e.path: e.problem for e in cfg.problems(json.dumps(doc), Model())}
    assert set(listed) == {'bricks[0].neurons["0"]', f'bricks[1].neurons["{L + 1}"]', "bricks[2].name"}
    assert "out of range for d_ff" in listed['bricks[0].neurons["0"]']
    assert "rename" in listed["bricks[2].name"]


def test_problems_is_empty_for_a_valid_document_and_alone_for_broken_json():
    assert cfg.problems(json.dumps(make_doc()), Model()) == []
    (only,) = cfg.problems('{"schema_version": 1, "bricks": [')
    assert "invalid JSON" in only.problem
