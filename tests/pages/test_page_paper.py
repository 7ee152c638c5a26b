"""The Paper page on a cached quick analysis: selectivity beside the ablation matrix with its one-sentence
explanation, and each claim's verdict in words with the numbers."""

from __future__ import annotations

import shutil

import pytest

from core import analysis
from core.store import Store
from tests.conftest import app, texts

QUICK = analysis.ReportConfig().quick()


@pytest.fixture
def on_analysed_run(monkeypatch, small_run, tiny_dir, tiny_lm, tmp_path) -> dict:
    """A private copy of the tiny run with the quick analysis cached; the app looks at it."""
    path, run_id = small_run
    copy = tmp_path / "paper.duckdb"
    shutil.copy(path, copy)
    store = Store(copy)
    report = analysis.report(store, tiny_lm, run_id, QUICK)
    store.close()
    monkeypatch.setenv("BRICKLAB_DB", str(copy))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return report


def test_paper_shows_selectivity_and_a_verdict_per_claim(on_analysed_run):
    r = on_analysed_run
    at = app("5_Paper.py")
    at.session_state["run_id"] = r["run_id"]
    at.run()
    at.toggle[0].set_value(True).run()  # quick: the cached analysis
    assert not at.exception and not at.error
    assert not [b for b in at.button if b.label.startswith("Compute")]
    table = at.table[0].value
    assert list(table["category"]) == r["ablation_matrix"]["categories"]
    shown = [None if v != v else v for v in table["selectivity"]]  # NaN cells are the None ratios
    assert shown == pytest.approx(r["ablation_matrix"]["selectivity"], nan_ok=True)
    captions = texts(at.caption)
    assert "Selectivity is a category's own perplexity increase divided by" in captions
    body = texts(at.markdown)
    verdicts = analysis.verdicts(r)
    assert body.count("on this run") >= len(verdicts)
    recombination = verdicts["recombination"]["text"]
    assert ("loses to random" in recombination) == (verdicts["recombination"]["holds"] is False)
    assert "lower loss than as many random" in body and "random sets would share" in body
