"""The one place where the app creates shared resources: the model(s) and the DuckDB cache.

Both are shared by every browser session and never mutated; each session keeps only its choices
(model reference, run id, brick configuration) in `st.session_state`.
"""

from __future__ import annotations

import os

import streamlit as st

from core import models, settings
from core.errors import BricklabError
from core.store import Store
from ui.text import md


def default_model_ref() -> str:
    """The model a new session starts with: BRICKLAB_MODEL (tests name a tiny model), else the default."""
    return os.environ.get("BRICKLAB_MODEL") or models.DEFAULT_MODEL


def store() -> Store:
    """The cache named by BRICKLAB_DB now (one Store per path, so tests can switch files); a cache that
    cannot be opened (damaged, locked) stops the page with the store's advice."""
    try:
        return _store(str(settings.db_path()))
    except BricklabError as exc:
        show_error(exc)


@st.cache_resource(show_spinner=False)
def _store(path: str) -> Store:
    return Store(path)


@st.cache_resource(show_spinner="Loading the model…", max_entries=3)
def model(ref: str) -> models.LoadedModel:
    return models.load_model(ref)


def current_model() -> models.LoadedModel:
    """The model this session chose (the embedded default until it picks another)."""
    ref = st.session_state.get("model_ref", default_model_ref())
    try:
        return model(ref)
    except BricklabError as exc:
        st.session_state["model_ref"] = default_model_ref()
        st.error(md(exc))
        st.stop()


def current_run_id() -> str | None:
    """The run this session looks at: its choice, else the newest complete run."""
    try:
        runs = [r for r in store().runs() if r.complete]
    except BricklabError as exc:
        show_error(exc)
    chosen = st.session_state.get("run_id")
    if chosen and any(r.run_id == chosen for r in runs):
        return chosen
    return runs[0].run_id if runs else None


def show_error(exc: BricklabError) -> None:
    st.error(md(exc))  # messages quote file names, paths and ids: text, never markup
    st.stop()
