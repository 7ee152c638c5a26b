"""Cache faults on the command line: one short message with the advice and exit code 2, never a
traceback; `doctor` checks a damaged file and copies its readable runs into a fresh one."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import cli
from tests.store.test_doctor import with_damaged_result
from tests.store.test_faults import DAMAGES, can_unshare, damaged_copy, read_only_connect

ROOT = Path(__file__).resolve().parents[2]


def python_m_core(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("how", DAMAGES)
def test_runs_and_bricks_on_a_damaged_cache_name_the_doctor(small_run, tmp_path, capsys, how):
    db = str(damaged_copy(small_run[0], tmp_path, how))
    listed = cli.main(["runs", "--db", db])
    out, err = capsys.readouterr()
    if how == "block":  # the run list still reads back; the run is shown damaged, not complete
        assert listed == 0 and "damaged" in out and "complete" not in out
    else:
        assert listed == 2 and err.startswith("error: The cache") and "python -m core doctor" in err
    assert cli.main(["bricks", "--db", db]) == 2
    assert "python -m core doctor" in capsys.readouterr().err


@pytest.mark.parametrize(("how", "command"), [("header", "runs"), ("block", "bricks")])
def test_no_traceback_from_a_subprocess(small_run, tmp_path, how, command):
    done = python_m_core(command, "--db", str(damaged_copy(small_run[0], tmp_path, how)))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "python -m core doctor" in done.stderr


def test_doctor_copies_the_readable_run_into_a_fresh_file(small_run, tmp_path, capsys):
    path, run_id = with_damaged_result(small_run[0], tmp_path)
    assert cli.main(["doctor", "--db", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"run {run_id} (complete): readable; 0 results readable, 1 not" in out
    fresh = path.with_suffix(".recovered.duckdb")
    assert f"copied 1 readable run(s) and their readable results into {fresh}" in out
    assert cli.main(["runs", "--db", str(fresh)]) == 0
    assert f"{run_id}  complete" in capsys.readouterr().out


def test_doctor_on_a_healthy_and_an_unreadable_file(small_run, tmp_path, capsys):
    healthy = shutil.copy(small_run[0], tmp_path / "healthy.duckdb")  # other tests may hold the original
    assert cli.main(["doctor", "--db", str(healthy)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(["doctor", "--db", str(damaged_copy(small_run[0], tmp_path, "header"))]) == 1
    assert "nothing can be read: Corrupt database file" in capsys.readouterr().out


def test_a_read_only_cache_lists_and_refuses_writes(small_run, tmp_path, capsys, monkeypatch):
    db = tmp_path / "ro.duckdb"
    shutil.copy(small_run[0], db)
    read_only_connect(monkeypatch)
    assert cli.main(["runs", "--db", str(db)]) == 0
    out, err = capsys.readouterr()
    assert f"{small_run[1]}  complete" in out and "read-only" in err
    assert cli.main(["bricks", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert "is read-only" in err and "--db" in err


@pytest.mark.skipif(not can_unshare(), reason="no user namespaces to mount a read-only tmpfs without root")
def test_a_read_only_file_system_lists_runs(small_run, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (
        f"mount -t tmpfs tmpfs {mount} && cp {small_run[0]} {mount}/c.duckdb && mount -o remount,ro {mount} "
        f"&& {sys.executable} -m core runs --db {mount}/c.duckdb"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert f"{small_run[1]}  complete" in done.stdout and "read-only" in done.stderr
