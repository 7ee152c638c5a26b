"""Every page runs in Streamlit's AppTest on the tiny model and a small run; the main interactions work.

The app's resources are picked by environment (BRICKLAB_DB, BRICKLAB_MODEL); they are cached per
process, so each test names its cache file and the cached Store for that path is reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.store import Store
from tests.conftest import ROOT, app, texts


@pytest.fixture
def on_empty_cache(monkeypatch, tmp_path, tiny_dir) -> Path:
    path = tmp_path / "empty.duckdb"
    monkeypatch.setenv("BRICKLAB_DB", str(path))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return path


# Home


def test_home_shows_the_model_and_the_cached_runs(on_small_run):
    at = app("app.py").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["layers"] == "2" and metrics["FFN neurons"] == "192"
    assert on_small_run in at.dataframe[0].value["run"].tolist()


def test_home_sidebar_lists_home_first_then_every_page(on_small_run):
    at = app("app.py").run()
    assert not at.exception
    nav = [e.proto for e in at.sidebar.get("page_link")]
    assert [p.label for p in nav][:3] == ["Home", "Capture", "Neuron map"]
    assert len(nav) == 1 + len(list((ROOT / "pages").glob("[0-9]*_*.py")))
    assert "seconds" not in at.dataframe[0].value.columns  # durations read "1 min 5 s", not raw seconds


def test_home_reports_a_model_that_cannot_load(on_small_run, tmp_path):
    at = app("app.py").run()
    at.sidebar.text_input[0].input(str(tmp_path / "nowhere")).run()
    at.sidebar.button[0].click().run()
    assert not at.exception
    assert "does not exist" in texts(at.error)
    assert {m.label: m.value for m in at.metric}["layers"] == "2"  # the loaded model is untouched


# Capture


JSONL = b"\n".join(
    json.dumps({"id": f"u{i}", "category": cat, "text": text}).encode()
    for i, (cat, text) in enumerate(
        [
            ("math", "What is 7 times 8?"),
            ("coding", "def add(a, b): return a + b"),
            ("math", "Solve x + 3 = 5."),
        ]
    )
)


def test_capture_an_uploaded_prompt_file(on_empty_cache):
    at = app("1_Capture.py").run()
    assert not at.exception
    at.radio[0].set_value("My own file").run()
    at.file_uploader[0].set_value(("mine.jsonl", JSONL, "application/jsonl")).run()
    assert not at.exception and not at.error
    assert at.dataframe[0].value["id"].tolist() == ["u0", "u1", "u2"]  # the preview
    at.button[0].click().run()
    assert not at.exception
    assert "captured" in texts(at.success)
    run_id = at.session_state["run_id"]
    run = Store(on_empty_cache).require_run(run_id)
    assert run.complete and run.n_prompts == 3 and run.categories == ["coding", "math"]
    assert any(m.label == "prompts" and m.value == "3" for m in at.metric)  # the run summary
    assert at.sidebar.selectbox[0].value == run_id  # the run picker follows the new capture
    at.button[0].click().run()
    assert "already in the cache" in texts(at.success)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [("bad.jsonl", b"\x00\x01\x02binary", "binary"), ("empty.txt", b"\n \n", "no prompts"),
     ("bad.csv", b"a,b\n1,2\n", "needs a 'text' column")],
)  # fmt: skip
def test_capture_shows_why_a_file_is_refused(on_empty_cache, name, data, message):
    at = app("1_Capture.py").run()
    at.radio[0].set_value("My own file").run()
    at.file_uploader[0].set_value((name, data, "application/octet-stream")).run()
    assert not at.exception
    assert message in texts(at.error)
    assert not at.button  # nothing to capture
    assert Store(on_empty_cache).runs() == []


# Neuron map


def test_map_opens_a_neuron_with_shaded_examples(on_small_run, small_run):
    from core.bricks import candidates as bricks

    at = app("2_Neuron_map.py").run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 1
    assert "192 neurons" in texts(at.caption)
    at.number_input[0].set_value(1)
    at.number_input[1].set_value(7)
    at.button[0].click().run()  # the form's "Open neuron"
    assert not at.exception
    assert "Neuron 1:7" in [h.value for h in at.subheader]
    strips = [h.proto.body for h in at.get("html")]
    assert len(strips) == 8 and all(
        "rgba(" in s and "outline" in s for s in strips
    )  # shaded, top token marked
    assert {m.label: m.value for m in at.metric}["brick"] == "–"  # no bricks formed yet in this session
    at.session_state["brick_params"] = bricks.BrickParams().to_dict()  # as the Bricks page leaves it
    at.run()
    owner = next(b for b in bricks.compute_bricks(Store(small_run[0]), on_small_run) if 96 + 7 in b.neurons)
    assert {m.label: m.value for m in at.metric}["brick"] == owner.brick_id


def test_map_colours_and_search(on_small_run):
    at = app("2_Neuron_map.py").run()
    for option in ["cluster", "brick", "functionality", "firing rate"]:
        at.radio[0].set_value(option).run()
        assert not at.exception
    at.text_input[0].input("the").run()  # the whole-run search: tests/pages/test_page_explain.py
    assert not at.exception
    assert "occurrences in" in texts(at.caption)
    assert len(at.dataframe) == 1 and set(at.dataframe[0].value.columns) >= {"layer", "neuron", "z"}


# Bricks


def test_bricks_table_heatmap_and_adding_a_brick_to_the_configuration(on_small_run, small_run):
    from core.bricks import candidates as bricks

    at = app("3_Bricks.py")
    at.session_state["brick"] = "coact-L01-00"
    at.run()
    assert not at.exception
    found = bricks.compute_bricks(Store(small_run[0]), on_small_run)
    assert {m.label: m.value for m in at.metric}["bricks"] == str(len(found))
    table = at.dataframe[0].value
    assert table["brick"].tolist() == [b.brick_id for b in bricks.by_significance(found)]
    assert {"label", "size", "layers", "stability", "best p", "distinctive tokens"} <= set(table.columns)
    assert len(at.get("plotly_chart")) == 3  # enrichment heatmap, neurons per layer, neuron scores
    assert "Brick coact-L01-00" in [h.value for h in at.subheader]
    assert "Neuron 1:" in " ".join(h.value for h in at.subheader)  # the detail opens its first neuron
    next(b for b in at.button if b.label == "Playground: off").click().run()
    assert not at.exception
    chosen = at.session_state["config_bricks"]
    assert chosen["coact-L01-00"].mode == "off" and chosen["coact-L01-00"].neurons[1]
    assert "In the configuration: off" in texts(at.caption)


def test_bricks_other_methods(on_small_run):
    at = app("3_Bricks.py").run()
    at.radio[0].set_value("functional").run()
    assert not at.exception
    assert at.dataframe[0].value["brick"].str.startswith("functional-").all()


# Playground


@pytest.fixture
def without_demo(monkeypatch):
    """The Playground without its first example (tested on its own below): only its own two strips."""
    from core.live import demo

    monkeypatch.setattr(demo, "pick", lambda found, category=demo.CATEGORY: None)


def test_playground_toggling_a_brick_changes_the_configured_model(on_small_run, without_demo):
    at = app("4_Playground.py").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["active neurons"] == "100.0%" and metrics["first divergent token"] == "none"
    assert len(at.get("html")) == 2  # baseline and configured, side by side
    at.multiselect[0].set_value(["coact-L01-00"]).run()
    assert not at.exception
    assert at.session_state["config_bricks"]["coact-L01-00"].mode == "off"
    assert {m.label: m.value for m in at.metric}["active neurons"] == f"{1 - 32 / 192:.1%}"
    at.segmented_control[0].set_value("scale").run()
    at.slider(key="factor-coact-L01-00").set_value(0.5).run()
    assert not at.exception
    brick = at.session_state["config_bricks"]["coact-L01-00"]
    assert (brick.mode, brick.factor) == ("scale", 0.5)
    assert {m.label: m.value for m in at.metric}["active neurons"] == "100.0%"  # scaled, not removed
    charts = len(at.get("plotly_chart"))
    at.toggle[0].set_value(True).run()  # the per-category loss change
    assert not at.exception and len(at.get("plotly_chart")) == charts + 1
    at.multiselect[0].set_value([]).run()
    assert at.session_state["config_bricks"] == {}


def test_playground_opens_on_the_demo_with_a_random_control(on_small_run, monkeypatch):
    from core.live import demo

    # the tiny random model has no labelled brick: show its first functional brick as the demo's
    monkeypatch.setattr(demo, "pick", lambda found, category=demo.CATEGORY: found[0])
    at = app("4_Playground.py").run()
    assert not at.exception
    assert at.text_area[0].value == demo.PROMPT
    verdict = next(m.value for m in at.markdown if "random neurons of the same layers" in m.value)
    assert "mean KL" in verdict and "nats" in verdict
    assert len(at.get("html")) == 5  # plain, brick off, random off; then the Playground's two
    next(b for b in at.button if b.label.startswith("Try it below")).click().run()
    assert not at.exception
    [(name, brick)] = at.session_state["config_bricks"].items()
    assert name.startswith("functional-") and brick.mode == "off"
    assert {m.label: m.value for m in at.metric}["active neurons"] != "100.0%"
    metrics = {m.label: m.value for m in at.metric}
    at.run()  # the same request again: answered from the cache, and said so
    assert {m.label: m.value for m in at.metric}["response time"] == "cached"
    assert metrics["response time"] != "cached"


def test_playground_prompt_from_the_run_and_a_bad_prompt(on_small_run, without_demo):
    at = app("4_Playground.py").run()
    at.radio[0].set_value("Pick one from the run").run()
    assert not at.exception and len(at.get("html")) == 2
    at.radio[0].set_value("Type one").run()
    at.text_area[0].input("   ").run()
    assert not at.exception
    assert "prompt is empty" in texts(at.error)


# Export


def one_brick_config(at_or_state, small_run, mode="off"):
    """Put a 3-neuron brick of layer 0 into the session's configuration."""
    from core import configuration

    run = Store(small_run[0]).require_run(small_run[1])
    at_or_state["config_fingerprint"] = run.fingerprint
    at_or_state["config_bricks"] = {"b0": configuration.Brick("b0", {0: [1, 2, 3]}, mode)}
    return run


