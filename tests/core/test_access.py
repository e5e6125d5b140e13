"""core/access.py: the access policies, decided without sockets or clocks."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import access
from vpsrelay.errors import (
    BadRequest,
    Denied,
    MisdirectedRequest,
    RelayError,
    TooManyRequests,
    Unsupported,
)


def nets(*texts: str) -> tuple[access.Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


# --- IP lists -------------------------------------------------------------------------------


def test_open_relay_admits_anyone_even_garbage():
    access.IpPolicy().check("203.0.113.9")
    access.IpPolicy().check("not an ip")


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("203.0.113.9", None),
        ("2001:db8::1", None),
        ("::ffff:203.0.113.9", None),  # IPv4-mapped is judged as the IPv4 address
        ("198.51.100.1", "ip_not_allowed"),
        ("203.0.113.66", "ip_denied"),  # deny wins over allow
        ("2001:db9::1", "ip_not_allowed"),
        ("unix-socket", "ip_not_allowed"),
        ("fe80::1%eth0", "ip_not_allowed"),
    ],
)
def test_allow_and_deny_lists(ip, reason):
    policy = access.IpPolicy(nets("203.0.113.0/24", "2001:db8::/32"), nets("203.0.113.64/26"))
    if reason is None:
        policy.check(ip)
    else:
        with pytest.raises(Denied) as caught:
            policy.check(ip)
        assert caught.value.reason == reason
        assert caught.value.status == 403


def test_deny_list_alone():
    policy = access.IpPolicy(deny=nets("10.0.0.0/8"))
    policy.check("192.0.2.1")
    policy.check("garbage")
    with pytest.raises(Denied):
        policy.check("10.1.2.3")


# --- repository globs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("library/*", "library/alpine", True),
        ("library/*", "library/a/b", False),
        ("library/*", "other/alpine", False),
        ("myorg/**", "myorg/a", True),
        ("myorg/**", "myorg/a/b/c", True),
        ("myorg/**", "myorg", False),
        ("**/cache", "a/b/cache", True),
        ("app?", "app1", True),
        ("app?", "app/", False),
        ("a.b-c_d", "a.b-c_d", True),
        ("a.b", "axb", False),  # the dot is literal
    ],
)
def test_globs(pattern, name, matches):
    assert bool(access.compile_glob(pattern).fullmatch(name)) is matches


@pytest.mark.parametrize("bad", ["Library/*", "a b", "x[0-9]", "", "^a"])
def test_bad_globs(bad):
    with pytest.raises(ValueError):
        access.compile_glob(bad)


def test_repository_policy():
    policy = access.RepositoryPolicy(allow=("library/*", "myorg/**"), deny=("myorg/secret/**",))
    policy.check("docker.io", "library/alpine")
    policy.check("docker.io", "myorg/app/x")
    for name in ("someone/tool", "myorg/secret/a"):
        with pytest.raises(Denied) as caught:
            policy.check("docker.io", name)
        assert caught.value.reason == "repository_denied"
        assert name in caught.value.message
    access.RepositoryPolicy().check("docker.io", "anything/goes")


# --- request shape ----------------------------------------------------------------------------


def test_user_agent_patterns():
    policy = access.UserAgentPolicy(("zgrab", r"^curl/7\."))
    policy.check("docker/20.10 go/go1.19")
    policy.check("")
    for agent in ("Mozilla/5.0 zgrab/0.x", "ZGrab", "curl/7.88.1"):
        with pytest.raises(Denied) as caught:
            policy.check(agent)
        assert caught.value.reason == "user_agent_denied"


@pytest.mark.parametrize(
    ("method", "target", "error", "reason"),
    [
        ("GET", "/v2/", None, None),
        ("GET", "http://evil.example/v2/", BadRequest, "absolute_form"),
        ("GET", "evil.example:443", BadRequest, "absolute_form"),
        ("OPTIONS", "*", BadRequest, "absolute_form"),
        ("GET", "//evil.example/v2/", BadRequest, "absolute_form"),
        ("CONNECT", "evil.example:443", Unsupported, "connect"),
        ("CONNECT", "/", Unsupported, "connect"),
    ],
)
def test_request_target(method, target, error, reason):
    if error is None:
        access.check_request_target(method, target)
        return
    with pytest.raises(error) as caught:
        access.check_request_target(method, target)
    assert caught.value.reason == reason
    assert 400 <= caught.value.status < 500


@pytest.mark.parametrize(
    ("method", "headers", "refused"),
    [
        ("GET", (), False),
        ("GET", (("content-length", "0"),), False),
        ("HEAD", (("content-length", " 0 "),), False),
        ("POST", (("content-length", "120"),), False),  # the /token form
        ("POST", (("transfer-encoding", "chunked"),), False),
        ("GET", (("content-length", "1000000"),), True),
        ("HEAD", (("content-length", "1"),), True),
        ("GET", (("transfer-encoding", "chunked"),), True),
        ("GET", (("transfer-encoding", "identity"),), True),
        ("GET", (("content-length", "junk"),), True),
    ],
)
def test_a_get_or_head_with_a_body_is_refused(method, headers, refused):
    """A GET body is thrown away by the relay: trickled while its client read nothing, it
    kept the download and the connection alive (issue 12 follow-up, finding 1)."""
    if not refused:
        access.check_request_body(method, headers)
        return
    with pytest.raises(BadRequest) as caught:
        access.check_request_body(method, headers)
    assert caught.value.reason == "body_not_allowed"
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("Relay.Example:443", "relay.example"),
        ("relay.example.", "relay.example"),
        ("[::1]:5000", "::1"),
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_host_name(host, name):
    assert access.host_name(host) == name


def test_host_policy():
    access.HostPolicy().check("anything")
    policy = access.HostPolicy(("relay.example", "127.0.0.1"), ("relay.example",))
    for host in ("relay.example", "RELAY.example:8443", "ghcr.relay.example", "127.0.0.1:5000"):
        policy.check(host)
    for host in ("evil.example", "relay.example.evil", "xrelay.example", ""):
        with pytest.raises(MisdirectedRequest) as caught:
            policy.check(host)
        assert caught.value.reason == "unknown_host"
        assert caught.value.status == 421


# --- rates and concurrency --------------------------------------------------------------------


def test_token_bucket_take_and_spend():
    bucket = access.TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0
    assert bucket.full_at() == pytest.approx(0.5 + 1.5)
    assert bucket.take(10.0, amount=3) == 0.0  # refilled, capped at burst
    assert bucket.spend(10.0, 4.0) == pytest.approx(2.0)  # 4 tokens of debt at 2/s
    assert bucket.spend(12.0, 0.0) == 0.0


def test_token_bucket_refills_after_a_clock_stepped_back():
    """Review of issue 14, finding 8: the shared buckets use wall time; a clock stepped
    back an hour must not leave a limited client waiting that hour."""
    bucket = access.TokenBucket(rate=1.0, burst=2.0, now=10_000.0)
    assert [bucket.take(10_000.0) for _ in range(2)] == [0.0, 0.0]
    stepped = 10_000.0 - 3600.0
    assert bucket.take(stepped) == pytest.approx(1.0)  # empty: one second, not an hour
    assert bucket.take(stepped + 1.0) == 0.0
    assert bucket.last == stepped + 1.0


def test_slot_counts_add_and_remove():
    slots = access.SlotCounts()
    slots.add("upstream", "c")
    slots.add("upstream", "c")
    assert slots.get("upstream", "c") == 2
    assert slots.get("streams", "c") == 0
    slots.remove("upstream", "c")
    slots.remove("upstream", "c")
    slots.remove("upstream", "c")  # more than added: stays at none
    assert slots.get("upstream", "c") == 0


def test_rate_limiter_trips_at_the_burst_and_says_when():
    limiter = access.RateLimiter(rate=0.5, burst=3)
    for _ in range(3):
        limiter.check("a", now=100.0)
    with pytest.raises(TooManyRequests) as caught:
        limiter.check("a", now=100.0)
    assert caught.value.reason == "rate_limited"
    assert dict(caught.value.headers)["retry-after"] == "2"
    limiter.check("b", now=100.0)  # per key
    limiter.check("a", now=102.0)  # one token back after 2 s


def test_rate_limiter_forgets_full_buckets_when_crowded():
    limiter = access.RateLimiter(rate=1.0, burst=1, max_keys=2)
    limiter.check("a", now=0.0)
    limiter.check("b", now=0.5)
    limiter.check("c", now=5.0)  # both full again: both forgotten
    assert len(limiter) == 1
    limiter.check("d", now=5.0)
    limiter.check("e", now=5.0)  # none full: the oldest goes
    assert len(limiter) == 2


def test_too_many_at_once_is_a_429_with_retry_after():
    refused = access.too_many_at_once(2)
    assert refused.status == 429
    assert refused.reason == "concurrency_limited"
    assert dict(refused.headers) == {"retry-after": "1"}


# --- the budget -------------------------------------------------------------------------------

NOON = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC).timestamp()


def test_budget_trips_at_the_figure_and_retries_at_midnight():
    budget = access.Budget(access.BudgetLimits(daily=1000))
    budget.check(None, NOON)
    budget.charge(None, 999, NOON)
    budget.check(None, NOON)  # 999 < 1000: one more download may start
    budget.charge(None, 1, NOON)
    with pytest.raises(TooManyRequests) as caught:
        budget.check(None, NOON)
    assert caught.value.reason == "budget_exhausted"
    assert dict(caught.value.headers)["retry-after"] == str(12 * 3600)
    budget.check(None, NOON + 12 * 3600)  # a new day
    assert budget.used("total|2026-11-29") == 1000


def test_budget_per_user_and_month():
    budget = access.Budget(access.BudgetLimits(monthly=10_000, user_daily=100))
    budget.charge("alice", 100, NOON)
    with pytest.raises(TooManyRequests):
        budget.check("alice", NOON)
    budget.check("bob", NOON)
    budget.check(None, NOON)
    budget.charge("bob", 9_900, NOON)
    with pytest.raises(TooManyRequests) as caught:
        budget.check("bob", NOON)
    first_of_december = dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    assert dict(caught.value.headers)["retry-after"] == str(int(first_of_december - NOON))
    assert "relay's" in caught.value.message


def test_budget_forgets_past_periods_and_ignores_nothing():
    budget = access.Budget(access.BudgetLimits(daily=10), {"total|2020-01-01": 5})
    budget.charge(None, 0, NOON)
    assert budget.counters == {"total|2020-01-01": 5}
    budget.charge(None, 3, NOON)
    assert set(budget.counters) == {"total|2026-11-29", "total|2026-11"}
    assert not access.BudgetLimits().enabled
    assert access.BudgetLimits(user_monthly=1).enabled


@pytest.mark.parametrize(
    ("document", "counters"),
    [
        (
            {"counters": {"total|2026-11": 5, "bad": -1, "flag": True, "x": "1"}},
            {"total|2026-11": 5},
        ),
        ({"counters": []}, {}),
        ([], {}),
        (None, {}),
    ],
)
def test_parse_budget_state(document, counters):
    assert access.parse_budget_state(document) == counters


def test_period_ends():
    assert access.seconds_to_next_day(NOON) == 12 * 3600
    last = dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    assert access.seconds_to_next_day(last) == 1
    assert access.seconds_to_next_month(last) == 1


# --- redirect target addresses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),
        ("100.64.0.1", "not globally routable"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("192.0.2.1", "private"),  # documentation range
    ],
)
def test_address_refusal(address, reason):
    assert access.address_refusal(ipaddress.ip_address(address)) == reason


def test_address_refusal_allowed_networks():
    allowed = nets("127.0.0.1/32", "10.0.0.0/8")
    assert access.address_refusal(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert access.address_refusal(ipaddress.ip_address("10.9.9.9"), allowed) is None
    assert access.address_refusal(ipaddress.ip_address("127.0.0.2"), allowed) == "loopback"


@given(st.ip_addresses())
def test_address_refusal_is_total(address):
    reason = access.address_refusal(address)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        assert address.is_global


@given(st.text(max_size=40))
def test_policies_only_raise_relay_errors(text):
    statuses: list[int] = []
    for check in (
        access.IpPolicy(nets("10.0.0.0/8")).check,
        access.HostPolicy(("relay.example",)).check,
        access.UserAgentPolicy(("zgrab",)).check,
        lambda t: access.check_request_target("GET", t),
        lambda t: access.RepositoryPolicy(allow=("a/*",)).check("r", t),
    ):
        try:
            check(text)
        except RelayError as exc:
            statuses.append(exc.status)
    assert all(400 <= status < 500 for status in statuses)


# --- what the per-client limits are keyed by ---------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("203.0.113.9", 64, "203.0.113.9"),
        ("::ffff:203.0.113.9", 64, "203.0.113.9"),  # IPv4-mapped: the IPv4 client
        ("2001:db8:1:2::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2::1", 56, "2001:db8:1::/56"),
        ("2001:db8:1:2::1", 128, "2001:db8:1:2::1/128"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("unix-socket", 64, "unix-socket"),
    ],
)
def test_limit_key(ip, prefix, key):
    assert access.limit_key(ip, prefix) == key


@given(st.integers(0, 2**64 - 1))
def test_one_ipv6_64_is_one_rate_limit_bucket(interface_id):
    limiter = access.RateLimiter(rate=1, burst=1)
    limiter.check(access.limit_key("2001:db8:aa:bb::1"), 0.0)
    address = str(ipaddress.IPv6Address((0x20010DB800AA00BB << 64) | interface_id))
    with pytest.raises(TooManyRequests):
        limiter.check(access.limit_key(address), 0.0)
    assert len(limiter) == 1


# --- the budget: downloads must fit to start, and hold a bounded look-ahead -----------------


def _send(
    budget: access.Budget, hold: access.Hold, total: int, piece: int = 10, now: float = NOON
) -> int:
    """Send up to `total` bytes of `hold`'s body in pieces; what was sent before a refusal."""
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        try:
            budget.take(hold, size, now)
        except TooManyRequests:
            break
        sent += size
    return sent


