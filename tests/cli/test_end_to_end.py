"""The command line alone, start to finish: capture -> bricks --json -> config -> apply -> prune."""

import json

from transformers import AutoModelForCausalLM

from core import cli


def test_capture_bricks_config_apply_prune(tiny_dir, tmp_path, capsys):
    db = str(tmp_path / "c.duckdb")
    assert cli.main(["capture", "--db", db, "--model", tiny_dir, "--limit", "14", "--quiet"]) == 0
    assert "captured 14 prompts" in capsys.readouterr().out

    assert cli.main(["bricks", "--db", db, "--method", "coact", "--json"]) == 0
    bricks = json.loads(capsys.readouterr().out)["bricks"]
    first, second = bricks[0]["id"], bricks[-1]["id"]
    assert (first, second) == ("coact-L00-00", "coact-L01-02")

    off = str(tmp_path / "off.json")
    argv = ["config", "--db", db, "--brick", first, "--mode", "off", "--brick", second, "--mode", "scale"]
    assert cli.main([*argv, "--factor", "0.5", "-o", off]) == 0
    assert "2 bricks (off 1, scale 1), 64 neurons" in capsys.readouterr().out
    assert cli.main(["apply", off, "--prompt", "Hello there", "--max-new-tokens", "3"]) == 0
    assert "active FFN neurons: 83.3% (32 of 192 not computed)" in capsys.readouterr().out

    keep = str(tmp_path / "keep.json")
    assert cli.main(["--db", db, "config", "--keep", first, "--keep", bricks[3]["id"], "-o", keep]) == 0
    capsys.readouterr()
    assert cli.main(["prune", keep, str(tmp_path / "pruned")]) == 0
    assert "FFN width 96 -> 32" in capsys.readouterr().out
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.intermediate_size == 32
