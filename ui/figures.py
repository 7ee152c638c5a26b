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
    """Every neuron as one WebGL point (selection returns its index, layer * d_ff + neuron). Every
    per-point array is a compact numpy array, which Plotly sends as typed binary, not as a list of
    strings it must validate one by one: the map of 46k neurons builds and ships in well under a second."""
    n = len(coords)
    ids = np.arange(n)
    marker = {"size": 3 if n > 5000 else 6, "opacity": 0.8}
    where = np.stack([ids // d_ff, ids % d_ff], axis=1)
    hover = "layer %{customdata[0]} · neuron %{customdata[1]}"
    if categorical:  # a palette index per point, -1 (no group) as the last colour: light grey
        groups = np.asarray(colour)
        index = np.where(groups < 0, len(PALETTE), groups % len(PALETTE)).astype(np.uint8)
        marker |= {"color": index, "colorscale": _steps((*PALETTE, NOISE)), "cmin": -0.5}
        marker["cmax"] = len(PALETTE) + 0.5
        custom = where.astype(np.int32)
    else:
        marker |= {"color": np.asarray(colour, np.float32), "colorscale": "Viridis", "showscale": True}
        marker["colorbar"] = {"title": plain(colour_name)}
        custom = np.column_stack([where, colour]).astype(np.float32)
        hover += "<br>" + plain(colour_name) + " %{customdata[2]:.3g}"
    x, y = np.asarray(coords, np.float32).T
    fig = go.Figure(
        go.Scattergl(x=x, y=y, mode="markers", marker=marker, customdata=custom,
                     hovertemplate=hover + "<extra></extra>")
    )  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return _layout(fig, height=560)


def _steps(colours) -> list:
    """A colour scale with one flat step per colour: index k (of K) on a cmin -0.5, cmax K - 0.5 axis
    gets colours[k]."""
    k = len(colours)
    return [[edge / k, c] for i, c in enumerate(colours) for edge in (i, i + 1)]


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
