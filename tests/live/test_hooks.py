"""SharedInstall: installed once for any number of users, removed with the last, nothing left on errors.
Dispatcher: each kind of site runs the calling context's function, nests, and leaves nothing behind."""

import threading

import pytest
import torch

from core.live.hooks import Dispatcher, SharedInstall, replaced


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


def two_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["input", "output", "forward"])
def test_a_dispatcher_runs_this_contexts_function_nests_and_leaves_nothing(kind):
    model, x = two_linears(), torch.randn(2, 4)
    dispatcher = Dispatcher(f"test_{kind}", kind, lambda m: list(m))
    first, second = model[0], model[1]
    plain = model(x)
    weights = first.weight, first.bias  # a forward function calling first(a) would dispatch again
    double = {
        "input": lambda a: 2 * a,
        "output": lambda a, y: 2 * y,
        "forward": lambda a: 2 * torch.nn.functional.linear(a, *weights),
    }[kind]
    with dispatcher.using(model, [(first, double)]):
        assert (hook_count(model), sum(map(replaced, model))) == ((0, 2) if kind == "forward" else (2, 0))
        once = model(x)
        with dispatcher.using(model, [(first, double)]):
            twice = model(x)
        assert torch.equal(model(x), once)  # the inner context is gone
    want_once = second(2 * first(x)) if kind != "input" else second(first(2 * x))
    want_twice = second(4 * first(x)) if kind != "input" else second(first(4 * x))
    assert torch.allclose(once, want_once) and not torch.allclose(once, plain)
    # nested input and output functions compose; an inner forward replaces the outer one
    assert torch.allclose(twice, want_once if kind == "forward" else want_twice)
    assert hook_count(model) == 0 and not any(map(replaced, model)) and torch.equal(model(x), plain)


def test_a_dispatcher_is_context_local_across_threads():
    model, x = two_linears(), torch.randn(2, 4)
    dispatcher = Dispatcher("test_threads", "output", lambda m: list(m))
    plain, inside, seen = model(x), threading.Barrier(2), {}

    def other_session():
        inside.wait()  # the main thread's function is active now
        seen["other"] = model(x)
        inside.wait()

    thread = threading.Thread(target=other_session)
    thread.start()
    with dispatcher.using(model, [(model[1], lambda a, y: y + 1)]):
        inside.wait()
        inside.wait()
        seen["mine"] = model(x)
    thread.join()
    assert torch.equal(seen["other"], plain) and torch.allclose(seen["mine"], plain + 1)
    assert hook_count(model) == 0