def test_concurrent_downloads_cannot_overrun_the_budget_between_them():
    budget = access.Budget(access.BudgetLimits(daily=1000))  # each hold here is whole
    first, second = budget.open(None, NOON), budget.open(None, NOON)
    budget.admit(first, 600, NOON)
    with pytest.raises(TooManyRequests) as caught:
        budget.admit(second, 600, NOON)  # 600 held + 600 > 1000, though nothing is charged yet
    assert caught.value.reason == "budget_exhausted"
    assert "400 bytes left" in caught.value.message
    assert 0 < int(dict(caught.value.headers)["retry-after"]) <= 86400
    budget.admit(second, 400, NOON)
    with pytest.raises(TooManyRequests):
        budget.open(None, NOON)  # all of it is held: refused before asking the upstream
    assert _send(budget, first, 600) == 600
    assert _send(budget, second, 100) == 100
    budget.settle(first, 600, NOON)
    budget.settle(second, 100, NOON)  # ended early: only what was sent is charged
    assert budget.used("total|2026-11-29") == 700
    assert budget.reserved == {}
    assert budget.ahead == {}
    budget.admit(budget.open(None, NOON), 300, NOON)


def test_a_download_holds_a_look_ahead_not_its_whole_length():
    """Issue 12, review of finding 11: a download held its whole length until it ended, so
    a few slow readers of big blobs kept the budget spent for everyone else."""
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=100)
    slow = budget.open(None, NOON, "attacker")
    budget.admit(slow, 900, NOON)  # fits in what is left...
    assert (slow.amount, slow.sent) == (100, 0)  # ...but holds only its look-ahead
    assert _send(budget, slow, 30) == 30
    assert (slow.amount, slow.ahead) == (100, 70)  # within the hold: nothing more held
    other = budget.open(None, NOON, "victim")
    budget.admit(other, 800, NOON)  # 1000 - 100 held: room for it while the slow one trickles
    assert budget.reserved["total|2026-11-29"] == 200
    assert _send(budget, slow, 80) == 80  # past the hold: grown to 110 sent + 100 ahead
    assert (slow.amount, slow.sent) == (210, 110)
    # The head after the upstream's answer (the same body): admitted already, though the
    # slow one has grown since.
    budget.admit(other, 800, NOON)
    assert other.amount == 100
    with pytest.raises(TooManyRequests) as caught:
        budget.admit(budget.open(None, NOON), 691, NOON)  # 1000 - 210 - 100 = 690 left
    assert "690 bytes left, too few for 691" in caught.value.message


