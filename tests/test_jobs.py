"""Background jobs: one per (kind, key), failures kept for the page, and time estimates that count only
the job's own speed (a resume starts part-way)."""

from __future__ import annotations

import threading

import pytest

from core import jobs
from core.errors import BricklabError


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "–"), (0, "0 s"), (0.254, "0.25 s"), (4.24, "4.2 s"), (44.6, "45 s"),
     (60, "1 min 00 s"), (245, "4 min 05 s"), (2888, "48 min 08 s"),
     (3725, "1 h 02 min")],
)  # fmt: skip
def test_durations_read_in_minutes_and_seconds(seconds, text):
    assert jobs.duration(seconds) == text


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_after_a_resume_counts_only_this_sessions_speed():
    clock = Clock()
    meter = jobs.Meter(clock)
    meter.update(384, 643, "resuming")  # done by an earlier session, in no time here
    assert meter.left() is None  # nothing measured yet
    clock.now = 10.0
    meter.update(394, 643, "capturing")  # 1 prompt/s here
    assert meter.left() == pytest.approx(249.0)
    assert meter.fraction == pytest.approx(394 / 643)
    meter.update(643, 643, "done")
    assert meter.left() == 0.0


def blocked(release: threading.Event, result="ok"):
    def work(job: jobs.Job):
        job.progress(1, 4, "working")
        release.wait(10)
        return result

    return work


def test_one_job_per_kind_and_key_and_a_second_start_reattaches():
    registry, release = jobs.Jobs(), threading.Event()
    first = registry.start("capture", "run1", "capture", blocked(release))
    again = registry.start("capture", "run1", "capture", blocked(release, "other"))
    other = registry.start("capture", "run2", "capture", blocked(release, "two"))
    assert again is first and other is not first
    assert registry.get("capture", "run1") is first
    assert {j.key for j in registry.running(["capture"])} == {"run1", "run2"}
    snap = first.snapshot()
    assert snap.running and snap.fraction == pytest.approx(0.25) and "1/4" in snap.text
    release.set()
    registry.wait(10)
    assert first.snapshot().state == "done" and first.snapshot().result == "ok"
    assert registry.running() == []
    rerun = registry.start("capture", "run1", "capture", lambda job: "again")  # a finished job restarts
    registry.wait(10)
    assert rerun is not first and rerun.snapshot().result == "again"


def test_failures_are_kept_as_errors_that_say_what_to_do():
    registry = jobs.Jobs()

    def told(job):
        raise BricklabError("The cache is locked.", "Close the other process.")

    def crashed(job):
        raise ZeroDivisionError("division by zero")

    a = registry.start("capture", "a", "capture", told)
    b = registry.start("prepare", "b", "preparation", crashed)
    registry.wait(10)
    assert a.snapshot().state == "failed" and a.snapshot().error.hint == "Close the other process."
    error = b.snapshot().error
    assert b.snapshot().state == "failed" and "ZeroDivisionError" in str(error)
    assert "resumes" in error.hint


def test_steps_share_one_bar_weighted_by_their_estimates():
    registry, release = jobs.Jobs(), threading.Event()

    def work(job):
        job.step("capture", "cached")
        job.step("map", "running")
        job.progress(1, 2, "UMAP")
        release.wait(10)

    job = registry.start("prepare", "r", "preparation", work, {"capture": 100, "map": 100, "analysis": 200})
    for _ in range(200):  # the thread reaches its wait
        if job.snapshot().text.startswith("map"):
            break
        threading.Event().wait(0.01)
    snap = job.snapshot()
    assert snap.fraction == pytest.approx((100 + 50) / 400)
    assert dict(snap.steps) == {"capture": "cached", "map": "running", "analysis": "waiting"}
    assert snap.left is not None and snap.left >= 200  # the waiting analysis counts in full
    release.set()
    registry.wait(10)
    assert job.snapshot().fraction == 1.0
