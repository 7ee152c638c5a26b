"""Neuron map: every FFN neuron in 2-D (UMAP of its activity over the prompts); click or lasso to inspect."""

import numpy as np
import streamlit as st

from core.bricks.neuron_map import MapParams
from core.errors import BricklabError
from ui import figures, layout, neuron_view, queries, resources, search_view

layout.page(
    "Neuron map", "🗺️", "Each point is one FFN neuron; neurons active on the same prompts sit together."
)
run = layout.require_run()
with st.spinner("Placing every neuron (UMAP) and grouping them (HDBSCAN): once per run, then cached…"):
    try:
        coords, clusters = queries.neuron_map_arrays(run.run_id, MapParams().to_dict())
    except BricklabError as exc:
        resources.show_error(exc)

by = st.radio(
    "Colour by",
    ["layer", "cluster", "brick", "functionality", "firing rate"],
    horizontal=True,
    key="map-colour",
)
colour = np.arange(len(coords)) // run.d_ff
if by == "cluster":
    colour = clusters
elif by == "brick":
    with st.spinner("Forming bricks (the method chosen on the Bricks page): once, then cached…"):
        colour = queries.brick_of_neuron(run.run_id, queries.session_brick_params(), len(coords))
elif by == "firing rate":
    colour = queries.neuron_stat(run.run_id, "fire_rate")
elif by == "functionality" and run.categories:
    category = st.selectbox("Category", run.categories)
    colour = queries.functionality(run.run_id)[run.categories.index(category)]
event = st.plotly_chart(
    figures.neuron_map(coords, run.d_ff, colour, by, categorical=by in ("cluster", "brick")),
    on_select="rerun", selection_mode=("points", "box", "lasso"), key="map",
)  # fmt: skip
n_clusters = int(clusters.max()) + 1
st.caption(
    f"{len(coords):,} neurons · {n_clusters} clusters · click a point, or lasso a group (chart toolbar)."
)
picked = figures.map_selection(event.selection.points[:500], run.d_ff)
if len(picked) == 1 and picked != st.session_state.get("map-seen"):
    neuron_view.open_neuron(*divmod(picked[0], run.d_ff))
st.session_state["map-seen"] = picked
if len(picked) > 1:
    st.markdown(f"**{len(picked)} neurons selected**: pick one")
    rows = [{"layer": i // run.d_ff, "neuron": i % run.d_ff, "cluster": int(clusters[i])} for i in picked]
    if row := neuron_view.table_pick(rows, "lasso"):
        neuron_view.open_neuron(row["layer"], row["neuron"])

left, right = st.columns(2)
with left.form("goto"):
    layer = st.number_input("Layer", 0, run.n_layers - 1, 0)
    index = st.number_input("Neuron", 0, run.d_ff - 1, 0)
    if st.form_submit_button("Open neuron"):
        neuron_view.open_neuron(layer, index)
with right:
    search_view.show(run)  # the whole run, rerun with the model

if "neuron" in st.session_state:
    shade = st.toggle("Shade every token (recomputes the prompt with the model)", value=True)
    layer, neuron = st.session_state["neuron"]
    brick = queries.brick_name(run.run_id, st.session_state.get("brick_params"), layer * run.d_ff + neuron)
    neuron_view.show_neuron(run, layer, neuron, brick=brick, shade=shade)
