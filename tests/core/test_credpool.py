from __future__ import annotations

import pytest

from vpsrelay.core.credpool import DEFAULT_REST, CredentialPool
from vpsrelay.core.ratelimit import RateLimit


def budget(remaining: int, limit: int = 100, window: int | None = 21600) -> RateLimit:
    return RateLimit(limit=limit, remaining=remaining, window_seconds=window, source="x")


def test_an_empty_pool_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        CredentialPool([])


def test_pulls_are_spread_in_turn():
    pool = CredentialPool(["a", "b", "c"])
    assert [pool.choose(0.0) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_a_429_rests_the_credential_for_its_retry_after():
    pool = CredentialPool(["a", "b"])
    state = pool.answered("a", 10.0, status=429, budget=None, retry_after=60)
    assert state is not None
    assert (state.remaining, state.refusals, state.rest_until) == (0, 1, 70.0)
    assert {pool.choose(11.0) for _ in range(4)} == {"b"}
    assert not pool.has_ready(11.0, {"b"})
    assert pool.has_ready(11.0, {"a"})
    assert pool.has_ready(70.0, {"b"})  # the window passed
    assert {pool.choose(70.0) for _ in range(4)} == {"a", "b"}


def test_a_429_without_retry_after_rests_for_the_stated_window_or_the_default():
    pool = CredentialPool(["a", "b"])
    pool.answered("a", 0.0, status=200, budget=budget(5, window=600), retry_after=None)
    state = pool.answered("a", 1.0, status=429, budget=None, retry_after=None)
    assert state is not None
    assert state.rest_until == 601.0
    state = pool.answered("b", 1.0, status=429, budget=None, retry_after=None)
    assert state is not None
    assert state.rest_until == 1.0 + DEFAULT_REST


def test_remaining_zero_rests_without_a_429():
    pool = CredentialPool(["a", "b"])
    state = pool.answered("a", 0.0, status=200, budget=budget(0, window=300), retry_after=None)
    assert state is not None
    assert (state.limit, state.remaining, state.rest_until) == (100, 0, 300.0)
    state = pool.answered("b", 0.0, status=200, budget=budget(0, window=None), retry_after=None)
    assert state is not None
    assert state.rest_until == DEFAULT_REST


def test_budget_left_ends_a_rest_and_keeps_what_was_known():
    pool = CredentialPool(["a"])
    pool.answered("a", 0.0, status=429, budget=None, retry_after=100)
    partial = RateLimit(limit=None, remaining=3, window_seconds=None, source=None)
    state = pool.answered("a", 5.0, status=200, budget=partial, retry_after=None)
    assert state is not None
    assert (state.remaining, state.rest_until) == (3, None)
    state = pool.answered("a", 6.0, status=404, budget=None, retry_after=None)
    assert state is not None
    assert state.remaining == 3


def test_when_all_rest_the_one_back_soonest_is_used():
    pool = CredentialPool(["a", "b"])
    pool.answered("a", 0.0, status=429, budget=None, retry_after=500)
    pool.answered("b", 0.0, status=429, budget=None, retry_after=50)
    assert pool.choose(1.0) == "b"
    assert pool.choose(1.0, avoid={"b"}) == "a"
    assert pool.choose(1.0, avoid={"a", "b"}) == "b"  # all tried: avoid is ignored


def test_an_unknown_name_is_not_recorded():
    pool = CredentialPool(["a"])
    assert pool.answered("z", 0.0, status=429, budget=None, retry_after=1) is None
    assert pool.choose(0.0) == "a"
