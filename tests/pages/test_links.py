"""Links to a view (ui/links.py): round trips, malformed links as clear messages, and pages opened
from a link in AppTest restore the neuron, brick and configuration."""

from __future__ import annotations

import json
import zlib
from urllib.parse import parse_qsl

import pytest

from core.errors import BricklabError
from tests.conftest import app, texts
from ui import links

CONFIG = json.dumps({"version": 1, "bricks": [{"name": "b0", "neurons": {"0": list(range(300))}}]})


def test_a_view_round_trips_through_its_query():
    view = links.View("run1", (15, 100), "functional-knowledge", "Bonjour, ça va?", CONFIG)
    back = links.parse(links.to_query(view))
    assert back == view
    assert links.parse({}) == links.View()


def test_a_configuration_is_compact_and_a_long_one_is_linked_by_hash():
    packed = links.encode_config(CONFIG)
    assert len(packed) < len(CONFIG) * 0.6 and links.decode_config(packed) == CONFIG
    assert all(c.isalnum() or c in "-_" for c in packed)  # URL-safe, no padding
    noisy = json.dumps({"bricks": [str(i * 7919 % 100003) for i in range(3000)]})
    query = links.to_query(links.View("run1", config=noisy))
    assert query["cfg"] == "h" + links.config_hash(noisy)
    assert links.parse(query).config_hash == links.config_hash(noisy)


def test_the_url_is_relative_without_the_browser_address():
    view = links.View("r", (1, 2))
    assert links.url(view, "Neuron_map") == "Neuron_map?run=r&neuron=1%3A2"
    assert (
        links.url(view, "", "http://h:8501/Neuron_map?x=1") == "http://h:8501/Neuron_map?run=r&neuron=1%3A2"
    )
    assert links.url(links.View(), "") == "./"


@pytest.mark.parametrize(
    "query, message",
    [
        ({"neuron": "15-100"}, "not layer:index"),
        ({"neuron": "a:b"}, "not layer:index"),
        ({"run": "x' OR 1=1"}, "is not an id"),
        ({"cfg": "%%%not-base64"}, "cannot be read"),
        ({"cfg": links.encode_config(CONFIG)[:-6]}, "cannot be read"),  # cut off
        ({"cfg": links.encode_config("{}")[:-2] + "AA"}, "cannot be read"),  # bad checksum
    ],
)
def test_a_malformed_link_is_a_clear_error(query, message):
    with pytest.raises(BricklabError, match=message) as info:
        links.parse(query)
    assert "link again" in info.value.hint


def test_a_compressed_bomb_is_refused():
    bomb = links.base64.urlsafe_b64encode(zlib.compress(b" " * (links.MAX_JSON + 10))).decode()
    with pytest.raises(BricklabError, match="cannot be read"):
        links.decode_config(bomb)


def test_a_neuron_link_opens_the_neuron_and_shows_its_own_link(on_small_run):
    at = app("2_Neuron_map.py")
    at.query_params.update({"run": on_small_run, "neuron": "1:7"})
    at.run()
    assert not at.exception
    assert "Neuron 1:7" in [s.value for s in at.subheader]
    assert any("neuron=1%3A7" in c.value and f"run={on_small_run}" in c.value for c in at.code)


def test_a_malformed_link_warns_and_the_page_still_works(on_small_run):
    at = app("2_Neuron_map.py")
    at.query_params.update({"neuron": "fifteen"})
    at.run()
    assert not at.exception
    assert "is not layer" in texts(at.warning)
    assert at.get("plotly_chart")


def test_a_playground_link_restores_its_configuration_and_prompt(on_small_run):
    at = app("4_Playground.py").run()
    at.multiselect[0].set_value(["coact-L01-00"]).run()
    link = next(c.value for c in at.code if "cfg=" in c.value)
    fresh = app("4_Playground.py")
    fresh.query_params.update(dict(parse_qsl(link.split("?", 1)[1])))
    fresh.run()
    assert not fresh.exception and not fresh.warning
    assert fresh.session_state["config_bricks"]["coact-L01-00"].mode == "off"
    assert {m.label: m.value for m in fresh.metric}["active neurons"] == f"{1 - 32 / 192:.1%}"


def test_a_brick_link_opens_the_brick_with_its_method(on_small_run):
    at = app("3_Bricks.py")
    at.query_params.update({"run": on_small_run, "brick": "coact-L00-01"})
    at.run()
    assert not at.exception
    assert any("coact-L00-01" in s.value for s in at.subheader)
    assert any("brick=coact-L00-01" in c.value for c in at.code)
