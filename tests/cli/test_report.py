"""`report`: the largest run by default (said on stderr), a clear note where a run is too small for a
section, only JSON with --json, and a clear refusal for a run without categories."""

import json
import re

import pytest

from core import cli
from core.store import Store


@pytest.fixture(scope="module")
def small(tiny_dir, tmp_path_factory) -> tuple[str, str]:
    """(path, id of the 8-prompt run) of a cache that also holds a newer 5-prompt run."""
    db = str(tmp_path_factory.mktemp("report") / "c.duckdb")
    for limit in ("8", "5"):
        assert cli.main(["capture", "--db", db, "--model", tiny_dir, "--limit", limit, "--quiet"]) == 0
    store = Store(db)
    run_id = next(r.run_id for r in store.runs() if r.n_prompts == 8)
    store.close()
    return db, run_id


@pytest.fixture(scope="module")
def text_report(small) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `report --quick --resident-control` with no --run on the cache of
    `small`."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["report", "--db", small[0], "--quick", "--resident-control", "--quiet"])
    return code, out.getvalue(), err.getvalue()


def test_the_default_is_the_largest_complete_run_and_stderr_says_so(small, text_report):
    code, out, err = text_report
    assert code == 0
    assert f"report: run {small[1]} (8 prompts" in err and "largest complete run" in err
    assert out.startswith(f"run {small[1]} ")


def test_an_8_prompt_run_gets_a_note_per_section_too_small_not_a_traceback(text_report):
    code, out, _ = text_report
    assert code == 0
    notes = re.findall(
        r"This run \(8 prompts\) is too small for this section: no held-out prompt for (.*?);", out
    )
    assert len(notes) == 3  # the two ablation matrices and recombination
    assert "math" in notes[0] and "coding" not in notes[0]  # coding's 2 prompts leave one held out
    assert "n/a" in out and "Overlap of the top-5% sets" in out


def test_json_is_all_of_stdout(small, text_report, capsys):
    assert cli.main(["--db", small[0], "report", "--run", small[1], "--quick", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.out.count("\n") == 1 and result["run_id"] == small[1]
    assert {"ablation_matrix", "sparsity", "functionality", "overlap", "recombination"} <= set(result)
    assert result["ablation_matrix"]["increase_pct"][0][1] is None  # math has no held-out prompt
    assert "report:" not in captured.err  # --run named: nothing to say about the choice


def test_a_run_without_categories_is_refused_before_any_model_loads(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("One line.\nAnother line.\nA third.\n")
    db = str(tmp_path / "c.duckdb")
    assert cli.main(["capture", "--db", db, "--model", tiny_dir, "--prompts", str(prompts), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["report", "--db", db, "--model", str(tmp_path / "no-model")]) == 2
    assert "The report compares prompt categories" in capsys.readouterr().err


def test_text_shows_selectivity_its_explanation_and_the_verdicts(text_report):
    _, out, _ = text_report
    assert out.count("Selectivity is a category's own perplexity increase") == 2  # both matrices
    assert out.count("\nselectivity ") == 2 and "selection rule ap:" in out
    verdicts = out[out.index("\nVerdicts") :]
    assert "recombination:" in verdicts and "on this run" in verdicts


def test_json_carries_the_rule_and_selectivity_per_category(small, capsys):
    args = [
        "report",
        "--db",
        small[0],
        "--run",
        small[1],
        "--quick",
        "--quiet",
        "--json",
        "--rule",
        "per_layer",
    ]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rule"] == result["ablation_matrix"]["rule"] == "per_layer"
    assert list(result["selectivity"]) == result["ablation_matrix"]["categories"]
    assert result["config"]["rule"] == "per_layer"
    assert result["ablation_matrix_no_resident"] is None  # computed only with --resident-control


def test_without_resident_control_the_text_says_how_to_get_that_matrix(small, capsys):
    assert (
        cli.main(
            ["report", "--db", small[0], "--run", small[1], "--quick", "--quiet", "--rule", "contrastive"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Ablation matrix without resident neurons: not computed (add --resident-control)" in out
    assert out.count("Selectivity is a category's own perplexity increase") == 1 and "\nVerdicts" in out
