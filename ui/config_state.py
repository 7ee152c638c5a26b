"""The session's brick configuration: which bricks are changed and how, kept in st.session_state.

It holds core.configuration.Brick objects keyed by name, for the model of the run they came from;
switching to a run of another model starts an empty configuration.
"""

from __future__ import annotations

import streamlit as st

from core import configuration
from core.bricks import candidates as core_bricks
from core.bricks import configure
from core.bricks import ops as brick_ops
from core.configuration import BrickConfig
from core.store import Run

KEY = "config_bricks"  # name -> configuration.Brick
OWNER = "config_fingerprint"  # the model fingerprint the configuration belongs to
HISTORY = "config_history"  # core.bricks.ops.OpLog: the brick operations on the configuration
ADAPTERS = "config_adapters"  # name -> configuration.AdapterRef (adapter bricks, core.live.adapters)
ADAPTERS_OWNER = "config_adapters_fingerprint"


def _mine(run: Run) -> dict[str, configuration.Brick]:
    if st.session_state.get(OWNER) != run.fingerprint:
        st.session_state[OWNER] = run.fingerprint
        st.session_state[KEY] = {}
        st.session_state[HISTORY] = brick_ops.OpLog()
    return st.session_state[KEY]


def chosen(run: Run) -> dict[str, configuration.Brick]:
    return dict(_mine(run))


def set_brick(run: Run, brick: core_bricks.Candidate, mode: str, factor: float = 1.0) -> None:
    """Put a computed brick in the configuration with a mode (off, mean, scale, keep)."""
    _mine(run)[brick.brick_id] = core_bricks.brick_to_config(brick, run.n_layers, run.d_ff, mode, factor)


def remove(run: Run, name: str) -> None:
    _mine(run).pop(name, None)


def set_mode(run: Run, name: str, mode: str, factor: float = 1.0) -> None:
    """Change the mode of a brick already in the configuration."""
    bricks = _mine(run)
    old = bricks[name]
    bricks[name] = configuration.Brick(
        old.name, old.neurons, mode, factor if mode == "scale" else 1.0, old.label
    )


def clear(run: Run) -> None:
    _mine(run).clear()


def replace_with(run: Run, config: BrickConfig) -> None:
    """Adopt an uploaded configuration (already validated against the run's model)."""
    _mine(run).clear()
    _mine(run).update({b.name: b for b in config.bricks})
    st.session_state[HISTORY] = brick_ops.OpLog.of_records(config.operations)
    adapters(run).clear()
    adapters(run).update({a.name: a for a in config.adapters})


def history(run: Run) -> brick_ops.OpLog:
    _mine(run)
    return st.session_state.setdefault(HISTORY, brick_ops.OpLog())


def adopt(run: Run, bricks: dict[str, configuration.Brick], log: brick_ops.OpLog) -> None:
    """Take the bricks and the history that a brick operation (or its undo) left."""
    _mine(run).clear()
    _mine(run).update(bricks)
    st.session_state[HISTORY] = log


def build(run: Run, note: str | None = None) -> BrickConfig:
    """The session's configuration as a BrickConfig for the run's model."""
    return configure.config_from_bricks(
        run, _mine(run).values(), note, history(run).records(), adapters(run).values()
    )


def adapters(run: Run) -> dict[str, configuration.AdapterRef]:
    """The session's adapter bricks (for the run's model), by name."""
    if st.session_state.get(ADAPTERS_OWNER) != run.fingerprint:
        st.session_state[ADAPTERS_OWNER] = run.fingerprint
        st.session_state[ADAPTERS] = {}
    return st.session_state[ADAPTERS]


def set_adapter(run: Run, ref: configuration.AdapterRef) -> None:
    """Add an adapter brick to the configuration, or change its mode (on, off, scale)."""
    adapters(run)[ref.name] = ref


def remove_adapter(run: Run, name: str) -> None:
    adapters(run).pop(name, None)
