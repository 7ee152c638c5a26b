"""Long work as background jobs on the pages (ui/jobs_view.py): a reloaded page follows the running job,
an incomplete run says how far it got and resumes, every page lists running jobs, Home says what is
ready and how long preparing would take."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from core import models, prompts
from core.capture import run as capture
from core.store import Store
from tests.conftest import app, texts
from ui import jobs_view


@pytest.fixture
def on_partial_run(monkeypatch, tmp_path, tiny_dir, tiny_lm) -> str:
    """A cache holding one incomplete run: 8 of 14 prompts captured (the first of two shards)."""
    path = tmp_path / "partial.duckdb"
    store = Store(path)
    try:
        prompt_set = prompts.default_prompt_set().head(14)
        config = capture.CaptureConfig(chunk_prompts=8)
        run_id = capture.capture(tiny_lm, prompt_set, store, config, shard=(0, 2)).run_id
    finally:
        store.close()
    monkeypatch.setenv("BRICKLAB_DB", str(path))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return run_id


def held(release: threading.Event, seconds: float = 0.0):
    def work(job):
        job.progress(3, 10, "capturing")
        release.wait(seconds or 30)
        return None

    return work


@pytest.fixture
def on_unprepared_run(monkeypatch, tmp_path, small_run, tiny_dir) -> str:
    """A private copy of the tiny run with no derived result cached (other tests compute them on theirs)."""
    path, run_id = small_run
    copy = Path(shutil.copy(path, tmp_path / "unprepared.duckdb"))
    store = Store(copy)
    try:
        store.clear_results(run_id)
    finally:
        store.close()
    monkeypatch.setenv("BRICKLAB_DB", str(copy))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return run_id


def test_home_says_what_is_ready_and_how_long_preparing_takes(on_unprepared_run):
    at = app("app.py").run()
    assert not at.exception
    ready = texts(at.sidebar.caption)
    assert "Ready: ✓ capture" in ready and "○ neuron map" in ready
    labels = [b.label for b in at.button]
    assert any(label.startswith("Prepare everything") for label in labels)
    assert "Preparing takes about" in texts(at.caption)  # the capture's time from the run's speed
    assert any(label.startswith("Capture only (about") for label in labels)


def test_an_incomplete_run_says_how_far_it_got_and_resumes(on_partial_run):
    at = app("app.py").run()
    assert not at.exception
    assert f"Run {on_partial_run}" in texts(at.warning) and "incomplete: 8/14 prompts" in texts(at.warning)
    next(b for b in at.button if b.label == "Resume").click().run()
    assert not at.exception and not at.error
    assert not [w for w in at.warning if "incomplete" in str(w.value)]
    run = Store(os.environ["BRICKLAB_DB"]).require_run(on_partial_run)
    assert run.complete and run.n_prompts == 14
    assert at.session_state["run_id"] == on_partial_run


def test_a_reloaded_capture_page_follows_the_running_capture_to_its_end(on_small_run, tiny_dir):
    lm = models.load_model(tiny_dir, device="cpu")
    key = jobs_view.capture_key(lm, prompts.default_prompt_set(), capture.CaptureConfig())
    release = threading.Event()
    job = jobs_view.registry().start("capture", key, "capture of 643 prompts", held(release))
    threading.Timer(8.0, release.set).start()
    at = app("1_Capture.py").run()  # the page finds the job and draws its bar until it ends
    assert not at.exception
    assert not job.snapshot().running and job.snapshot().elapsed >= 8.0


def test_every_page_lists_the_jobs_running_in_the_background(on_small_run):
    release = threading.Event()
    job = jobs_view.registry().start("capture", "elsewhere", "capture of 99 prompts", held(release))
    try:
        at = app("3_Bricks.py").run()
        assert not at.exception
        assert "Running in the background" in texts(at.sidebar.caption)
        bars = at.sidebar.get("progress")
        assert (
            bars and "capture of 99 prompts" in str(bars[0].proto.text) and "3/10" in str(bars[0].proto.text)
        )
    finally:
        release.set()
        job.thread.join(10)


def test_the_capture_page_offers_to_resume_an_incomplete_run(on_partial_run):
    at = app("1_Capture.py").run()
    at.number_input[0].set_value(14).run()
    label = at.button[0].label
    assert label.startswith("Resume 14 prompts") and "incomplete: 8/14 prompts" in label, label
    at.button[0].click().run()
    assert not at.exception and f"Run {on_partial_run} captured" in texts(at.success)
    assert at.button[0].label.endswith("(cached: nothing to compute)")
