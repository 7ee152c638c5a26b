"""`capture` and `runs`: capture with --limit, the cache hit, the listing, clear error exits."""

import json
import re

import pytest

from core import cli


def test_capture_then_cache_hit_then_runs(tiny_dir, tmp_path, capsys):
    db = str(tmp_path / "c.duckdb")
    argv = ["--db", db, "capture", "--model", tiny_dir, "--limit", "7", "--quiet"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    match = re.search(r"run (\w+): captured 7 prompts, ([\d,]+) tokens", first)
    assert match, first
    assert cli.main(argv) == 0
    assert f"run {match.group(1)}: cache hit ({match.group(2)} tokens" in capsys.readouterr().out
    assert cli.main(["--db", db, "runs"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"{match.group(1)}\s+complete\s+\S+\s+7\s+{match.group(2)}", listing), listing


def test_a_partial_token_sample_says_what_it_kept(tiny_dir, tmp_path, capsys):
    """--sample-mib 0 keeps no token's bits: the run keeps co-activation counts beside the cache, over a
    hashed share of its tokens with --count-tokens."""
    db = str(tmp_path / "c.duckdb")
    argv = ["--db", db, "capture", "--model", tiny_dir, "--limit", "5", "--quiet", "--sample-mib", "0"]
    assert cli.main([*argv, "--count-tokens", "40"]) == 0
    out = capsys.readouterr().out
    n_tokens = int(re.search(r"captured 5 prompts, ([\d,]+) tokens", out).group(1).replace(",", ""))
    share = re.search(r"counts over ([\d.]+)% of them \(--count-tokens 40\)", out)
    assert share and float(share.group(1)) == pytest.approx(100 * 40 / n_tokens, abs=0.01), out
    match = re.search(r"firing bits kept for 0.00% of the tokens .* mean \|a\|: (\S+) \(([\d.]+) MiB", out)
    assert match and match.group(1).endswith(".arrays/" + re.search(r"run (\w+):", out).group(1)), out
    assert float(match.group(2)) > 0


def test_global_options_after_the_command_reach_the_same_cache(tiny_dir, tmp_path, capsys):
    db = str(tmp_path / "c.duckdb")
    assert (
        cli.main(["capture", "--db", db, "--model", tiny_dir, "--device", "cpu", "--limit", "8", "--quiet"])
        == 0
    )
    run_id = re.search(r"run (\w+): captured 8 prompts", capsys.readouterr().out).group(1)
    assert cli.main(["runs", "--db", db]) == 0
    assert run_id in capsys.readouterr().out


def test_a_cut_5_mb_line_warns_once(tiny_dir, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "text": "word " * 1_000_000}) + "\n")
    db = str(tmp_path / "c.duckdb")
    assert cli.main(["--db", db, "capture", "--model", tiny_dir, "--prompts", str(path), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("Line 1: cut to 20,000 characters.") == 1, err
    assert err.count("Prompt 'long' is longer than 256 tokens") == 1, err


def test_a_resumed_capture_reports_this_sessions_tokens_per_second(tiny_dir, tmp_path, capsys):
    argv = ["--db", str(tmp_path / "c.duckdb"), "capture", "--model", tiny_dir, "--limit", "70", "--quiet"]
    assert cli.main([*argv, "--shard", "0/2"]) == 0  # the first chunk of 64 prompts, left incomplete
    first = int(re.search(r"([\d,]+) tokens", capsys.readouterr().out).group(1).replace(",", ""))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    found = re.search(r"resumed and finished 70 prompts, ([\d,]+) tokens in all; this session captured "
                      r"([\d,]+) in ([\d.]+) s \(([\d,]+) tokens/s\)", out)  # fmt: skip
    assert found, out
    total, mine, seconds, rate = (float(g.replace(",", "")) for g in found.groups())
    assert mine == total - first and 0 < mine < total
    assert mine / (seconds + 0.05) - 1 <= rate <= mine / max(seconds - 0.05, 1e-9) + 1  # rounded as printed


def test_runs_on_an_empty_cache(tmp_path, capsys):
    assert cli.main(["--db", str(tmp_path / "c.duckdb"), "runs"]) == 0
    assert "no runs yet" in capsys.readouterr().out


def test_a_missing_prompt_file_is_a_clear_error_that_creates_nothing(tiny_dir, tmp_path, capsys):
    db = tmp_path / "c.duckdb"
    argv = ["--db", str(db), "capture", "--model", tiny_dir, "--prompts", str(tmp_path / "nope.jsonl")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The prompt file") and "does not exist" in err
    assert not db.exists()


def test_a_bad_model_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["--db", str(tmp_path / "c.duckdb"), "capture", "--model", str(tmp_path / "none")]) == 2
    assert "error: The model folder" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_limit_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["capture", "--limit", value])
    assert done.value.code == 2 and "--limit" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0/0", "2/2", "x"])
def test_a_bad_shard_is_a_clear_error(tiny_dir, tmp_path, value, capsys):
    argv = ["capture", "--db", str(tmp_path / "c.duckdb"), "--model", tiny_dir, "--shard", value]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --shard {value}" if "/" in value else "error: --shard 'x'"
    )


def test_shards_captured_and_merged_from_the_command_line(tiny_dir, tmp_path, capsys):
    """Two shards of a partial-sample run (70 prompts: chunks of 64 and 6, one a shard), merged by
    `merge` with its bar on stderr (a shard a step, then the finalising) into a run listed complete."""
    common = ["capture", "--model", tiny_dir, "--limit", "70", "--quiet", "--sample-mib", "0"]
    paths = [str(tmp_path / f"s{i}.duckdb") for i in range(2)]
    for i, path in enumerate(paths):
        assert cli.main(["--db", path, *common, "--shard", f"{i}/2"]) == 0
        assert re.search(r"shard \d/2 of run \w+: [1-9][\d,]* tokens", capsys.readouterr().out)
    db = str(tmp_path / "merged.duckdb")
    assert cli.main(["--db", db, "merge", *paths]) == 0
    out, err = capsys.readouterr()
    run_id = re.search(r"run (\w+): complete", out).group(1)
    assert re.search(r"merge: 100%.*2/2.*finalising", err), err
    assert cli.main(["--db", db, "runs"]) == 0
    assert re.search(rf"{run_id}\s+complete\s+\S+\s+70\s", capsys.readouterr().out)


def test_ctrl_c_says_what_is_kept_and_the_same_command_resumes(tiny_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the second chunk: exit status 130 and one line (no traceback) saying that the chunks
    captured are kept; the same command then captures only the rest."""
    from core.capture import run as capture

    real, calls = capture._run_chunk, []

    def interrupted_second(*args, **kwargs):
        calls.append(args[2])  # the chunk's first prompt
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(capture, "_run_chunk", interrupted_second)
    db = str(tmp_path / "c.duckdb")
    argv = ["--db", db, "capture", "--model", tiny_dir, "--limit", "150", "--quiet"]  # 3 chunks
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    said = "interrupted: the chunks captured so far are kept; run the same command again to resume"
    assert err.splitlines()[-1] == said and "Traceback" not in err, err
    assert cli.main(argv) == 0
    assert calls[2] == calls[1]  # the rerun starts at the interrupted chunk, not at the first
    assert re.search(r"resumed and finished 150 prompts", capsys.readouterr().out)
