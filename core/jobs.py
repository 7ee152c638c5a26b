"""Long work that outlives a browser session: a process-wide registry of background jobs (threads), one
per (kind, key) at a time, each with a progress record whose time estimate counts only its own speed.

A page starts a job and draws its record; a tab closed or reloaded finds the same job again by its
kind and key (e.g. ("capture", run id)) and shows how far it got.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.errors import BricklabError

log = logging.getLogger(__name__)


def duration(seconds: float | None) -> str:
    """A duration as people read it: "0.25 s", "4.2 s", "45 s", "4 min 05 s", "1 h 02 min"; "–" for
    none. The one formatter of durations, for the CLI and the pages."""
    if seconds is None or seconds != seconds:
        return "–"
    if 0 < seconds < 1:
        return f"{seconds:.2f} s"
    if 1 <= seconds < 10:
        return f"{seconds:.1f} s"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Meter:
    """Progress of one piece of work. The estimate counts only the speed seen since the first report:
    a resumed capture first reports the prompts an earlier session did (384/643), which took no time
    here, so counting them would promise "about 1 s left"."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.done, self.total, self.message = 0, 0, "starting"
        self._base: tuple[float, int] | None = None  # (time, done) of the first report

    def update(self, done: int, total: int, message: str) -> None:
        if self._base is None or done < self._base[1]:
            self._base = (self._clock(), done)
        self.done, self.total, self.message = done, total, message

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    def left(self) -> float | None:
        """Seconds left at this session's own rate; None until some work was measured."""
        if self._base is None or self.total <= 0:
            return None
        if self.done >= self.total:
            return 0.0
        since, first = self._base
        worked = self.done - first
        return (self._clock() - since) / worked * (self.total - self.done) if worked > 0 else None


@dataclass(frozen=True)
class Snapshot:
    """What a page shows of a job at one moment (a copy: the job keeps running)."""

    kind: str
    key: str
    title: str
    state: str  # "running", "done" or "failed"
    fraction: float  # of the whole job, 0..1
    text: str  # the current step and its count, e.g. "capturing: 384/643 prompts"
    left: float | None  # seconds, None while unknown
    elapsed: float  # seconds since the job started
    steps: tuple[tuple[str, str], ...]  # (step, state): "waiting", "running", "done", "cached", "skipped"
    error: BricklabError | None
    result: object

    @property
    def running(self) -> bool:
        return self.state == "running"


class Job:
    """One background computation. `work(job)` reports through `job.progress` (a core.progress.Progress)
    and, for work in several steps, `job.step(name, state)`; the steps' `estimates` (seconds) weigh them
    in the one progress bar and count for the steps not reached yet."""

    def __init__(self, kind: str, key: str, title: str, estimates: dict[str, float] | None = None):
        self.kind, self.key, self.title = kind, key, title
        self._estimates = dict(estimates or {})
        self._states = dict.fromkeys(self._estimates, "waiting")
        self._current: str | None = None
        self._meter = Meter()
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._ended: float | None = None
        self.state, self.error, self.result = "running", None, None
        self.thread: threading.Thread | None = None

    def progress(self, done: int, total: int, message: str) -> None:
        with self._lock:
            self._meter.update(done, total, message)

    def step(self, name: str, state: str = "running") -> None:
        """Mark a step: "running" (its progress starts afresh), or "done", "cached", "skipped"."""
        with self._lock:
            self._states[name] = state
            if state == "running":
                self._current, self._meter = name, Meter()
            elif name == self._current:
                self._current = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            meter, states, current = self._meter, dict(self._states), self._current
            end = self._ended or time.monotonic()
            fraction, left = self._whole(meter, states, current)
            text = meter.message + (f": {meter.done:,}/{meter.total:,}" if meter.total else "")
            if current:
                text = f"{current} · {text}"
            return Snapshot(self.kind, self.key, self.title, self.state, fraction, text, left,
                            end - self._started, tuple(states.items()), self.error, self.result)  # fmt: skip

    def _whole(self, meter: Meter, states: dict, current: str | None) -> tuple[float, float | None]:
        if self.state != "running":
            return 1.0, 0.0
        if not self._estimates:
            return meter.fraction, meter.left()
        weights = {name: max(self._estimates.get(name, 1.0), 1e-3) for name in states}
        finished = sum(w for name, w in weights.items() if states[name] not in ("waiting", "running"))
        now = weights.get(current, 0.0) * meter.fraction if current else 0.0
        fraction = (finished + now) / sum(weights.values())
        waiting = sum(w for name, w in weights.items() if states[name] == "waiting")
        here = meter.left() if current else 0.0
        if here is None:  # the current step is not measured yet: its own estimate stands in
            here = weights.get(current, 0.0) * (1 - meter.fraction)
        return fraction, here + waiting

    def _run(self, work: Callable[[Job], object]) -> None:
        try:
            self.result = work(self)
            self.state = "done"
        except BricklabError as exc:
            self.error, self.state = exc, "failed"
        except Exception as exc:  # a thread's exception would vanish: the page must see it
            log.error("job %s %s failed:\n%s", self.kind, self.key, traceback.format_exc())
            self.error = BricklabError(
                f"The {self.title} stopped with an unexpected error: {type(exc).__name__}: {exc}.",
                "The server log has the details; what finished is cached, so starting again resumes.",
            )
            self.state = "failed"
        finally:
            self._ended = time.monotonic()


class Jobs:
    """The process's jobs by (kind, key); starting one that is already running returns the running one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], Job] = {}

    def start(
        self,
        kind: str,
        key: str,
        title: str,
        work: Callable[[Job], object],
        estimates: dict[str, float] | None = None,
    ) -> Job:
        with self._lock:
            job = self._jobs.get((kind, key))
            if job is not None and job.state == "running":
                return job
            job = self._jobs[(kind, key)] = Job(kind, key, title, estimates)
        job.thread = threading.Thread(target=job._run, args=(work,), name=f"bricklab-{kind}", daemon=True)
        job.thread.start()
        return job

    def get(self, kind: str, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get((kind, key))

    def running(self, kinds: Sequence[str] = ()) -> list[Job]:
        """Jobs still running (of the given kinds, or all), oldest first."""
        with self._lock:
            jobs = list(self._jobs.values())
        return [j for j in jobs if j.state == "running" and (not kinds or j.kind in kinds)]

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every running job to end (scripts and tests)."""
        for job in self.running():
            if job.thread is not None:
                job.thread.join(timeout)
