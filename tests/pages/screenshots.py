"""The README's screenshots (docs/screenshots/*.png), taken from a real run in the headless Chromium the
end-to-end test uses: the Neuron map with one neuron's detail, the Bricks page with its most significant
brick open, the Playground's first lesson and the Paper page. Not a test: run it from the repository
root on a cache whose run has its map, bricks and analysis (the app runs on a temporary copy):
  .venv/bin/python -m tests.pages.screenshots --db data/bricklab.duckdb [--out docs/screenshots]
Look at every image afterwards: a cut, empty or error page must be taken again.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from core.bricks import candidates, scores
from core.store import Store
from tests.pages.test_e2e import ARGS, CHROMIUM, ROOT, serve

WIDTH = 1280  # px: the README shows them about 900 wide, so text stays readable
MAX_HEIGHT = 3200  # px: a long page is cut here rather than shrunk to unreadable
PAGES = ["neuron_map", "bricks", "playground", "paper"]
IDLE = "() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')"  # script done


def showcase(db: Path) -> tuple[str, str, str]:
    """(run id, "layer:index" of the neuron with the highest category score, the most significant
    co-activation brick): the views the screenshots open."""
    store = Store(db)
    try:
        run = store.require_run(None)
        best = int(np.argmax(scores.functionality_scores(store, run.run_id).max(axis=0)))
        found = candidates.compute_bricks(store, run.run_id, candidates.BrickParams())
        brick = candidates.by_significance(found)[0].brick_id
    finally:
        store.close()
    return run.run_id, f"{best // run.d_ff}:{best % run.d_ff}", brick


def shot(page, path: Path, until=None) -> None:
    """The page's whole main block (Streamlit scrolls inside it, so the viewport grows to fit it), or
    only the part above the element `until`: a long page ends at a section, not mid-chart."""
    for _ in range(2):  # the running icon shows a moment after a rerun starts: look twice
        page.wait_for_function(IDLE)
        page.wait_for_timeout(1500)  # charts finish drawing
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": WIDTH, "height": min(max(height, 900), MAX_HEIGHT)})
    page.wait_for_timeout(800)
    box = until.bounding_box() if until is not None else None
    clip = {"x": 0, "y": 0, "width": WIDTH, "height": box["y"] - 8} if box else None
    page.screenshot(path=str(path), clip=clip)
    page.set_viewport_size({"width": WIDTH, "height": 900})
    print(path, flush=True)


def take(url: str, run_id: str, neuron: str, brick: str, out: Path, pages: set[str]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(viewport={"width": WIDTH, "height": 900}).new_page()
        page.set_default_timeout(600_000)
        if "neuron_map" in pages:
            map_shot(page, url, run_id, neuron, out)
        if "bricks" in pages:
            page.goto(f"{url}/Bricks?run={run_id}&brick={brick}")
            page.get_by_role("heading", name=f"Brick {brick}").wait_for()
            shot(page, out / "bricks.png")
        if "playground" in pages:
            page.goto(f"{url}/Playground?run={run_id}")
            page.get_by_text("active neurons").first.wait_for()
            shot(page, out / "playground.png")
        if "paper" in pages:
            page.goto(f"{url}/Paper?run={run_id}")
            page.get_by_role("heading", name="Recombination").first.wait_for()
            shot(page, out / "paper.png", until=page.get_by_role("heading", name="4 ·").first)
        browser.close()


def map_shot(page, url: str, run_id: str, neuron: str, out: Path) -> None:
    page.goto(f"{url}/Neuron_map?run={run_id}&neuron={neuron.replace(':', '%3A')}")
    page.get_by_text("neurons · ", exact=False).first.wait_for()
    page.get_by_test_id("stRadio").get_by_text("cluster", exact=True).click()  # the map's groups
    page.get_by_role("heading", name=f"Neuron {neuron}").wait_for()
    page.get_by_text("Top activating examples").wait_for()
    page.get_by_text("#8 · ").wait_for()  # the eighth example, shaded by the model
    shot(page, out / "neuron_map.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a cache with the map, bricks and analysis computed")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--pages", nargs="+", choices=PAGES, default=PAGES, help="only these (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "screenshots.duckdb"
        shutil.copyfile(args.db, db)  # the app writes to its cache: never to the user's file
        if Path(args.db + ".wal").exists():  # what a running process wrote and has not checkpointed yet
            shutil.copyfile(args.db + ".wal", str(db) + ".wal")
        run_id, neuron, brick = showcase(db)
        with serve(Path(tmp), {"BRICKLAB_DB": str(db), "BRICKLAB_MODEL": "default"}) as url:
            take(url, run_id, neuron, brick, out, set(args.pages))


if __name__ == "__main__":
    main()
