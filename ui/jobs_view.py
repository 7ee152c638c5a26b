"""Long work as background jobs on the pages: capture, preparation and the paper analysis run in the
process-wide registry (core.jobs), so a tab closed or reloaded finds its job again and follows it; the
page states before the click how long the work should take, and what of a run is ready."""

from __future__ import annotations

import time

import streamlit as st

from core import analysis, jobs, models, prepare, prompts
from core.capture import run as capture
from core.errors import BricklabError
from core.store import Run
from ui import resources
from ui.text import duration, md

POLL = 0.5  # seconds between redraws of a followed job's bar


@st.cache_resource(show_spinner=False)
def registry() -> jobs.Jobs:
    """The process's jobs: one registry shared by every browser session."""
    return jobs.Jobs()


def bar_text(snap: jobs.Snapshot) -> str:
    left = f" · about {duration(snap.left)} left" if snap.left else ""
    return f"{md(snap.title)}: {md(snap.text)}{left} · {duration(snap.elapsed)} so far"


def follow(job: jobs.Job) -> jobs.Snapshot:
    """Draw the job's bar until it ends and return its last state. The job runs in its own thread: when
    this session goes (tab closed, page left, widget touched) the job goes on, and the next visit
    follows it again."""
    snap = job.snapshot()
    if snap.running:
        bar = st.progress(snap.fraction, text=bar_text(snap))
        while (snap := job.snapshot()).running:
            bar.progress(snap.fraction, text=bar_text(snap))
            time.sleep(POLL)
        bar.empty()
    if snap.error is not None:
        resources.show_error(snap.error)
    return snap


def follow_running(kind: str, key: str) -> jobs.Snapshot | None:
    """Reattach to the job of this kind and key if one is running (a reload, a second tab)."""
    job = registry().get(kind, key)
    return follow(job) if job is not None and job.snapshot().running else None


def capture_key(lm: models.LoadedModel, prompt_set: prompts.PromptSet, config: capture.CaptureConfig) -> str:
    return capture.run_id_for(lm.info.fingerprint, prompt_set.hash, config)


def capture_plan(
    lm: models.LoadedModel, prompt_set: prompts.PromptSet, config: capture.CaptureConfig
) -> tuple[str, str]:
    """(verb, note) for a capture button: "Capture" with about how long it takes, "Resume" for an
    incomplete run (how far it got, and the time of the prompts it still misses), or cached."""
    store = resources.store()
    run = store.run(capture_key(lm, prompt_set, config))
    if run is not None and run.complete:
        return "Capture", "cached: nothing to compute"
    done = prepare.captured_prompts(store, run) if run is not None else 0
    took = estimate_text(estimate(lm, len(prompt_set) - done), ("capture",))
    return (
        ("Resume", f"incomplete: {done:,}/{len(prompt_set):,} prompts; {took} left")
        if done
        else ("Capture", took)
    )


def start_capture(
    lm: models.LoadedModel,
    prompt_set: prompts.PromptSet,
    config: capture.CaptureConfig = capture.CaptureConfig(),
) -> jobs.Job:
    store = resources.store()
    return registry().start(
        "capture",
        capture_key(lm, prompt_set, config),
        f"capture of {len(prompt_set):,} prompts",
        lambda job: capture.capture(lm, prompt_set, store, config, progress=job.progress),
    )


def start_prepare(lm: models.LoadedModel, prompt_set: prompts.PromptSet) -> jobs.Job:
    store, config = resources.store(), capture.CaptureConfig()
    guess = prepare.weights(prepare.estimate(store, lm.info.fingerprint, len(prompt_set)))

    def work(job: jobs.Job) -> str:
        return prepare.prepare(lm, prompt_set, store, config, step=job.step, progress=job.progress)

    return registry().start(
        "prepare",
        capture_key(lm, prompt_set, config),
        f"preparation of {len(prompt_set):,} prompts",
        work,
        guess,
    )


def analysis_key(run: Run, config: analysis.ReportConfig) -> str:
    return f"{run.run_id}:{'quick' if config == analysis.ReportConfig().quick() else 'full'}"