def test_the_look_ahead_never_passes_the_declared_end():
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=100)
    hold = budget.open(None, NOON)
    budget.admit(hold, 150, NOON)
    assert hold.amount == 100
    assert _send(budget, hold, 101) == 101
    assert hold.amount == 150  # 101 sent, 49 to go
    assert _send(budget, hold, 49) == 49
    assert hold.ahead == 0


def test_downloads_admitted_together_are_cut_at_the_budget_never_past_it():
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=100)
    first, second = budget.open(None, NOON, "a"), budget.open(None, NOON, "b")
    budget.admit(first, 600, NOON)
    budget.admit(second, 600, NOON)  # each fits what is left; both together do not
    sent_first = _send(budget, first, 600)
    sent_second = _send(budget, second, 600)
    assert (sent_first, sent_second) == (600, 400)  # the second is cut where the budget ends
    with pytest.raises(TooManyRequests) as caught:
        budget.take(second, 1, NOON)
    assert caught.value.reason == "budget_exhausted"
    budget.settle(first, sent_first, NOON)
    budget.settle(second, sent_second, NOON)
    assert budget.used("total|2026-11-29") == 1000


def test_one_client_holds_at_most_its_cap_ahead_of_what_it_sent():
    budget = access.Budget(access.BudgetLimits(daily=10**6), lookahead=100, ahead_per_client=250)
    holds = [budget.open(None, NOON, "attacker") for _ in range(4)]
    for hold in holds:
        budget.admit(hold, 10_000, NOON)
    assert [hold.amount for hold in holds] == [100, 100, 50, 0]
    assert budget.ahead == {"attacker": 250}
    assert _send(budget, holds[3], 10) == 10  # at the cap: only what goes out is held
    assert (holds[3].amount, holds[3].ahead) == (10, 0)
    other = budget.open(None, NOON, "victim")
    budget.admit(other, 10_000, NOON)
    assert other.amount == 100  # another client's look-ahead is its own
    assert _send(budget, holds[0], 101) == 101  # sending frees the cap for the next top-up
    assert budget.ahead["attacker"] <= 250
    for hold in holds:
        budget.settle(hold, hold.sent, NOON)
    budget.settle(other, 0, NOON)
    assert budget.ahead == {}
    assert budget.reserved == {}


