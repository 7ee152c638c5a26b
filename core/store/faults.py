"""What went wrong with the cache file, told apart by the real cause: a lock held by another
process, a read-only file or file system, a full disk, or a damaged file; each becomes one
`BricklabError` that names the file and says what to do.
"""

from __future__ import annotations

import errno
import functools
from pathlib import Path

import duckdb

from core.errors import BricklabError

LOCKED, READ_ONLY, FULL, CORRUPT = "locked", "read-only", "full", "corrupt"

# DuckDB reports most file faults as text only (no errno), so the causes are matched on its words,
# and on the errno of an OSError where there is one.
_MARKERS = {
    # the last: this process already holds the file open with other settings (e.g. read-write)
    LOCKED: ("could not set lock", "conflicting lock", "different configuration than existing connections"),
    FULL: ("no space left", "disk full", "disk quota exceeded", "file too large"),
    READ_ONLY: ("read-only file system", "permission denied", "operation not permitted", "read-only mode"),
}
_ERRNOS = {
    FULL: (errno.ENOSPC, errno.EDQUOT, errno.EFBIG),
    READ_ONLY: (errno.EROFS, errno.EACCES, errno.EPERM),
}


def kind(exc: BaseException) -> str:
    """LOCKED, READ_ONLY, FULL or CORRUPT: the cause of a DuckDB or OS error about the cache."""
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    for name in (LOCKED, FULL, READ_ONLY):
        if code in _ERRNOS.get(name, ()) or any(marker in text for marker in _MARKERS[name]):
            return name
    return CORRUPT


def is_fault(exc: BaseException) -> bool:
    """Whether `exc` comes from the file or its disk, rather than from a statement bricklab got wrong
    (DuckDB's parser, binder and catalog errors stay as they are, so a bug is never called damage)."""
    if isinstance(exc, (duckdb.ProgrammingError, duckdb.OutOfMemoryException)):
        return kind(exc) != CORRUPT
    return isinstance(exc, (duckdb.Error, OSError))


def cache_error(path: Path, exc: BaseException, needs: int | None = None) -> BricklabError:
    """The user-facing error for `exc`, raised while using the cache at `path`; `needs`: the bytes
    the failed step was writing, when known."""
    text = cause(exc)
    found = kind(exc)
    if found == LOCKED:
        return BricklabError(
            f"The cache '{path}' is open in another process ({text}).",
            "Close the other bricklab (app or CLI) or set BRICKLAB_DB to another file.",
        )
    if found == FULL:
        size = f"about {_mib(needs)} MiB" if needs else "some space"
        return BricklabError(
            f"The disk holding the cache '{path}' is full ({text}); nothing of this step was written.",
            f"Free {size} more than the step had (or give --db a file on another disk) and run the "
            "same command again: a capture resumes from its last whole chunk.",
        )
    if found == READ_ONLY:
        return read_only_error(path, text)
    return corrupt_error(path, text)


def read_only_error(path: Path, cause: str = "") -> BricklabError:
    because = f" ({cause})" if cause else ""
    return BricklabError(
        f"The cache '{path}' is read-only{because}: runs can be listed and viewed, nothing can be written.",
        "Make the file and its folder writable, or give --db (or BRICKLAB_DB) a writable file elsewhere.",
    )


def corrupt_error(path: Path, cause: str) -> BricklabError:
    return BricklabError(
        f"The cache '{path}' is damaged ({cause}).",
        f"Run `python -m core doctor --db {path}`: it checks the file, says which runs and results are "
        "readable and copies them into a fresh file.",
    )


def guarded(method):
    """Turn the DuckDB and OS errors of a `Store` method into `cache_error`s naming its file."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (duckdb.Error, OSError) as exc:
            if not is_fault(exc):
                raise
            raise cache_error(self.path, exc) from exc

    return wrapper


def cause(exc: BaseException) -> str:
    """DuckDB's message without its category prefix ("IO Error: ..."), on one line."""
    text = " ".join(str(exc).split())
    for prefix in ("IO Error: ", "TransactionContext Error: ", "Invalid Input Error: "):
        text = text.replace(prefix, "")
    return text or type(exc).__name__


def _mib(n: int) -> str:
    return f"{max(n / 2**20, 0.1):,.1f}"
