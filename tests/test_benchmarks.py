"""Every script in benchmarks/ runs in its smoke mode (a tiny random model or the smallest inputs, seconds)
and still prints its JSON object as the last line, so no benchmark rots unseen. The scripts run as
subprocesses against the installed package (no PYTHONPATH), two at a time: this machine has two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
SMOKE = {  # script -> (arguments, keys its last line must hold); slowest first
    "shard_check.py": (["--smoke"], {"merged_equals_single", "single_s", "sharded_s", "merge_s"}),
    "first_use.py": (["--smoke"], {"steps_s", "total_s", "all_ready", "load_avg_before", "within_target"}),
    "capture_memory.py": (["--smoke"], {"peak_rss_mib", "ratio_4n_over_n", "bounded"}),
    "adapters.py": (["--smoke"], {"sha256", "recall_on", "loss_change_pct", "both_loss_change_pct"}),
    "routing.py": (["--smoke"], {"settings", "dense_tokens_per_s", "best_within_10pct"}),
    "sparse_decode.py": (
        ["--smoke", "--parts"],
        {"settings", "dense_tokens_per_s", "matches_hf", "loss", "parts"},
    ),
    "sparse_kernels.py": (["--smoke"], {"products", "cuda"}),
    "analysis.py": (
        ["--smoke"],
        {
            "analysis_cold_s",
            "analysis_counts",
            "resident_control_counts",
            "analysis_apart_ratio",
            "eval_ratio",
            "max_abs_loss_diff",
            "rules",
        },
    ),
    "app.py": (["--smoke"], {"neuron_detail_p95_ms", "regen_ratio", "generation_only_ratio"}),
    "map_page.py": (["--smoke"], {"page_warm_s", "page_warm_baseline_s", "figure_s", "figure_bytes"}),
    "bricks.py": (["--smoke"], {"pipeline_s", "bricks_coact_count", "bricks_functional_random_share"}),
    "explain.py": (["--smoke"], {"projection_s", "projection_speedup", "score_median", "control_median"}),
    "capture.py": (
        ["--smoke"],
        {"ratio", "cpu_ratio", "tokens_per_s", "n_padded_tokens", "cache_bytes_per_token"},
    ),
    "store.py": (["--smoke"], {"store_s", "fetchall_s", "long_table_s", "speedup_vs_fetchall"}),
    "gpu_capture.py": (
        ["--smoke", "--write-reps", "1", "--run-chunks", "2"],  # format-3 runs too
        {"ratio", "bare_s", "capture_s", "tokens_per_s", "with_cache_writes", "host"},
    ),
    "select_window.py": (["--smoke"], {"hit_rate", "worst_layer_hit_rate", "tokens"}),
    "finalise.py": (["--smoke"], {"finalise_s", "baseline_s", "speedup", "same_run"}),
    "counts_save.py": (["--smoke"], {"copied", "last", "same_files", "time_ratio_last_over_copied"}),
    "shard_merge.py": (["--smoke"], {"files", "same_counts", "counts_mib_a_shard"}),
    "interventions.py": (["--smoke"], {"ratio_empty", "ratio_config", "cpu_ratio_config"}),
    "coactivation.py": (["--smoke"], {"numba_s", "speedup_vs_blas", "speedup_vs_sparse"}),
}
GPU = {  # the paths only a CUDA device runs, at their smallest
    "coactivation.py": ["--device", "cuda", "--quick", "--tokens", "65536", "--neurons", "1024"],
    "gpu_capture.py": ["--device", "cuda", "--shape", "smollm2-135m", "--prompts", "4", "--seq", "64",
                       "--batch-size", "2", "--reps", "1", "--kernels"],
    "sparse_kernels.py": ["--quick", "--products", "o"],
    "sparse_decode.py": ["--device", "cuda", "--shape", "smollm2-135m", "--no-loss", "--tokens", "8",
                         "--reps", "1", "--calibrate", "8", "--parts"],
}  # fmt: skip
TIMEOUT = 600  # seconds per script: generous, the smoke runs take seconds to a minute on a busy machine


def run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BRICKLAB_DB")}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # two scripts share two cores
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def smoke_runs(default_dir) -> dict[str, subprocess.CompletedProcess]:
    """Every script's smoke run (default_dir: the tokenizer the tiny models borrow is prepared once)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {script: pool.submit(run, script, args) for script, (args, _) in SMOKE.items()}
        return {script: future.result() for script, future in futures.items()}


def last_json(proc: subprocess.CompletedProcess) -> dict:
    hint = (
        " (is the package installed? `pip install -e .`)" if "No module named 'core'" in proc.stderr else ""
    )
    assert proc.returncode == 0, f"exit {proc.returncode}{hint}:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output:\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_every_script_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SMOKE) | set(BROWSER)
    assert not [p.name for p in BENCHMARKS.glob("*.py") if "sys.path" in p.read_text()]


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_the_smoke_run_prints_its_json_line(smoke_runs, script):
    result = last_json(smoke_runs[script])
    assert SMOKE[script][1] <= set(result), sorted(SMOKE[script][1] - set(result))


def test_sharded_capture_still_equals_unsharded(smoke_runs):
    assert last_json(smoke_runs["shard_check.py"])["merged_equals_single"] is True


def test_the_finalise_step_reads_partials_in_groups_to_the_same_run(smoke_runs):
    assert last_json(smoke_runs["finalise.py"])["same_run"] is True


def test_the_whole_run_benchmark_captures_every_token_it_asks_for():
    """gpu_capture.py --whole-run (the end-to-end figure of issue 16) on the tiny shape: one whole
    capture through capture.capture into a new cache, against the bare passes of its chunks."""
    result = last_json(run("gpu_capture.py", ["--smoke", "--whole-run", "4096"]))
    assert result["whole_run_tokens"] == 4096 and result["chunks"] == 4
    assert result["capture_s"] > 0 and result["bare_s"] > 0 and result["db_bytes"] > 0
    assert result["ratio"] == pytest.approx(result["capture_s"] / result["bare_s"])


def test_first_use_makes_every_step_ready(smoke_runs):
    result = last_json(smoke_runs["first_use.py"])
    assert result["all_ready"] is True and result["steps_s"]["capture"] > 0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; the smoke runs cover the CPU paths"
)
@pytest.mark.parametrize("script", sorted(GPU))
def test_the_gpu_paths_print_their_json_line(script):
    assert last_json(run(script, GPU[script]))


BROWSER = {  # scripts that drive the headless Chromium of the end-to-end test: slow, and need it
    "map_browser.py": (
        ["--smoke"],
        {
            "warm_median_s",
            "first_s",
            "warm_server_s",
            "target_met",
            "webgl",
            "baseline_warm_median_s",
            "speedup",
        },
    ),
}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium (make browser)")
@pytest.mark.parametrize("script", sorted(BROWSER))
def test_the_browser_benchmarks_print_their_json_line(script):
    result = last_json(run(script, BROWSER[script][0]))
    assert BROWSER[script][1] <= set(result), sorted(BROWSER[script][1] - set(result))
