"""The neuron detail panel: statistics, score per category, brick, and top examples as shaded text."""

from __future__ import annotations

import numpy as np
import streamlit as st

from core.errors import BricklabError
from core.store import Run
from ui import explain_view, figures, links, queries, resources
from ui.text import md

CONTEXT = (24, 8)  # tokens shown before and after an example's token


def show_neuron(
    run: Run, layer: int, neuron: int, brick: str | None = None, shade: bool = True, n: int = 8
) -> None:
    try:
        detail = queries.neuron_detail(run.run_id, layer, neuron)
    except BricklabError as exc:
        resources.show_error(exc)
    st.subheader(f"Neuron {layer}:{neuron}")
    links.share("Neuron_map", links.View(run.run_id, (layer, neuron)), "Link to this neuron")
    best = max(detail.scores, key=detail.scores.get) if detail.scores else None
    c = st.columns(4)
    c[0].metric("mean |a|", f"{detail.mean_abs:.4f}")
    c[1].metric(
        "firing rate",
        f"{detail.fire_rate:.1%}",
        help="Share of tokens at which it is in its layer's top set.",
    )
    c[2].metric(
        "best category", best or "–", f"AP {detail.scores[best]:.2f}" if best else None, delta_color="off"
    )
    c[3].metric("brick", brick or "–")
    explain_view.neuron_section(run, layer, neuron)  # in words, and what it writes
    if detail.scores:
        names = list(detail.scores)
        prevalence = _prevalence(run, names)
        fig = figures.bars(
            names, [detail.scores[k] for k in names], "Functionality score (average precision)"
        )
        fig.add_scatter(
            x=fig.data[0].x,  # the bars' escaped category labels
            y=prevalence,
            mode="markers",
            name="chance",
            marker={"symbol": "line-ew-open", "size": 30},
        )
        st.plotly_chart(fig, key=f"scores-{layer}-{neuron}")
    st.markdown(
        f"**Top activating examples** ({len(detail.examples)} kept; orange = positive, blue = negative)"
    )
    scale = detail.examples[0].value if detail.examples else 1.0
    for example in detail.examples[:n]:
        values = None
        if shade:
            try:
                values = queries.token_activations(
                    run.run_id, run.model_id, example.prompt_idx, layer, neuron
                )
            except BricklabError as exc:
                st.warning(md(exc))
                shade = False
        lo, hi = max(0, example.pos - CONTEXT[0]), example.pos + CONTEXT[1] + 1
        strip = figures.token_strip(
            example.tokens[lo:hi], None if values is None else values[lo:hi], example.pos - lo, scale
        )
        where = f"{md(example.prompt_id)} ({md(example.category) if example.category else 'no category'})"
        st.caption(f"#{example.rank + 1} · {where} · |a| = {example.value:.3f}")
        st.html(strip)


def _prevalence(run: Run, names: list[str]) -> list[float]:
    """Average precision of a random ranking: the share of prompts in the category."""
    categories = [p[2] for p in resources.store().prompts(run.run_id)]
    return [float(np.mean([c == name for c in categories])) for name in names]


def table_pick(rows: list[dict], key: str, columns: dict | None = None) -> dict | None:
    """A one-row-selectable table; returns the row only on the run where the selection changed,
    so a later choice made elsewhere (another table, the map, the form) is not overridden."""
    event = st.dataframe(
        rows,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key=key,
        height=240,
        column_config=columns,
    )
    chosen = event.selection.rows
    fresh = chosen and chosen != st.session_state.get(f"{key}-seen")
    st.session_state[f"{key}-seen"] = chosen
    return rows[chosen[0]] if fresh else None


def open_neuron(layer: int, neuron: int) -> None:
    st.session_state["neuron"] = (int(layer), int(neuron))
