"""Calibrated thresholds on the Paper page (AppTest, tiny model, a copy of the small run): measured on
request, then a table of the loss per share skipped, equal to core.routing.thresholds.curve's."""

from __future__ import annotations

import shutil

import pytest

from core.routing import thresholds
from core.store import Store
from tests.conftest import app, texts


@pytest.fixture
def run_copy(monkeypatch, small_run, tiny_dir, tmp_path) -> tuple[str, str]:
    path = tmp_path / "cache.duckdb"
    shutil.copy(small_run[0], path)
    monkeypatch.setenv("BRICKLAB_DB", str(path))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return str(path), small_run[1]


def test_paper_measures_thresholds_on_request_and_shows_the_loss_per_share(run_copy):
    path, run_id = run_copy
    at = app("5_Paper.py").run()
    at.toggle[0].set_value(True).run()  # quick analysis first: the curves are the page's last section
    next(b for b in at.button if b.label.startswith("Compute the")).click().run()
    button = next(b for b in at.button if b.label.startswith("Measure the loss with thresholds"))
    assert "needs a GPU" in button.label  # the CPU: no speed
    assert not at.dataframe or "loss / dense" not in at.dataframe[-1].value.columns
    button.click().run()
    assert not at.exception and not at.error
    table = at.dataframe[-1].value
    assert list(table["skipped"]) == list(thresholds.SHARES) and "tokens/s" not in table.columns
    store = Store(path)
    try:
        stored = thresholds.stored_curve(store, run_id, "cpu")
    finally:
        store.close()
    assert list(table["loss / dense"]) == pytest.approx([p["loss_ratio"] for p in stored["points"]])
    assert f"{stored['n_prompts']} held-out prompts" in texts(at.caption)
