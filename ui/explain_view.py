"""What a neuron or brick does, in words: its scored description and the tokens it writes."""

from __future__ import annotations

import streamlit as st

from core.bricks import explain
from core.errors import BricklabError
from core.store import Run
from ui import queries
from ui.text import code, md

SCORE_HELP = (
    "Pearson r, on the half of the run's prompts the description was not made from, between the real "
    "per-prompt activity and a simulation that predicts it as the share of a prompt's tokens named "
    f"after 'fires on'. good: r ≥ {explain.TRUST[0][0]}, fair: r ≥ {explain.TRUST[1][0]}, else weak."
)


def _tokens(pairs) -> str:
    return " · ".join(code(text) for text, _ in pairs) or "–"


def _description(described: explain.Explanation) -> None:
    st.markdown(f"**In words:** {md(described.text)}")
    score = "–" if described.trust == "none" else f"{described.score:.2f} ({described.trust})"
    st.caption(f"Score {score} on {described.n_held_out:,} held-out prompts.", help=SCORE_HELP)


def _section(spinner: str, compute, promotes: tuple[str, str]) -> dict | None:
    """Compute (description, tokens written) behind a spinner, show the description and the promoted
    tokens; returns the tokens, or None after showing why there are none."""
    try:
        with st.spinner(spinner):
            described, writes = compute()
    except BricklabError as exc:
        st.warning(md(exc))
        return None
    _description(described)
    label, note = promotes
    st.markdown(f"**{label}** ({note}): " + _tokens(writes["promoted"]))
    return writes


def neuron_section(run: Run, layer: int, neuron: int) -> None:
    """The neuron's scored description and the tokens it promotes and suppresses."""
    writes = _section(
        "Describing the neuron's layer: once per run, then cached…",
        lambda: queries.neuron_explanation(run.run_id, run.model_id, layer, neuron),
        ("Promotes", "its output, read through the unembedding, per unit of activation"),
    )
    if writes is not None:
        st.markdown("**Suppresses:** " + _tokens(writes["suppressed"]))


def brick_section(run: Run, params: dict, brick_id: str) -> None:
    """A brick's scored description and the tokens its summed output promotes."""
    _section(
        "Describing the brick: once, then cached…",
        lambda: queries.brick_explanation(run.run_id, run.model_id, params, brick_id),
        ("Its summed output promotes", "each neuron weighted by its mean activation"),
    )
