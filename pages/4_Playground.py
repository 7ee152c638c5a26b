"""Playground: switch bricks off, mean-ablate, rescale or keep only some, and watch the output change."""

import time

import numpy as np
import streamlit as st

from core import configuration
from core.errors import BricklabError
from core.live import demo
from ui import adapter_view, config_state, demo_view, figures, layout, links, queries, resources, routing_view
from ui.text import duration, md

INTRO = "Pick bricks and a mode for each; the configured model writes next to the plain one."
layout.page("Playground", "🎛️", INTRO)
run = layout.require_run()
lm = layout.run_model(run)
if routing_view.auto_mode():  # a router picks the bricks for each prompt; the manual controls are below
    params = routing_view.router_picker()
    routing_view.require_router(run, lm, params)
    prompt, max_new = routing_view.prompt_input(run)
    result = routing_view.compare(run, params, prompt, max_new)
    routing_view.outcome(result)
    routing_view.choice(run, result)
    st.stop()
demo_view.show(run)  # the first lesson: a functional brick off beside a random control
found = {b.brick_id: b for b in queries.playground_bricks(run)}  # labelled, most enriched first
chosen = config_state.chosen(run)


def _toggle() -> None:
    picked = set(st.session_state["pg-bricks"])
    for name in set(chosen) - picked:
        config_state.remove(run, name)
    for name in picked - set(chosen):
        config_state.set_brick(run, found[name], "off")


st.session_state["pg-bricks"] = list(chosen)
label = {name: f"{name} · {b.label or 'unlabelled'} · {b.size} neurons" for name, b in found.items()}
st.multiselect("Bricks to change", [*chosen, *(n for n in found if n not in chosen)], key="pg-bricks",
               format_func=lambda n: label.get(n, n), on_change=_toggle)  # fmt: skip
for name, brick in config_state.chosen(run).items():
    a, b, c = st.columns([2, 3, 2], vertical_alignment="center")
    size = sum(map(len, brick.neurons.values()))
    a.markdown(f"**{md(name)}**  \n{md(brick.label or 'unlabelled')} · {size} neurons")
    mode = b.segmented_control(
        md(name), configuration.MODES, default=brick.mode, key=f"mode-{name}", label_visibility="collapsed"
    )
    factor = c.slider("factor", 0.0, 4.0, brick.factor, 0.1, key=f"factor-{name}", disabled=mode != "scale")
    if mode and (mode, factor if mode == "scale" else 1.0) != (brick.mode, brick.factor):
        config_state.set_mode(run, name, mode, factor)
adapter_view.toggles(run)  # adapter bricks added on the Custom bricks page

prompts = resources.store().prompts(run.run_id)
source = st.radio("Prompt", ["Type one", "Pick one from the run"], horizontal=True, key="pg-source")
if source == "Type one":
    st.session_state.setdefault("pg-prompt", demo.PROMPT)
    prompt = st.text_area("Prompt", height=80, key="pg-prompt")
else:
    pick = st.selectbox("Prompt", prompts, format_func=lambda p: f"{p[1]} · {p[2]} · {p[3][:90]}")
    prompt = pick[3]
max_new = st.slider("New tokens", 4, 128, 32)

config = config_state.build(run)
started = time.perf_counter()
with st.spinner("Generating…"):
    try:
        result, computed = queries.comparison(run.model_id, run.run_id, prompt, config.to_json(), max_new)
    except BricklabError as exc:
        resources.show_error(exc)
seconds = time.perf_counter() - started
cached = seconds < computed / 2  # answered from the cache of an earlier identical request
c = st.columns(4)
c[0].metric("active neurons", f"{result.active_share:.1%}")
c[1].metric("mean KL (nats)", f"{result.mean_kl:.3f}")
c[2].metric(
    "first divergent token", "none" if result.first_divergence is None else result.first_divergence + 1
)
c[3].metric(
    "response time", "cached" if cached else duration(seconds), help=f"Computed in {duration(computed)}."
)
left, right = st.columns(2)
scale = max(result.kl, default=0.0)
left.markdown("**Baseline** (shaded by per-token KL)")
left.html(figures.token_strip(result.baseline_pieces, result.kl, result.first_divergence, scale))
right.markdown(f"**Configured** ({len(config.bricks)} brick{'s' * (len(config.bricks) != 1)} changed)")
right.html(figures.token_strip(result.configured_pieces, None, result.first_divergence, 1.0))
if result.kl:
    steps = list(range(1, len(result.kl) + 1))
    st.plotly_chart(
        figures.curves(steps, {"KL": result.kl}, "Per-token KL(baseline ‖ configured)", "token", "nats")
    )

if run.categories and st.toggle("Loss change per category (4 prompts of each category of the run)"):
    with st.spinner("Measuring the loss with and without the configuration…"):
        plain = queries.category_loss(run.model_id, run.run_id, None, 4)
        changed = queries.category_loss(run.model_id, run.run_id, config.to_json(), 4)
    change = [100 * (np.exp(changed[c] - plain[c]) - 1) for c in plain]
    st.plotly_chart(figures.bars(list(plain), change, "Perplexity change per category (%)"))

typed = prompt if source == "Type one" else None
links.share(
    "Playground", links.View(run.run_id, prompt=typed, config=config.to_json() if config.bricks else None)
)
