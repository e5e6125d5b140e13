"""Access policy: who may use the relay, for what, and how much.

Pure decisions, each a small class or function that takes the facts (an address,
a name, `now`) and either returns or raises a `ClientError` whose `reason` names
the rule; `vpsrelay.access.guard` applies them per request and counts the refusals.

* IP allow/deny lists (CIDR), on the real client address.
* Repository allow/deny globs per registry: `*` is one path segment, `**` any number.
* User-Agent deny patterns (regular expressions, case-insensitive).
* Request-target checks: absolute-form targets, `CONNECT`, `OPTIONS *`, unknown Hosts,
  a GET or HEAD with a body.
* Limits: a token bucket per key (request rate, stream bandwidth), the refusal of a
  count per key over its limit (`limit_key`: an IPv4 address, an IPv6 /64; the counts
  are in `access.shared`), and a traffic budget per UTC day and month, total and per
  user, shared by processes through `BudgetShare`.
* Redirect-target addresses: only globally routable ones, unless the operator allows.
"""

from __future__ import annotations

import calendar
import datetime as dt
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vpsrelay.errors import BadRequest, Denied, MisdirectedRequest, TooManyRequests, Unsupported

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    # ::ffff:10.0.0.1 is 10.0.0.1: judge the IPv4 address a mapped one carries.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# --- who: client addresses ---------------------------------------------------------------


DEFAULT_IPV6_PREFIX = 64


