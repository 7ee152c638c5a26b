"""Routing on the pages: pick a router and fit it on request (then it is read from the cache), the
Playground's auto mode (what the router chose, dense and routed output side by side) and the Paper's
quality–compute curve."""

from __future__ import annotations

import json

import numpy as np
import streamlit as st

from core import models
from core.errors import BricklabError
from core.routing import route as routing
from core.routing import thresholds, tradeoff
from core.routing.route import Router, RouterParams
from core.store import Run
from ui import figures, layout, queries, resources
from ui.text import md

MODES = ("Manual bricks", "Auto (router)")
LABELS = {  # core.routing.tradeoff.PRESETS -> how the app names each router
    "category": "category",
    "static": "static",
    "token_oracle": "token · oracle",
    "token_learned": "token · learned",
    "neuron_oracle": "neurons · oracle",
}
ABOUT = {
    "category": "guesses the prompt's category from its first {layers} layers and runs that category's "
    "neurons (plus the neurons every category uses)",
    "static": "runs one fixed set for every prompt: the neurons that matter most to any category",
    "token_oracle": "per token and layer, runs the co-activation bricks ({size} neurons) with the most "
    "activation; it must compute every neuron's activation to know, so it shows the quality token routing "
    "could reach and saves only the down projection's work",
    "token_learned": "per token and layer, a small linear map predicts which co-activation bricks "
    "({size} neurons) will be most active, and only those run",
    "neuron_oracle": "per token and layer, computes every neuron's activation and runs the down "
    "projection only for the most active single neurons; it saves only the down projection's work, "
    "but at 35% it kept the loss of the dense model on held-out prompts (benchmarks/routing.py); token "
    "routers run the prompt dense and route each generated token",
}


def auto_mode() -> bool:
    """The Playground's mode switch; True for the router."""
    return st.pills("Mode", MODES, default=MODES[0], key="pg-mode") == MODES[1]


def router_picker() -> RouterParams:
    left, right = st.columns([3, 2])
    presets = {LABELS[preset]: preset for preset in tradeoff.PRESETS}
    label = left.radio("Router", list(presets), horizontal=True, key="auto-kind")
    percent = right.slider("Budget: share of each layer's neurons", 10, 90, 35, 5, format="%d%%")
    params = tradeoff.router_params(presets[label], percent / 100)
    about = ABOUT[presets[label]].format(layers=params.profile_layers, size=params.brick_size)
    left.caption(f"The **{label}** router {about}.")
    return params


def stored_router(run_id: str, params: RouterParams) -> Router | None:
    return routing.load(resources.store(), {"run_id": run_id, "params": params.key()})


def require_router(run: Run, lm: models.LoadedModel, params: RouterParams) -> None:
    """Go on when the router is in the cache, else offer a button that fits it (on the run's
    selection half) and stop."""
    if stored_router(run.run_id, params) is not None:
        return
    unit = "neurons" if params.brick_size == 1 else "token"
    kind = params.kind if params.kind != "token" else f"{unit} ({'oracle' if params.oracle else 'learned'})"
    name = f"{kind} router at {params.budget:.0%}"
    st.info(f"The {name} is not fitted on this run yet. Fitting reads the run's cached activations "
            "(token routers also run the model); it is stored in the cache afterwards.")  # fmt: skip
    if not st.button(f"Fit the {name}", type="primary"):
        st.stop()
    with st.spinner(f"Fitting the {name}…"):
        try:
            routing.fit(lm, resources.store(), run.run_id, params, layout.progress_bar("fitting…"))
        except BricklabError as exc:
            resources.show_error(exc)
    st.rerun()  # redraw from the cache, without the button


def prompt_input(run: Run) -> tuple[str, int]:
    """(prompt, new tokens): typed, or one of the run's prompts."""
    source = st.radio("Prompt", ["Type one", "Pick one from the run"], horizontal=True, key="auto-source")
    if source == "Type one":
        prompt = st.text_area("Prompt", "What is the capital of France?", height=80, key="auto-prompt")
    else:
        rows = resources.store().prompts(run.run_id)
        pick = st.selectbox("Prompt", rows, format_func=lambda p: f"{p[1]} · {p[2]} · {p[3][:90]}",
                            key="auto-pick")  # fmt: skip
        prompt = pick[3]
    return prompt, st.slider("New tokens", 4, 128, 32, key="auto-new")


@st.cache_data(max_entries=32, show_spinner=False)
def routed_run(model_ref: str, run_id: str, key: str, prompt: str, max_new: int) -> tradeoff.RoutedRun:
    router = routing.load(resources.store(), {"run_id": run_id, "params": json.loads(key)})
    return tradeoff.routed_run(resources.model(model_ref), router, prompt, max_new)


