"""core/tokens.py: relay tokens, credentials parsing, htpasswd."""

from __future__ import annotations

import base64
import contextlib

import jwt
import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import access, tokens
from vpsrelay.errors import Unauthorized

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def issue(service: str = "vpsrelay") -> str:
    repositories = ["docker.io/library/alpine", "ghcr.io/owner/app"]
    return tokens.issue(
        KEY, subject="alice", service=service, repositories=repositories, now=1000.0, ttl=300.0
    )


def test_round_trip_and_scope():
    grant = tokens.verify(KEY, issue(), service="vpsrelay", now=1000.0)
    assert grant.subject == "alice"
    assert grant.expires == 1300.0
    assert grant.covers("docker.io", "library/alpine")
    assert grant.covers("ghcr.io", "owner/app")
    assert not grant.covers("docker.io", "library/busybox")
    assert not grant.covers("ghcr.io", "library/alpine")  # same name, other registry
    everything = tokens.Grant("token", frozenset(), 0.0, everything=True)
    assert everything.covers("x", "y")


@pytest.mark.parametrize(
    ("token_of", "service", "now", "reason"),
    [
        (lambda: issue(), "vpsrelay", 1299.0, None),
        (lambda: issue(), "vpsrelay", 1300.0, "token_expired"),
        (lambda: issue(), "another-service", 1000.0, "token_invalid"),
        (lambda: issue()[:-2] + "xx", "vpsrelay", 1000.0, "token_invalid"),
        (lambda: tokens.issue(OTHER_KEY, subject="a", service="vpsrelay", repositories=[],
                              now=1000.0, ttl=300), "vpsrelay", 1000.0, "token_invalid"),
        (lambda: tokens.issue_refresh(KEY, subject="a", service="vpsrelay", now=1000.0, ttl=9,
                                      binding=tokens.Binding.of_pull_token(KEY, "t")),
         "vpsrelay", 1000.0, "token_invalid"),  # a refresh token is no access token
        (lambda: jwt.encode({"iss": "vpsrelay", "aud": "vpsrelay", "typ": "access", "sub": "a",
                             "exp": 2000}, KEY * 2, algorithm="HS512"), "vpsrelay", 1000.0,
         "token_invalid"),  # other algorithms are refused
        (lambda: jwt.encode({"iss": "vpsrelay", "aud": "vpsrelay", "typ": "access", "sub": "a"},
                            KEY, algorithm="HS256"), "vpsrelay", 1000.0, "token_expired"),
        (lambda: jwt.encode({"iss": "other", "aud": "vpsrelay", "typ": "access", "sub": "a",
                             "exp": 2000}, KEY, algorithm="HS256"), "vpsrelay", 1000.0,
         "token_invalid"),
        (lambda: "not a token", "vpsrelay", 1000.0, "token_invalid"),
    ],
)  # fmt: skip
def test_verify_refuses(token_of, service, now, reason):
    token = token_of()
    if reason is None:
        tokens.verify(KEY, token, service=service, now=now)
        return
    with pytest.raises(Unauthorized) as caught:
        tokens.verify(KEY, token, service=service, now=now)
    assert caught.value.reason == reason


def test_malformed_access_entries_grant_nothing():
    claims = {
        "iss": "vpsrelay", "aud": "s", "typ": "access", "sub": "a", "exp": 2000,
        "access": [
            "x", {"type": "registry", "name": "r", "actions": ["pull"]},
            {"type": "repository", "name": "docker.io/a", "actions": ["push"]},
            {"type": "repository", "name": 5, "actions": ["pull"]},
            {"type": "repository", "name": "docker.io/b", "actions": ["pull"]},
        ],
    }  # fmt: skip
    grant = tokens.verify(KEY, jwt.encode(claims, KEY), service="s", now=1000.0)
    assert grant.repositories == frozenset({"docker.io/b"})


BOUND = tokens.Binding.of_password(KEY, "alice", "$2b$12$hash")


def test_refresh_tokens():
    refresh = tokens.issue_refresh(
        KEY, subject="alice", service="s", binding=BOUND, now=0.0, ttl=100.0
    )
    grant = tokens.verify_refresh(KEY, refresh, service="s", now=99.0)
    assert grant.subject == "alice"
    assert grant.binding.matches(BOUND)
    with pytest.raises(Unauthorized):
        tokens.verify_refresh(KEY, refresh, service="s", now=100.0)
    with pytest.raises(Unauthorized):
        tokens.verify_refresh(KEY, issue(service="s"), service="s", now=1000.0)