def limit_key(client_ip: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The key a client's rate and stream limits are counted under.

    An IPv4 address is one client. An IPv6 address is not: a host gets a whole /64 (or
    more) and picks any address in it, so keyed by address one host would hold 2**64
    buckets. IPv6 clients are keyed by their /`ipv6_prefix` network; an IPv4-mapped
    address by the IPv4 address it carries; anything unparsable by its text.
    """
    address = _address(client_ip)
    if address is None:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class IpPolicy:
    """CIDR lists; `allow` empty means everyone, and `deny` wins over `allow`."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    def check(self, client_ip: str) -> None:
        """Refuse a client address the lists do not admit.

        Raises:
            Denied: reason `ip_denied` (on the deny list) or `ip_not_allowed`.
        """
        if not self.allow and not self.deny:
            return
        address = _address(client_ip)
        if address is None:
            # A unix socket peer or a proxy's garbage: only an open relay lets it in.
            if self.allow:
                raise Denied("this relay does not serve your address", reason="ip_not_allowed")
            return
        if any(address in network for network in self.deny):
            raise Denied("this relay does not serve your address", reason="ip_denied")
        if self.allow and not any(address in network for network in self.allow):
            raise Denied("this relay does not serve your address", reason="ip_not_allowed")


# --- what: repositories --------------------------------------------------------------------

_GLOB_CHARS = re.compile(r"[a-z0-9._/*?-]+")


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A repository glob as a regular expression: `*` and `?` stay within one segment.

    `library/*` matches `library/alpine` but not `library/a/b`; `myorg/**` matches every
    repository below `myorg/`; `**/cache` matches `cache` at any depth below the top.

    Raises:
        ValueError: characters a repository name cannot hold.
    """
    if not _GLOB_CHARS.fullmatch(pattern):
        raise ValueError(f"not a repository glob (a-z 0-9 . _ - / * ?): {pattern!r}")
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts))


@dataclass(frozen=True, slots=True)
class RepositoryPolicy:
    """Globs on the upstream's repository name (`library/alpine`); deny wins."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    _allow: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _deny: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allow", tuple(compile_glob(p) for p in self.allow))
        object.__setattr__(self, "_deny", tuple(compile_glob(p) for p in self.deny))

    def check(self, registry: str, name: str) -> None:
        """Refuse a repository the lists do not admit.

        Raises:
            Denied: reason `repository_denied`.
        """
        denied = any(p.fullmatch(name) for p in self._deny)
        if denied or (self._allow and not any(p.fullmatch(name) for p in self._allow)):
            raise Denied(
                f"repository {name!r} of {registry} is not served by this relay",
                reason="repository_denied",
            )


# --- how: request shape --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserAgentPolicy:
    """Regular expressions searched (case-insensitively) in the User-Agent."""

    patterns: tuple[str, ...] = ()
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = tuple(re.compile(p, re.IGNORECASE) for p in self.patterns)
        object.__setattr__(self, "_compiled", compiled)

    def check(self, user_agent: str) -> None:
        """Raises:
        Denied: reason `user_agent_denied`.
        """
        if any(p.search(user_agent) for p in self._compiled):
            raise Denied("this relay does not serve your client", reason="user_agent_denied")


def check_request_target(method: str, raw_path: str) -> None:
    """Refuse what only a proxy would be sent (RFC 9112 §3.2).

    An origin server gets the origin-form (`/v2/...`); the absolute-form
    (`http://host/...`) and authority-form (`CONNECT host:port`) are for proxies, and a
    relay that answered them could be taken for an open proxy; `OPTIONS *` has no use.

    Raises:
        Unsupported: `CONNECT` (405, reason `connect`).
        BadRequest: any target that is not origin-form (400, reason `absolute_form`).
    """
    if method == "CONNECT":
        raise Unsupported("this relay is not a proxy: CONNECT is refused", reason="connect")
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise BadRequest(
            "this relay is not a proxy: only origin-form request targets", reason="absolute_form"
        )


# Methods whose request carries no body (RFC 9110 §9.3.1-2 gives it no meaning).
BODILESS_METHODS = frozenset({"GET", "HEAD"})


def check_request_body(method: str, headers: Iterable[tuple[str, str]]) -> None:
    """Refuse a GET or HEAD that announces a body (`Content-Length` above 0, or any
    `Transfer-Encoding`): no registry client sends one, and one trickled a byte at a time
    while its client read nothing kept a blob download and its connection alive.

    Raises:
        BadRequest: 400, reason `body_not_allowed`.
    """
    if method not in BODILESS_METHODS:
        return
    for name, value in headers:
        if name == "transfer-encoding" or (name == "content-length" and value.strip() != "0"):
            raise BadRequest(f"a {method} request carries no body", reason="body_not_allowed")


def host_name(host: str) -> str:
    """The name in a Host header value, lower case, without port or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.rpartition(":")[0]
    return host.rstrip(".")


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The names the relay answers for; none configured means any Host."""

    names: tuple[str, ...] = ()
    base_domains: tuple[str, ...] = ()

    def check(self, host: str) -> None:
        """Raises:
        MisdirectedRequest: a Host that is no configured name (421, reason `unknown_host`).
        """
        if not self.names:
            return
        name = host_name(host)
        if name in self.names:
            return
        for base in self.base_domains:
            if name == base or name.endswith("." + base):
                return
        raise MisdirectedRequest(
            f"this relay does not answer for host {name!r}", reason="unknown_host"
        )


# --- how much: rates, concurrency, bandwidth -------------------------------------------------


class TokenBucket:
    """One bucket: `rate` tokens a second, at most `burst`; may run into debt (pacing)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def _refill(self, now: float) -> None:
        # A clock stepped back (the shared buckets use wall time) restarts the refill
        # from the new now rather than waiting out the step with no refill.
        self.last = min(self.last, now)
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def take(self, now: float, amount: float = 1.0) -> float:
        """Take `amount` if there is that much; return 0, or the seconds until there is."""
        self._refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate

    def spend(self, now: float, amount: float) -> float:
        """Take `amount` unconditionally; return the seconds to wait to pay the debt back."""
        self._refill(now)
        self.tokens -= amount
        return max(0.0, -self.tokens / self.rate)

    def full_at(self) -> float:
        """When the bucket will be full again."""
        return self.last + max(0.0, self.burst - self.tokens) / self.rate


def rate_limited(rate: float, burst: float, wait: float) -> TooManyRequests:
    """The refusal of a request over the rate; `wait`: seconds until one more may come."""
    return TooManyRequests(
        f"too many requests: at most {rate:g} a second (bursts of {burst:g})",
        reason="rate_limited",
        headers=(("retry-after", str(max(1, math.ceil(wait)))),),
    )


def too_many_at_once(limit: int) -> TooManyRequests:
    """The refusal of a download over a client's count of streams at once."""
    return TooManyRequests(
        f"too many downloads at once: at most {limit} per client",
        reason="concurrency_limited",
        headers=(("retry-after", "1"),),
    )


class RateLimiter:
    """A token bucket per key (client IP): `rate` requests a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key: str, now: float) -> None:
        """Count one request for `key`.

        Raises:
            TooManyRequests: the bucket is empty (reason `rate_limited`, with Retry-After).
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        wait = bucket.take(now)
        if wait > 0:
            raise rate_limited(self.rate, self.burst, wait)

    def _prune(self, now: float) -> None:
        # A full bucket is the same as no bucket: forget those; if none is full, the oldest.
        full = [key for key, bucket in self._buckets.items() if bucket.full_at() <= now]
        for key in full or sorted(self._buckets, key=lambda k: self._buckets[k].last)[:1]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class SlotCounts:
    """Streams open per (kind, client key) in this process: its real count, which the
    shared `slots` rows of limits.db mirror when they can be written."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], int] = {}

    def get(self, kind: str, key: str) -> int:
        return self._open.get((kind, key), 0)

    def add(self, kind: str, key: str) -> None:
        self._open[kind, key] = self.get(kind, key) + 1

    def remove(self, kind: str, key: str) -> None:
        left = self.get(kind, key) - 1
        if left > 0:
            self._open[kind, key] = left
        else:
            self._open.pop((kind, key), None)


# --- how much: the traffic budget ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """Bytes per UTC day and month, for everyone together and for each user; 0 is no limit."""

    daily: int = 0
    monthly: int = 0
    user_daily: int = 0
    user_monthly: int = 0

    @property
    def enabled(self) -> bool:
        return any((self.daily, self.monthly, self.user_daily, self.user_monthly))


def _periods(now: float) -> tuple[str, str]:
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m")


def next_midnight(now: float) -> float:
    """When the UTC day of `now` ends (and with the last day, its month)."""
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    midnight = dt.datetime(moment.year, moment.month, moment.day, tzinfo=dt.UTC)
    return (midnight + dt.timedelta(days=1)).timestamp()


def seconds_to_next_day(now: float) -> int:
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    midnight = dt.datetime(moment.year, moment.month, moment.day, tzinfo=dt.UTC)
    return max(1, math.ceil((midnight + dt.timedelta(days=1)).timestamp() - now))


def seconds_to_next_month(now: float) -> int:
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    days = calendar.monthrange(moment.year, moment.month)[1]
    first = dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC)
    return max(1, math.ceil((first + dt.timedelta(days=days)).timestamp() - now))


MiB = 1024 * 1024
# How far ahead of what it has sent one download holds the budget: a few pieces (the
# cache reads 1 MiB at a time), so a top-up is rare, while what a stream holds and has
# not sent stays small whatever its length or however slowly its client reads.
LOOKAHEAD = 4 * MiB
# What one client key may hold ahead of what its downloads have sent, all together.
AHEAD_PER_CLIENT = 16 * MiB


@dataclass(slots=True)
class Hold:
    """One download's reservation: the counters it was made under, and how many bytes.

    `amount` is what the download has sent (`sent`) plus what it holds ahead of that,
    never more than `Budget.lookahead` (nor past the body's declared `end`).
    """

    user: str | None
    client: str
    limits: tuple[tuple[str, int, int], ...]  # (counter key, limit, seconds to period end)
    amount: int = 0
    sent: int = 0
    end: int | None = None  # where the body ends (`sent` + its declared length), if said
    admitted: bool = False
    # The periods `limits` are keyed by end at `period_end` (the next UTC midnight). A
    # download still running then has what it sent so far charged to those periods
    # (`charged` of `sent`), and goes on under the new periods' keys, checked afresh.
    keyed_at: float = 0.0
    period_end: float = math.inf
    charged: int = 0

    @property
    def ahead(self) -> int:
        return self.amount - self.sent


class Budget:
    """Bytes served per period, total and per user, and the limits they are held to.

    Counters are keyed `total|2026-11-29`, `total|2026-11`, `user:alice|2026-11`; only
    the current periods are kept. A download holds (reserves) its bytes before they go
    out, and no hold may grow past what the charged bytes and every other hold leave:
    so the bytes served never pass a limit, however many downloads run at once.

    A hold is a bounded look-ahead (`lookahead` past what was sent, `ahead_per_client`
    for all of one client's downloads), grown as bytes are sent, not the whole length:
    a download held whole until it ended would let a client that reads slowly keep the
    budget counted as spent, without one byte more going out. Admission (`admit`) asks
    that the declared length fit in what the charged bytes and the holds leave; that the
    unsent rest of the downloads in flight is not counted is the price: one may still be
    cut off mid-body when the budget truly runs out, but never serve past it.
    """

    def __init__(
        self,
        limits: BudgetLimits,
        counters: Mapping[str, int] | None = None,
        *,
        lookahead: int = LOOKAHEAD,
        ahead_per_client: int = AHEAD_PER_CLIENT,
    ) -> None:
        self.limits = limits
        self.counters: dict[str, int] = dict(counters or {})
        self.lookahead = lookahead
        self.ahead_per_client = ahead_per_client  # 0: no cap beyond each stream's
        self.reserved: dict[str, int] = {}  # held by downloads in flight; not saved
        self.ahead: dict[str, int] = {}  # per client key: held and not yet sent

    def _keys(self, user: str | None, now: float) -> list[tuple[str, int, int]]:
        """(counter key, limit, seconds to the period's end) that apply to `user`."""
        day, month = _periods(now)
        keys = [
            (f"total|{day}", self.limits.daily, seconds_to_next_day(now)),
            (f"total|{month}", self.limits.monthly, seconds_to_next_month(now)),
        ]
        if user is not None:
            keys += [
                (f"user:{user}|{day}", self.limits.user_daily, seconds_to_next_day(now)),
                (f"user:{user}|{month}", self.limits.user_monthly, seconds_to_next_month(now)),
            ]
        return keys

    def _committed(self, key: str) -> int:
        return self.counters.get(key, 0) + self.reserved.get(key, 0)

    def check(self, user: str | None, now: float) -> None:
        """Refuse a new download when a budget it falls under is spent (or all held).

        Raises:
            TooManyRequests: reason `budget_exhausted`, Retry-After at the period's end.
        """
        for key, limit, retry in self._keys(user, now):
            if limit and self._committed(key) >= limit:
                raise _spent(key, retry, "is spent until the period ends")

    def open(self, user: str | None, now: float, client: str = "") -> Hold:
        """An empty hold for a new download by `client` (a `limit_key`).

        Raises:
            TooManyRequests: as `check`.
        """
        self.check(user, now)
        return Hold(
            user, client, self._limits(user, now), keyed_at=now, period_end=next_midnight(now)
        )

    def _limits(self, user: str | None, now: float) -> tuple[tuple[str, int, int], ...]:
        return tuple(key for key in self._keys(user, now) if key[1])

    def room(self, hold: Hold) -> int | None:
        """The most `hold` could grow to; None when no limit applies."""
        rooms = [limit - self._committed(key) for key, limit, _ in hold.limits]
        return hold.amount + max(0, min(rooms)) if rooms else None

    def admit(self, hold: Hold, length: int | None, now: float) -> None:
        """A body of `length` bytes (None: not said) is about to start: refuse it if it
        cannot fit in what is left, else hold its first look-ahead.

        Raises:
            TooManyRequests: `length` does not fit in a budget (reason `budget_exhausted`).
        """
        self._roll_over(hold, now)
        end = None if length is None else hold.sent + length
        if hold.admitted and end == hold.end:
            return  # the same body again (its head, after the upstream's): already decided
        # Of a length not said, at least one byte must fit.
        self._refuse_past(hold, hold.sent + (1 if length is None else length))
        hold.end, hold.admitted = end, True
        self._hold_ahead(hold, hold.sent)

    def take(self, hold: Hold, size: int, now: float) -> None:
        """`size` bytes of the body are about to go out: out of the hold, grown first
        (with a fresh look-ahead) when they are past it.

        Raises:
            TooManyRequests: they do not fit in what is left (the download must end).
        """
        self._roll_over(hold, now)
        sent = hold.sent + size
        if sent > hold.amount:
            self._refuse_past(hold, sent)
            self._hold_ahead(hold, sent)
        self._set(hold, hold.amount, sent)

    def _roll_over(self, hold: Hold, now: float) -> None:
        """Once the periods `hold` is keyed by have ended: charge what it sent in them to
        them, and key it by the current ones, holding nothing ahead (so that its next
        bytes are checked against what the new periods have left)."""
        if now < hold.period_end:
            return
        self._set(hold, hold.sent, hold.sent)  # drop the look-ahead
        in_old_periods = hold.sent - hold.charged
        self._reserve(hold.limits, -in_old_periods)
        self._add(hold.user, in_old_periods, hold.keyed_at)
        hold.charged = hold.sent
        hold.limits = self._limits(hold.user, now)
        hold.keyed_at, hold.period_end = now, next_midnight(now)

    def _refuse_past(self, hold: Hold, total: int) -> None:
        """Raise if `hold` cannot grow to `total` bytes."""
        for key, limit, retry in hold.limits:
            others = self._committed(key) - (hold.amount - hold.charged)
            if others + total - hold.charged > limit:
                left = max(0, limit - others - (hold.sent - hold.charged))
                wanted = total - hold.sent
                raise _spent(key, retry, f"has {left} bytes left, too few for {wanted}")

    def _hold_ahead(self, hold: Hold, sent: int) -> None:
        """Grow `hold` to `sent` plus a look-ahead (`sent` must fit, see `_refuse_past`)."""
        # With no limit there is no counter to hold anything in: only what is sent.
        ahead = self.lookahead if hold.limits else 0
        if hold.end is not None:
            ahead = min(ahead, max(0, hold.end - sent))
        if self.ahead_per_client:
            others = self.ahead.get(hold.client, 0) - hold.ahead
            ahead = min(ahead, max(0, self.ahead_per_client - others))
        room = self.room(hold)
        target = sent + ahead if room is None else min(sent + ahead, room)
        self._set(hold, max(hold.amount, target), hold.sent)

    def _reserve(self, limits: tuple[tuple[str, int, int], ...], amount: int) -> None:
        for key, _, _ in limits:
            self.reserved[key] = self.reserved.get(key, 0) + amount
            if self.reserved[key] <= 0:
                del self.reserved[key]

    def _set(self, hold: Hold, amount: int, sent: int) -> None:
        """Move `hold` to `amount` held and `sent` sent, keeping the sums in step.

        What a hold reserves under its keys is `amount - charged`: the bytes charged to
        past periods are no longer the current ones' business.
        """
        if grown := amount - hold.amount:
            self._reserve(hold.limits, grown)
        ahead = self.ahead.get(hold.client, 0) + (amount - sent) - hold.ahead
        if ahead > 0:
            self.ahead[hold.client] = ahead
        else:
            self.ahead.pop(hold.client, None)
        hold.amount, hold.sent = amount, sent

    def settle(self, hold: Hold, sent: int, now: float) -> None:
        """The download is over: release its hold and charge the `sent` bytes, those
        charged to past periods already excepted."""
        self._roll_over(hold, now)
        self._set(hold, hold.charged, hold.charged)
        self.charge(hold.user, sent - hold.charged, now)

    def charge(self, user: str | None, amount: int, now: float) -> None:
        """Add `amount` bytes served to `user` (and the total); forget past periods."""
        if amount <= 0:
            return
        self._add(user, amount, now)
        day, month = _periods(now)
        for key in [k for k in self.counters if k.rpartition("|")[2] not in (day, month)]:
            del self.counters[key]

    def _add(self, user: str | None, amount: int, when: float) -> None:
        """Add `amount` bytes to `user`'s (and the total's) counters of `when`'s periods."""
        if amount <= 0:
            return
        for key, _, _ in self._keys(user, when):
            self.counters[key] = self.counters.get(key, 0) + amount

    def used(self, key: str) -> int:
        return self.counters.get(key, 0)

    def keys(self, user: str | None, now: float) -> tuple[str, ...]:
        """The counters with a limit that a download by `user` at `now` falls under."""
        return tuple(key for key, _, _ in self._limits(user, now))

    def roll_over(self, hold: Hold, now: float) -> None:
        """As `take` and `settle` do first: key `hold` by the periods of `now`."""
        self._roll_over(hold, now)


# How much a process asks the shared budget for at once: a few look-aheads, so that a
# download's bytes reach the shared counters once per this many, not per chunk.
GRANT = 2 * LOOKAHEAD


class BudgetShare:
    """One process's side of a budget that several processes share.

    The shared store counts, per budget counter, the bytes *granted* to processes (what
    they sent and what they may still send); no process sends a byte it was not granted,
    so all of them together never pass a limit. This process keeps what it was granted
    and has not charged (`unspent`), and keeps its `Budget`'s counters at the shared
    total less that: the bytes every other process holds or sent, and the bytes this one
    sent. Its `Budget` then decides as it does alone, holding only what was granted.

    The shell calls `wants` before the `Budget` may grow a hold, asks the store for those
    grants and passes the answers to `granted`; around every call that may charge bytes
    it passes a copy of the counters from before to `charged`, and gives `idle` back.
    """

    def __init__(self, budget: Budget, *, grant: int = GRANT) -> None:
        self.budget = budget
        self.grant = grant
        self.unspent: dict[str, int] = {}

    def seen(self, key: str, total: int) -> None:
        """The shared store's `total` for `key`, as read (or left by a grant)."""
        self.budget.counters[key] = total - self.unspent.get(key, 0)

    def wants(self, hold: Hold, more: int) -> list[tuple[str, int, int, int]]:
        """(key, limit, bytes needed, bytes more welcome) so `hold` may grow by `more`
        within its grants; asking a few look-aheads at once keeps the store off the
        per-chunk path."""
        wanted = []
        for key, limit, _ in hold.limits:
            need = self.budget.reserved.get(key, 0) + more - self.unspent.get(key, 0)
            if need > 0:
                wanted.append((key, limit, need, max(0, self.grant - need)))
        return wanted

    def granted(self, key: str, amount: int, total: int) -> None:
        self.unspent[key] = self.unspent.get(key, 0) + amount
        self.seen(key, total)

    def charged(self, before: Mapping[str, int]) -> dict[str, int]:
        """The counters moved from `before` (bytes charged): take them out of `unspent`.

        Returns the bytes charged past what was granted (an error body, charged only
        at its end; any bytes under a counter with no limit, kept for when one is set),
        which the shell adds to the shared counters as they are.
        """
        over: dict[str, int] = {}
        for key, value in self.budget.counters.items():
            grown = value - before.get(key, 0)
            if grown <= 0:
                continue
            left = self.unspent.get(key, 0) - grown
            if left < 0:
                over[key] = -left
                left = 0
            self.unspent[key] = left
        for key in [k for k in self.unspent if k not in self.budget.counters and k in before]:
            del self.unspent[key]  # its period ended
        return over

    def idle(self) -> list[tuple[str, int]]:
        """(key, bytes) granted and unspent that no hold needs now: to give back."""
        back = [
            (key, amount)
            for key, amount in self.unspent.items()
            if amount > 0 and not self.budget.reserved.get(key, 0)
        ]
        for key, _ in back:
            self.unspent[key] = 0
        return back


def _spent(key: str, retry: int, what: str) -> TooManyRequests:
    who = "this relay's" if key.startswith("total") else "your"
    return TooManyRequests(
        f"{who} traffic budget {what}",
        reason="budget_exhausted",
        headers=(("retry-after", str(retry)),),
    )


def parse_budget_state(document: object) -> dict[str, int]:
    """The counters of a saved budget document; anything malformed is dropped."""
    if not isinstance(document, dict):
        return {}
    counters = document.get("counters")
    if not isinstance(counters, dict):
        return {}
    return {
        str(key): value
        for key, value in counters.items()
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0
    }


# --- where the relay itself connects: redirect targets -----------------------------------------


def address_refusal(address: Address, allowed: Iterable[Network] = ()) -> str | None:
    """Why the relay must not connect to `address` for a redirect, or None if it may.

    Only globally routable unicast addresses are fair game: a redirect to loopback,
    link-local (169.254.169.254 is the cloud metadata service), RFC 1918, shared
    (100.64/10), ULA (fc00::/7), multicast, unspecified or reserved space would let an
    upstream (or whoever controls its redirect) reach the relay's own network.
    `allowed` lists the networks the operator opened anyway.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return None
    for name, test in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if test:
            return name
    if not address.is_global:
        return "not globally routable"
    return None
