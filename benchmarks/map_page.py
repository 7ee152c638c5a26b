"""The Neuron map page warm (the map already computed): the page's script run in Streamlit's AppTest,
navigation to the chart's data sent (the browser's paint of a WebGL scatter is not in it), and the
map figure alone (build + the JSON Streamlit sends), against the figure code before this change
(per-point colour strings and float64 hover columns), swapped into the same page, interleaved.

Run on a COPY of a cache with a computed map (the app may hold the original):
  cp data/bricklab.duckdb /tmp/bench.duckdb && python benchmarks/map_page.py --db /tmp/bench.duckdb
The last line is one JSON object with page_warm_s (target <= 2 s) and page_warm_baseline_s.
`--smoke` measures a fresh run of a tiny random model instead, in seconds.

The pages import ui/, which is not part of the installed package: the script runs itself as
`python -m benchmarks.map_page` from the repository root, where Streamlit runs the app.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("layer", "cluster")  # a numeric and a categorical colouring


def baseline_figure(coords, d_ff, colour, colour_name, categorical):
    """ui.figures.neuron_map before this change: colours as one string per point, four float64 hover
    columns."""
    import plotly.graph_objects as go

    from ui import figures

    ids = np.arange(len(coords))
    marker = {"size": 3 if len(coords) > 5000 else 6, "opacity": 0.8}
    if categorical:
        marker["color"] = figures.group_colours(colour)
    else:
        marker |= {
            "color": colour,
            "colorscale": "Viridis",
            "showscale": True,
            "colorbar": {"title": colour_name},
        }
    fig = go.Figure(
        go.Scattergl(
            x=coords[:, 0], y=coords[:, 1], mode="markers", marker=marker,
            customdata=np.stack([ids, ids // d_ff, ids % d_ff, colour], axis=1),
            hovertemplate="layer %{customdata[1]} · neuron %{customdata[2]}<br>" + colour_name
            + " %{customdata[3]:.3g}<extra></extra>",
        )
    )  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return figures._layout(fig, height=560)


def figure_seconds(build, coords, d_ff, colours) -> tuple[float, int]:
    """Build both colourings and serialise them as st.plotly_chart does; (seconds, JSON bytes)."""
    import plotly.io as pio

    started, size = time.perf_counter(), 0
    for mode in MODES:
        fig = build(coords, d_ff, colours[mode], mode, mode == "cluster")
        size += len(pio.to_json(fig.to_dict(), validate=False))
    return time.perf_counter() - started, size


def page_seconds(at, mode: str) -> float:
    """One script run of the page (already opened once in this AppTest) with the map coloured by `mode`."""
    at.radio(key="map-colour").set_value(mode)
    started = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - started
    assert not at.exception, at.exception
    assert at.get("plotly_chart"), "no chart on the page"
    return seconds


def measure(args, db: str, run_id: str) -> None:
    from streamlit.testing.v1 import AppTest

    from core.bricks import neuron_map
    from core.store import Store
    from ui import figures

    store = Store(db)
    run = store.require_run(run_id)
    started = time.perf_counter()
    result = neuron_map.compute_map(store, run.run_id)  # cached in the file after its first computation
    store.close()
    ready = time.perf_counter() - started
    print(f"run {run.run_id}: {run.n_layers} x {run.d_ff} neurons; map ready in {ready:.1f} s")
    coords, n = result.coords, len(result.coords)
    colours = {"layer": np.arange(n) // run.d_ff, "cluster": result.labels}

    os.environ["BRICKLAB_DB"] = db
    at = AppTest.from_file(str(ROOT / "pages" / "2_Neuron_map.py"), default_timeout=600)
    at.session_state["run_id"] = run.run_id
    started = time.perf_counter()
    at.run()
    print(f"page, first run in this process: {time.perf_counter() - started:.2f} s")
    new_build = figures.neuron_map
    times = {name: [] for name in ("page", "page_baseline", "figure", "figure_baseline")}
    sizes = {}
    for _ in range(args.repeats):
        for name, build in (("", new_build), ("_baseline", baseline_figure)):
            figures.neuron_map = build  # the page calls it through the module: swap the code path
            try:
                times["page" + name].append(max(page_seconds(at, mode) for mode in MODES))
            finally:
                figures.neuron_map = new_build
            seconds, sizes["figure" + name] = figure_seconds(build, coords, run.d_ff, colours)
            times["figure" + name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, values in times.items():
        print(f"{name}: median {median[name]:.3f} s {[round(t, 3) for t in values]}")
    print(json.dumps({
        "page_warm_s": round(median["page"], 3), "page_warm_baseline_s": round(median["page_baseline"], 3),
        "page_speedup": round(median["page_baseline"] / median["page"], 2),
        "figure_s": round(median["figure"], 3), "figure_baseline_s": round(median["figure_baseline"], 3),
        "figure_bytes": sizes["figure"], "figure_baseline_bytes": sizes["figure_baseline"],
        "target_met": median["page"] <= 2.0, "n_neurons": n, "repeats": args.repeats, "run_id": run.run_id,
        "load_1min": round(os.getloadavg()[0], 2),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="a copy of a bricklab cache (required unless --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a fresh tiny run and 1 repeat")
    parser.add_argument("--run", help="run id (default: the newest complete run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if __package__ != "benchmarks":  # run as a file: again as a module from the repository root
        command = [sys.executable, "-m", "benchmarks.map_page", *sys.argv[1:]]
        sys.exit(subprocess.run(command, cwd=ROOT, check=False).returncode)
    if not args.smoke:
        if not args.db:
            parser.error("--db is required (or --smoke)")
        from core.store import Store

        store = Store(args.db)
        run_id = store.require_run(args.run).run_id
        store.close()
        return measure(args, args.db, run_id)
    import tempfile

    from benchmarks import _tiny

    args.repeats = 1
    with tempfile.TemporaryDirectory() as tmp:
        db, run_id = _tiny.run(_tiny.model(), tmp)
        measure(args, str(db), run_id)


if __name__ == "__main__":
    main()
