"""Capture: run the loaded model once over a prompt set (the default one or your own file)."""

import streamlit as st

from core import prompts
from core.capture import run as capture
from core.errors import BricklabError
from ui import jobs_view, layout, resources
from ui.text import md

layout.page(
    "Capture", "📥", "The model reads every prompt once; every other page is computed from this capture."
)
lm = resources.current_model()

source = st.radio("Prompt set", ["The default set (7 categories)", "My own file"], horizontal=True)
if source.startswith("My own"):
    upload = st.file_uploader(
        'A .jsonl (one {"id", "category", "text"} per line), .csv (columns category,text) or .txt '
        f"(one prompt per line) file, up to {prompts.MAX_FILE_BYTES // 2**20} MiB",
        type=["jsonl", "csv", "txt"],
    )
    if upload is None:
        st.stop()
    try:
        prompt_set = prompts.parse_prompts(upload.getvalue(), upload.name)
    except BricklabError as exc:
        resources.show_error(exc)
else:
    prompt_set = prompts.default_prompt_set()
for warning in prompt_set.warnings[:5]:
    st.warning(md(warning))

n = st.number_input(
    f"Prompts to capture (of {len(prompt_set):,})", 1, len(prompt_set), len(prompt_set),
    help="A smaller sample is faster; it is drawn evenly from every category.",
)  # fmt: skip
prompt_set = prompt_set.head(int(n))
st.dataframe(
    [{"id": p.id, "category": p.category, "text": p.text} for p in prompt_set.prompts[:200]],
    hide_index=True, height=220, width="stretch",
)  # fmt: skip
categories = ", ".join(map(md, prompt_set.categories)) or "none"
st.caption(f"**{md(prompt_set.name)}**: {len(prompt_set):,} prompts; categories: {categories}")

with st.expander("Capture settings"):
    fire = st.slider("Share of a layer's neurons that fire at each token", 0.01, 0.5, 0.10, 0.01)
    top_k = st.number_input("Top examples kept per neuron", 1, 100, 20)
    max_tokens = st.number_input("Max tokens per prompt", 16, 4096, 256)
config = capture.CaptureConfig(fire_fraction=fire, top_k=int(top_k), max_tokens=int(max_tokens))

if jobs_view.follow_running("capture", jobs_view.capture_key(lm, prompt_set, config)):
    st.rerun()  # the capture this page started before a reload (or another tab's) ended
verb, plan = jobs_view.capture_plan(lm, prompt_set, config)
if st.button(
    f"{verb} {len(prompt_set):,} prompts with {md(layout.model_name(lm.info.model_id))} ({plan})",
    type="primary", help="It runs in the background: leaving or reloading the page does not stop it.",
):  # fmt: skip
    result = jobs_view.follow(jobs_view.start_capture(lm, prompt_set, config)).result
    st.session_state["run_id"] = result.run_id
    done = "was already in the cache: nothing to compute" if result.cache_hit else "captured"
    st.session_state["captured"] = (
        f"Run {result.run_id} {done}: {result.n_tokens:,} tokens.",
        result.warnings[:5],
    )
    st.rerun()  # redraw the sidebar's run picker with the new run
if "captured" in st.session_state:
    message, warnings = st.session_state.pop("captured")
    st.success(message)
    for warning in warnings:
        st.warning(md(warning))

run_id = resources.current_run_id()
if run_id:
    st.subheader("Current run")
    layout.run_summary(resources.store().require_run(run_id))
