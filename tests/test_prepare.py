"""Preparing a run in one go: every step computed once, a second call skips them all, an incomplete
run tells how far it got and resumes from its own stored prompts, and estimates come from measured speed."""

from __future__ import annotations

import pytest

from core import analysis, prepare, prompts
from core.capture import run as capture
from core.store import Store

QUICK = analysis.ReportConfig(
    eval_per_category=1, sparsity_per_category=1, ks=(0, 50), recombine_percents=(5.0,)
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_lm):
    """(store path, run id, steps reported by the first and by the second call)."""
    path = tmp_path_factory.mktemp("prepare") / "cache.duckdb"
    prompt_set = prompts.default_prompt_set().head(28)
    store = Store(path)
    try:
        first, second = [], []
        run_id = prepare.prepare(tiny_lm, prompt_set, store, report=QUICK, step=lambda *s: first.append(s))
        again = prepare.prepare(tiny_lm, prompt_set, store, report=QUICK, step=lambda *s: second.append(s))
    finally:
        store.close()
    assert again == run_id
    return path, run_id, first, second


def test_every_step_is_computed_once_then_cached(prepared):
    path, run_id, first, second = prepared
    computed = [name for name, state in first if state == "done"]
    assert computed == list(prepare.STEPS)
    assert {state for _, state in second} == {"cached"} and len(second) == len(computed)
    store = Store(path)
    try:
        run = store.require_run(run_id)
        assert all(prepare.ready(store, run, QUICK)[n] for n in computed)
        assert not prepare.ready(store, run)["analysis"]  # the full analysis is another configuration
        # the on-demand control (the matrix without resident neurons) is left for whoever asks for it
        assert analysis.missing_sections(store, run_id, QUICK, analysis.ON_DEMAND) == list(analysis.ON_DEMAND)
        timing = store.get_json(run_id, prepare.TIMING, prepare.TIMING_KEY)
        assert set(timing) == set(computed) and all(s > 0 for s in timing.values())
    finally:
        store.close()


def test_estimates_come_from_the_last_capture_and_preparation(prepared):
    path, run_id, _, _ = prepared
    store = Store(path)
    try:
        run = store.require_run(run_id)
        timing = store.get_json(run_id, prepare.TIMING, prepare.TIMING_KEY)
        guess = prepare.estimate(store, run.fingerprint, 2 * run.n_prompts)
        assert guess["capture"] == pytest.approx(2 * run.seconds)
        assert guess["coact"] == pytest.approx(2 * timing["coact"])
        assert guess["map"] == pytest.approx(timing["map"])
        unknown = prepare.estimate(store, "another-model", 10, probe=0.5)
        assert unknown["capture"] == 5.0 and unknown["map"] is None
        assert prepare.weights(unknown)["map"] == prepare.FALLBACK_SECONDS["map"]
    finally:
        store.close()


def test_an_incomplete_run_says_how_far_it_got_and_resumes_from_its_stored_prompts(tiny_lm, store):
    prompt_set = prompts.default_prompt_set().head(14)
    config = capture.CaptureConfig(chunk_prompts=8)
    part = capture.capture(tiny_lm, prompt_set, store, config, shard=(0, 2))  # chunk 0 of 2: 8 prompts
    run = store.require_run(part.run_id, complete=False)
    assert not run.complete and prepare.captured_prompts(store, run) == 8
    assert not any(prepare.ready(store, run).values())
    again, settings = prepare.stored_prompt_set(store, run)
    assert again.hash == prompt_set.hash and settings == config
    seen = []
    result = capture.capture(tiny_lm, again, store, settings, progress=lambda *a: seen.append(a))
    assert result.run_id == part.run_id and result.resumed
    assert seen[0] == (8, 14, "resuming")
    assert prepare.captured_prompts(store, store.require_run(part.run_id)) == 14


def test_a_probe_measures_seconds_per_prompt_without_writing(tiny_lm, store):
    seconds = capture.probe(tiny_lm, prompts.default_prompt_set(), n=4)
    assert 0 < seconds < 30
    assert store.runs() == []
