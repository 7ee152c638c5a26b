"""The neuron map figure (ui/figures.py) stays compact: numpy arrays Plotly sends as typed binary, one
palette index per point rather than a colour string, short hover text."""

from __future__ import annotations

import numpy as np
import plotly.io as pio

from ui import figures


def test_the_map_sends_compact_arrays_and_keeps_group_colours():
    n, d_ff = 4000, 100
    coords = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    groups = np.arange(n) % 25 - 1  # -1: no group
    trace = figures.neuron_map(coords, d_ff, groups, "cluster", categorical=True).data[0]
    index = np.asarray(trace.marker.color)
    assert index.dtype == np.uint8 and index[0] == len(figures.PALETTE)  # -1 -> the last step: grey
    scale = [c for _, c in trace.marker.colorscale]
    assert scale[2 * index[0]] == figures.NOISE and scale[2 * index[1]] == figures.PALETTE[0]
    assert np.array_equal(np.asarray(trace.customdata)[250], [2, 50])  # layer, neuron
    spec = pio.to_json(figures.neuron_map(coords, d_ff, groups, "cluster", True).to_dict(), validate=False)
    assert '"bdata"' in spec and "#4e79a7" in spec and spec.count("#") < n / 10  # no colour per point
    assert len(spec) < 40 * n


def test_the_map_hover_names_the_value_it_colours_by():
    coords = np.zeros((10, 2), np.float32)
    fig = figures.neuron_map(coords, 5, np.linspace(0, 1, 10), "firing <rate>", categorical=False)
    assert "firing &lt;rate&gt; %{customdata[2]:.3g}" in fig.data[0].hovertemplate
    assert np.asarray(fig.data[0].customdata).shape == (10, 3)
