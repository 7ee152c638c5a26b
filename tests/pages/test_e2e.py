"""The real app in a real headless Chromium: capture a small run, open the map and select a neuron,
toggle a brick in the playground, compute the paper's report, download the configuration; a
screenshot of every page goes to tests/output/. Needs Debian's chromium (`make browser`);
Playwright's Python package only drives it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "tests" / "output"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
SLOW = 240_000  # ms: a capture or a first map on a busy 2-core machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (make browser)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(tmp_path, env: dict[str, str]):
    """`streamlit run app.py` on a free loopback port with `env` added; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--server.headless", "true"]  # fmt: skip
    log = open(tmp_path / "streamlit.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, cwd=ROOT, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT)
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
                    raise RuntimeError((tmp_path / "streamlit.log").read_text()) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def app_url(tmp_path, tiny_dir):
    """The app on a fresh cache and the tiny model."""
    env = {"BRICKLAB_DB": str(tmp_path / "e2e.duckdb"), "BRICKLAB_MODEL": tiny_dir,
           "BRICKLAB_DATA": str(tmp_path / "data")}  # fmt: skip
    with serve(tmp_path, env) as url:
        yield url


@pytest.fixture
def real_app_url(tmp_path, default_dir):
    """The app on a fresh cache and the real default model (converted once by `default_dir`)."""
    with serve(tmp_path, {"BRICKLAB_DB": str(tmp_path / "real.duckdb"), "BRICKLAB_MODEL": "default"}) as url:
        yield url


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        yield context.new_page()
        browser.close()


def go(page, name: str) -> None:
    """Navigate inside the app (sidebar link): the browser session and its state stay."""
    page.get_by_test_id("stSidebar").get_by_role("link", name=name, exact=True).click()
    page.wait_for_url(re.compile(name.replace(" ", "_")))


def shot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main block, so the viewport grows to fit it."""
    OUTPUT.mkdir(exist_ok=True)
    page.wait_for_timeout(800)  # let charts finish drawing
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(max(height, 1000), 6000)})
    page.wait_for_timeout(300)
    page.screenshot(path=str(OUTPUT / f"{name}.png"))
    page.set_viewport_size({"width": 1400, "height": 1000})


def click_a_point(page) -> str:
    """Click a neuron of the WebGL map at its pixel position, as a person would, and return its name
    ("layer:neuron"). Points that lie within a few pixels of another are passed over: where two overlap,
    Plotly picks whichever its hit test prefers (neurons 0:0 and 22:1122 of the real map lie 0.013 apart,
    and a fresh Chromium picked the second), so the first such point of each colour is tried in turn."""
    page.wait_for_function(  # the chart's element appears before Plotly has laid it out
        "() => { const gd = document.querySelector('.js-plotly-plot');"
        " return gd && gd._fullLayout && gd._fullData && gd._fullData.length > 0; }"
    )
    x, y, name = page.evaluate(
        """() => {
            const gd = document.querySelector('.js-plotly-plot');
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
            const px = [], py = [], who = [];
            for (const t of gd._fullData) {
                if (!t.customdata) continue;
                for (let i = 0; i < t.x.length; i++) {
                    px.push(xa.d2p(t.x[i])); py.push(ya.d2p(t.y[i]));
                    who.push(t.customdata[i][0] + ':' + t.customdata[i][1]);
                }
            }
            for (let i = 0; i < px.length; i++) {
                let alone = true;
                for (let j = 0; j < px.length && alone; j++) {
                    alone = j === i || Math.hypot(px[i] - px[j], py[i] - py[j]) > 6;
                }
                if (alone) return [box.left + xa._offset + px[i], box.top + ya._offset + py[i], who[i]];
            }
            throw new Error('no neuron of the map lies 6 pixels from every other');
        }"""
    )
    page.mouse.click(x, y)
    return name


def test_the_app_end_to_end(app_url, page):
    page.set_default_timeout(SLOW)
    page.goto(app_url)
    page.get_by_text("Cached runs").wait_for()
    shot(page, "home")

    go(page, "Capture")
    page.get_by_role("spinbutton", name=re.compile("Prompts to capture")).fill("14")
    page.keyboard.press("Enter")
    page.get_by_role("button", name=re.compile("Capture 14 prompts")).click()
    page.get_by_text(re.compile(r"Run \w+ captured")).wait_for()
    shot(page, "capture")

    go(page, "Neuron map")
    page.locator(".js-plotly-plot").first.wait_for()
    page.get_by_text(re.compile("neurons · .* clusters")).wait_for()
    name = click_a_point(page)
    page.get_by_role("heading", name=f"Neuron {name}").wait_for()
    page.get_by_text("Top activating examples").wait_for()
    shot(page, "neuron_map")

    go(page, "Bricks")
    page.get_by_test_id("stMetric").first.wait_for()
    shot(page, "bricks")

    go(page, "Playground")
    page.get_by_text("active neurons").wait_for()
    assert page.get_by_test_id("stMetricValue").first.inner_text() == "100.0%"
    page.get_by_test_id("stMultiSelect").click()
    page.keyboard.type("coact-L01-00")  # labelled bricks come first: filter the long list down
    page.get_by_role("option", name=re.compile("coact-L01-00")).click()
    page.keyboard.press("Escape")
    page.get_by_test_id("stMetricValue").first.filter(has_text=re.compile(r"^(?!100\.0%)")).wait_for()
    shot(page, "playground")

    go(page, "Custom bricks")
    page.get_by_role("heading", name=re.compile("Cached adapters")).wait_for()
    shot(page, "custom_bricks")

    go(page, "Paper")
    page.get_by_text("Quick (3 held-out prompts").click()
    # the toggle reruns the page: only the redrawn button names the quick analysis (a click on the
    # button of the run before would be lost with it)
    page.get_by_role("button", name=re.compile("Compute the quick analysis")).click()
    page.get_by_role("heading", name=re.compile("Recombination")).wait_for()
    shot(page, "paper")

    go(page, "Export")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSON").click()
    saved = OUTPUT / "bricklab-config.json"
    download.value.save_as(saved)
    doc = json.loads(saved.read_text())
    assert doc["schema_version"] == 1 and len(doc["bricks"]) == 1 and doc["bricks"][0]["mode"] == "off"
    shot(page, "export")


REAL_PROMPTS = 14  # two per category: every category is labelled, the capture takes seconds
MAP = 480_000  # ms: the first map of 46,080 neurons (numba compiles UMAP's code) on a busy machine


def metric_value(page, label: str):
    return page.get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue")


def metric(page, label: str) -> str:
    return metric_value(page, label).inner_text()


def test_the_real_model_end_to_end(real_app_url, page):
    """The main path on the real SmolLM2-135M: capture a few default prompts, the map, a neuron's detail
    with the tokens it promotes, its link reopened in a new tab, a brick's link, and that brick switched
    off in the Playground with a visible change. Functional bricks (seconds) keep it short: the
    co-activation bricks of 46,080 neurons take minutes, which `prepare-run` and its benchmark cover."""
    from playwright.sync_api import expect

    expect.set_options(timeout=SLOW)
    page.set_default_timeout(SLOW)
    page.goto(real_app_url)
    page.get_by_text("Cached runs").wait_for()

    go(page, "Capture")
    page.get_by_role("spinbutton", name=re.compile("Prompts to capture")).fill(str(REAL_PROMPTS))
    page.keyboard.press("Enter")
    page.get_by_role("button", name=re.compile(f"Capture {REAL_PROMPTS} prompts with SmolLM2")).click()
    page.get_by_text(re.compile(r"Run \w+ captured")).wait_for()

    go(page, "Neuron map")
    page.get_by_text(re.compile(r"46,080 neurons · \d+ clusters")).wait_for(timeout=MAP)
    name = click_a_point(page)
    page.get_by_role("heading", name=f"Neuron {name}").wait_for()
    page.get_by_text("Top activating examples").wait_for()
    page.get_by_text("Promotes", exact=True).wait_for()  # the tokens its output writes (vocabulary)
    page.get_by_text("Suppresses:", exact=True).wait_for()
    link = (
        page.get_by_test_id("stCode")
        .filter(has_text=f"neuron={name.replace(':', '%3A')}")
        .inner_text()
        .strip()
    )
    run_id = re.search(r"run=(\w+)", link).group(1)
    shot(page, "real_neuron_map")

    fresh = page.context.new_page()  # a new tab: a new browser session, only the link's state
    fresh.set_default_timeout(SLOW)
    fresh.goto(link)
    fresh.get_by_role("heading", name=f"Neuron {name}").wait_for()
    fresh.get_by_text("Top activating examples").wait_for()
    shot(fresh, "real_link")
    fresh.close()

    page.goto(f"{real_app_url}/Bricks?run={run_id}&brick=functional-linguistic")
    page.get_by_role("heading", name=re.compile("Brick functional-linguistic")).wait_for()
    go(page, "Playground")
    page.get_by_text("active neurons").wait_for()
    assert metric(page, "active neurons") == "100.0%" and metric(page, "mean KL") == "0.000"
    page.get_by_test_id("stMultiSelect").filter(has_text="Bricks to change").click()
    page.get_by_role("option", name=re.compile("^functional-knowledge")).click()
    page.keyboard.press("Escape")
    expect(metric_value(page, "active neurons")).not_to_have_text("100.0%")
    assert float(metric(page, "mean KL")) > 0.01
    assert metric(page, "first divergent token") != "none"  # the configured model writes other words
    shot(page, "real_playground")
