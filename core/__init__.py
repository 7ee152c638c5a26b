"""bricklab's computation: models, capture, the DuckDB cache, bricks, maps and interventions.

Nothing in this package imports streamlit; the pages in `pages/` only show what it computes.
"""
