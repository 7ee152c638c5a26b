"""The Custom bricks page in AppTest on the tiny model: train an adapter with a progress bar, list it,
add it to the session configuration, and see it as a toggle on the Playground."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.configuration import AdapterRef
from core.live import adapters
from tests.conftest import app, texts
from ui import config_state


@pytest.fixture
def on_tiny_run(monkeypatch, tmp_path, small_run, tiny_dir) -> Path:
    """A copy of the tiny capture as the app's cache, so adapters land in this test's own folder."""
    path = tmp_path / "cache.duckdb"
    shutil.copy(small_run[0], path)
    monkeypatch.setenv("BRICKLAB_DB", str(path))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return tmp_path / "adapters"


def test_train_list_and_add_an_adapter(on_tiny_run):
    at = app("7_Custom_bricks.py").run()
    assert not at.exception
    assert "32 training texts, 8 held-out questions" in texts(at.caption)
    assert "No adapter for this model yet" in texts(at.info)
    at.number_input(key="ad-steps").set_value(2)
    at.multiselect(key="ad-layers").set_value([1])
    next(b for b in at.button if b.label == "Train adapter").click().run()
    assert not at.exception
    assert "trained in" in texts(at.success)
    [stored] = adapters.catalog(on_tiny_run)
    assert stored["layers"] == [1] and stored["train"]["steps"] == 2
    assert len(at.dataframe[-1].value) == 1
    next(b for b in at.button if b.label == "Add to the configuration").click().run()
    assert not at.exception
    name = f"adapter-{stored['sha256'][:8]}"
    assert f"**{name}** is in this session's configuration" in texts(at.caption)
    assert name in at.session_state[config_state.ADAPTERS]


def test_playground_shows_the_adapter_toggle_and_generates_with_it(on_tiny_run, small_run, tiny_lm):
    from tests.live.test_adapters import synthetic

    data = synthetic(tiny_lm, layers=(0, 1))
    sha = adapters.save(data, on_tiny_run)
    ref = AdapterRef("adapter-x", sha, (0, 1), adapters.MODULES, 3)
    at = app("4_Playground.py")
    at.session_state[config_state.ADAPTERS_OWNER] = tiny_lm.info.fingerprint
    at.session_state[config_state.ADAPTERS] = {ref.name: ref}
    at.run()
    assert not at.exception
    assert "**adapter-x** (adapter)" in texts(at.markdown)
    assert not at.error  # the configuration with the adapter was accepted and applied
