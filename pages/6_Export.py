"""Export: the configuration as JSON (download, upload, diff) and as a smaller model on disk."""

import hashlib

import streamlit as st

from core import configuration, export, settings
from core.errors import BricklabError
from core.live import plan
from ui import config_state, export_view, figures, layout, resources
from ui.text import md

layout.page("Export", "📦", "Take a configuration away as JSON, bring one back, or write a pruned model.")
run = layout.require_run()
config = config_state.build(run)
text = config.to_json()

st.subheader("This session's configuration")
c = st.columns(3)
c[0].metric("bricks", len(config.bricks))
c[1].metric("active neurons", f"{plan.active_share(config):.1%}")
c[2].download_button("Download JSON", text, "bricklab-config.json", "application/json", type="primary")
with st.expander("JSON"):
    st.code(text, language="json")

st.subheader("Load or compare a configuration")
upload = st.file_uploader("A bricklab configuration (.json)", type=["json"])
other = st.file_uploader("Optional: a second one, to compare the two files", type=["json"])
if upload is not None:
    loaded = export_view.validated(upload, run)
    share = plan.active_share(loaded)
    model_id = md(loaded.model_id)
    st.success(f"Valid: {len(loaded.bricks)} bricks for {model_id}, {share:.1%} of neurons active.")
    if other is None:
        st.markdown("**What loading it changes** (added, removed, changed bricks):")
        st.json(configuration.diff(config, loaded), expanded=2)
    else:
        second = export_view.validated(other, run)
        st.markdown(f"**From {md(upload.name)} to {md(other.name)}** (added, removed, changed bricks):")
        st.json(configuration.diff(loaded, second), expanded=2)
    if st.button("Use this configuration"):
        config_state.replace_with(run, loaded)
        st.rerun()

st.subheader("Write a pruned model")
st.caption(
    "Disabled neurons are cut from gate, up and down; scales fold into W_down. Plain transformers loads it."
)
default = settings.data_dir() / "exports" / f"pruned-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
folder = st.text_input("Output folder (new or empty)", str(default))
if st.button("Write pruned model", disabled=not config.bricks):
    lm = layout.run_model(run)
    try:
        report = export.prune(
            lm, config, folder, resources.store(), run.run_id, progress=layout.progress_bar()
        )
    except BricklabError as exc:
        resources.show_error(exc)
    c = st.columns(4)
    c[0].metric("parameters", f"{report.params_after:,}", f"-{report.params_saved:,}", delta_color="inverse")
    c[1].metric("saved", f"{report.params_saved / report.params_before:.1%}")
    c[2].metric("weight bytes saved", f"{report.bytes_saved / 2**20:.1f} MiB")
    c[3].metric("files on disk", f"{report.file_bytes / 2**20:.1f} MiB")
    st.plotly_chart(
        figures.bars(
            list(range(run.n_layers)), list(report.kept), f"Neurons kept per layer (of {report.d_ff})"
        )
    )
    st.success(f"Written to {md(report.out_dir)}: load it with AutoModelForCausalLM.from_pretrained(...).")
