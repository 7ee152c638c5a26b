"""Bricks: groups of neurons that work together, with their functional labels, stability and detail."""

import numpy as np
import streamlit as st

from core.bricks import candidates as bricks
from core.bricks import neurons
from core.errors import BricklabError
from ui import (
    brick_ops_view,
    config_state,
    experts_view,
    explain_view,
    figures,
    layout,
    links,
    neuron_view,
    queries,
    resources,
)
from ui.text import code, md

METHODS = {
    "coact": "co-activation (per layer, METIS)",
    "functional": "functional (top 5% per category)",
    "map": "map clusters (UMAP + HDBSCAN)",
}
layout.page("Bricks", "🧱", "A brick is a set of FFN neurons; it is functional for a category when it holds "
            "far more of that category's top-1% neurons than chance (hypergeometric p ≤ 0.001).")  # fmt: skip
run = layout.require_run()
METHODS |= experts_view.methods(run)  # a mixture-of-experts run's trained experts
left, right = st.columns(2)
method = left.radio("Method", list(METHODS), format_func=METHODS.get, horizontal=True, key=links.METHOD)
size = right.number_input(
    "Neurons per brick (co-activation)", 2, run.d_ff, min(32, run.d_ff), disabled=method != "coact"
)
params = bricks.BrickParams(method=method, size=int(size)).to_dict()
st.session_state["brick_params"] = params
with st.spinner("Forming bricks: once per run and parameters, then cached…"):
    try:
        found = queries.bricks_of(run.run_id, params)
    except BricklabError as exc:
        resources.show_error(exc)

stable = [b.stability for b in found if b.stability is not None]
c = st.columns(3)
c[0].metric("bricks", len(found))
if run.categories:
    c[1].metric(
        "functional", f"{bricks.functional_share(found):.0%}", help="Share with an enrichment p ≤ 0.001."
    )
else:
    c[1].metric("functional", "–", help="Labels need prompt categories, and this run has none.")
c[2].metric(
    "stability",
    f"{np.mean(stable):.2f}" if stable else "–",
    help="Jaccard with the bricks of half the prompts.",
)
rows = [
    {"brick": b.brick_id, "label": b.label or "", "size": b.size, "layers": layout.span(b.layers),
     "stability": b.stability, "best p": min(b.p_values.values(), default=1.0),
     "distinctive tokens": " ".join(neurons.display_token(t).strip() or "␣" for t in b.top_tokens)}
    for b in bricks.by_significance(found)  # labelled first, most significant first
]  # fmt: skip
if row := neuron_view.table_pick(
    rows, "bricks", {"best p": st.column_config.NumberColumn(format="scientific")}
):
    st.session_state["brick"] = row["brick"]

strongest = sorted(found, key=lambda b: min(b.p_values.values(), default=1.0))[:40]
if run.categories and strongest:
    z = -np.log10(np.array([[max(b.p_values[c], 1e-300) for b in strongest] for c in run.categories]))
    names = [b.brick_id for b in strongest]
    st.plotly_chart(
        figures.heatmap(
            z, names, run.categories, "Enrichment, −log10 p (the 40 strongest bricks)", zfmt=".0f"
        )
    )

brick = next((b for b in found if b.brick_id == st.session_state.get("brick")), None)
if brick is not None:
    st.subheader(f"Brick {md(brick.brick_id)}" + (f" · {md(brick.label)}" if brick.label else ""))
    links.share("Bricks", links.View(run.run_id, brick=brick.brick_id), "Link to this brick")
    per_layer = np.bincount(brick.neurons // run.d_ff, minlength=run.n_layers)
    st.plotly_chart(figures.bars(list(range(run.n_layers)), per_layer.tolist(), "Neurons per layer"))
    st.markdown(
        "**Distinctive input tokens** (where its neurons fire, against the run's token frequencies): "
        + " · ".join(code(neurons.display_token(t)) for t in brick.top_tokens)
    )
    explain_view.brick_section(run, params, brick.brick_id)  # in words, and what it writes
    modes = st.columns(4)
    for column, mode in zip(modes, ["off", "mean", "keep"], strict=False):
        if column.button(
            f"Playground: {mode}", help=f"Add this brick to the configuration in mode '{mode}'."
        ):
            config_state.set_brick(run, brick, mode)
    in_config = config_state.chosen(run).get(brick.brick_id)
    modes[3].caption(f"In the configuration: {in_config.mode if in_config else 'no'}")
    pick = st.selectbox(
        "Neuron of this brick",
        brick.neurons[:500].tolist(),
        format_func=lambda i: f"{i // run.d_ff}:{i % run.d_ff}",
    )
    neuron_view.show_neuron(run, *divmod(int(pick), run.d_ff), brick=brick.brick_id, shade=False, n=5)

brick_ops_view.show(run, found)
experts_view.show(run)
