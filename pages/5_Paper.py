"""Paper: the findings of "Configurable Foundation Models" (Xiao et al., 2024) measured on this run."""

import numpy as np
import streamlit as st

from core import analysis
from core.errors import BricklabError
from ui import figures, jobs_view, layout, paper_text, resources, routing_view

layout.page("Paper", "📄", paper_text.INTRO)
run = layout.require_run()
quick = st.toggle("Quick (3 held-out prompts per category instead of 4: rougher numbers)", value=False)
config = analysis.ReportConfig().quick() if quick else analysis.ReportConfig()
missing = analysis.missing_sections(resources.store(), run.run_id, config)
lm = layout.run_model(run) if missing else None
if missing and jobs_view.analysis_button(run, lm, config, paper_text.compute_label(len(missing), quick)):
    st.rerun()  # redraw from the cache, without the button and the progress bar
if missing:
    st.info(paper_text.COMPUTE_NOTE)
    st.stop()
try:
    r = analysis.report(resources.store(), None, run.run_id, config)
except BricklabError as exc:
    resources.show_error(exc)

verdicts = analysis.verdicts(r)
st.header("1 · Activations are sparse")
st.markdown(paper_text.SPARSITY)
sp = r["sparsity"]["indicators"]
x = np.arange(1, r["sparsity"]["bins"] + 1) / r["sparsity"]["bins"]
cdf = {name: np.mean(sp[name]["cdf"], axis=0) for name in ("abs", "output")}
left, right = st.columns(2)
left.plotly_chart(
    figures.curves(x, cdf, "Neurons below x", "x · per-token max |a| (mean over layers)", "share")
)
loss = {name: sp[name]["loss"] for name in ("abs", "output")}
right.plotly_chart(
    figures.curves(r["sparsity"]["ks"], loss, "Lowest k% zeroed", "k: % of neurons zeroed per token", "loss")
)
below = np.mean(sp["abs"]["share_below_0.2"])
st.caption(
    f"This model: {below:.0%} of neurons sit below 0.2 of the per-token maximum |a| (the paper: ~80%)."
)
st.markdown(paper_text.verdict(verdicts["sparsity"]))

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
st.markdown(paper_text.verdict(verdicts["functionality"]))

st.header("3 · Ablation: removing a category's neurons hurts that category")
st.markdown(paper_text.ABLATION)
resident = st.toggle(paper_text.RESIDENT_TOGGLE)
a = r["ablation_matrix_no_resident" if resident else "ablation_matrix"]
if a is None:  # an on-demand section, not computed yet
    extra = analysis.ON_DEMAND
    if jobs_view.analysis_button(run, layout.run_model(run), config, paper_text.RESIDENT_BUTTON, extra):
        st.rerun()
    st.info(paper_text.RESIDENT_NOTE)
else:
    matrix = np.array([*a["increase_pct"], a["random"]], dtype=float)
    title = "Perplexity increase (%): row zeroed, column measured"
    st.plotly_chart(
        figures.heatmap(matrix, a["categories"], [*a["categories"], "random"], title, "RdBu_r", ".1f", zmid=0)
    )
    dominant = sum(a["diagonal_dominant"])
    st.caption(f"The diagonal dominates for {dominant} of {len(a['categories'])} categories. {a['split']}")
    st.table(paper_text.selectivity_table(a))
    st.caption(paper_text.selectivity_caption(a))
    st.markdown(paper_text.verdict(analysis.verdicts({**r, "ablation_matrix": a})["ablation_matrix"]))

st.header("4 · The categories' neurons barely overlap")
st.markdown(paper_text.OVERLAP)
o = r["overlap"]
st.plotly_chart(
    figures.heatmap(np.array(o["matrix"]), o["categories"], o["categories"], o["measure"], zfmt=".2f")
)
st.caption(f"Random sets of this size would overlap by about {o['random_expectation']:.2f}.")
st.markdown(paper_text.verdict(verdicts["overlap"]))

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
st.markdown(paper_text.verdict(verdicts["recombination"]))

st.header("6 · Routing: run only the neurons an input needs")
st.markdown(paper_text.ROUTING)
routing_view.curve_section(run)