def compare(run: Run, params: RouterParams, prompt: str, max_new: int) -> tradeoff.RoutedRun:
    with st.spinner("Generating dense and routed, twice each to time them…"):
        try:
            result = routed_run(run.model_id, run.run_id, json.dumps(params.key()), prompt, max_new)
        except BricklabError as exc:
            resources.show_error(exc)
    threshold_note(run)
    return result


def _device(run: Run) -> str:
    return next(resources.model(run.model_id).model.parameters()).device.type


def threshold_note(run: Run) -> None:
    """On a GPU, what calibrated thresholds measured on this run (the Paper page measures them)."""
    if _device(run) != "cuda":
        return
    result = thresholds.stored_curve(resources.store(), run.run_id, "cuda")
    if result is None or result["dense_tokens_per_s"] is None:
        st.caption("On this GPU, the Paper page measures decoding with calibrated thresholds (TEAL).")
        return
    parts = [f"{p['share']:.0%} skipped: loss ×{p['loss_ratio']:.3f} at {p['tokens_per_s']:.0f} tokens/s"
             for p in result["points"]]  # fmt: skip
    st.caption(f"Calibrated thresholds on this GPU (dense {result['dense_tokens_per_s']:.0f} tokens/s): "
               + "; ".join(parts) + ".")  # fmt: skip


def threshold_section(run: Run) -> None:
    """Calibrated magnitude thresholds (as in TEAL): the loss on held-out prompts per share skipped,
    and on a GPU the measured decoding speed beside it; from the cache, else measured on request."""
    st.markdown("**Calibrated thresholds.** Per layer, inputs and neurons under a magnitude threshold are "
                "skipped; the thresholds come from the run's activation histograms.")  # fmt: skip
    store, device = resources.store(), _device(run)
    result = thresholds.stored_curve(store, run.run_id, device)
    if result is None:
        speed = " and time decoding on this GPU" if device == "cuda" else " (decoding speed needs a GPU)"
        if not st.button(f"Measure the loss with thresholds{speed}"):
            return
        try:
            thresholds.curve(layout.run_model(run), store, run.run_id, progress=layout.progress_bar())
        except BricklabError as exc:
            resources.show_error(exc)
        st.rerun()
    dense_speed = result["dense_tokens_per_s"]
    rows = [{"skipped": p["share"], "FFN weights read": p["active_share"], "loss / dense": p["loss_ratio"],
             **({} if dense_speed is None else {"tokens/s": p["tokens_per_s"],
                                                "speed-up": p["tokens_per_s"] / dense_speed})}
            for p in result["points"]]  # fmt: skip
    pct = st.column_config.NumberColumn(format="percent")
    st.dataframe(rows, hide_index=True, column_config={"skipped": pct, "FFN weights read": pct})
    speed = "" if dense_speed is None else f"; dense decodes {dense_speed:.0f} tokens/s on this GPU"
    st.caption(f"{result['n_prompts']} held-out prompts; dense loss {result['dense_loss']:.3f}{speed}.")


def outcome(result: tradeoff.RoutedRun) -> None:
    """The router's choice in a sentence, metrics, then the dense and the routed output side by side."""
    route, div = result.route, result.first_divergence
    st.markdown(choice_sentence(result))
    timing = (f"Per generated token, prompt included; fastest of {tradeoff.TIMING_REPEATS} runs on this "
              "machine, so it varies with its load.")  # fmt: skip
    c = st.columns(5)
    c[0].metric("neurons that ran", f"{route.active_share:.1%}", help="Share of the model's FFN neurons; "
                "token routing: per token, at most")  # fmt: skip
    c[1].metric("dense, ms per token", f"{1000 * result.dense_seconds:.1f}", help=timing)
    c[2].metric("routed, ms per token", f"{1000 * result.routed_seconds:.1f}", help=timing)
    c[3].metric("time saved", f"{result.time_saved:.0%}", help=timing)
    c[4].metric("first divergent token", "none" if div is None else div + 1)
    left, right = st.columns(2)
    left.markdown("**Dense** (every neuron runs)")
    left.html(figures.token_strip(result.dense_pieces, None, div, 1.0))
    right.markdown(f"**Routed** ({route.active_share:.0%} of the neurons" + (")" if route.sparse else
                   ", masked: this MLP cannot skip them)"))  # fmt: skip
    right.html(figures.token_strip(result.routed_pieces, None, div, 1.0))


