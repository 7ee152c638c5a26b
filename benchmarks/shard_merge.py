"""Merging the shards of a run with co-activation counts (a partial token sample, issue #16): the one
serial step of a sharded capture, and its host memory. The counts are the width's (layers x d_ff^2,
26 GB a shard for an 8B shape), so a merge that reads every shard's counts into memory, or holds every
sum at once, needs tens of GB for a large model.

Captures `--shards` shards of a random-weight Llama (`--layers` x `--d-ff`, the default tokenizer,
the first `--prompts` default prompts) into files, then merges them into a fresh cache in a process of
its own each way, reporting seconds and the peak RSS that the merge added (VmHWM after it less
before; file pages mapped for reading count while mapped), and apart (sampled every 5 ms) its private
memory's peak (RssAnon) and the shared memory's (RssShmem: pages of Ray's object store it reads):
  files    `merge` on this machine: each shard's arrays read from their files as each sum is written
  baseline (with --baseline-tree DIR) `merge` of another checkout, e.g. the commit before this one
  ray-files, ray-shipped (with --ray) `capture --backend ray` on a local Ray runtime: the shards
           captured again by Ray's workers and merged from files beside the cache, or sent in pieces
           through the object store (`capture_ray(ship=True)`, as from other machines); the driver's peaks
Each way must give the same counts (their sha256). Prints the figures and, last, one JSON object.
Run: python benchmarks/shard_merge.py [--layers 4 --d-ff 4096 --shards 2] [--baseline-tree DIR] [--ray]
    [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = """
import hashlib, json, sys, threading, time
import numpy as np
def status(*keys):  # MiB
    lines = {l.split(":")[0]: l for l in open("/proc/self/status")}
    return [int(lines[k].split()[1]) / 1024 for k in keys]
highs = {"RssAnon": 0.0, "RssShmem": 0.0}
def sample():  # VmHWM has no private and shared parts: sample them
    while True:
        for key, value in zip(highs, status(*highs)):
            highs[key] = max(highs[key], value)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
def start():  # VmHWM starts again at exec, where ru_maxrss keeps the parent's peak at the fork
    return status("VmHWM", "RssAnon") + [time.perf_counter()]
def report(begun, store, run_id):
    (peak, anon, t0), seconds = begun, time.perf_counter() - begun[2]
    out = {"merge_s": seconds, "added_peak_mib": status("VmHWM")[0] - peak,
           "added_peak_private_mib": highs["RssAnon"] - anon, "peak_shared_mib": highs["RssShmem"]}
    digest = hashlib.sha256()
    for (name, layer), file in sorted(store.array_files(run_id).items()):
        digest.update(name.encode() + np.ascontiguousarray(store.read_array(run_id, name, layer)).tobytes())
    print(json.dumps(out | {"sha256": digest.hexdigest()}))
"""

MERGE = (
    MEASURE
    + """
from core.capture import shards
from core.store import Store
out, paths, how = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
store = Store(out)
begun = start()
run_ids, _ = shards.merge(store, paths)
report(begun, store, run_ids[0])
store.close()
"""
)

RAY = (
    MEASURE
    + """
import ray
from core import prompts, settings
from core.capture import run as capture, shards
from core.store import Store
out, model, n_prompts, n_shards, n_bytes, how = sys.argv[1:]
config = capture.CaptureConfig(chunk_prompts=4, sample_bytes=int(n_bytes))
store = Store(out)
env = {"env_vars": {"PYTHONPATH": str(settings.ROOT)}}  # as capture_ray would start it
ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env)
begun = start()
run_id = shards.capture_ray(model, prompts.default_prompt_set().head(int(n_prompts)), store, config,
                            n_shards=int(n_shards), device="cpu", ship=how == "ray-shipped")
report(begun, store, run_id)
store.close()
ray.shutdown()
"""
)


def random_lm(n_layers: int, d_ff: int):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core import models

    torch.manual_seed(0)
    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=d_ff, num_hidden_layers=n_layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    net = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    tokenizer = AutoTokenizer.from_pretrained(models.prepare_default_model())
    return models.LoadedModel(net, tokenizer, models.describe(net, "random-merge"))


def sample_bytes(n_layers: int, d_ff: int) -> int:
    """A sample of a few prompts' tokens: the rest counted, so the run keeps its counts."""
    return n_layers * d_ff // 4


def capture_shards(folder: Path, n_layers: int, d_ff: int, n_prompts: int, n_shards: int) -> list[Path]:
    from core import prompts
    from core.capture import run as capture
    from core.store import Store

    lm = random_lm(n_layers, d_ff)
    lm.model.save_pretrained(folder / "model", safe_serialization=True)  # for Ray's workers
    lm.tokenizer.save_pretrained(folder / "model")
    prompt_set = prompts.default_prompt_set().head(n_prompts)
    config = capture.CaptureConfig(chunk_prompts=4, sample_bytes=sample_bytes(n_layers, d_ff))
    paths = []
    for i in range(n_shards):
        paths.append(folder / f"shard{i}.duckdb")
        store = Store(paths[-1])
        try:
            capture.capture(lm, prompt_set, store, config, shard=(i, n_shards))
        finally:
            store.close()
    return paths


def merged(folder: Path, how: str, inputs: list[str], tree: str) -> dict:
    """One way's merge in a process of its own: MERGE of the shard files `inputs`, or RAY (`ray-*`)
    capturing and merging the shards again with the arguments `inputs`."""
    out = folder / f"merged-{how}.duckdb"
    # `python -c` imports core from its working folder first: the other checkout's, or this one's
    root = tree if how == "baseline" else str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root)
    script = RAY if how.startswith("ray") else MERGE
    argv = [sys.executable, "-c", script, str(out), *inputs, how]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=root, check=False)
    if done.returncode:
        raise SystemExit(f"the {how} merge failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=4096)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--baseline-tree", help="also merge with the code of this checkout (its root folder)")
    p.add_argument("--ray", action="store_true", help="also capture and merge the shards through Ray")
    p.add_argument("--smoke", action="store_true", help="2 layers of 128 neurons")
    args = p.parse_args()
    n_layers, d_ff = (2, 128) if args.smoke else (args.layers, args.d_ff)
    ways = ("files", *(("baseline",) if args.baseline_tree else ()))
    ways += ("ray-files", "ray-shipped") if args.ray else ()
    result = {"layers": n_layers, "d_ff": d_ff, "shards": args.shards}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = capture_shards(Path(tmp), n_layers, d_ff, args.prompts, args.shards)
        result["capture_s"] = time.perf_counter() - t0
        result["counts_mib_a_shard"] = sum(
            f.stat().st_size for f in Path(tmp).glob("shard0.duckdb.arrays/*/coact_*")
        ) / 2**20  # fmt: skip
        ray_args = [
            str(Path(tmp) / "model"),
            str(args.prompts),
            str(args.shards),
            str(sample_bytes(n_layers, d_ff)),
        ]
        for how in ways:
            inputs = ray_args if how.startswith("ray") else list(map(str, paths))
            result[how] = merged(Path(tmp), how, inputs, args.baseline_tree or "")
            got = result[how]
            print(
                f"{how:>8}: {got['merge_s']:.2f} s, +{got['added_peak_mib']:.0f} MiB at the peak (private "
                f"+{got['added_peak_private_mib']:.0f}, shared {got['peak_shared_mib']:.0f})",
                flush=True,
            )
    result["same_counts"] = len({result[how]["sha256"] for how in ways}) == 1
    print(json.dumps(result))


if __name__ == "__main__":
    main()