def test_a_hold_counts_for_the_user_and_the_total():
    budget = access.Budget(access.BudgetLimits(daily=1000, user_daily=500))
    alice = budget.open("alice", NOON)
    budget.admit(alice, 500, NOON)
    with pytest.raises(TooManyRequests) as caught:
        budget.admit(budget.open("alice", NOON), 1, NOON)
    assert "your traffic budget" in caught.value.message
    with pytest.raises(TooManyRequests) as caught:
        budget.admit(budget.open("bob", NOON), 501, NOON)
    assert "this relay's traffic budget" in caught.value.message


def test_unknown_length_holds_a_look_ahead_clamped_to_what_is_left():
    budget = access.Budget(access.BudgetLimits(daily=150), lookahead=100)
    hold, late = budget.open(None, NOON), budget.open(None, NOON)
    budget.admit(hold, None, NOON)
    assert hold.amount == 100
    assert _send(budget, hold, 100) == 100  # within the hold: nothing more held
    assert hold.amount == 100
    assert _send(budget, hold, 1) == 1
    assert hold.amount == 150  # the rest, not a full look-ahead
    assert _send(budget, hold, 100, piece=1) == 49
    with pytest.raises(TooManyRequests):
        budget.admit(late, None, NOON)  # a length not said: refused when not one byte is left


