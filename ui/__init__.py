"""Streamlit-side helpers shared by app.py and the pages: cached resources and Plotly figures."""