def test_export_offers_the_session_configuration_as_json(on_small_run, small_run):
    from core import configuration

    at = app("6_Export.py")
    run = one_brick_config(at.session_state, small_run)
    at.run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["bricks"] == "1"
    assert at.download_button[0].label == "Download JSON"
    loaded = configuration.loads(at.code[0].value, model=run)  # what the download holds
    assert loaded.bricks[0].neurons == {0: (1, 2, 3)} and loaded.source == {"run_id": run.run_id}


def test_export_upload_shows_the_diff_and_applies_on_request(on_small_run, small_run):
    at = app("6_Export.py")
    one_brick_config(at.session_state, small_run)
    at.run()
    doc = json.loads(at.code[0].value)
    doc["bricks"][0]["mode"] = "keep"
    at.file_uploader[0].set_value(("mine.json", json.dumps(doc).encode(), "application/json")).run()
    assert not at.exception and not at.error
    assert at.json[0].value and json.loads(at.json[0].value)["changed"]["b0"]["mode"] == {
        "from": "off",
        "to": "keep",
    }
    next(b for b in at.button if b.label == "Use this configuration").click().run()
    assert at.session_state["config_bricks"]["b0"].mode == "keep"


@pytest.mark.parametrize(
    ("edit", "message"),
    [(lambda d: d["bricks"][0]["neurons"].update({"0": [999]}), 'bricks[0].neurons["0"]'),
     (lambda d: d["model"].update(fingerprint="0000"), "model.fingerprint"),
     (lambda d: d.pop("schema_version"), "schema_version")],
)  # fmt: skip
def test_export_upload_names_the_bad_field_and_applies_nothing(on_small_run, small_run, edit, message):
    at = app("6_Export.py")
    one_brick_config(at.session_state, small_run)
    at.run()
    doc = json.loads(at.code[0].value)
    edit(doc)
    at.file_uploader[0].set_value(("bad.json", json.dumps(doc).encode(), "application/json")).run()
    assert not at.exception
    assert message in texts(at.error)
    assert at.session_state["config_bricks"]["b0"].neurons == {0: (1, 2, 3)}
    assert not [b for b in at.button if b.label == "Use this configuration"]