def test_refresh_tokens_without_a_binding_are_refused():
    claims = {"iss": "vpsrelay", "aud": "s", "typ": "refresh", "sub": "alice", "exp": 2000}
    with pytest.raises(Unauthorized) as caught:
        tokens.verify_refresh(KEY, jwt.encode(claims, KEY), service="s", now=1000.0)
    assert caught.value.reason == "token_invalid"
    claims |= {"by": "magic", "bnd": "x"}
    with pytest.raises(Unauthorized):
        tokens.verify_refresh(KEY, jwt.encode(claims, KEY), service="s", now=1000.0)


def test_bindings_change_with_the_credential():
    assert BOUND.matches(tokens.Binding.of_password(KEY, "alice", "$2b$12$hash"))
    assert not BOUND.matches(tokens.Binding.of_password(KEY, "alice", "$2b$12$new-hash"))
    assert not BOUND.matches(tokens.Binding.of_password(KEY, "bob", "$2b$12$hash"))
    assert not BOUND.matches(tokens.Binding.of_password(OTHER_KEY, "alice", "$2b$12$hash"))
    token = tokens.Binding.of_pull_token(KEY, "ci-token")
    assert token.matches(tokens.Binding.of_pull_token(KEY, "ci-token"))
    assert not token.matches(tokens.Binding.of_pull_token(KEY, "other-token"))
    # A pull token and a password hash of the same text are different credentials.
    assert not tokens.Binding.of_pull_token(KEY, "x").matches(
        tokens.Binding(tokens.BY_PASSWORD, tokens.Binding.of_pull_token(KEY, "x").digest)
    )
    assert "ci-token" not in token.digest


def test_usual_cost():
    assert tokens.bcrypt_cost("$2b$12$abc") == 12
    assert tokens.bcrypt_cost("$2y$05$abc") == 5
    assert tokens.bcrypt_cost("plain") is None
    assert tokens.usual_cost([], 12) == 12
    assert tokens.usual_cost(["$2b$05$a", "$2b$05$b", "$2b$12$c"], 12) == 5
    assert tokens.usual_cost(["junk"], 10) == 10


# --- failed logins


def test_backoff_after_free_failures_doubles_up_to_the_cap():
    backoff = tokens.PasswordBackoff(free=2, cap=8.0)
    waits = []
    for attempt in range(7):
        now = 100.0 + attempt * 0.01
        waits.append(round(backoff.wait("203.0.113.7", "alice", now), 2))
        backoff.failed("203.0.113.7", "alice", now)
    assert waits[:3] == [0.0, 0.0, 0.0]  # the free failures
    after = [round(backoff.wait("203.0.113.7", "alice", 100.06 + 0.01 * i), 2) for i in (0,)]
    assert after == [8.0]  # 1, 2, 4, 8 (capped) after failures 3..6
    assert backoff.wait("203.0.113.7", "alice", 108.07) == 0.0


def test_backoff_refuses_per_address_and_per_user_from_that_address():
    backoff = tokens.PasswordBackoff(free=0, cap=60.0)
    backoff.failed("203.0.113.7", "alice", 10.0)
    assert backoff.wait("203.0.113.7", "bob", 10.0) == 1.0  # the address waits
    assert backoff.wait("198.51.100.1", "alice", 10.0) == 0.0  # alice elsewhere is not refused
    assert backoff.wait("198.51.100.1", "bob", 10.0) == 0.0
    assert backoff.wait("203.0.113.7", "bob", 11.0) == 0.0


