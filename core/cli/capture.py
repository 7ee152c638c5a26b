"""`capture`, `merge`, `runs` and `prepare`: filling the cache and listing what it holds."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from core import models, prompts
from core.capture import run as capture
from core.capture import shards
from core.errors import BricklabError
from core.store import Store, sample


def register(sub) -> None:
    p = sub.add_parser("capture", help="capture a prompt set's FFN activations into the cache")
    p.add_argument("--prompts", help="JSONL, CSV or TXT prompt file (default: the bundled set)")
    p.add_argument("--limit", type=positive, help="capture only N prompts, spread over categories")
    p.add_argument(
        "--batch-size", type=non_negative, default=0,
        help="prompts per forward pass (default 0: as many as fit in free GPU memory; 8 on the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--sample-mib", type=non_negative, default=capture.CaptureConfig().sample_bytes >> 20,
        help="MiB of per-token firing bits to keep (default 1024); a larger run keeps a hashed sample "
        "of its tokens and co-activation counts beside the cache",
    )  # fmt: skip
    p.add_argument(
        "--count-tokens", type=non_negative, default=capture.CaptureConfig().count_tokens,
        help="such a run counts the co-activations of this many of its tokens, a hashed sample "
        "(default 1048576; 0: every token, exact but slower)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--shard", metavar="I/N", help="capture only shard I of N (chunks c with c %% N == I)")
    p.add_argument(
        "--backend", choices=("local", "ray"), default="local", help="ray: fan shards out as Ray tasks"
    )
    p.add_argument("--shards", type=positive, default=2, help="shards for --backend ray (default 2)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray runtime)")
    p.set_defaults(
        func=cmd_capture,
        on_interrupt=": the chunks captured so far are kept; run the same command again to resume",
    )
    p = sub.add_parser("merge", help="merge shard files (from capture --shard) into the cache")
    p.add_argument("shards", nargs="+", help="shard DuckDB files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser(  # "prepare" is its old name, kept so that older Makefiles and notes still work
        "setup-model", aliases=["prepare"], help="convert the embedded default model once (idempotent)"
    )
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("runs", help="list cached runs")
    p.set_defaults(func=cmd_runs)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text}")
    return value


def cmd_capture(args) -> int:
    from tqdm import tqdm

    prompt_set = prompts.load_prompt_file(args.prompts) if args.prompts else prompts.default_prompt_set()
    if args.limit:
        prompt_set = prompt_set.head(args.limit)
    for warning in prompt_set.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.backend == "ray":
        return _capture_ray(args, prompt_set)
    shard = _shard(args.shard) if args.shard else None
    lm = models.load_model(args.model, device=args.device)
    store = Store(args.db)
    config = _config(args)
    bar = tqdm(total=len(prompt_set), unit="prompt", desc="capture", disable=args.quiet)

    def progress(done: int, total: int, message: str) -> None:
        bar.total = total
        if message == "resuming":  # the first report: prompts of earlier sessions fill the bar at
            bar.initial = bar.n = bar.last_print_n = done  # once but do not count in the rate
            bar.refresh()
        else:
            bar.update(done - bar.n)

    try:
        result = capture.capture(lm, prompt_set, store, config, progress=progress, shard=shard)
    finally:
        bar.close()
        store.close()  # the file can then be opened by another process (the app) at once
    if shard:
        print(f"shard {args.shard} of run {result.run_id}: {result.n_tokens:,} tokens in {store.path}")
        print("merge all shards with `python -m core merge SHARD_FILE...`")
        return 0
    for warning in result.warnings[:10]:
        print(f"warning: {warning}", file=sys.stderr)
    if result.cache_hit:
        print(f"run {result.run_id}: cache hit ({result.n_tokens:,} tokens, nothing computed)")
    else:
        # The rate is this session's tokens over this session's time: a resumed run's earlier
        # chunks were captured in another session.
        done = f"run {result.run_id}: "
        if result.resumed:
            done += f"resumed and finished {len(prompt_set)} prompts, {result.n_tokens:,} tokens in all; "
            done += f"this session captured {result.new_tokens:,}"
        else:
            done += f"captured {len(prompt_set)} prompts, {result.n_tokens:,} tokens"
        print(f"{done} in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)")
    print(f"cache: {store.path} ({store.size_bytes() / 2**20:.1f} MiB)")
    rate = sample.sample_rate(config.sample_bytes, result.n_tokens, lm.info.n_layers, lm.info.d_ff)
    if rate < 1.0:  # a partial token sample: say what was kept, and where the counts and means are
        folder = store.arrays_folder(result.run_id)
        size = sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0
        counted = sample.count_rate(config.count_tokens, result.n_tokens, rate)
        print(f"firing bits kept for {rate:.2%} of the tokens (--sample-mib {args.sample_mib}); "
              f"co-activation counts over {counted:.2%} of them (--count-tokens {args.count_tokens}) and "
              f"each prompt's mean |a|: {folder} ({size / 2**20:.1f} MiB; keep it beside the cache)"
              )  # fmt: skip
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise BricklabError(
            f"--shard '{text}' is not I/N.", "Write e.g. --shard 0/4 for the first of four."
        ) from exc
    if not 0 <= i < n:
        raise BricklabError(f"--shard {text}: I must be in 0..N-1.", "Number shards from 0.")
    return i, n


def _config(args) -> capture.CaptureConfig:
    return capture.CaptureConfig(
        batch_size=args.batch_size, sample_bytes=args.sample_mib << 20, count_tokens=args.count_tokens
    )


def _capture_ray(args, prompt_set) -> int:
    store = Store(args.db)
    try:
        with _shard_bar(args.shards, "ray", args.quiet) as progress:
            run_id = shards.capture_ray(
                args.model, prompt_set, store, _config(args), args.shards, args.address, args.device, progress
            )
        run = store.require_run(run_id)
        print(f"run {run_id}: captured in {args.shards} Ray shards and merged ({run.n_tokens:,} tokens)")
    finally:
        store.close()
    return 0


@contextlib.contextmanager
def _shard_bar(total: int, desc: str, quiet: bool):
    """A progress bar of shards on stderr, and the Progress callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="shard", desc=desc, disable=quiet)

    def progress(done: int, total: int, message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()


def cmd_merge(args) -> int:
    store = Store(args.db)
    try:
        with _shard_bar(len(args.shards), "merge", args.quiet) as progress:
            merged, missing = shards.merge(store, args.shards, progress)
    finally:
        store.close()
    for run_id in merged:
        state = "still misses chunks: merge its other shards" if run_id in missing else "complete"
        print(f"run {run_id}: {state}")
    return 0


def cmd_runs(args) -> int:
    store = Store(args.db)
    try:
        runs = store.runs()
    finally:
        store.close()
    if store.read_only:
        print(
            f"note: {store.path} is read-only: listing and viewing work, nothing can be written",
            file=sys.stderr,
        )
    if not runs:
        print("no runs yet: `python -m core capture` captures the default prompt set")
        return 0
    print(f"{'run':12}  {'status':10}  {'model':24}  {'prompts':>7}  {'tokens':>8}  {'seconds':>7}  created")
    for r in runs:
        tokens = f"{r.n_tokens:,}" if r.n_tokens else "-"
        secs = f"{r.seconds:.1f}" if r.seconds else "-"
        print(
            f"{r.run_id:12}  {r.status:10}  {r.model_id[:24]:24}  {r.n_prompts:>7}  {tokens:>8}  {secs:>7}  "
            f"{r.created:%Y-%m-%d %H:%M}"
        )
    return 0


def cmd_prepare(args) -> int:
    started = time.perf_counter()
    path = models.prepare_default_model()
    print(f"default model ready at {path} ({time.perf_counter() - started:.1f} s)")
    return 0
