"""The progress callback that long computations accept, so a page can draw a bar and the CLI a line."""

from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # (steps done, steps total, message)
