"""SharedInstall: installed once for any number of users, removed with the last, nothing left on errors."""

import threading

import pytest

from core.live.hooks import SharedInstall


class Model:
    """Stands in for a torch model: only identity and weak references matter."""


def counting():
    log = []

    def install(model):
        log.append("install")
        return lambda: log.append("remove")

    return SharedInstall(install), log


def test_nested_users_install_once_and_the_last_removes():
    shared, log = counting()
    model = Model()
    with shared.held(model):
        with shared.held(model):
            assert log == ["install"]
        assert log == ["install"]
    assert log == ["install", "remove"]
    with shared.held(model):
        pass
    assert log == ["install", "remove", "install", "remove"]


def test_an_exception_inside_still_removes():
    shared, log = counting()
    with pytest.raises(RuntimeError), shared.held(Model()):
        raise RuntimeError("inside")
    assert log == ["install", "remove"]


def test_a_failing_install_leaves_no_user_behind():
    calls = []

    def install(model):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("cannot install")
        return lambda: calls.append("removed")

    shared, model = SharedInstall(install), Model()
    with pytest.raises(ValueError), shared.held(model):
        pass
    with shared.held(model):  # a later user installs afresh
        pass
    assert calls == [1, 1, "removed"]


def test_many_threads_share_one_install():
    shared, log = counting()
    model, inside, go = Model(), threading.Barrier(9), threading.Event()  # 8 users and this thread

    def user():
        with shared.held(model):
            inside.wait()
            go.wait()

    threads = [threading.Thread(target=user) for _ in range(8)]
    for t in threads:
        t.start()
    inside.wait(timeout=60)  # all 8 are inside at once
    assert log == ["install"]
    go.set()
    for t in threads:
        t.join()
    assert log == ["install", "remove"]
