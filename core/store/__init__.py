"""The DuckDB cache behind one boundary: every SQL statement of bricklab lives in this package.

`Store` is the connection and its named reads and writes; `codec` is the byte format of cached
arrays and results; `schema` holds the tables; `faults` turns the file's errors into advice by their
cause, and `doctor` checks a damaged file and copies what still reads back.
"""

from core.store import codec
from core.store.cache import Store
from core.store.schema import CHUNK_TABLES, RUN_TABLES, SCHEMA, Run

__all__ = ["CHUNK_TABLES", "RUN_TABLES", "SCHEMA", "Run", "Store", "codec"]