def start_analysis(run: Run, lm: models.LoadedModel, config: analysis.ReportConfig) -> jobs.Job:
    store = resources.store()

    def work(job: jobs.Job) -> dict:
        started = time.perf_counter()
        result = analysis.report(store, lm, run.run_id, config, job.progress)
        if config == analysis.ReportConfig():  # the configuration a preparation computes
            prepare.record(store, run.run_id, {"analysis": time.perf_counter() - started})
        return result

    return registry().start("analysis", analysis_key(run, config), "paper analysis", work)


def analysis_estimate(run: Run, lm: models.LoadedModel, config: analysis.ReportConfig) -> str:
    guess = estimate(lm, run.n_prompts)
    if guess["analysis"] is not None and config != analysis.ReportConfig():
        guess["analysis"] /= 4  # the quick configuration evaluates about a quarter as much
    return estimate_text(guess, ("analysis",))


@st.cache_data(max_entries=8, show_spinner="Measuring this machine's speed on a few prompts…")
def _probe(model_ref: str, fingerprint: str) -> float:
    return capture.probe(resources.model(model_ref), prompts.default_prompt_set())


def estimate(lm: models.LoadedModel, n_prompts: int) -> dict[str, float | None]:
    """Seconds per step for `n_prompts` prompts on this model: from the last capture and preparation,
    else (capture only) from a probe of a few prompts."""
    guess = prepare.estimate(resources.store(), lm.info.fingerprint, n_prompts)
    if guess["capture"] is None:
        guess["capture"] = _probe(lm.info.model_id, lm.info.fingerprint) * n_prompts
    return guess


def estimate_text(guess: dict[str, float | None], steps: tuple[str, ...]) -> str:
    """E.g. "about 1 min 40 s", or "about 1 min 40 s plus the neuron map (not timed on this machine yet)"."""
    known = [guess[s] for s in steps if guess.get(s) is not None]
    unknown = [prepare.STEPS[s] for s in steps if guess.get(s) is None]
    text = f"about {duration(sum(known))}" if known else "a time not measured yet"
    if known and unknown:
        text += f" plus the {', '.join(unknown)} (not timed on this machine yet)"
    return text


def readiness(run: Run) -> None:
    """One caption: which of the run's steps are cached (✓) and which would be computed on first use (○)."""
    try:
        ready = prepare.ready(resources.store(), run)
    except BricklabError:
        return
    shown = [(name, done) for name, done in ready.items() if done is not None]
    marks = [f"{'✓' if done else '○'} {prepare.STEPS[name]}" for name, done in shown]
    st.caption("Ready: " + " · ".join(marks))


def sidebar() -> None:
    """On every page: what of the session's run is ready, and the jobs running in this server process
    (their bars are redrawn at each visit)."""
    run_id = st.session_state.get("run_id")
    running = registry().running()
    with st.sidebar:
        if run_id and (run := resources.store().run(run_id)) is not None:
            readiness(run)
        if running:
            st.caption("Running in the background:")
        for job in running:
            snap = job.snapshot()
            st.progress(snap.fraction, text=bar_text(snap))


def incomplete_runs(lm: models.LoadedModel) -> None:
    """Each incomplete run with how far it got and a button that resumes it from its stored prompts."""
    store = resources.store()
    for run in [r for r in store.runs() if r.status == "incomplete"]:
        done = prepare.captured_prompts(store, run)
        left, right = st.columns([3, 1])
        left.warning(
            f"Run {md(run.run_id)} ({md(run.prompt_set)}) is incomplete: {done:,}/{run.n_prompts:,} prompts."
        )
        if right.button("Resume", key=f"resume-{run.run_id}"):
            resume(run, lm)


def resume(run: Run, lm: models.LoadedModel) -> None:
    store = resources.store()
    if lm.info.fingerprint != run.fingerprint:
        lm = resources.model(run.model_id)
    fix = f"The weights of '{run.model_id}' changed since the capture began: capture the prompt set again."
    try:
        models.check_match(run, lm.info, f"Run '{run.run_id}'", fix)
    except BricklabError as exc:
        resources.show_error(exc)
    prompt_set, config = prepare.stored_prompt_set(store, run)
    follow(start_capture(lm, prompt_set, config))
    st.session_state["run_id"] = run.run_id
    st.rerun()
