"""Custom bricks: train a small LoRA adapter on your own texts, then toggle it beside the emergent bricks."""

import streamlit as st

from ui import adapter_view, layout

INTRO = (
    "An adapter brick is a low-rank update of the FFN projections, trained on the CPU from a few dozen "
    "texts (new facts, a style, a domain). It is applied live to your session only."
)
layout.page("Custom bricks", "🧩", INTRO)
run = layout.require_run()
lm = layout.run_model(run)

st.subheader("1 · Texts")
facts = adapter_view.facts_picker()
st.subheader("2 · Train")
adapter_view.train_form(run, lm, facts)
st.subheader("3 · Cached adapters")
adapter_view.catalog(run)
adapter_view.recall(lm, facts, run)
st.subheader("4 · Bundle")
st.caption("The configuration and its adapter files in one zip, to take away or import back.")
adapter_view.bundle(run)
