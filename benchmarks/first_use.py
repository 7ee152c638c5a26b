"""First use: from a fresh process and an empty cache to everything the pages show (capture, vocabulary
projections, bricks, the neuron map and the paper analysis) on the default prompt set, as the Home page's
"Prepare" button does it. Reports seconds per step and the machine's load beside them (issue #21's
target: at most 5 minutes on 2 quiet cores, the paper analysis alone at most 60 s). Last line: one JSON
object.
Run: python benchmarks/first_use.py [--limit N] [--smoke]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from core import analysis, models, prepare, prompts
from core.capture import run as capture
from core.store import Store

TARGET_S = 300  # the whole preparation on the default set
ANALYSIS_TARGET_S = 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="only N prompts of the default set (a quick check)")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny random model, 2 prompts per category, quick analysis"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()
    if args.smoke:
        import _tiny  # beside this file

        lm, report, limit = _tiny.model(), analysis.ReportConfig().quick(), 2 * len(prompts.CATEGORIES)
    else:
        lm, report, limit = models.load_model(None, device="cpu"), analysis.ReportConfig(), args.limit
    load_s = time.perf_counter() - started
    prompt_set = prompts.default_prompt_set()
    if limit:
        prompt_set = prompt_set.head(limit)
    seconds, begun = {}, {}

    def step(name: str, state: str) -> None:
        if state == "running":
            begun[name] = time.perf_counter()
        elif name in begun:
            seconds[name] = time.perf_counter() - begun[name]
        else:
            seconds[name] = 0.0 if state == "cached" else None

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "first_use.duckdb")
        try:
            prepared = time.perf_counter()
            run_id = prepare.prepare(lm, prompt_set, store, capture.CaptureConfig(), report, step)
            prepare_s = time.perf_counter() - prepared
            run = store.require_run(run_id)
            ready = prepare.ready(store, run, report)
        finally:
            store.close()
    total_s = time.perf_counter() - started
    print(json.dumps({
        "model": lm.info.model_id, "prompts": run.n_prompts, "tokens": run.n_tokens,
        "load_s": load_s, "steps_s": seconds, "prepare_s": prepare_s, "total_s": total_s,
        "all_ready": all(v is not False for v in ready.values()),
        "within_target": total_s <= TARGET_S,
        "analysis_within_target": (seconds.get("analysis") or 0.0) <= ANALYSIS_TARGET_S,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "cpus": os.cpu_count(),
        "smoke": args.smoke,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
