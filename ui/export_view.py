"""The Export page's upload form: every problem of a file, field by field, or the loaded configuration."""

from __future__ import annotations

import streamlit as st

from core import configuration
from core.configuration import BrickConfig


def validated(upload, run) -> BrickConfig:
    """The uploaded configuration; on any problem, list them all and stop the page (nothing applied)."""
    text = upload.getvalue()
    found = configuration.problems(text, model=run)
    if not found:
        return configuration.loads(text, model=run)
    lines = "\n".join(f"- **{e.path}**: {e.problem}" for e in found)  # the field first, then the problem
    more = " (the first 20)" if len(found) == 20 else ""
    st.error(f"{upload.name}: {len(found)} problem{'s' * (len(found) > 1)}{more}\n\n{lines}")
    st.caption("Nothing was applied.")
    st.stop()
