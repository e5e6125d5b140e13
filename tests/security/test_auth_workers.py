"""Issue 14 follow-up: a password guesser spreading its tries over the relay's workers.

Each worker kept its own failed-login backoff, so with `--workers N` a guesser got N times
the tries: its failures on one worker cost it nothing on the other. Now the backoff is one
for the relay (`<data_dir>/limits.db`). Here one client guesses over new connections (the
kernel gives each to whichever worker accepts it; the access log's `worker=` says which)
against one relay of two workers, and gets exactly the failures before the first refusal
that one process gives; once the refusal's wait has passed, the right password works.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.relay import RelayProcess
from tests.infra.workers import label_of
from vpsrelay.access.clientauth import add_user

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

PASSWORD = "correct horse battery staple"
FREE = 3  # auth.failures_before_backoff: FREE failures, one more, then a wait
ROUNDS = 6  # guessers (each its own address and user name) until one was spread over both
PULL_TOKEN = "ci-token-0123456789abcdef"


def _guess(relay: RelayProcess, address: str, user: str, password: str) -> tuple[int, str]:
    """One `/token` login on a new connection from `address`: (status, worker label)."""
    marker = f"g{uuid.uuid4().hex}"
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=30) as client:
        response = client.get(
            f"{relay.url}/token",
            params={"scope": "repository:alpine:pull", "probe": marker},
            auth=(user, password),
        )
    if response.status_code == 429:
        error = response.json()["errors"][0]
        assert error["code"] == "TOOMANYREQUESTS", response.text
        assert int(response.headers["retry-after"]) >= 1
    else:
        assert response.status_code in (200, 401), response.text
    return response.status_code, label_of(relay, marker)


def _guess_until_refused(relay: RelayProcess, address: str, user: str) -> list[tuple[int, str]]:
    """Wrong passwords, one after another, up to and with the first 429 (bounded)."""
    answers = []
    for attempt in range(4 * FREE + 4):
        answers.append(_guess(relay, address, user, f"guess-{attempt}"))
        if answers[-1][0] == 429:
            return answers
    raise AssertionError(f"{len(answers)} wrong passwords, none refused: {answers}")


@pytest.fixture
def relay_config(tmp_path: Path) -> Path:
    users = tmp_path / "htpasswd"
    for number in range(ROUNDS):
        add_user(users, f"user{number}", PASSWORD, rounds=4)  # cheap bcrypt: test speed
    add_user(users, "slow", PASSWORD)  # the usual cost: checks at once overlap
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[auth]\nenabled = true\nusers_file = "{users}"\npull_tokens = ["{PULL_TOKEN}"]\n'
        f"failures_before_backoff = {FREE}\nmax_backoff = 4.0\n"
        # A user guessed at is checked in turn, and the guesser's own address has a third
        # of the turns: at 600 a minute, one every 0.3 s (the default would make the right
        # password from that address wait 18 s for its turn, by design).
        "guesses_per_minute = 600\n"
    )
    return config


def _relay(tmp_path: Path, config: Path, workers: int) -> RelayProcess:
    return RelayProcess(tmp_path / f"relay{workers}", "--config", str(config),
                        "--workers", str(workers))  # fmt: skip


@pytest.fixture
def one_worker(tmp_path: Path, relay_config: Path) -> Iterator[RelayProcess]:
    with _relay(tmp_path, relay_config, 1) as relay:
        yield relay


@pytest.fixture
def two_workers(tmp_path: Path, relay_config: Path) -> Iterator[RelayProcess]:
    with _relay(tmp_path, relay_config, 2) as relay:
        yield relay


def test_a_guesser_gets_no_more_tries_from_two_workers_than_from_one(
    one_worker: RelayProcess, two_workers: RelayProcess
) -> None:
    alone = _guess_until_refused(one_worker, "127.0.0.1", "user0")
    failures_alone = [status for status, _ in alone].count(401)
    assert failures_alone == FREE + 1, alone

    spread = None
    for number in range(ROUNDS):
        address = f"127.0.6.{number + 1}"
        answers = _guess_until_refused(two_workers, address, f"user{number}")
        print(f"guesser {address}: {answers}")
        # The same tries as from one process, however the connections were spread.
        assert [status for status, _ in answers] == [401] * failures_alone + [429], answers
        if {label for status, label in answers if status == 401} == {"w1", "w2"}:
            spread = (address, f"user{number}", answers)
            break
    assert spread is not None, f"in {ROUNDS} guessers' tries, no worker pair answered both"

    # The refusal holds in both workers while the wait runs: new connections, from the
    # guesser's address, until each worker refused one (bounded; no wrong password).
    address, user, answers = spread
    refused_by = {answers[-1][1]}
    began = time.monotonic()
    for _ in range(40):
        if refused_by == {"w1", "w2"} or time.monotonic() - began > 0.8:
            break
        status, label = _guess(two_workers, address, user, PASSWORD)  # the right one too
        if status == 429:
            refused_by.add(label)
    assert refused_by == {"w1", "w2"}, f"only {refused_by} refused within the wait"

    # After the wait (1 s: the first one past the free failures), the right password works.
    time.sleep(1.2)
    status, label = _guess(two_workers, address, user, PASSWORD)
    assert status == 200, (status, label)


def _wrong_pull_tokens_until_refused(relay: RelayProcess, address: str) -> list[tuple[int, str]]:
    answers: list[tuple[int, str]] = []
    for attempt in range(4 * FREE):
        marker = f"b{uuid.uuid4().hex}"
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(transport=transport, timeout=30) as client:  # a new connection
            response = client.get(
                f"{relay.url}/v2/alpine/manifests/latest",
                params={"probe": marker},
                headers={"authorization": f"Bearer guess-{attempt:024d}"},
            )
        answers.append((response.status_code, label_of(relay, marker)))
        if response.status_code == 429:
            break
    return answers


def test_wrong_pull_tokens_spread_over_two_workers_count_once(two_workers: RelayProcess) -> None:
    """A wrong Bearer pull token is a failure of its address (no bcrypt, so no turn to
    wait for): its workers count it together too."""
    for number in range(ROUNDS):
        answers = _wrong_pull_tokens_until_refused(two_workers, f"127.0.7.{number + 1}")
        print(f"wrong pull tokens: {answers}")
        assert [status for status, _ in answers] == [401] * (FREE + 1) + [429], answers
        if {label for status, label in answers if status == 401} == {"w1", "w2"}:
            return
    raise AssertionError(f"in {ROUNDS} guessers' tries, no worker pair answered both")


def test_guesses_at_once_over_two_workers_get_the_tries_of_guesses_in_turn(
    two_workers: RelayProcess,
) -> None:
    """A burst of wrong passwords at once, on new connections that both workers take:
    checks are counted from their start, so the burst gets the tries of guesses one after
    another (each worker alone would have run or queued 5 checks: 10 tries in all)."""
    burst = 12

    def one_burst(address: str) -> list[tuple[int, str]]:
        start = threading.Barrier(burst, timeout=30)

        def guess(number: int) -> tuple[int, str]:
            start.wait()
            return _guess(two_workers, address, "slow", f"guess-{number}")

        with concurrent.futures.ThreadPoolExecutor(burst) as pool:
            return list(pool.map(guess, range(burst)))

    for number in range(ROUNDS):
        answers = one_burst(f"127.0.9.{number + 1}")
        print(f"a burst of {burst} guesses: {answers}")
        statuses = sorted(status for status, _ in answers)
        assert statuses == [401] * (FREE + 1) + [429] * (burst - FREE - 1), answers
        if {label for _, label in answers} == {"w1", "w2"}:
            return
    raise AssertionError(f"in {ROUNDS} bursts, no worker pair answered both")
