"""A damaged cache in the app: a short error with the doctor's advice, never a traceback box."""

import pytest

from tests.conftest import app
from tests.store.test_faults import damaged_copy


@pytest.mark.parametrize("page", ["app.py", "2_Neuron_map.py"])
@pytest.mark.parametrize("how", ["header", "block"])
def test_a_damaged_cache_shows_advice_not_a_traceback(small_run, tiny_dir, tmp_path, monkeypatch, page, how):
    monkeypatch.setenv("BRICKLAB_DB", str(damaged_copy(small_run[0], tmp_path, how)))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    at = app(page).run()
    assert not at.exception
    if how == "header":  # the file does not open: every page says so and stops
        assert "python -m core doctor" in at.error[0].value
    else:  # the run list reads back; its damaged run is not offered as complete
        assert all(box.value != small_run[1] for box in at.selectbox)