def test_no_limit_for_an_anonymous_user_holds_nothing_back():
    budget = access.Budget(access.BudgetLimits(user_daily=10))
    hold = budget.open(None, NOON, "client")
    budget.admit(hold, 10**12, NOON)
    budget.take(hold, 10**12, NOON)
    assert budget.room(hold) is None
    assert budget.reserved == {}
    assert budget.ahead == {}
    budget.settle(hold, 10**12, NOON)
    assert budget.reserved == {}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.one_of(st.none(), st.integers(0, 400)),
            st.integers(0, 400),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_served_never_exceeds_the_budget(downloads):
    """Any interleaving of opens, admissions, sends and settles: what was sent stays within
    the limit, and what a download and a client hold ahead stays within their bounds."""
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=60, ahead_per_client=100)
    open_holds: list[tuple[access.Hold, int]] = []
    served = 0
    for client, length, wanted, finish_one in downloads:
        try:
            hold = budget.open(None, NOON, client)
            budget.admit(hold, length, NOON)
            open_holds.append((hold, wanted if length is None else min(wanted, length)))
        except TooManyRequests:
            pass
        for hold, wanted in open_holds:  # each sends a piece
            sent = _send(budget, hold, min(wanted, hold.sent + 37) - hold.sent, piece=13)
            served += sent
            assert hold.ahead <= 60
        assert all(ahead <= 100 for ahead in budget.ahead.values())
        assert budget.used("total|2026-11-29") + budget.reserved.get("total|2026-11-29", 0) <= 1000
        if finish_one and open_holds:
            hold, _ = open_holds.pop(0)
            budget.settle(hold, hold.sent, NOON)
    for hold, _ in open_holds:
        budget.settle(hold, hold.sent, NOON)
    assert budget.used("total|2026-11-29") == served <= 1000
    assert budget.reserved == {}
    assert budget.ahead == {}


