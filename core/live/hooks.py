"""Context-local changes to a model that many threads share. `SharedInstall`: something installed on a
model while at least one context anywhere uses it, reference counted per model (the first user
installs, the last removes). `Dispatcher`: one hook per site so installed, which runs the calling
context's function for its site or passes through; interventions, sparse execution and adapters each
have one."""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Literal

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


# --- one dispatcher per kind of change --------------------------------------------------------------

Kind = Literal["input", "output", "forward"]
# What a context's function on a site (a module) receives and returns, per kind:
#   input    fn(x) -> x'     rewrites the site's first input (a forward pre-hook)
#   output   fn(x, y) -> y'  rewrites its output y, given its first input x (a forward hook)
#   forward  fn(x) -> y      runs instead of its forward (an instance attribute, not a hook)
# Nested contexts compose input and output functions (the inner one runs on the outer one's result);
# an inner forward function replaces the outer one.
Sites = Callable[[object], list]  # model -> the modules a dispatcher serves (may raise: nothing installed)


class Dispatcher:
    """One bricklab hook per site of a model, installed while any context anywhere uses the dispatcher.
    Each hook looks up the calling context's function for its site (a ContextVar), calls it, or passes
    through: a thread (a browser session) only ever sees its own functions."""

    def __init__(self, name: str, kind: Kind, sites: Sites):
        self.kind, self._sites = kind, sites
        self._active: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
            f"bricklab_{name}", default=None
        )
        self._shared = SharedInstall(self._install)

    def lookup(self, site) -> Callable | None:
        """The calling context's function for `site` (a module), or None."""
        table = self._active.get()
        return table.get(id(site)) if table else None

    @contextmanager
    def using(self, model, functions: Iterable[tuple[object, Callable]]):
        """Run each (site, fn) pair on `model` in this context only (see Kind for what fn receives)."""
        table = dict(self._active.get() or {})
        for site, fn in functions:
            outer = table.get(id(site))
            table[id(site)] = fn if outer is None or self.kind == "forward" else _nested(self.kind, outer, fn)
        with self._shared.held(model):
            token = self._active.set(table)
            try:
                yield
            finally:
                self._active.reset(token)

    def _install(self, model) -> Callable[[], None]:
        sites = self._sites(model)
        # a virtual site (an MoE layer's activation or routing, core/experts.py) is called only while exposed
        hidden = [site.expose() for site in sites if hasattr(site, "expose")]
        remove = self._hook(sites)
        return lambda: [undo() for undo in (remove, *hidden)]

    def _hook(self, sites: list) -> Callable[[], None]:
        if self.kind == "forward":
            return _replace_forwards(self, sites)
        if self.kind == "input":
            handles = [site.register_forward_pre_hook(self._before) for site in sites]
        else:
            handles = [site.register_forward_hook(self._after) for site in sites]
        return lambda: [handle.remove() for handle in handles]

    def _before(self, module, args):
        fn = self.lookup(module)
        return None if fn is None else (fn(args[0]), *args[1:])

    def _after(self, module, args, output):
        fn = self.lookup(module)
        return None if fn is None else fn(args[0], output)


def _nested(kind: Kind, outer: Callable, inner: Callable) -> Callable:
    if kind == "input":
        return lambda x: inner(outer(x))
    return lambda x, y: inner(x, outer(x, y))


def _replace_forwards(dispatcher: Dispatcher, sites: list) -> Callable[[], None]:
    own = [vars(site).get("forward") for site in sites]  # an instance forward set by someone else
    for site in sites:
        site.forward = _forward(dispatcher, site)

    def remove() -> None:
        for site, previous in zip(sites, own, strict=True):
            del site.forward
            if previous is not None:
                site.forward = previous

    return remove


def _forward(dispatcher: Dispatcher, site):
    own = site.forward  # the bound forward in use (the class's, or e.g. accelerate's wrapper)

    def forward(x, *args, **kwargs):
        fn = dispatcher.lookup(site)
        return own(x, *args, **kwargs) if fn is None else fn(x)

    forward.bricklab_own = own
    return forward


def replaced(module) -> bool:
    """Whether `module`'s forward is a dispatcher's right now (none is outside every context)."""
    return hasattr(vars(module).get("forward"), "bricklab_own")
