"""The neuron map figure (ui/figures.py) stays compact and cheap for the browser: numpy arrays Plotly
sends as typed binary, one WebGL trace per colour (no colour per point for Plotly to convert), short
hover text, and a selection that reads each point's neuron from its customdata."""

from __future__ import annotations

import numpy as np
import plotly.io as pio

from ui import figures


def test_the_map_has_one_trace_per_group_colour_and_sends_compact_arrays():
    n, d_ff = 4000, 100
    coords = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    groups = np.arange(n) % 25 - 1  # -1: no group
    fig = figures.neuron_map(coords, d_ff, groups, "cluster", categorical=True)
    colours = [t.marker.color for t in fig.data]
    assert colours == [*figures.PALETTE, figures.NOISE]  # 24 groups wrap round the 18 colours
    grey = np.asarray(fig.data[-1].customdata)
    assert np.array_equal(grey[0], [0, 0]) and len(grey) == n // 25  # neuron 0 has group -1
    every = np.concatenate([np.asarray(t.customdata) for t in fig.data])
    assert sorted((every[:, 0] * d_ff + every[:, 1]).tolist()) == list(range(n))  # each neuron once
    first = np.asarray(fig.data[0].customdata)[0]  # group 0: neuron 1; its coordinates travel with it
    assert np.array_equal(first, [0, 1]) and fig.data[0].x[0] == coords[1, 0]
    spec = pio.to_json(fig.to_dict(), validate=False)
    assert '"bdata"' in spec and spec.count("#") < n / 10  # no colour per point
    assert len(spec) < 40 * n
    assert fig.layout.clickmode == "event+select" and fig.layout.dragmode == "pan"  # no second paint


def test_a_continuous_colouring_takes_steps_with_a_colour_bar_and_the_exact_value_in_the_hover():
    coords = np.zeros((100, 2), np.float32)
    value = np.linspace(0, 1, 100)
    value[3] = np.nan
    fig = figures.neuron_map(coords, 5, value, "firing <rate>", categorical=False)
    points = [t for t in fig.data if t.type == "scattergl"]
    assert len(points) == figures.MAP_STEPS + 1 and points[-1].marker.color == figures.NOISE  # NaN: grey
    assert "firing &lt;rate&gt; %{customdata[2]:.3g}" in points[0].hovertemplate
    assert np.asarray(points[0].customdata).shape[1] == 3
    assert fig.data[-1].marker.showscale and fig.data[-1].marker.cmax == 1.0
    layers = figures.neuron_map(coords, 5, np.arange(100) // 5, "layer", categorical=False)
    assert len([t for t in layers.data if t.type == "scattergl"]) == 20  # one step per exact value


def test_a_selection_gives_the_neurons_whatever_trace_they_are_in():
    points = [{"curve_number": 3, "point_index": 0, "customdata": [2, 7]},
              {"curve_number": 0, "point_index": 0, "customdata": {"0": 0, "1": 5, "2": 0.5}}]  # fmt: skip
    assert figures.map_selection(points, 100) == [207, 5]
