"""Plotly figure builders for the pages, and the HTML of a token strip shaded by activation."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from ui.text import plain, plain_labels

PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
    "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
)  # fmt: skip
NOISE = "#d0d0d0"  # neurons in no cluster / no brick
MAP_STEPS = 32  # a continuous colouring's steps (one WebGL trace each); at most this many exact values
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
    """Every neuron as one WebGL point, in one trace per colour. Plotly turns a per-point colour into
    RGBA one point at a time in the browser (colour scale -> string -> parsed back: ~1.5 s of a 46k-point
    map's paint in software WebGL); a trace of one colour skips that. A continuous colouring takes
    MAP_STEPS steps of Viridis, with a colour bar beside it and the exact value in the hover. Every point's
    customdata is (layer, neuron[, value]): a selection reads the neuron from it, not from its index."""
    n = len(coords)
    ids = np.arange(n)
    where = np.stack([ids // d_ff, ids % d_ff], axis=1)
    hover = "layer %{customdata[0]} · neuron %{customdata[1]}"
    if categorical:
        groups = np.asarray(colour)
        step = np.where(groups < 0, len(PALETTE), groups % len(PALETTE))
        colours = [*PALETTE, NOISE]
        custom = where.astype(np.int32)
        bar = None
    else:
        value = np.asarray(colour, np.float32)
        step, colours, bar = _viridis_steps(value)
        custom = np.column_stack([where, value]).astype(np.float32)
        hover += "<br>" + plain(colour_name) + " %{customdata[2]:.3g}"
    order = np.argsort(step, kind="stable")
    starts = np.searchsorted(step[order], np.arange(len(colours) + 1))
    x, y = np.asarray(coords, np.float32)[order].T
    custom = custom[order]
    marker = {"size": 3 if n > 5000 else 6, "opacity": 0.8}
    fig = go.Figure()
    for k, colour_k in enumerate(colours):
        part = slice(starts[k], starts[k + 1])
        if part.start == part.stop:
            continue
        fig.add_trace(go.Scattergl(
            x=x[part], y=y[part], customdata=custom[part], mode="markers", showlegend=False,
            marker=marker | {"color": colour_k}, hovertemplate=hover + "<extra></extra>",
        ))  # fmt: skip
    if bar is not None:  # the colour bar: an empty trace carrying the continuous scale
        lo, hi = bar
        scale = {"color": [lo, hi], "cmin": lo, "cmax": hi, "colorscale": "Viridis", "showscale": True}
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False,
            marker=scale | {"colorbar": {"title": plain(colour_name)}},
        ))  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    # the modes Streamlit sets for a selectable chart, set here: else it sets them after the first paint,
    # and Plotly draws the whole map a second time
    fig.update_layout(clickmode="event+select", dragmode="pan", hovermode="closest")
    return _layout(fig, height=560)


def map_selection(points: list[dict], d_ff: int) -> list[int]:
    """Global ids (layer * d_ff + neuron) of the neuron_map points a selection event holds, read from
    their customdata (a point's index counts within its colour's trace)."""
    ids = []
    for point in points:
        custom = point["customdata"]
        layer, neuron = (custom[0], custom[1]) if isinstance(custom, list) else (custom["0"], custom["1"])
        ids.append(int(layer) * d_ff + int(neuron))
    return ids


def _viridis_steps(value: np.ndarray) -> tuple[np.ndarray, list[str], tuple[float, float] | None]:
    """(step of each value, each step's colour, the colour bar's range): the distinct values themselves
    when there are at most MAP_STEPS (e.g. layers), else MAP_STEPS equal bins; NaN gets the last step,
    grey."""
    finite = np.isfinite(value)
    if not finite.any():
        return np.zeros(len(value), np.int64), [NOISE], None
    lo, hi = float(value[finite].min()), float(value[finite].max())
    levels = np.unique(value[finite])
    if len(levels) <= MAP_STEPS:
        step = np.searchsorted(levels, value)
        where = (levels - lo) / (hi - lo) if hi > lo else np.zeros(len(levels))
    else:
        width = (hi - lo) / MAP_STEPS
        step = np.minimum(((np.where(finite, value, lo) - lo) / width).astype(np.int64), MAP_STEPS - 1)
        where = (np.arange(MAP_STEPS) + 0.5) / MAP_STEPS
    step = np.where(finite, step, len(where))
    colours = [*sample_colorscale("Viridis", where.tolist()), NOISE]
    return step, colours, (lo, hi)


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
