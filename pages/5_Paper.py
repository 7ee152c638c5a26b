"""Paper: the findings of "Configurable Foundation Models" (Xiao et al., 2024) measured on this run."""

import numpy as np
import streamlit as st

from core import analysis
from core.errors import BricklabError
from ui import figures, layout, paper_text, resources, routing_view

layout.page("Paper", "📄", paper_text.INTRO)
run = layout.require_run()
quick = st.toggle("Quick (fewer prompts and k values: rougher numbers, about 4× faster)", value=False)
config = analysis.ReportConfig().quick() if quick else analysis.ReportConfig()
missing = analysis.missing_sections(resources.store(), run.run_id, config)
if missing and not st.button(
    f"Compute the analysis ({len(missing)} sections need the model)", type="primary"
):
    st.info("The analysis runs the model over held-out prompts with neurons masked; it is cached afterwards.")
    st.stop()
try:
    if missing:
        analysis.report(resources.store(), layout.run_model(run), run.run_id, config, layout.progress_bar())
        st.rerun()  # redraw from the cache, without the button and the progress bar
    r = analysis.report(resources.store(), None, run.run_id, config)
except BricklabError as exc:
    resources.show_error(exc)

st.header("1 · Activations are sparse")
st.markdown(paper_text.SPARSITY)
sp = r["sparsity"]["indicators"]
x = np.arange(1, r["sparsity"]["bins"] + 1) / r["sparsity"]["bins"]
cdf = {name: np.mean(sp[name]["cdf"], axis=0) for name in ("abs", "output")}
left, right = st.columns(2)
left.plotly_chart(
    figures.curves(x, cdf, "Share of neurons below x · per-token max (mean over layers)", "x", "share")
)
loss = {name: sp[name]["loss"] for name in ("abs", "output")}
right.plotly_chart(
    figures.curves(r["sparsity"]["ks"], loss, "Loss with the lowest k% zeroed per token", "k (%)", "loss")
)
below = np.mean(sp["abs"]["share_below_0.2"])
st.caption(
    f"This model: {below:.0%} of neurons sit below 0.2 of the per-token maximum |a| (the paper: ~80%)."
)

st.header("2 · Neurons specialise by category")
st.markdown(paper_text.FUNCTIONALITY)
f = r["functionality"]
layers = np.arange(run.n_layers)
series = {
    f"{kind} labels, {stat}": np.mean(f[kind][stat], axis=0)
    for kind in ("real", "shuffled")
    for stat in ("best", "top_0.5pct")
}
st.plotly_chart(
    figures.curves(layers, series, "Functionality score per layer (mean over categories)", "layer", "AP")
)

st.header("3 · Ablation: removing a category's neurons hurts that category")
st.markdown(paper_text.ABLATION)
resident = st.toggle("Exclude neurons active for every category (resident neurons)")
a = r["ablation_matrix_no_resident" if resident else "ablation_matrix"]
matrix = np.array([*a["increase_pct"], a["random"]], dtype=float)
title = "Perplexity increase (%): row zeroed, column measured"
st.plotly_chart(
    figures.heatmap(matrix, a["categories"], [*a["categories"], "random"], title, "RdBu_r", ".1f", zmid=0)
)
dominant = sum(a["diagonal_dominant"])
st.caption(f"The diagonal dominates for {dominant} of {len(a['categories'])} categories. {a['split']}")

st.header("4 · The categories' neurons barely overlap")
st.markdown(paper_text.OVERLAP)
o = r["overlap"]
st.plotly_chart(
    figures.heatmap(np.array(o["matrix"]), o["categories"], o["categories"], o["measure"], zfmt=".2f")
)
st.caption(f"Random sets of this size would overlap by about {o['random_expectation']:.2f}.")

st.header("5 · Recombination: keep only some categories' neurons")
st.markdown(paper_text.RECOMBINATION)
rc = r["recombination"]
table = [{"kept": "none removed", **dict(zip(rc["categories"], rc["baseline_loss"], strict=True))}]
for row in rc["rows"]:
    table.append({"kept": f"top {row['percent']:g}% of {' + '.join(rc['kept'])} ({row['share_kept']:.1%})",
                  **dict(zip(rc["categories"], row["loss"], strict=True))})  # fmt: skip
    table.append(
        {"kept": "  random, same size", **dict(zip(rc["categories"], row["random_loss"], strict=True))}
    )
st.dataframe(table, hide_index=True)

st.header("6 · Routing: run only the neurons an input needs")
st.markdown(paper_text.ROUTING)
routing_view.curve_section(run)
