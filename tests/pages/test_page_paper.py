"""The Paper page on a cached quick analysis: selectivity beside the ablation matrix with its one-sentence
explanation, each claim's verdict in words with the numbers, and the resident-neuron control computed
on request as a background job."""

from __future__ import annotations

import os
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


def test_the_resident_control_is_computed_on_request_as_a_job(on_analysed_run):
    from core import prepare
    from ui import paper_text
    from ui.text import duration

    r = on_analysed_run
    assert r["ablation_matrix_no_resident"] is None  # a report leaves the control out
    store = Store(os.environ["BRICKLAB_DB"])
    prepare.record(store, r["run_id"], {"analysis": 100.0})  # as if a preparation's analysis took 100 s
    store.close()
    share = analysis.prompt_evaluations(QUICK, 7, analysis.ON_DEMAND) / analysis.prompt_evaluations(
        analysis.ReportConfig(), 7, analysis.ALWAYS
    )
    assert 0.3 < share < 0.5  # 7 x (8 x 3 + 3) held-out prompts of 7 x (9 + 8 x 4 + 6 x 4 + 4)
    at = app("5_Paper.py")
    at.session_state["run_id"] = r["run_id"]
    at.run()
    at.toggle[0].set_value(True).run()
    at.toggle[1].set_value(True).run()  # resident neurons excluded: not computed yet
    assert not at.exception and not at.error and len(at.header) == 6  # every other section still shows
    button = [b for b in at.button if b.label.startswith(paper_text.RESIDENT_BUTTON)]
    assert [b.label for b in button] == [f"{paper_text.RESIDENT_BUTTON} (about {duration(100 * share)})"]
    assert not at.table and "computed only when asked for" in texts(at.info)
    button[0].click().run()
    assert not at.exception and not at.error
    assert not [b for b in at.button if b.label.startswith("Compute")]
    store = Store(os.environ["BRICKLAB_DB"])
    control = analysis.report(store, None, r["run_id"], QUICK)["ablation_matrix_no_resident"]
    store.close()
    assert control is not None  # cached by the job, and shown:
    shown = [None if v != v else v for v in at.table[0].value["selectivity"]]
    assert shown == pytest.approx(control["selectivity"], nan_ok=True)


def test_a_reloaded_page_follows_the_running_control_to_its_end(on_analysed_run):
    import threading

    from ui import jobs_view

    store = Store(os.environ["BRICKLAB_DB"])
    run = store.require_run(on_analysed_run["run_id"])
    store.close()
    release = threading.Event()

    def held(job):
        job.progress(3, 9, "evaluating")
        release.wait(30)

    key = jobs_view.analysis_key(run, QUICK, analysis.ON_DEMAND)
    job = jobs_view.registry().start("analysis", key, "ablation matrix without resident neurons", held)
    try:
        at = app("5_Paper.py")
        at.session_state["run_id"] = run.run_id
        at.run()
        at.toggle[0].set_value(True).run()
        threading.Timer(3.0, release.set).start()
        at.toggle[1].set_value(True).run()  # the control's section finds the job and follows it to its end
        assert not at.exception and not job.snapshot().running
    finally:
        release.set()
        job.thread.join(10)
