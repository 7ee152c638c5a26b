"""Page scaffolding shared by every page: the header, the sidebar run picker, the model of a run,
a progress bar with the time left, and a run summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core import jobs, models
from core.errors import BricklabError
from core.store import Run
from ui import jobs_view, links, resources
from ui.text import duration, md


def page(title: str, icon: str, intro: str = "") -> None:
    """Page config, title and the sidebar run picker; the first call on every page."""
    st.set_page_config(
        page_title=title if title == "bricklab" else f"{title} · bricklab", page_icon=icon, layout="wide"
    )
    st.title(f"{icon} {title}")
    navigation()
    if intro:
        st.caption(intro)
    st.session_state[links.PAGE] = "" if title == "bricklab" else title.replace(" ", "_")
    links.restore()  # a link's run, neuron, brick, prompt and configuration, before the run picker
    run_picker()
    jobs_view.sidebar()  # background jobs (capture, preparation, analysis) and how far they are


def navigation() -> None:
    """The sidebar's page list, drawn here so that the entry page reads "Home" (Streamlit's own list,
    switched off in .streamlit/config.toml, names it after app.py); pages/ auto-discovery stays.
    Only when app.py is the entry script: AppTest runs a page alone, where page links cannot resolve."""
    ctx = get_script_run_ctx()
    if ctx is None or Path(ctx.main_script_path).name != "app.py":
        return
    root = Path(ctx.main_script_path).parent
    with st.sidebar:
        st.page_link("app.py", label="Home", icon="🏠")
        for path in sorted((root / "pages").glob("[0-9]*_*.py"), key=lambda p: int(p.name.split("_")[0])):
            st.page_link(f"pages/{path.name}", label=path.stem.split("_", 1)[1].replace("_", " "))
        st.divider()


def _picked() -> None:
    st.session_state["run_id"] = st.session_state["run_picker"]


def run_picker() -> str | None:
    """The sidebar's run selector; it writes the session's choice to session_state["run_id"]."""
    try:
        runs = [r for r in resources.store().runs() if r.complete]
    except BricklabError as exc:
        resources.show_error(exc)
    with st.sidebar:
        if not runs:
            st.caption("No captured run yet: capture one on the Capture page.")
            return None
        current = resources.current_run_id()
        st.session_state["run_picker"] = current  # follow choices made elsewhere (e.g. a new capture)
        names = {r.run_id: run_label(r) for r in runs}
        st.selectbox("Run", list(names), format_func=names.get, key="run_picker", on_change=_picked)
    st.session_state["run_id"] = current
    return current


def model_name(model_id: str) -> str:
    """A short name for a model reference: the default's name, or the last part of a hub id or path."""
    return models.DEFAULT_NAME if model_id == models.DEFAULT_MODEL else model_id.rstrip("/").split("/")[-1]


def run_label(run: Run) -> str:
    return f"{run.prompt_set} · {run.n_prompts} prompts · {model_name(run.model_id)} · {run.run_id}"


def require_run() -> Run:
    """The session's run, or a pointer to the Capture page and a stop."""
    run_id = resources.current_run_id()
    if run_id is None:
        st.info(
            "There is no captured run yet. Capture one on the **Capture** page (or Home), then come back."
        )
        st.stop()
    try:
        run = resources.store().require_run(run_id)
    except BricklabError as exc:
        resources.show_error(exc)
    links.apply_config(run)
    return run


def run_model(run: Run) -> models.LoadedModel:
    """The model a run was captured with (loaded once per process), or a clear error and a stop."""
    fix = f"The weights of '{run.model_id}' changed since the capture: capture the prompt set again."
    try:
        lm = resources.model(run.model_id)
        models.check_match(run, lm.info, f"Run '{run.run_id}'", fix)
    except BricklabError as exc:
        resources.show_error(exc)
    return lm


def progress_bar(text: str = "starting…"):
    """A progress bar and a capture-style callback (done, total, message) that shows the time left."""
    bar = st.progress(0.0, text=text)
    meter = jobs.Meter()  # counts only this call's own speed (a resume starts part-way)

    def report(done: int, total: int, message: str) -> None:
        meter.update(done, total, message)
        left = meter.left()
        left = f", about {duration(left)} left" if left and done < total else ""
        bar.progress(meter.fraction, text=f"{message}: {done:,}/{total:,}{left}")

    return report


def run_summary(run: Run) -> None:
    """Metrics of a run and its prompts per category."""
    c = st.columns(5)
    c[0].metric("prompts", f"{run.n_prompts:,}")
    c[1].metric("tokens", f"{run.n_tokens or 0:,}")
    c[2].metric("neurons", f"{run.n_layers * run.d_ff:,}", help=f"{run.n_layers} layers × {run.d_ff}")
    c[3].metric("capture time", duration(run.seconds))
    c[4].metric("tokens / s", f"{(run.n_tokens or 0) / max(run.seconds or 0, 1e-9):,.0f}")
    counts = Counter(p[2] or "(none)" for p in resources.store().prompts(run.run_id))
    st.caption(
        f"Run `{run.run_id}` · prompt set **{md(run.prompt_set)}** · model **{md(run.model_id)}** · "
        + ", ".join(f"{md(name)}: {n}" for name, n in counts.most_common())
    )


def span(layers: tuple[int, ...]) -> str:
    """Layers as text: "4", or "2–9 (5)" for five layers between 2 and 9."""
    if len(layers) == 1:
        return str(layers[0])
    return f"{layers[0]}–{layers[-1]}" + (
        f" ({len(layers)})" if len(layers) != layers[-1] - layers[0] + 1 else ""
    )