def test_export_upload_lists_every_problem_field_by_field(on_small_run, small_run):
    at = app("6_Export.py")
    one_brick_config(at.session_state, small_run)
    at.run()
    doc = json.loads(at.code[0].value)
    doc["bricks"][0]["mode"] = "explode"
    doc["bricks"].append({"name": "b1", "neurons": {"0": [1]}, "mode": "scale"})  # no factor
    at.file_uploader[0].set_value(("bad.json", json.dumps(doc).encode(), "application/json")).run()
    shown = texts(at.error)
    assert not at.exception and "2 problems" in shown
    assert "bricks[0].mode" in shown and "bricks[1].factor" in shown
    assert not [b for b in at.button if b.label == "Use this configuration"]


def test_export_diffs_two_uploaded_files(on_small_run, small_run):
    at = app("6_Export.py")
    one_brick_config(at.session_state, small_run)
    at.run()
    first = json.loads(at.code[0].value)
    second = json.loads(at.code[0].value)
    second["bricks"][0]["neurons"]["0"] = [1, 2, 3, 4]
    second["bricks"].append({"name": "new", "neurons": {"1": [0]}, "mode": "off"})
    at.file_uploader[0].set_value(("a.json", json.dumps(first).encode(), "application/json"))
    at.file_uploader[1].set_value(("b.json", json.dumps(second).encode(), "application/json")).run()
    assert not at.exception and not at.error
    changes = json.loads(at.json[0].value)
    assert "new" in json.dumps(changes["added"]) and "b0" in changes["changed"]
    assert "From a.json to b.json" in " ".join(m.value for m in at.markdown)


