"""The Bricks page's "Edit bricks" section: grow, shrink, merge, split or rename a brick, see its
coherence before and after, and undo; the session configuration holds the results."""

from __future__ import annotations

import streamlit as st

from core.bricks import candidates as core_bricks
from core.bricks import ops as brick_ops
from core.bricks.coherence import Firing
from core.errors import BricklabError
from core.store import Run
from ui import config_state, resources
from ui.text import md

INTRO = (
    "Edited bricks join the configuration unchanged (scale × 1); pick their mode in the Playground. "
    "Coherence = mean normalised co-activation C_ij/√(C_ii·C_jj) between a brick's neurons, divided by "
    "the mean between them and the other neurons of their layers (about 1 for a random set of neurons)."
)
LABELS = {"grow": "Grow", "shrink": "Shrink", "merge": "Merge", "split": "Split", "rename": "Rename/label"}
LAST, ERROR = "edit-last", "edit-error"  # the last operation (applied or undone), the last refusal


def show(run: Run, found: list[core_bricks.Candidate]) -> None:
    st.subheader("Edit bricks")
    st.caption(INTRO)
    chosen = config_state.chosen(run)
    computed = {b.brick_id: b for b in found}
    names = [*chosen, *(n for n in computed if n not in chosen)]
    if not names:
        st.info("Form bricks above first.")
        return
    op = st.radio("Operation", brick_ops.OPS, format_func=LABELS.get, horizontal=True, key="edit-op")
    left, right = st.columns(2)
    name = left.selectbox("Brick", names, key="edit-brick")
    _inputs(run, op, name, names, chosen, right)
    st.button("Apply", type="primary", key="edit-apply", on_click=_apply, args=(run, computed))
    if error := st.session_state.pop(ERROR, None):
        st.error(md(error))
    _last()
    _history(run)


def _inputs(run: Run, op: str, name: str, names: list[str], chosen: dict, column) -> None:
    if op in ("grow", "shrink"):
        verb = "add" if op == "grow" else "drop"
        column.number_input(f"Neurons to {verb}", 1, run.d_ff, 4, key="edit-n")
    if op == "grow":
        column.checkbox("Also from the neighbouring layers", key="edit-neighbours")
    if op == "merge":
        column.selectbox("With", [n for n in names if n != name], key="edit-other")
        column.text_input("Name of the merged brick", key="edit-merged", placeholder="first+second")
    if op == "split":
        halves = f"{md(name)}-a and {md(name)}-b"
        column.caption(f"Two halves with the least co-activation between them: {halves}.")
    if op == "rename":
        old = chosen.get(name)
        column.text_input("New name", name, key=f"edit-name-{name}")
        column.text_input("Label", (old.label if old else None) or "", key=f"edit-label-{name}")


def _call(op: str, firing: Firing, bricks: dict, name: str) -> brick_ops.Outcome:
    state = st.session_state
    if op == "grow":
        return brick_ops.grow(firing, bricks, name, int(state["edit-n"]), state.get("edit-neighbours", False))
    if op == "shrink":
        return brick_ops.shrink(firing, bricks, name, int(state["edit-n"]))
    if op == "merge":
        return brick_ops.merge(firing, bricks, name, state["edit-other"], state.get("edit-merged") or None)
    if op == "split":
        return brick_ops.split(firing, bricks, name)
    return brick_ops.rename(firing, bricks, name, state[f"edit-name-{name}"], state[f"edit-label-{name}"])


def _apply(run: Run, computed: dict[str, core_bricks.Candidate]) -> None:
    """Button callback (it runs before the page, so it may point the brick picker at the result)."""
    chosen, op, name = config_state.chosen(run), st.session_state["edit-op"], st.session_state["edit-brick"]
    involved = [name, st.session_state.get("edit-other")] if op == "merge" else [name]
    # A computed brick joins the configuration with no effect until a mode is picked for it.
    extra = {n: core_bricks.brick_to_config(computed[n], run.n_layers, run.d_ff, "scale") for n in involved
             if n not in chosen and n in computed}  # fmt: skip
    try:
        firing = Firing.of_run(resources.store(), run.run_id)
        outcome = _call(op, firing, chosen | extra, name)
        bricks, log = config_state.history(run).apply(chosen, outcome)
    except BricklabError as exc:
        st.session_state[ERROR] = str(exc)
        return
    config_state.adopt(run, bricks, log)
    st.session_state[LAST] = ("applied", outcome.operation)
    st.session_state["edit-brick"] = outcome.bricks[0].name


def _undo(run: Run) -> None:
    log = config_state.history(run)
    bricks, earlier = log.undo()
    config_state.adopt(run, bricks, earlier)
    st.session_state[LAST] = ("undone", log.operations[-1])
    st.session_state["edit-brick"] = log.operations[-1].bricks[0]


def _scores(values) -> str:
    return " · ".join("–" if v is None else f"{v:.2f}" for v in values)


def _last() -> None:
    if (last := st.session_state.get(LAST)) is None:
        return
    what, op = last
    st.success(f"{LABELS[op.op]} {what}: {', '.join(map(md, op.bricks))} → {', '.join(map(md, op.result))}")
    before, after = op.coherence_before, op.coherence_after
    one = len(before) == len(after) == 1 and None not in (*before, *after)
    c = st.columns(2)
    c[0].metric("coherence before", _scores(before))
    c[1].metric("coherence after", _scores(after), f"{after[0] - before[0]:+.2f}" if one else None)


def _history(run: Run) -> None:
    log = config_state.history(run)
    rows = [
        {"operation": op.op, "bricks": ", ".join(op.bricks), "result": ", ".join(op.result),
         "coherence before": _scores(op.coherence_before), "coherence after": _scores(op.coherence_after),
         "undoable": i >= len(log.base)}
        for i, op in enumerate(log.operations)
    ]  # fmt: skip
    if rows:
        st.markdown("**Operations** (recorded in the configuration's `operations`)")
        st.dataframe(rows, hide_index=True)
    st.button("Undo the last operation", key="edit-undo", disabled=not log.done, on_click=_undo, args=(run,))
