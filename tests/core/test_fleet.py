"""Which workers serve, and whether the relay is ready, from their statuses (no files)."""

from __future__ import annotations

import json

import pytest

from vpsrelay.core.fleet import (
    MAX_STATUS_BYTES,
    STALE_SECONDS,
    State,
    WorkerStatus,
    assess,
)

NOW = 1000.0


def status(number: int, **changes: object) -> WorkerStatus:
    fields: dict[str, object] = {
        "number": number,
        "pid": 100 + number,
        "started": NOW - 60,
        "heartbeat": NOW - 1,
        "checks": {"tls": "off"},
    }
    fields.update(changes)
    return WorkerStatus(**fields)  # type: ignore[arg-type]


def test_a_status_survives_its_file() -> None:
    original = status(2, certificate_not_after=1.8e9, ready=False, checks={"tls": "no cert"})
    assert WorkerStatus.from_json(original.to_json()) == original
    assert WorkerStatus.from_json(original.to_json().encode()) == original
    assert original.label == "w2"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"number": 1}',
        '{"number": 0, "pid": 5, "started": 1, "heartbeat": 1}',
        '{"number": true, "pid": 5, "started": 1, "heartbeat": 1}',
        '{"number": 1, "pid": -5, "started": 1, "heartbeat": 1}',
        '{"number": 1, "pid": 5, "started": "1", "heartbeat": 1}',
        '{"number": 1, "pid": 5, "started": 1, "heartbeat": NaN}',
        '{"number": 1, "pid": 5, "started": 1, "heartbeat": 1, "checks": {"tls": 1}}',
        '{"number": 1, "pid": 5, "started": 1, "heartbeat": 1, "ready": "yes"}',
        '{"number": 1, "pid": 5, "started": 1, "heartbeat": 1, "certificate_not_after": "x"}',
    ],
)
def test_a_malformed_status_is_none(text: str) -> None:
    assert WorkerStatus.from_json(text) is None


def test_an_oversized_status_is_not_parsed() -> None:
    padded = json.loads(status(1).to_json())
    padded["checks"] = {"tls": "x" * MAX_STATUS_BYTES}
    assert WorkerStatus.from_json(json.dumps(padded)) is None


def test_every_worker_ready_is_ok() -> None:
    view = assess(2, {1: status(1), 2: status(2)}, NOW)
    assert [w.state for w in view.workers] == [State.READY, State.READY]
    assert view.ready
    assert view.all_ready
    assert view.summary() == "ok"
    assert view.workers[0].heartbeat_age == pytest.approx(1)
    assert view.workers[0].uptime == pytest.approx(60)


def test_one_worker_down_keeps_the_relay_ready_and_says_which() -> None:
    view = assess(3, {1: status(1), 2: status(2).marked_exited()}, NOW)
    assert [w.state for w in view.workers] == [State.READY, State.EXITED, State.STARTING]
    assert view.ready
    assert not view.all_ready
    assert view.summary() == "1 of 3 workers ready (w2 exited, w3 starting)"


def test_no_worker_ready_is_unready() -> None:
    view = assess(2, {1: status(1, ready=False, checks={"tls": "no cert"})}, NOW)
    assert [w.state for w in view.workers] == [State.UNREADY, State.STARTING]
    assert not view.ready
    assert view.summary().startswith("0 of 2 workers ready")


def test_a_silent_heartbeat_is_stale_and_a_missing_process_exited() -> None:
    statuses = {
        1: status(1, heartbeat=NOW - STALE_SECONDS - 0.1),
        2: status(2, heartbeat=NOW - STALE_SECONDS + 0.1),
        3: status(3),
    }
    view = assess(3, statuses, NOW, gone_pids=frozenset({103}))
    assert [w.state for w in view.workers] == [State.STALE, State.READY, State.EXITED]


def test_a_draining_worker_is_draining_however_old_its_heartbeat() -> None:
    view = assess(1, {1: status(1, draining=True, heartbeat=NOW - 100)}, NOW)
    assert view.workers[0].state is State.DRAINING
    assert not view.ready


def test_a_heartbeat_from_the_future_is_age_zero() -> None:
    view = assess(1, {1: status(1, heartbeat=NOW + 5)}, NOW)
    assert view.workers[0].heartbeat_age == 0.0
    assert view.workers[0].state is State.READY


def test_statuses_beyond_the_count_are_ignored() -> None:
    view = assess(1, {1: status(1), 2: status(2)}, NOW)
    assert [w.label for w in view.workers] == ["w1"]


def test_the_report_shows_the_pid_only_in_detail() -> None:
    view = assess(1, {1: status(1, ready=False, checks={"tls": "no cert", "x": "ok"})}, NOW)
    public = view.workers[0].report(detailed=False)
    assert public == {
        "worker": "w1",
        "state": "unready",
        "heartbeat_seconds_ago": 1.0,
        "uptime_seconds": 60.0,
        "checks": {"tls": "no cert"},
    }
    assert view.workers[0].report(detailed=True)["pid"] == 101


def test_the_oldest_certificate_of_the_serving_workers() -> None:
    statuses = {
        1: status(1, certificate_not_after=2000.0),
        2: status(2, certificate_not_after=1500.0),
        3: status(3, certificate_not_after=1000.0).marked_exited(),  # serves nothing
    }
    assert assess(3, statuses, NOW).oldest_certificate() == 1500.0
    assert assess(1, {1: status(1)}, NOW).oldest_certificate() is None
