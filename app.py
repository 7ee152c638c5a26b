"""bricklab home: what it is, the loaded model, the cached runs, and a one-click default capture."""

import streamlit as st

from core import models, prepare, prompts
from core.capture import run as capture
from core.errors import BricklabError
from ui import jobs_view, layout, resources
from ui.text import count, duration, md

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
st.subheader(f"Model: {md(layout.model_name(info.model_id))}")  # a heading wraps; a metric value is cut
c1, c2, c3 = st.columns(3)
c1.metric("layers", info.n_layers)
c2.metric("FFN neurons", f"{info.n_neurons:,}")
c3.metric("device", info.device)

st.subheader("Cached runs")
try:
    runs = resources.store().runs()
except BricklabError as exc:
    resources.show_error(exc)
if runs:
    st.dataframe(
        [
            {"run": r.run_id, "status": r.status, "model": layout.model_name(r.model_id),
             "prompt set": r.prompt_set, "prompts": count(r.n_prompts), "tokens": count(r.n_tokens),
             "capture time": duration(r.seconds), "created": str(r.created or "–")[:16]}
            for r in runs
        ],
        hide_index=True,
    )  # fmt: skip
else:
    st.info("No runs yet. Capture the default prompt set to begin.")

jobs_view.incomplete_runs(lm)
default_set = prompts.default_prompt_set()
key = jobs_view.capture_key(lm, default_set, capture.CaptureConfig())
if any(jobs_view.follow_running(kind, key) for kind in ("prepare", "capture")):
    st.rerun()  # a job of an earlier visit (or another tab) ended: show what it made
guess = jobs_view.estimate(lm, len(default_set))
left, right = st.columns(2)
left.caption(f"Preparing takes {jobs_view.estimate_text(guess, tuple(prepare.STEPS))} on this machine.")
if left.button(
    f"Prepare everything for the default prompt set ({len(default_set)} prompts)", type="primary",
    help="Capture, then bricks, the neuron map and the paper analysis, in the "
    "background: leaving or reloading the page does not stop it, and a second click resumes.",
):  # fmt: skip
    st.session_state["run_id"] = jobs_view.follow(jobs_view.start_prepare(lm, default_set)).result
    st.rerun()  # the run list and the sidebar's run picker show the new run
if right.button(
    f"Capture only ({jobs_view.estimate_text(guess, ('capture',))})",
    help="The other steps then run when a page first needs them.",
):
    st.session_state["run_id"] = jobs_view.follow(jobs_view.start_capture(lm, default_set)).result.run_id
    st.rerun()

NEXT = {
    "pages/1_Capture.py": "📥 Capture your own prompts",
    "pages/2_Neuron_map.py": "🗺️ Neuron map",
    "pages/3_Bricks.py": "🧱 Bricks",
    "pages/4_Playground.py": "🎛️ Playground",
    "pages/6_Export.py": "📦 Export",
}
st.markdown("**Next:**")
columns = st.columns(3)  # five in one row cut the longer labels on a laptop screen
for i, (page, label) in enumerate(NEXT.items()):
    columns[i % 3].page_link(page, label=label)
