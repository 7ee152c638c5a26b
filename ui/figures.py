"""Plotly figure builders for the pages, and the HTML of a token strip shaded by activation."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from ui.text import plain, plain_labels

PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
    "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
)  # fmt: skip
NOISE = "#d0d0d0"  # neurons in no cluster / no brick
FONT = {"size": 15}  # readable on a classroom projector


def _layout(fig: go.Figure, title: str = "", height: int = 420) -> go.Figure:
    fig.update_layout(
        title=plain(title), height=height, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10}
    )
    fig.update_layout(font=FONT, template="plotly_white")
    return fig


def group_colours(groups: np.ndarray) -> list[str]:
    """One palette colour per group id; -1 (no group) is light grey."""
    return [NOISE if g < 0 else PALETTE[g % len(PALETTE)] for g in np.asarray(groups).tolist()]


def neuron_map(
    coords: np.ndarray, d_ff: int, colour: np.ndarray, colour_name: str, categorical: bool
) -> go.Figure:
    """Every neuron as one WebGL point; customdata holds the global id, which selection returns."""
    ids = np.arange(len(coords))
    marker = {"size": 3 if len(coords) > 5000 else 6, "opacity": 0.8}
    if categorical:
        marker["color"] = group_colours(colour)
    else:
        marker |= {
            "color": colour,
            "colorscale": "Viridis",
            "showscale": True,
            "colorbar": {"title": colour_name},
        }
    fig = go.Figure(
        go.Scattergl(
            x=coords[:, 0],
            y=coords[:, 1],
            mode="markers",
            marker=marker,
            customdata=np.stack([ids, ids // d_ff, ids % d_ff, colour], axis=1),
            hovertemplate="layer %{customdata[1]} · neuron %{customdata[2]}<br>"
            + colour_name
            + " %{customdata[3]:.3g}<extra></extra>",
        )  # fmt: skip
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return _layout(fig, height=560)


def bars(names: list[str], values: list[float], title: str, baseline: float | None = None) -> go.Figure:
    """Bars over `names` (categories, layers…); string names are escaped, so read them back from
    `fig.data[0].x` to add a trace over the same categories."""
    name = plain(title.split(" (")[0])
    fig = go.Figure(go.Bar(x=plain_labels(names), y=list(values), marker_color=PALETTE[0], name=name))
    if baseline is not None:
        fig.add_hline(y=baseline, line_dash="dot", annotation_text="chance")
    return _layout(fig, title, height=300)


def heatmap(
    z: np.ndarray, x: list, y: list, title: str, colorscale: str = "Blues", zfmt: str = ".2f", zmid=None
) -> go.Figure:
    """A labelled matrix; `zmid` centres a diverging colour scale (e.g. 0 for a change)."""
    text = "%{z:" + zfmt + "}" if z.size <= 400 else None
    labels = {"x": [plain(v) for v in x], "y": [plain(v) for v in y]}
    fig = go.Figure(
        go.Heatmap(z=z, **labels, colorscale=colorscale, zmid=zmid, texttemplate=text, hoverongaps=False)
    )
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, height=max(300, 40 * len(y) + 120))


def curves(x: np.ndarray, series: dict[str, np.ndarray], title: str, xaxis: str, yaxis: str) -> go.Figure:
    fig = go.Figure()
    for i, (name, y) in enumerate(series.items()):
        fig.add_trace(
            go.Scatter(x=x, y=y, name=plain(name), mode="lines", line={"color": PALETTE[i % len(PALETTE)]})
        )
    fig.update_xaxes(title=plain(xaxis))
    fig.update_yaxes(title=plain(yaxis))
    return _layout(fig, title)


def token_strip(tokens: tuple[str, ...], values: np.ndarray | None, mark: int | None, scale: float) -> str:
    """HTML of tokens with a background whose strength is |value| / scale (orange positive, blue
    negative); `mark` (e.g. the top-example token or the first divergent one) is outlined."""
    spans = []
    for i, token in enumerate(tokens):
        style = ""
        if values is not None and scale > 0:
            v = float(values[i])
            alpha = min(abs(v) / scale, 1.0)
            rgb = "242,142,43" if v >= 0 else "78,121,167"
            style = f"background: rgba({rgb},{alpha:.2f});"
        if i == mark:
            style += "outline: 2px solid #e15759; border-radius: 3px;"
        title = f' title="{float(values[i]):.3f}"' if values is not None else ""
        text = html.escape(token).replace("\n", "⏎")
        spans.append(f'<span style="{style}"{title}>{text}</span>')
    # pre-wrap keeps a token's spaces and still wraps; "anywhere" breaks runs without spaces
    style = "font: 15px monospace; line-height: 1.9; white-space: pre-wrap; overflow-wrap: anywhere;"
    return f'<div style="{style}">{"".join(spans)}</div>'


def tradeoff(lines: dict[str, tuple[list, list]], title: str) -> go.Figure:
    """Quality against compute: one line per router kind (x: share of neurons that ran, y: loss
    relative to dense), the dense model as a star at (1, 1)."""
    fig = go.Figure()
    for i, (name, (x, y)) in enumerate(lines.items()):
        line = {"color": PALETTE[i % len(PALETTE)]}
        fig.add_trace(go.Scatter(x=x, y=y, name=plain(name), mode="lines+markers", line=line))
    star = {"symbol": "star", "size": 16, "color": "black"}
    fig.add_trace(go.Scatter(x=[1.0], y=[1.0], name="dense", mode="markers", marker=star))
    fig.add_hline(y=1.1, line_dash="dot", line_color="grey", annotation_text="10% above dense")
    fig.update_xaxes(title="share of FFN neurons that ran", tickformat=".0%", range=[0, 1.05])
    fig.update_yaxes(title="loss / dense loss")
    return _layout(fig, title, height=460)