def test_export_writes_a_pruned_model(on_small_run, small_run, tmp_path):
    at = app("6_Export.py")
    one_brick_config(at.session_state, small_run)
    at.run()
    at.text_input[0].input(str(tmp_path / "pruned")).run()
    next(b for b in at.button if b.label == "Write pruned model").click().run()
    assert not at.exception and not at.error
    assert {m.label for m in at.metric} >= {"parameters", "saved", "files on disk"}
    assert (tmp_path / "pruned" / "config.json").is_file()
    assert json.loads((tmp_path / "pruned" / "brick_config.json").read_text())["bricks"][0]["name"] == "b0"


# Paper


def test_paper_computes_on_request_then_shows_every_section(on_small_run):
    from core import analysis

    at = app("5_Paper.py").run()
    assert not at.exception
    at.toggle[0].set_value(True).run()  # quick
    compute = [b for b in at.button if b.label.startswith("Compute the quick analysis")]
    assert compute and not at.header  # nothing is computed before the click
    compute[0].click().run()
    assert not at.exception and not at.error
    assert [h.value for h in at.header] == [
        "1 · Activations are sparse", "2 · Neurons specialise by category",
        "3 · Ablation: removing a category's neurons hurts that category",
        "4 · The categories' neurons barely overlap", "5 · Recombination: keep only some categories' neurons",
        "6 · Routing: run only the neurons an input needs",
    ]  # fmt: skip
    assert len(at.get("plotly_chart")) == 5
    rows = 1 + 2 * len(analysis.ReportConfig().recombine_percents)  # baseline + (kept, random) per share
    assert at.dataframe[0].value.shape[0] == rows
    again = app("5_Paper.py")
    again.session_state["run_id"] = on_small_run
    again.run()
    again.toggle[0].set_value(True).run()
    assert not [b for b in again.button if b.label.startswith("Compute")] and len(again.header) == 6  # cached
    again.toggle[1].set_value(True).run()  # resident neurons excluded
    assert not again.exception