def test_a_guessed_at_user_is_paced_in_turn_never_refused_within_the_cap():
    """Finding 3: guesses at one user from many addresses are served a few a minute, in
    order; the user's own correct login waits its turn instead of being refused."""
    backoff = tokens.PasswordBackoff(free=2, cap=60.0, per_minute=10)
    for number in range(2):
        assert backoff.pace(f"198.51.100.{number}", "alice", 0.0) == 0.0
        backoff.failed(f"198.51.100.{number}", "alice", 0.0)
    # Now every check of alice from a newcomer takes a turn 9 s after the one before (two
    # thirds of 10 a minute), whoever asks; those that failed have their own line.
    turns = [backoff.pace(f"192.0.2.{number}", "alice", 1.0) for number in range(7)]
    assert turns == pytest.approx([0.0, 9.0, 18.0, 27.0, 36.0, 45.0, 54.0])
    assert backoff.pace("192.0.2.99", "alice", 1.0) is None  # over a minute away: refused
    assert backoff.pace("198.51.100.0", "alice", 1.0) == 0.0  # the line of those that failed
    assert backoff.pace("198.51.100.1", "alice", 1.0) == pytest.approx(18.0)  # a third of 10/min
    assert backoff.pace("192.0.2.99", "bob", 1.0) == 0.0  # other users are not paced
    assert backoff.wait("192.0.2.99", "alice", 1.0) == 0.0  # nor is alice refused


def test_one_address_has_at_most_one_turn_waiting():
    backoff = tokens.PasswordBackoff(free=0, cap=60.0, per_minute=10)
    backoff.failed("198.51.100.1", "alice", 0.0)
    assert backoff.pace("192.0.2.1", "alice", 0.0) == 0.0  # now: not waiting
    assert backoff.pace("192.0.2.1", "alice", 0.0) == 9.0  # waiting...
    assert backoff.pace("192.0.2.1", "alice", 1.0) is None  # ...so no other one
    assert backoff.pace("192.0.2.2", "alice", 1.0) == 17.0
    assert backoff.pace("192.0.2.1", "alice", 9.0) == 18.0  # its turn has come: another


def test_a_success_trusts_its_address_and_forgets_the_users_failures_not_the_addresss():
    backoff = tokens.PasswordBackoff(free=0, cap=90.0, per_minute=1)
    backoff.failed("203.0.113.7", "alice", 10.0)
    backoff.failed("192.0.2.1", "alice", 10.0)
    assert backoff.pace("198.51.100.1", "alice", 10.0) == 0.0
    assert backoff.pace("198.51.100.2", "alice", 10.0) == 90.0  # in line
    backoff.succeeded("198.51.100.1", "alice")
    assert backoff.wait("203.0.113.7", "bob", 10.0) == 1.0  # the guesser's address still waits
    backoff.failed("203.0.113.8", "alice", 11.0)
    backoff.failed("203.0.113.9", "alice", 11.0)
    assert backoff.pace("198.51.100.3", "alice", 11.0) == 0.0  # the user's line is new
    assert backoff.pace("198.51.100.4", "alice", 11.0) == 90.0
    assert backoff.pace("198.51.100.1", "alice", 11.0) == 0.0  # her own address skips it


def _guessed_at(
    attackers: int, *, minutes: int = 5, warm_up: int = 0, per_minute: int = 10
) -> tuple[int, int]:
    """Issue 12 review, finding 4, simulated with an explicit clock: `attackers` addresses
    guess alice's password, each asking every second (and for another turn whenever it has
    none waiting; refusals cost them nothing), at most 5 checks running at once (the check
    slots); after `warm_up` seconds alice, from an address of her own, tries every 10 s.
    Returns (alice's tries given a turn, of 6 a minute) and the guesses checked."""
    backoff = tokens.PasswordBackoff(free=5, cap=60.0, per_minute=per_minute)
    running: list[tuple[float, float, str]] = []  # (start, end, address)
    granted = checked = 0
    for second in range(warm_up + 60 * minutes):
        now = float(second)
        for check in sorted(running):
            if check[1] <= now:  # the check ends: a wrong guess
                running.remove(check)
                backoff.failed(check[2], "alice", check[1])
                checked += 1
        for number in range(attackers):
            address = f"192.0.{2 + number // 200}.{number % 200 + 1}"
            started = sum(1 for start, _, _ in running if start <= now)
            if backoff.wait(address, "alice", now) > 0 or started >= 5:
                continue
            turn = backoff.pace(address, "alice", now)
            if turn is not None:
                running.append((now + turn, now + turn + 0.25, address))
        alice_tries = second >= warm_up and second % 10 == 0
        if alice_tries and backoff.wait("198.51.100.7", "alice", now) <= 0:
            granted += backoff.pace("198.51.100.7", "alice", now) is not None
    return granted, checked


