"""`prepare-run`: every step once with its time, then a second call that finds them all cached."""

import re

from core import cli


def test_prepare_run_then_everything_is_cached(tiny_dir, tmp_path, capsys):
    db = str(tmp_path / "p.duckdb")
    argv = ["--db", db, "prepare-run", "--model", tiny_dir, "--device", "cpu", "--limit", "14", "--quick"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    run_id = re.search(r"run (\w+): ready in .* \(14 prompts\)", first.out).group(1)
    assert re.search(r"capture: done in [\d.]+ s", first.err) and "neuron map: done in" in first.err
    assert "paper analysis: done in" in first.err
    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert f"run {run_id}: ready" in second.out
    assert "done" not in second.err and second.err.count(": cached") >= 5
