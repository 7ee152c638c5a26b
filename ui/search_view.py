"""The Neuron map's search: which neurons fire most on a token wherever it occurs in the run (the
model reruns the prompts that hold it), or which neurons' output promotes it."""

from __future__ import annotations

import streamlit as st

from core.bricks import token_search
from core.errors import BricklabError
from core.store import Run
from ui import layout, neuron_view, queries, resources
from ui.text import code, md


def show(run: Run) -> None:
    """Which neurons fire most on a token wherever it occurs in the run, or promote it."""
    word = st.text_input("Which neurons fire most on…", placeholder="Python")
    what = st.radio(
        "Search", ["fire on it in the run", "promote it"], horizontal=True, label_visibility="collapsed"
    )
    if not word.strip():
        return
    if what == "promote it":
        _promoting(run, word)
        return
    slot = st.empty()  # the progress bar, gone once the answer is there
    try:
        with slot.container():
            found = queries.token_activity(run.run_id, run.model_id, word, layout.progress_bar("rerunning…"))
    except BricklabError as exc:
        st.info(md(exc))
        _promoting(run, word)
        return
    finally:
        slot.empty()
    rows = token_search.rank_neurons(resources.store(), run.run_id, found)
    st.caption(
        f"{md(found['token'])}: {found['positions']:,} occurrences in {found['prompts']:,} prompts, rerun "
        "with the model. z: how far |a| there stands above |a| on the prompts' other tokens."
    )
    if row := neuron_view.table_pick(rows, "search"):
        neuron_view.open_neuron(row["layer"], row["neuron"])


def _promoting(run: Run, word: str) -> None:
    try:
        token, rows = queries.promoting_neurons(run.model_id, word)
    except BricklabError as exc:
        st.warning(md(exc))
        return
    st.caption(f"Neurons whose output raises the logit of {code(token)} the most, per unit of activation.")
    if row := neuron_view.table_pick(rows, "promote"):
        neuron_view.open_neuron(row["layer"], row["neuron"])