@pytest.mark.parametrize("attackers", [1, 3, 10, 20])
def test_guessers_from_many_addresses_do_not_keep_the_user_out(attackers):
    """Review of issue 12, finding 4: attackers reclaimed every freed turn of the user's
    one line and refused turns cost them nothing: from 10 addresses the user got 1 of 30
    tries a turn, from 20 none. Now the addresses that failed have a line of their own."""
    granted, _ = _guessed_at(attackers)
    assert granted >= 10, f"{attackers} guessing addresses: alice had {granted}/30 turns"
    granted, _ = _guessed_at(attackers, warm_up=300)  # an attack that has run a while
    assert granted >= 20, f"{attackers} guessing addresses: alice had {granted}/30 turns"


@pytest.mark.parametrize("attackers", [20, 300])
def test_guessing_one_user_from_many_addresses_stays_slow(attackers):
    """Finding 6's goal holds: at most `per_minute` checks of the user a minute, however
    many addresses guess (after the free failures and the first turns they queued)."""
    _, checked = _guessed_at(attackers, minutes=10)
    assert checked <= 5 + 10 * 10 + 7, f"{checked} guesses in 10 minutes"


def test_the_lines_forget_with_the_user_and_stay_bounded():
    backoff = tokens.PasswordBackoff(free=0, cap=5.0, limit=50)
    for number in range(200):
        backoff.failed(f"10.0.{number // 250}.{number % 250}", "alice", 0.0)
    assert len(backoff._lines) + backoff._suspects <= 50
    assert len(backoff._keys) <= 50
    for number in range(20):
        backoff.failed(f"10.1.0.{number}", f"user{number}", 0.0)
    assert len(backoff._lines) + backoff._suspects <= 50
    backoff.pace("192.0.2.1", "user19", 1000.0)  # quiet long enough: forgiven
    assert tokens.PasswordBackoff._user_key(backoff, "user19") not in backoff._lines


def test_a_wrong_pull_token_counts_for_its_address_only():
    backoff = tokens.PasswordBackoff(free=1, cap=60.0)
    backoff.failed_address("203.0.113.7", 0.0)
    assert backoff.address_wait("203.0.113.7", 0.0) == 0.0  # a free failure
    backoff.failed_address("203.0.113.7", 0.0)
    assert backoff.address_wait("203.0.113.7", 0.5) == 0.5
    assert backoff.wait("203.0.113.7", "alice", 0.5) == 0.5
    assert backoff.pace("198.51.100.1", "alice", 0.5) == 0.0  # no user is paced for it


def test_quiet_keys_are_forgiven_and_the_map_is_bounded():
    backoff = tokens.PasswordBackoff(free=3, cap=5.0, limit=10)
    backoff.failed("203.0.113.7", "alice", 0.0)
    backoff.failed("203.0.113.7", "alice", 0.0)
    backoff.failed("203.0.113.7", "alice", 0.0)
    backoff.failed("203.0.113.7", "alice", 0.0)
    assert backoff.wait("203.0.113.7", "alice", 0.5) == 0.5
    assert backoff.wait("203.0.113.7", "alice", 6.0) == 0.0  # 1 s wait + 5 s quiet: forgiven
    backoff.failed("203.0.113.7", "alice", 6.0)
    backoff.failed("203.0.113.7", "alice", 6.0)
    backoff.failed("203.0.113.7", "alice", 6.0)
    assert backoff.wait("203.0.113.7", "alice", 6.0) == 0.0  # counting from zero again
    for number in range(100):
        backoff.failed(f"198.51.100.{number}", f"user{number}", 7.0)
    assert len(backoff._keys) <= 10


def test_ipv6_clients_count_per_64():
    backoff = tokens.PasswordBackoff(free=0, cap=60.0)
    backoff.failed("2001:db8:1:2::1", "alice", 0.0)
    assert backoff.wait("2001:db8:1:2:ffff::9", "bob", 0.0) == 1.0
    assert backoff.wait("2001:db8:1:3::1", "bob", 0.0) == 0.0
    assert tokens.address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert tokens.address_key("not an address") == "not an address"


