"""Everything a run needs, in one go: capture, then the co-activation and functional bricks, the
neuron map and the paper's analysis. Vocabulary projections are not a step: one neuron's, brick's or
token's takes milliseconds, so the pages compute them when shown. Each step is cached where it
always is, so a second call (or a resume after a stop) skips what is ready; the seconds each step
took are kept with the run, and the next preparation's estimate starts from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from core import analysis, prompts
from core.bricks import candidates, neuron_map
from core.capture import run as capture
from core.models import LoadedModel
from core.progress import Progress
from core.store import Run, Store

STEPS = {  # name -> what a person reads
    "capture": "capture",
    "coact": "co-activation bricks",
    "functional": "functional bricks",
    "map": "neuron map",
    "analysis": "paper analysis",
}
# Seconds per step on the default model on a 2-core machine (benchmarks/first_use.py, 2026-12-03; the
# analysis 2026-12-04): they only weigh the steps in one progress bar until this machine has prepared a
# run of its own.
FALLBACK_SECONDS = {"capture": 87, "coact": 30, "functional": 8, "map": 40, "analysis": 58}
TIMING = "prepare.seconds"  # the results kind that keeps a run's measured step times
TIMING_KEY = {"version": 1}
Step = Callable[[str, str], None]  # (step name, state): "running", "done", "cached", "skipped"


def brick_params(method: str) -> candidates.BrickParams:
    return candidates.BrickParams(method=method)


def ready(
    store: Store, run: Run, report: analysis.ReportConfig = analysis.ReportConfig()
) -> dict[str, bool | None]:
    """Step -> whether its result is cached for this run (None: the step does not apply to it)."""
    if not run.complete:
        return dict.fromkeys(STEPS, False)
    out: dict[str, bool | None] = {"capture": True}
    for method in ("coact", "functional"):
        applies = method == "coact" or bool(run.categories)
        key = brick_params(method).key()
        out[method] = store.has_result(run.run_id, "bricks", key, arrays=True) if applies else None
    out["map"] = store.has_result(run.run_id, "map", neuron_map.MapParams().to_dict(), arrays=True)
    out["analysis"] = not analysis.missing_sections(store, run.run_id, report) if run.categories else None
    return out


def stored_prompt_set(store: Store, run: Run) -> tuple[prompts.PromptSet, capture.CaptureConfig]:
    """The prompt set and settings a run was started with, read back from the cache: what resuming an
    incomplete run needs (the same prompts give the same run id)."""
    rows = store.prompts(run.run_id)
    prompt_set = prompts.PromptSet(run.prompt_set, tuple(prompts.Prompt(i, c, t) for _, i, c, t in rows))
    return prompt_set, capture.CaptureConfig(**run.settings)


def captured_prompts(store: Store, run: Run) -> int:
    """Prompts of the run committed so far (all of them once it is complete)."""
    if run.complete:
        return run.n_prompts
    chunk = capture.CaptureConfig(**run.settings).chunk_prompts
    return sum(min(chunk, run.n_prompts - c * chunk) for c in store.done_chunks(run.run_id))


def prepare(
    lm: LoadedModel,
    prompt_set: prompts.PromptSet,
    store: Store,
    config: capture.CaptureConfig = capture.CaptureConfig(),
    report: analysis.ReportConfig = analysis.ReportConfig(),
    step: Step | None = None,
    progress: Progress | None = None,
) -> str:
    """Capture `prompt_set` and compute every step after it; returns the run id. Cached steps are
    reported "cached" and cost nothing, so calling it again resumes where a stopped one ended."""
    step = step or (lambda name, state: None)
    progress = progress or (lambda done, total, message: None)
    seconds: dict[str, float] = {}

    def timed(name: str, work: Callable[[], object]) -> None:
        step(name, "running")
        started = time.perf_counter()
        work()
        seconds[name] = time.perf_counter() - started
        step(name, "done")

    run_id = capture.run_id_for(lm.info.fingerprint, prompt_set.hash, config)
    existing = store.run(run_id)
    if existing is not None and existing.complete:
        step("capture", "cached")
    else:
        timed("capture", lambda: capture.capture(lm, prompt_set, store, config, progress))
    run = store.require_run(run_id)
    done = ready(store, run, report)
    work = {
        "coact": lambda: candidates.compute_bricks(store, run_id, brick_params("coact"), progress),
        "functional": lambda: candidates.compute_bricks(store, run_id, brick_params("functional"), progress),
        "map": lambda: neuron_map.compute_map(store, run_id, neuron_map.MapParams(), progress),
        "analysis": lambda: analysis.report(store, lm, run_id, report, progress),
    }
    for name, compute in work.items():
        if done[name] is None:
            step(name, "skipped")
        elif done[name]:
            step(name, "cached")
        else:
            timed(name, compute)
            record(store, run_id, seconds)
    record(store, run_id, seconds)
    return run_id


def record(store: Store, run_id: str, seconds: dict[str, float]) -> None:
    if seconds and not store.read_only:
        kept = store.get_json(run_id, TIMING, TIMING_KEY) or {}
        store.put_json(run_id, TIMING, TIMING_KEY, kept | seconds)


def estimate(
    store: Store, fingerprint: str, n_prompts: int, probe: float | None = None
) -> dict[str, float | None]:
    """Seconds each step should take for `n_prompts` prompts on this model and machine, from what it
    measured last: the newest capture of this model (seconds per prompt, else `probe`'s) and the
    newest preparation's step times (capture and co-activation scale with the prompts). None: unknown.
    """
    runs = [r for r in store.runs() if r.fingerprint == fingerprint and r.complete]
    out: dict[str, float | None] = dict.fromkeys(STEPS)
    captured = next((r for r in runs if r.seconds and r.n_prompts), None)
    per_prompt = captured.seconds / captured.n_prompts if captured else probe
    out["capture"] = per_prompt * n_prompts if per_prompt else None
    for run in runs:
        if timing := store.get_json(run.run_id, TIMING, TIMING_KEY):
            scale = n_prompts / max(run.n_prompts, 1)
            for name, seconds in timing.items():
                if name in out and name != "capture" and out[name] is None:
                    out[name] = seconds * (scale if name == "coact" else 1.0)
    return out


def weights(estimates: dict[str, float | None]) -> dict[str, float]:
    """Estimates with the fallback figures where nothing was measured: weights for one progress bar."""
    return {name: value if value is not None else FALLBACK_SECONDS[name] for name, value in estimates.items()}
