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


def ended_well(snap: jobs.Snapshot | None) -> bool:
    """A followed job ended without an error (its error, if any, is on the page)."""
    return snap is not None and snap.error is None


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


def analysis_key(run: Run, config: analysis.ReportConfig, extra: tuple[str, ...] = ()) -> str:
    kind = "quick" if config == analysis.ReportConfig().quick() else "full"
    return ":".join([run.run_id, kind, *extra])


def start_analysis(
    run: Run, lm: models.LoadedModel, config: analysis.ReportConfig, extra: tuple[str, ...] = ()
) -> jobs.Job:
    """The analysis's missing sections (with the on-demand ones in `extra`) as a background job."""
    store = resources.store()
    only_extra = bool(extra) and not analysis.missing_sections(store, run.run_id, config)

    def work(job: jobs.Job) -> dict:
        started = time.perf_counter()
        result = analysis.report(store, lm, run.run_id, config, job.progress, extra=extra)
        if config == analysis.ReportConfig() and not extra:  # what a preparation computes
            prepare.record(store, run.run_id, {"analysis": time.perf_counter() - started})
        return result

    title = "ablation matrix without resident neurons" if only_extra else "paper analysis"
    return registry().start("analysis", analysis_key(run, config, extra), title, work)


def analysis_estimate(
    run: Run, lm: models.LoadedModel, config: analysis.ReportConfig, extra: tuple[str, ...] = ()
) -> str:
    """How long the missing sections should take: the last measured analysis (a preparation's, the
    default configuration) scaled by the held-out prompts each evaluates."""
    guess = estimate(lm, run.n_prompts)
    if guess["analysis"] is not None:
        n = len(run.categories)
        todo = analysis.missing_sections(resources.store(), run.run_id, config, extra)
        whole = analysis.prompt_evaluations(analysis.ReportConfig(), n, analysis.ALWAYS)
        guess["analysis"] *= analysis.prompt_evaluations(config, n, todo) / max(whole, 1)
    return estimate_text(guess, ("analysis",))


def analysis_button(
    run: Run, lm: models.LoadedModel, config: analysis.ReportConfig, label: str, extra: tuple[str, ...] = ()
) -> bool:
    """The analysis's missing sections (the on-demand ones in `extra` too) as a background job: follows
    it if one is running (a reload, another tab), else a button that states how long they should take
    and starts it. True once a job ended here: the page reruns to draw the sections from the cache."""
    key = analysis_key(run, config, extra)
    running = follow_running("analysis", key)
    if running is not None:
        return ended_well(running)
    took = analysis_estimate(run, lm, config, extra)
    if not st.button(f"{md(label)} ({took})", type="primary", key=f"compute-{key}"):
        return False
    return ended_well(follow(start_analysis(run, lm, config, extra)))


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
