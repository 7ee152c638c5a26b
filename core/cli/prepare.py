"""`prepare-run`: capture a prompt set and compute everything the pages show, in one resumable command."""

from __future__ import annotations

import sys
import time

from core import analysis, models, prepare, prompts
from core.capture import run as capture
from core.cli.capture import non_negative, positive
from core.jobs import duration
from core.store import Store


def register(sub) -> None:
    p = sub.add_parser(
        "prepare-run",
        help="capture, then bricks, the map and the paper analysis (resumable)",
        description="Everything the app shows for one prompt set; steps already cached are skipped, so "
        "running it again after a stop resumes.",
    )  # fmt: skip
    p.add_argument("--prompts", help="JSONL, CSV or TXT prompt file (default: the bundled set)")
    p.add_argument("--limit", type=positive, help="only N prompts, spread over categories")
    p.add_argument("--batch-size", type=non_negative, default=0, help="prompts per forward pass (0: auto)")
    p.add_argument("--quick", action="store_true", help="the paper analysis on fewer prompts (rougher)")
    p.add_argument("--quiet", action="store_true", help="no step lines")
    p.set_defaults(func=cmd_prepare_run)


def cmd_prepare_run(args) -> int:
    prompt_set = prompts.load_prompt_file(args.prompts) if args.prompts else prompts.default_prompt_set()
    if args.limit:
        prompt_set = prompt_set.head(args.limit)
    lm = models.load_model(args.model, device=args.device)
    store = Store(args.db)
    report = analysis.ReportConfig().quick() if args.quick else analysis.ReportConfig()
    started: dict[str, float] = {}

    def step(name: str, state: str) -> None:
        if state == "running":
            started[name] = time.perf_counter()
        elif not args.quiet:
            took = f" in {duration(time.perf_counter() - started[name])}" if name in started else ""
            print(f"{prepare.STEPS[name]}: {state}{took}", file=sys.stderr, flush=True)

    try:
        begun = time.perf_counter()
        config = capture.CaptureConfig(batch_size=args.batch_size)
        run_id = prepare.prepare(lm, prompt_set, store, config, report, step)
        print(f"run {run_id}: ready in {duration(time.perf_counter() - begun)} ({len(prompt_set):,} prompts)")
    finally:
        store.close()
    return 0
