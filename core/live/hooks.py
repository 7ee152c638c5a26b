"""Something installed on a model shared by many threads (hooks, patched forwards) while at least one
context anywhere uses it: reference counted per model, installed by the first user, removed by the last."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager

Install = Callable[[object], Callable[[], None]]  # model -> a function that removes what was installed


class SharedInstall:
    def __init__(self, install: Install):
        self._install = install
        self._lock = threading.Lock()
        self._users: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [count, remove]

    @contextmanager
    def held(self, model):
        """Installed on `model` for the duration; the install may raise, leaving nothing behind."""
        with self._lock:
            entry = self._users.get(model)
            if entry is None:
                entry = self._users[model] = [0, self._install(model)]
            entry[0] += 1
        try:
            yield
        finally:
            with self._lock:
                entry[0] -= 1
                if entry[0] == 0:
                    entry[1]()
                    del self._users[model]