# --- the budget across a day or month boundary (issue 12 review, finding 3) -----------------

MIDNIGHT = dt.datetime(2026, 11, 30, tzinfo=dt.UTC).timestamp()
MONTH_END = dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()


def test_a_download_running_past_midnight_is_held_to_the_new_days_budget():
    """A hold kept its old day's counter keys: once a charge after midnight forgot that
    day's counters, the old download had a whole day's limit of room again, on top of what
    the new day's downloads were allowed."""
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=100)
    late = budget.open(None, MIDNIGHT - 10, "late")
    budget.admit(late, 1000, MIDNIGHT - 10)
    assert _send(budget, late, 100, now=MIDNIGHT - 5) == 100  # sent on the old day
    early = budget.open(None, MIDNIGHT + 5, "early")
    budget.admit(early, 600, MIDNIGHT + 5)
    assert _send(budget, early, 600, now=MIDNIGHT + 5) == 600
    budget.settle(early, 600, MIDNIGHT + 5)  # forgets the old day's counters
    sent_after_midnight = _send(budget, late, 900, now=MIDNIGHT + 10)
    assert sent_after_midnight == 400  # what the new day has left, not 900
    budget.settle(late, late.sent, MIDNIGHT + 20)
    assert budget.used("total|2026-11-30") == 1000  # the old day's 100 not charged here
    assert budget.reserved == {}
    assert budget.ahead == {}


def test_a_download_past_midnight_charges_each_day_what_was_sent_in_it():
    budget = access.Budget(access.BudgetLimits(daily=1000, monthly=10_000), lookahead=100)
    hold = budget.open("alice", MIDNIGHT - 10, "client")
    budget.admit(hold, 500, MIDNIGHT - 10)
    assert _send(budget, hold, 150, now=MIDNIGHT - 5) == 150
    assert _send(budget, hold, 50, now=MIDNIGHT + 5) == 50
    assert budget.used("total|2026-11-29") == 150  # charged when the day ended
    assert budget.reserved["total|2026-11-30"] == hold.amount - 150
    budget.settle(hold, 200, MIDNIGHT + 10)
    assert budget.used("total|2026-11-30") == 50  # only the rest
    assert budget.used("total|2026-11") == 200
    assert budget.used("user:alice|2026-11-30") == 50
    assert budget.reserved == {}


def test_a_download_past_the_month_end_is_held_to_the_new_months_budget():
    """The monthly limit is the one on the VPS bill: what was left of the old month must
    not be spendable again in the new one."""
    budget = access.Budget(access.BudgetLimits(monthly=1000), lookahead=100)
    budget.charge(None, 900, MONTH_END - 60)
    late = budget.open(None, MONTH_END - 10, "late")
    budget.admit(late, 100, MONTH_END - 10)
    assert _send(budget, late, 50, now=MONTH_END - 5) == 50
    budget.charge(None, 980, MONTH_END + 1)  # the new month's downloads so far
    assert _send(budget, late, 50, now=MONTH_END + 2) == 20  # what the new month has left
    with pytest.raises(TooManyRequests) as caught:
        budget.take(late, 1, MONTH_END + 3)
    assert caught.value.reason == "budget_exhausted"
    budget.settle(late, late.sent, MONTH_END + 4)
    assert budget.used("total|2026-12") == 1000


