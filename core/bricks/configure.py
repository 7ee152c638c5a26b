"""From chosen bricks to a brick configuration for a run's model: the one step that the app's session
configuration, the CLI and the library facade share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from core.bricks.candidates import Candidate, brick_to_config
from core.configuration import AdapterRef, Brick, BrickConfig
from core.errors import BricklabError


def config_from_bricks(
    run,
    chosen: Mapping | Iterable,
    note: str | None = None,
    operations: list | None = None,
    adapters: Iterable[AdapterRef] = (),
) -> BrickConfig:
    """A configuration for the model of `run` (a core.store.Run) holding the `chosen` bricks, in order.

    chosen: {candidate: mode} or {candidate: (mode, factor)}; or a list of configuration.Brick entries
    (taken as they are), candidates (switched off), and (candidate, mode) or (candidate, mode, factor)
    tuples. Candidates come from core.bricks.candidates.compute_bricks on a run of the same model;
    modes are off, mean, scale and keep. The run's id is recorded as the source (`mean` bricks apply
    with that run's means).
    """
    items = [(c, *_how(how)) for c, how in chosen.items()] if isinstance(chosen, Mapping) else chosen
    return BrickConfig(
        model_id=run.model_id, fingerprint=run.fingerprint, n_layers=run.n_layers, d_ff=run.d_ff,
        bricks=tuple(_brick(run, item) for item in items), source={"run_id": run.run_id}, note=note,
        operations=operations or None, adapters=tuple(adapters),
    )  # fmt: skip


def _how(how) -> tuple:
    return tuple(how) if isinstance(how, (tuple, list)) else (how,)


def _brick(run, item) -> Brick:
    if isinstance(item, Brick):
        return item
    if isinstance(item, Candidate):
        item = (item, "off")
    if isinstance(item, tuple) and 2 <= len(item) <= 3 and isinstance(item[0], Candidate):
        return brick_to_config(item[0], run.n_layers, run.d_ff, *item[1:])
    raise BricklabError(
        f"Cannot put {type(item).__name__} {str(item)[:80]} in a configuration.",
        "Pass candidates from compute_bricks ({candidate: 'off'}) or configuration.Brick entries.",
    )
