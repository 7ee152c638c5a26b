"""The Neuron map in a real headless Chromium: seconds from the click on its sidebar link (on Home) to
the scatter painted (every point in Plotly's data, its WebGL canvas drawn, Streamlit's "running"
indicator gone); the first visit in a fresh app process, then warm visits (Home and back each time).
Beside each visit: when the last websocket message before the paint arrived, which splits the time into
server (script + transfer) and browser (decoding, React, Plotly's paint), and the largest message's size
(Streamlit sends a message it sent before, like the figure on a warm visit, as a short reference).
Issue #21's target: <= 2 s warm.

`--compare` also serves the map's figure code before its one-trace-per-colour change (one trace with a
colour per point, which Plotly turns into RGBA strings point by point in the browser) from a second app
process, and visits the two in turn in the same browser, so that both see the same machine load.

The app runs on a temporary copy of --db (never the file itself), with its map computed first.
  python benchmarks/map_browser.py --db data/bricklab.duckdb [--repeats 7] [--compare]
`--smoke`: a fresh run of a tiny random model, 2 visits of each (with --compare).
Needs /usr/bin/chromium (`make browser`).
The last line is one JSON object (warm_median_s, first_s, target_met, load; with --compare the
baseline's warm_median_s and first_s as baseline_warm_median_s, baseline_first_s, and the speedup).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from core.bricks import neuron_map
from core.store import Store

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
TARGET_S = 2.0
# The app with ui.figures.neuron_map replaced by baseline_figure (below) before Streamlit starts: pages
# import the module Streamlit's process already holds (its file watcher is off: no reload undoes it).
BASELINE_APP = """
import sys
import map_browser
from ui import figures
figures.neuron_map = map_browser.baseline_figure
from streamlit.web.cli import main
sys.argv[0] = "streamlit"
main()
"""
# Every websocket message's arrival time and size, recorded before Streamlit's own handler sees it.
RECORD_MESSAGES = """
(() => {
  const Native = window.WebSocket;
  window.__messages = [];
  window.WebSocket = function (...args) {
    const ws = new Native(...args);
    ws.addEventListener("message", (e) => window.__messages.push(
      [performance.now(), e.data.byteLength ?? e.data.size ?? e.data.length]));
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();
"""
# True once the page holds the map with all n points (over its WebGL traces), drawn on its WebGL canvas,
# and the script is done.
PAINTED = """
(n) => {
  if (!location.pathname.endsWith("Neuron_map")) return false;
  if (document.querySelector('[data-testid="stStatusWidgetRunningIcon"]')) return false;  // running
  const gd = document.querySelector(".js-plotly-plot");
  if (!gd || !gd._fullData) return false;
  const points = gd._fullData.reduce((sum, t) => sum + (t.type === "scattergl" ? t.x.length : 0), 0);
  if (points !== n) return false;
  const canvas = gd.querySelector("canvas.gl-canvas-context");
  if (!canvas || !canvas.width) return false;
  const probe = document.createElement("canvas");  // a small copy: are any points drawn on it?
  probe.width = 64; probe.height = 64;
  const ctx = probe.getContext("2d");
  ctx.drawImage(canvas, 0, 0, 64, 64);
  const px = ctx.getImageData(0, 0, 64, 64).data;
  for (let i = 3; i < px.length; i += 4) if (px[i] > 0) return performance.now();
  return false;
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_figure(coords, d_ff, colour, colour_name, categorical):
    """ui.figures.neuron_map before one trace per colour: one trace, a colour number per point through a
    colour scale (a palette index for groups), which Plotly turns into an RGBA string per point."""
    import plotly.graph_objects as go

    from ui import figures

    n = len(coords)
    ids = np.arange(n)
    marker = {"size": 3 if n > 5000 else 6, "opacity": 0.8}
    where = np.stack([ids // d_ff, ids % d_ff], axis=1)
    hover = "layer %{customdata[0]} · neuron %{customdata[1]}"
    if categorical:
        groups = np.asarray(colour)
        colours = (*figures.PALETTE, figures.NOISE)
        index = np.where(groups < 0, len(figures.PALETTE), groups % len(figures.PALETTE)).astype(np.uint8)
        steps = [[edge / len(colours), c] for i, c in enumerate(colours) for edge in (i, i + 1)]
        marker |= {"color": index, "colorscale": steps, "cmin": -0.5, "cmax": len(colours) - 0.5}
        custom = where.astype(np.int32)
    else:
        marker |= {"color": np.asarray(colour, np.float32), "colorscale": "Viridis", "showscale": True}
        marker["colorbar"] = {"title": colour_name}
        custom = np.column_stack([where, colour]).astype(np.float32)
        hover += "<br>" + colour_name + " %{customdata[2]:.3g}"
    x, y = np.asarray(coords, np.float32).T
    fig = go.Figure(go.Scattergl(x=x, y=y, mode="markers", marker=marker, customdata=custom,
                                 hovertemplate=hover + "<extra></extra>"))  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return figures._layout(fig, height=560)


@contextmanager
def serve(folder: Path, env: dict[str, str], baseline: bool = False):
    """`streamlit run app.py` on a free loopback port with `env` added (with the baseline figure code
    if `baseline`); yields its URL."""
    port = free_port()
    start = [sys.executable, "-c", BASELINE_APP] if baseline else [sys.executable, "-m", "streamlit"]
    command = [*start, "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1",
               "--server.headless", "true", "--server.fileWatcherType", "none"]  # fmt: skip
    log_path = folder / ("streamlit-baseline.log" if baseline else "streamlit.log")
    with open(log_path, "wb") as log:
        out = {"stdout": log, "stderr": subprocess.STDOUT}
        if baseline:  # the baseline process imports this file as `map_browser`
            paths = [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]
            env = {**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        server = subprocess.Popen(command, cwd=ROOT, env=os.environ | env, **out)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(log_path.read_text()) from None
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def visit(page, n: int) -> dict:
    """Click "Neuron map" in the sidebar and wait for the painted map; seconds from the click."""
    link = page.get_by_test_id("stSidebar").get_by_role("link", name="Neuron map", exact=True)
    link.wait_for()
    clicked = page.evaluate("() => { window.__messages = []; return performance.now(); }")
    link.click()
    painted = page.wait_for_function(PAINTED, arg=n, polling="raf", timeout=600_000).json_value()
    messages = [m for m in page.evaluate("() => window.__messages") if m[0] <= painted]
    last = messages[-1][0] if messages else clicked
    return {
        "s": (painted - clicked) / 1000,
        "server_s": (last - clicked) / 1000,  # the page's script and the transfer of what it sent
        "browser_s": (painted - last) / 1000,  # the rest: decoding, React and Plotly's paint
        "largest_message_bytes": max((m[1] for m in messages), default=0),
        "messages": len(messages),
        "traces": page.evaluate("() => document.querySelector('.js-plotly-plot')._fullData.length"),
    }


def home(page) -> None:
    page.get_by_test_id("stSidebar").get_by_role("link", name="Home", exact=True).click()
    page.wait_for_url(re.compile(r"/$"))
    page.get_by_text("Cached runs").wait_for()
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')")


def measure(db: Path, run_id: str, model: str, repeats: int, compare: bool) -> dict:
    from playwright.sync_api import sync_playwright

    store = Store(db)
    try:
        started = time.perf_counter()
        n = len(neuron_map.compute_map(store, run_id).coords)  # cached in the copy after the first time
        map_s = time.perf_counter() - started
    finally:
        store.close()
    variants = ["", "baseline_"] if compare else [""]
    visits = {v: [] for v in variants}
    env = {"BRICKLAB_DB": str(db), "BRICKLAB_MODEL": model}
    with ExitStack() as stack, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.add_init_script(RECORD_MESSAGES)
        pages = {}
        for v in variants:
            if v:  # its own copy: one process at a time may open a DuckDB file for writing
                env = env | {"BRICKLAB_DB": str(shutil.copyfile(db, db.with_name(v + db.name)))}
            url = stack.enter_context(serve(db.parent, env, baseline=bool(v)))
            pages[v] = context.new_page()
            pages[v].set_default_timeout(600_000)
            pages[v].goto(f"{url}/?run={run_id}")
            pages[v].get_by_text("Cached runs").wait_for()
        for i in range(repeats):
            for v, page in pages.items():  # in turn: the same machine load for each
                page.bring_to_front()
                visits[v].append(visit(page, n))
                shown = ", ".join(f"{k} {x:.3f}" for k, x in visits[v][-1].items())
                print(f"{v or 'current_'}visit {i + 1}: {shown}", flush=True)
                home(page)
        webgl = page.evaluate("() => { const c = document.createElement('canvas'); "
                              "return (c.getContext('webgl2') || c.getContext('webgl')) ? "
                              "c.getContext('webgl2') ? 'webgl2' : 'webgl' : 'none'; }")  # fmt: skip
        browser.close()
    result = {}
    for v in variants:
        result |= {v + k: x for k, x in summary(visits[v]).items()}
    if compare:
        result["speedup"] = round(result["baseline_warm_median_s"] / result["warm_median_s"], 2)
    return result | {
        "n_neurons": n, "map_ready_s": round(map_s, 2), "repeats": repeats, "run_id": run_id,
        "webgl": webgl, "load_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }  # fmt: skip


def summary(visits: list[dict]) -> dict:
    """The first visit and the median of the warm ones."""
    warm = visits[1:]
    median = {k: statistics.median(v[k] for v in warm) for k in warm[0]} if warm else {}
    return {
        "warm_median_s": round(median.get("s", float("nan")), 3),
        "first_s": round(visits[0]["s"], 3),
        "warm_s": [round(v["s"], 3) for v in warm],
        "warm_server_s": round(median.get("server_s", float("nan")), 3),
        "warm_browser_s": round(median.get("browser_s", float("nan")), 3),
        "first_server_s": round(visits[0]["server_s"], 3),
        "first_largest_message_bytes": visits[0]["largest_message_bytes"],
        "traces": visits[0]["traces"],
        "target_met": bool(warm) and median["s"] <= TARGET_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="a cache with a complete run (copied first); required unless --smoke")
    parser.add_argument("--run", help="run id (default: the newest complete run)")
    parser.add_argument("--repeats", type=int, default=7, help="visits: the first, then warm ones")
    parser.add_argument("--smoke", action="store_true", help="a fresh tiny run, 2 visits of each, compared")
    parser.add_argument("--compare", action="store_true", help="also the figure code before, in turn")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        parser.error(f"needs {CHROMIUM} (make browser)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            import _tiny  # beside this file

            model = _tiny.save(Path(tmp) / "tiny")
            db, run_id = _tiny.run(_tiny.model(), tmp)
            args.repeats, args.compare = 2, True  # the baseline's path too
        else:
            if not args.db:
                parser.error("--db is required (or --smoke)")
            db, model = Path(tmp) / "map_browser.duckdb", os.environ.get("BRICKLAB_MODEL", "default")
            shutil.copyfile(args.db, db)  # the app writes to its cache: never to the user's file
            store = Store(db)
            try:
                run_id = store.require_run(args.run).run_id
            finally:
                store.close()
        result = measure(Path(db), run_id, model, args.repeats, args.compare)
    print(json.dumps(result | {"smoke": args.smoke}))


if __name__ == "__main__":
    main()