def test_a_download_settled_after_midnight_without_sending_more_charges_the_old_day():
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=100)
    hold = budget.open(None, MIDNIGHT - 10)
    budget.admit(hold, 100, MIDNIGHT - 10)
    assert _send(budget, hold, 100, now=MIDNIGHT - 5) == 100
    budget.settle(hold, 100, MIDNIGHT + 5)
    assert budget.used("total|2026-11-30") == 0
    assert budget.reserved == {}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.one_of(st.none(), st.integers(0, 400)),
            st.integers(0, 400),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(0, 30),
    st.sampled_from([MIDNIGHT, MONTH_END]),
)
def test_served_never_exceeds_the_budget_across_a_period_boundary(downloads, switch, boundary):
    """As `test_served_never_exceeds_the_budget`, with the clock passing a midnight (or a
    month's end) after `switch` steps: each period is served at most its limit."""
    limits = (
        access.BudgetLimits(daily=1000)
        if boundary == MIDNIGHT
        else access.BudgetLimits(monthly=1000)
    )
    budget = access.Budget(limits, lookahead=60, ahead_per_client=100)
    open_holds: list[tuple[access.Hold, int]] = []
    served = {"before": 0, "after": 0}
    for step, (client, length, wanted, finish_one) in enumerate(downloads):
        period, now = (
            ("before", boundary - 30 + step) if step < switch else ("after", boundary + step)
        )
        try:
            hold = budget.open(None, now, client)
            budget.admit(hold, length, now)
            open_holds.append((hold, wanted if length is None else min(wanted, length)))
        except TooManyRequests:
            pass
        for hold, wanted in open_holds:  # each sends a piece
            sent = _send(budget, hold, min(wanted, hold.sent + 37) - hold.sent, 13, now)
            served[period] += sent
            assert hold.ahead <= 60
        assert all(ahead <= 100 for ahead in budget.ahead.values())
        assert served["before"] <= 1000
        assert served["after"] <= 1000
        if finish_one and open_holds:
            hold, _ = open_holds.pop(0)
            budget.settle(hold, hold.sent, now)
    end = boundary + 3600
    for hold, _ in open_holds:
        budget.settle(hold, hold.sent, end)
    day, month = access._periods(end)
    key = f"total|{day}" if boundary == MIDNIGHT else f"total|{month}"
    assert budget.used(key) == served["after"]
    assert budget.reserved == {}
    assert budget.ahead == {}


# --- issue 14: one process's share of a budget several processes share ------------------------


def test_a_share_asks_only_past_its_grants_and_gives_back_when_idle():
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=100)
    share = access.BudgetShare(budget, grant=150)
    day = "total|2026-11-29"
    share.seen(day, 400)  # the other processes hold or sent 400
    hold = budget.open(None, NOON, "c")
    assert share.wants(hold, 100) == [(day, 1000, 100, 50)]
    share.granted(day, 150, 550)
    assert budget.counters[day] == 400  # the shared total less this process's grant
    budget.admit(hold, 300, NOON)
    assert share.wants(hold, 50) == []  # within the grant: the store is not asked
    assert share.wants(hold, 60) == [(day, 1000, 10, 140)]
    _send(budget, hold, 100)
    before = dict(budget.counters)
    budget.settle(hold, hold.sent, NOON)
    # The day's bytes were granted before they went out; the month has no limit (no
    # grants) and is counted for all as it is.
    assert share.charged(before) == {"total|2026-11": 100}
    assert share.unspent[day] == 50
    assert share.idle() == [(day, 50)]
    assert share.idle() == []


def test_a_share_reports_bytes_charged_past_its_grants():
    budget = access.Budget(access.BudgetLimits(daily=1000))
    share = access.BudgetShare(budget)
    hold = budget.open(None, NOON, "c")
    before = dict(budget.counters)
    budget.settle(hold, 70, NOON)  # an error body: charged at its end, never held
    # The day's counter has a limit, the month's none: both are counted for all.
    assert share.charged(before) == {"total|2026-11-29": 70, "total|2026-11": 70}


def test_a_share_gives_back_the_grants_of_a_period_that_ended():
    budget = access.Budget(access.BudgetLimits(daily=1000), lookahead=100)
    share = access.BudgetShare(budget)
    old_day = "total|2026-11-29"
    hold = budget.open(None, NOON, "c")
    share.granted(old_day, 200, 200)
    budget.admit(hold, None, NOON)
    _send(budget, hold, 50)
    before = dict(budget.counters)
    budget.settle(hold, hold.sent, NOON + 86400)  # sent on the old day, settled the next
    share.charged(before)
    assert share.unspent[old_day] == 150
    assert (old_day, 150) in share.idle()  # nothing of the old day stays granted