def test_ipv6_clients_count_per_the_configured_prefix_like_the_guard():
    backoff = tokens.PasswordBackoff(free=0, cap=60.0, ipv6_prefix=48)
    backoff.failed("2001:db8:1:2::1", "alice", 0.0)
    assert backoff.wait("2001:db8:1:3::1", "bob", 0.0) == 1.0  # the same /48
    assert backoff.wait("2001:db8:2::1", "bob", 0.0) == 0.0
    for address in ("2001:db8:1:2::1", "::ffff:203.0.113.7", "203.0.113.7", "junk"):
        assert tokens.address_key(address, 48) == access.limit_key(address, 48)


def test_long_user_names_cost_a_fixed_size_key():
    backoff = tokens.PasswordBackoff(free=0, cap=60.0)
    backoff.failed("203.0.113.7", "x" * 10000, 0.0)
    backoff.succeeded("203.0.113.7", "y" * 10000)
    assert all(len(key) < 64 for key in [*backoff._keys, *backoff._trusted])


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic("alice:pw"), ("alice", "pw")),
        (basic("alice:pw:with:colons"), ("alice", "pw:with:colons")),
        (basic("alice:"), ("alice", "")),
        ("basic " + base64.b64encode(b"u:p").decode(), ("u", "p")),
        (basic("no-colon"), None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"\xff:x").decode(), None),
        ("Bearer abc", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_basic(header, expected):
    assert tokens.parse_basic(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Bearer ", None), ("Basic x", None),
     (None, None)],
)  # fmt: skip
def test_parse_bearer(header, expected):
    assert tokens.parse_bearer(header) == expected


def test_parse_htpasswd():
    text = "# users\n\nalice:$2b$12$abc\nbob:$2y$10$def\n"
    assert tokens.parse_htpasswd(text) == {"alice": "$2b$12$abc", "bob": "$2y$10$def"}
    with pytest.raises(ValueError, match="line 1"):
        tokens.parse_htpasswd("nocolon")
    with pytest.raises(ValueError, match="bcrypt"):
        tokens.parse_htpasswd("carol:$apr1$md5hash")
    with pytest.raises(ValueError):
        tokens.parse_htpasswd(":$2b$x")


@given(st.text(max_size=60))
def test_parsers_never_crash(text):
    tokens.parse_basic(text)
    tokens.parse_bearer(text)
    with contextlib.suppress(ValueError):
        tokens.parse_htpasswd(text)
    with contextlib.suppress(Unauthorized):
        tokens.verify(KEY, text, service="s", now=0.0)


def test_a_check_counts_from_its_start_until_its_answer():
    """Issue 14 follow-up: checks begun at once get the tries of checks one after another."""
    backoff = tokens.PasswordBackoff(free=1, cap=60.0)
    starts = [backoff.start("203.0.113.7", "alice", 10.0) for _ in range(4)]
    assert [start.refused for start in starts] == [0.0, 0.0, 1.0, 1.0]
    backoff.abandoned("203.0.113.7", "alice")  # no answer: not a try
    backoff.succeeded("203.0.113.7", "alice")  # the right password: not a failure
    assert backoff.start("203.0.113.7", "bob", 10.0).refused == 0.0
    backoff.failed("203.0.113.7", "bob", 10.5)
    assert backoff.start("203.0.113.7", "bob", 10.5) == tokens.Start()  # the 2nd of free + 1
    backoff.failed("203.0.113.7", "bob", 10.5)
    assert backoff.start("203.0.113.7", "bob", 10.5).refused == 1.0
    assert backoff.start("203.0.113.7", "bob", 10.5, pull_token=True).refused == 1.0
    assert backoff.start("198.51.100.1", "x", 10.5, pull_token=True) == tokens.Start()
    assert backoff.wrong_pull_token("203.0.113.7", 10.5) == 1.0  # refused, not counted
    assert backoff.wrong_pull_token("203.0.113.7", 11.5) == 0.0  # counted
    assert backoff.address_wait("203.0.113.7", 11.5) == 2.0


def test_a_forgiven_key_counts_from_zero_at_its_next_failure():
    backoff = tokens.PasswordBackoff(free=1, cap=5.0)
    for _ in range(3):
        backoff.failed("203.0.113.7", "alice", 0.0)
    backoff.failed("203.0.113.7", "alice", 100.0)  # long after: forgiven, nobody asked
    assert backoff.wait("203.0.113.7", "alice", 100.0) == 0.0
