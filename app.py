"""bricklab home: what it is, the loaded model, the cached runs, and a one-click default capture."""

import streamlit as st

from core import models, prompts
from core.capture import run as capture
from core.errors import BricklabError
from ui import layout, resources
from ui.text import md

layout.page(
    "bricklab",
    "🧱",
    "bricklab opens the feed-forward layers of a language model and finds the groups of neurons that work "
    "together — **bricks**. Capture a prompt set once, explore the neuron map, then switch bricks off, keep "
    "only some or rescale them and watch the model's output change live.",
)

with st.sidebar:
    ref = st.text_input(
        "Model (hub id or local folder; empty = the embedded SmolLM2-135M-Instruct)",
        value=""
        if st.session_state.get("model_ref", "default") == "default"
        else st.session_state["model_ref"],
    )
    if st.button("Load model"):
        try:
            resources.model(ref.strip() or models.DEFAULT_MODEL)
            st.session_state["model_ref"] = ref.strip() or models.DEFAULT_MODEL
        except BricklabError as exc:
            st.error(md(exc))

lm = resources.current_model()
info = lm.info
st.subheader("Model")
c1, c2, c3, c4 = st.columns(4)
c1.metric(
    "model", models.DEFAULT_NAME if info.model_id == "default" else info.model_id.rstrip("/").split("/")[-1]
)
c2.metric("layers", info.n_layers)
c3.metric("FFN neurons", f"{info.n_neurons:,}")
c4.metric("device", info.device)

st.subheader("Cached runs")
try:
    runs = resources.store().runs()
except BricklabError as exc:
    resources.show_error(exc)
if runs:
    st.dataframe(
        [
            {"run": r.run_id, "status": r.status, "model": r.model_id, "prompt set": r.prompt_set,
             "prompts": r.n_prompts, "tokens": r.n_tokens, "seconds": r.seconds, "created": r.created}
            for r in runs
        ],
        hide_index=True,
    )  # fmt: skip
else:
    st.info("No runs yet. Capture the default prompt set to begin.")

default_set = prompts.default_prompt_set()
if st.button(f"Capture the default prompt set ({len(default_set)} prompts)", type="primary"):
    try:
        result = capture.capture(lm, default_set, resources.store(), progress=layout.progress_bar())
    except BricklabError as exc:
        resources.show_error(exc)
    st.session_state["run_id"] = result.run_id
    st.rerun()  # the run list and the sidebar's run picker show the new run

NEXT = {
    "pages/1_Capture.py": "📥 Capture your own prompts",
    "pages/2_Neuron_map.py": "🗺️ Neuron map",
    "pages/3_Bricks.py": "🧱 Bricks",
    "pages/4_Playground.py": "🎛️ Playground",
    "pages/6_Export.py": "📦 Export",
}
st.markdown("**Next:**")
for col, (page, label) in zip(st.columns(len(NEXT)), NEXT.items(), strict=True):
    col.page_link(page, label=label)
