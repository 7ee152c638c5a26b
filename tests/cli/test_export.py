"""`apply` and `prune` on configuration files for the tiny model."""

from core import cli
from core.configuration import Brick
from tests.test_export import make


def test_apply_prints_both_generations(tiny_lm, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(make(tiny_lm, Brick("a", {0: list(range(90)), 1: list(range(90))}, "off")).to_json())
    assert cli.main(["apply", str(path), "--prompt", "Hello there", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "baseline:" in out and "configured:" in out and "first divergent token" in out
    assert "active FFN neurons: 6.2%" in out and "KL(baseline || configured)" in out


def test_apply_refuses_too_many_tokens(tiny_lm, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(make(tiny_lm).to_json())
    assert cli.main(["apply", str(path), "--prompt", "Hi", "--max-new-tokens", "100000"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_prune_prints_what_it_saved(tiny_lm, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(make(tiny_lm, Brick("k", {0: list(range(48)), 1: list(range(48))}, "keep")).to_json())
    assert cli.main(["prune", str(path), str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    saved = 48 * 3 * 64 * 2
    assert f"saved {saved:,}" in out and "FFN width 96 -> 48" in out
