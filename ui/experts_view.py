"""A mixture-of-experts run on the Bricks page: its trained experts as a brick method, and how often
each prompt category's tokens were routed to each expert of a layer."""

from __future__ import annotations

import numpy as np
import streamlit as st

from core.capture import experts as expert_routes
from core.errors import BricklabError
from core.live import experts as live_experts
from core.store import Run
from ui import figures, layout, resources
from ui.text import md

METHOD = {"expert": "trained experts (MoE)"}  # the Bricks page's method for a MoE run


@st.cache_data(max_entries=8, show_spinner=False)
def _layout(run_id: str) -> dict | None:
    found = expert_routes.layout(resources.store(), run_id)
    return None if found is None else vars(found)


@st.cache_data(max_entries=8, show_spinner=False)
def _usage(run_id: str) -> tuple[np.ndarray, list[str]]:
    return expert_routes.usage_by_category(resources.store(), run_id)


def methods(run: Run) -> dict[str, str]:
    """The extra brick method this run offers: the experts of a MoE run, nothing for a dense one."""
    return METHOD if _layout(run.run_id) else {}


def show(run: Run) -> None:
    """Per-category expert usage of one layer (a heatmap) and taking one of its experts out of the
    router's choice, for a MoE run; nothing for a dense one."""
    found = _layout(run.run_id)
    if found is None:
        return
    st.subheader("Expert usage")
    st.caption(
        f"Each layer has {found['n_experts']} experts of {found['d_expert']} neurons; the router sends "
        f"each token to {found['top_k']}. Expert e of layer L is the brick expert-L{{L}}-E{{e}}: neurons "
        f"e·{found['d_expert']} to (e+1)·{found['d_expert']} − 1, 0 at tokens not routed to it."
    )
    usage, names = _usage(run.run_id)
    layer = 0
    if run.n_layers > 1:
        layer = st.slider("Layer", 0, run.n_layers - 1, 0, key="expert-usage-layer")
    chance = found["top_k"] / found["n_experts"]
    title = f"Share of each category's tokens routed to each expert, layer {layer} (chance {chance:.0%})"
    experts = [f"E{e}" for e in range(found["n_experts"])]
    st.plotly_chart(figures.heatmap(100 * usage[:, layer], experts, names, title, zfmt=".0f"))
    _router_tryout(run, found, layer)


def _router_tryout(run: Run, found: dict, layer: int) -> None:
    """Take one expert of the shown layer out of the router's choice and compare the continuations."""
    with st.expander("Take an expert out of the router's choice"):
        left, right = st.columns(2)
        expert = left.selectbox("Expert", list(range(found["n_experts"])), format_func="E{}".format)
        renormalise = right.toggle(
            "Renormalise", True, help="Scale the remaining chosen experts' weights back to their sum; off, "
            "the expert's share is dropped, which equals switching all its neurons off.",
        )  # fmt: skip
        prompt = st.text_input("Prompt", "Write a haiku about the sea.", key="expert-route-prompt")
        if not st.button("Compare", key="expert-route-go"):
            return
        lm = layout.run_model(run)
        try:
            moe = live_experts.require_moe(lm.model)
            factors = live_experts.router_factors(moe, run.n_layers, {(layer, expert): 0.0})
            result = live_experts.compare_routed(lm, prompt, factors, renormalise)
        except BricklabError as exc:
            st.error(md(exc))
            return
        without = f"Without E{expert} of layer {layer}"
        for label, text in (("Plain", result.baseline), (without, result.routed)):
            st.markdown(f"**{label}**")
            st.code(text, language=None, wrap_lines=True)  # verbatim: a continuation may be only spaces
        where = (
            "identical"
            if result.first_divergence is None
            else f"first differs at token {result.first_divergence}"
        )
        st.caption(where)