def choice_sentence(result: tradeoff.RoutedRun) -> str:
    route, share = result.route, f"{result.route.active_share:.0%}"
    if route.kind == "category":
        sure = route.probabilities[route.category]
        return (f"The router read the prompt as **{md(route.category)}** ({sure:.0%} sure) and ran that "
                f"category's neurons: {share} of the FFN; the rest was skipped.")  # fmt: skip
    if route.kind == "static":
        return f"The router ran its one set for every prompt: {share} of the FFN; the rest was skipped."
    k, n = round(float(result.brick_use[0].sum())), result.brick_use.shape[1]
    what = "neurons" if result.brick_size == 1 else "co-activation bricks"
    return (f"Per token, the router ran **{k} of the {n} {what}** of each layer (at most "
            f"{share} of the FFN), a different choice at every token.")  # fmt: skip


def choice(run: Run, result: tradeoff.RoutedRun) -> None:
    """What the router chose for the prompt: the category, and the bricks that ran."""
    st.subheader("What the router chose")
    if result.brick_use is not None:
        layers = [str(layer) for layer in range(len(result.brick_use))]
        bricks = list(range(result.brick_use.shape[1]))
        unit = "neuron" if result.brick_size == 1 else "co-activation brick"
        title = f"Share of the prompt's tokens that ran each {unit} (layer × {unit})"
        st.plotly_chart(figures.heatmap(result.brick_use, bricks, layers, title, zfmt=".0%"))
        return
    p = result.route.probabilities
    left, right = st.columns([2, 3]) if p else (None, st.container())
    if p:
        left.plotly_chart(figures.bars(list(p), list(p.values()), "Category probabilities for this prompt"))
    with right:
        brick_table(run, result.kept)
    per_layer = result.kept.mean(axis=1)
    if np.ptp(per_layer) > 0.01:  # residents can fill a layer past the budget
        title = "Share of each layer's neurons that ran"
        st.plotly_chart(figures.bars([str(i) for i in range(len(per_layer))], per_layer.tolist(), title))


def brick_table(run: Run, kept: np.ndarray) -> None:
    """The run's bricks (as formed on the Bricks page), by the share of their neurons that ran."""
    found = queries.bricks_of(run.run_id, queries.session_brick_params())
    flat = kept.reshape(-1)
    rows = sorted(
        ({"brick": b.brick_id, "label": b.label or "", "layers": layout.span(b.layers), "size": b.size,
          "ran": float(flat[b.neurons].mean())} for b in found),
        key=lambda r: -r["ran"],
    )  # fmt: skip
    if not any(r["label"] for r in rows):  # no brick is enriched for a category on this run
        rows = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    ran = sum(r["ran"] >= 0.5 for r in rows)
    st.markdown(f"**{ran} of {len(rows)} bricks** ran at least half of their neurons for this prompt.")
    bar = st.column_config.ProgressColumn("ran", format="percent", min_value=0, max_value=1)
    st.dataframe(rows, hide_index=True, column_config={"ran": bar}, height=320)


def curve_section(run: Run, params: tradeoff.CurveParams = tradeoff.CurveParams()) -> None:
    """The Paper's quality–compute curve of routers, then that of calibrated thresholds."""
    router_curve(run, params)
    threshold_section(run)


def router_curve(run: Run, params: tradeoff.CurveParams) -> None:
    """The routers' quality–compute curve: from the cache, else measured on request."""
    store = resources.store()
    result = tradeoff.stored_curve(store, run.run_id, params)
    if result is None:
        n = len(tradeoff.held_out(store, run.run_id, params.per_category))
        routers = len(params.presets) * len(params.budgets)
        st.info(f"Measuring fits {routers} routers (or reads them from the cache) and runs the model on "
                f"{n} held-out prompts under each; the result is cached.")  # fmt: skip
        if not st.button(f"Measure the quality–compute curve ({routers} routers, {n} prompts)"):
            return
        try:
            lm = layout.run_model(run)
            tradeoff.curve(lm, store, run.run_id, params, layout.progress_bar())
        except BricklabError as exc:
            resources.show_error(exc)
        st.rerun()  # redraw from the cache, without the button and the progress bar
    lines = {
        LABELS[preset]: ([p["active_share"] for p in points], [p["loss_ratio"] for p in points])
        for preset, points in result["lines"].items()
    }
    title = "Loss relative to dense vs share of FFN neurons that ran"
    st.plotly_chart(figures.tradeoff(lines, title))
    budgets = ", ".join(f"{b:.0%}" for b in params.budgets)
    st.caption(
        f"Measured on {result['n_prompts']} held-out prompts ({params.per_category} per category) that no "
        f"router was fitted on; budgets {budgets}; dense loss {result['dense_loss']:.3f}."
    )
