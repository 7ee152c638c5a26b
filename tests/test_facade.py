"""The library facade in core/__init__.py: cheap to import, its names resolve, capture takes plain
strings, and README's "Use from Python" example runs verbatim from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import core
from core.errors import BricklabError
from tests.conftest import ROOT


def test_import_core_loads_neither_torch_nor_duckdb():
    code = (
        "import core, sys; print(sorted(m for m in ('torch', 'duckdb', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_facade_name_resolves_and_an_unknown_one_is_an_attribute_error():
    for name in core.__all__:
        assert getattr(core, name) is not None, name
    assert set(core.__all__) <= set(dir(core))
    with pytest.raises(AttributeError, match="no attribute 'capture_runs'"):
        core.capture_runs  # noqa: B018


def test_capture_run_takes_plain_strings_and_a_repeat_is_a_cache_hit(tiny_lm, store):
    run = core.capture_run(tiny_lm, ["Hello there.", "2 + 2 = 4"], store, chunk_prompts=1)
    assert (run.n_prompts, run.complete, run.categories) == (2, True, [])
    assert [row[3] for row in store.prompts(run.run_id)] == ["Hello there.", "2 + 2 = 4"]
    assert core.capture_run(tiny_lm, ("Hello there.", "2 + 2 = 4"), store).run_id == run.run_id
    with pytest.raises(BricklabError, match="not a list"):
        core.capture_run(tiny_lm, "Hello there.", store)


def test_bricks_configuration_generation_and_json_round_trip(tiny_lm, small_run, tmp_path):
    path, run_id = small_run
    store = core.Store(path)
    bricks = core.compute_bricks(store, run_id, stability=False)
    config = core.config_from_bricks(store.require_run(run_id), {bricks[0]: "off"})
    assert core.generate(tiny_lm, "Hi", max_new_tokens=3) == core.generate(tiny_lm, "Hi", None, 3)
    core.generate(tiny_lm, "Hi", config, max_new_tokens=3)
    with pytest.raises(BricklabError, match="max_new_tokens"):
        core.generate(tiny_lm, "Hi", config, max_new_tokens=0)
    saved = core.save_config(config, tmp_path / "config.json")
    assert core.load_config(saved, tiny_lm) == config
    assert json.loads(saved.read_text())["bricks"][0]["name"] == bricks[0].brick_id
    store.close()


def readme_example() -> str:
    """The first python block under README's "Use from Python" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Use from Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_from_outside_the_checkout(tmp_path, default_dir):
    (tmp_path / "example.py").write_text(readme_example())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BRICKLAB_DB")}
    proc = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "switching off coact-L" in proc.stdout and "configured:" in proc.stdout
    doc = json.loads((tmp_path / "one-brick-off.json").read_text())
    assert doc["bricks"][0]["mode"] == "off" and (tmp_path / "demo.duckdb").exists()
