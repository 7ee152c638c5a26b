"""The Playground's first lesson: the run's knowledge brick switched off on a curated prompt, a random
brick of the same size and layers beside it as the control, and the verdict in one line."""

from __future__ import annotations

import streamlit as st

from core.bricks import configure
from core.errors import BricklabError
from core.live import demo
from core.store import Run
from ui import config_state, figures, queries
from ui.text import md


def show(run: Run) -> None:
    """The demo in a bordered box, with a button that takes its brick and prompt into the Playground.
    Nothing when no brick of the run is labelled (a run without categories)."""
    if not run.categories:
        return
    with st.spinner("Preparing the first example: the run's functional bricks, once per run…"):
        try:
            brick = demo.pick(queries.bricks_of(run.run_id, demo.PARAMS.to_dict()))
        except BricklabError:
            return  # the manual Playground below still works
    if brick is None:
        return
    control = demo.random_like(brick, run.d_ff)
    results = []
    with st.spinner(f"Generating with {md(brick.brick_id)} off, then with random neurons off…"):
        for candidate in (brick, control):
            config = configure.config_from_bricks(run, [candidate]).to_json()
            results.append(
                queries.comparison(run.model_id, run.run_id, demo.PROMPT, config, demo.NEW_TOKENS)[0]
            )
    off, random_off = results
    with st.container(border=True):
        what = f"the run's top {demo.PARAMS.percent:g}% neurons for {md(brick.label)}"
        st.markdown(f"**First example:** “{md(demo.PROMPT)}” with {md(brick.brick_id)} ({what}) off")
        st.markdown(md(demo.verdict(brick, off, random_off)))
        columns = st.columns(3)
        where = off.first_divergence
        for column, title, pieces, mark in (
            (columns[0], "Plain model", off.baseline_pieces, None),
            (columns[1], f"{brick.brick_id} off", off.configured_pieces, where),
            (
                columns[2],
                f"{brick.size:,} random neurons off",
                random_off.configured_pieces,
                random_off.first_divergence,
            ),
        ):
            column.caption(md(title))
            column.html(figures.token_strip(pieces, None, mark, 1.0))
        st.button(
            f"Try it below: {md(brick.brick_id)} off on this prompt", on_click=_adopt, args=(run, brick),
            help="Puts the brick in this session's configuration and the prompt in the prompt box.",
        )  # fmt: skip


def _adopt(run: Run, brick) -> None:
    config_state.set_brick(run, brick, "off")
    st.session_state["pg-source"] = "Type one"
    st.session_state["pg-prompt"] = demo.PROMPT
