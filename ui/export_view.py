"""The Export page's upload form: every problem of a file, field by field, or the loaded configuration."""

from __future__ import annotations

import streamlit as st

from core import configuration
from core.configuration import BrickConfig
from ui.text import code, md


def validated(upload, run) -> BrickConfig:
    """The uploaded configuration; on any problem, list them all and stop the page (nothing applied)."""
    text = upload.getvalue()
    found = configuration.problems(text, model=run)
    if not found:
        return configuration.loads(text, model=run)
    # the field first (a code span keeps it verbatim), then the problem
    lines = "\n".join(f"- {code(e.path)}: {md(e.problem)}" for e in found)
    more = " (the first 20)" if len(found) == 20 else ""
    st.error(f"{md(upload.name)}: {len(found)} problem{'s' * (len(found) > 1)}{more}\n\n{lines}")
    st.caption("Nothing was applied.")
    st.stop()
