"""The guard: applies the access policies of `core.access` to each request.

Before routing reaches any upstream: request target, a GET or HEAD body, Host, client
IP, User-Agent, header count and request rate. After routing: repository allow/deny
lists. Around a blob download: streams per client (an IPv4 address, an IPv6 /64), the
traffic budget (a download must fit in what is left to start, and holds a bounded
look-ahead past what it has sent) and the bandwidth cap.

The request rate, the stream counts and the budget hold for the relay, not per process:
their state is in `<data_dir>/limits.db`, shared by every worker (`access.shared`); the
only process of a relay (`workers = 1`) keeps its request rate buckets and stream counts
in memory. While limits.db cannot be used (a full disk), each worker counts the rate and
the streams alone; only the budget refuses (`LimitsUnavailable`, a 503).

Every refusal, here or anywhere else in the relay, passes `record`, which logs the
reason and counts it in `refusals` (what the metrics endpoint reads).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay import worker_identity
from vpsrelay.access.shared import LimitsUnavailable, SharedLimits
from vpsrelay.core import access, headers as header_policy
from vpsrelay.errors import BadRequest, HeadersTooLarge, TooManyRequests

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping

    from vpsrelay.config import Settings
    from vpsrelay.core import routing
    from vpsrelay.errors import RelayError

log = logging.getLogger("vpsrelay.guard")

_BAD_FIELD = re.compile(r"[^\t\x20-\x7e]")


class Guard:
    """Policy state: limiters, counters, the budget (shared by all of the relay's
    processes through `shared`); `refusals` by reason (this process's)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        server, acc, limits = settings.server, settings.access, settings.limits
        self.settings = settings
        self.clock = clock
        self.refusals: collections.Counter[str] = collections.Counter()
        self.ips = access.IpPolicy(acc.allow_ips, acc.deny_ips)
        self.user_agents = access.UserAgentPolicy(acc.deny_user_agents)
        hosts = list(server.allowed_hosts)
        if hosts and server.public_url:
            hosts.append(access.host_name(_url_host(server.public_url)))
        self.hosts = access.HostPolicy(
            tuple(access.host_name(h) for h in hosts),
            tuple(d.lower().strip(".") for d in server.base_domains),
        )
        self.repositories = {
            r.name: access.RepositoryPolicy(r.allow, r.deny) for r in settings.registries
        }
        self.max_headers = server.max_headers
        self.max_header_bytes = server.max_header_bytes
        alone = worker_identity.current().count == 1
        self.shared = SharedLimits(settings.data_dir, local_only=alone)
        self.rate = limits.requests_per_second
        self.burst = float(limits.burst)
        # The rate check runs on every request: one write to limits.db costs about 20 us
        # (and a cheap request ~14% more CPU, bench/limits_cost.py), so the only process
        # of a relay keeps its buckets in memory; workers share theirs, and fall back to
        # these while limits.db cannot be used.
        self.own_rate = access.RateLimiter(self.rate, limits.burst) if self.rate > 0 else None
        self.local_rate = self.own_rate if alone else None
        self.streams_per_ip = limits.streams_per_ip
        self.stream_rate = limits.stream_bytes_per_second
        self.ipv6_prefix = limits.ipv6_prefix_length
        self.upstream_streams_per_ip = limits.upstream_streams_per_ip
        self.budget_limits = access.BudgetLimits(
            limits.budget_daily, limits.budget_monthly,
            limits.user_budget_daily, limits.user_budget_monthly,
        )  # fmt: skip
        self.budget = (
            SharedBudget(self.budget_limits, self.shared, limits.budget_ahead_per_client)
            if self.budget_limits.enabled
            else None
        )

    # -- before routing ----------------------------------------------------------------------

    def admit(
        self,
        *,
        method: str,
        raw_path: str,
        headers: header_policy.Headers,
        client_ip: str,
        host: str,
    ) -> None:
        """The checks every request passes before it is routed; cheapest first.

        Raises:
            RelayError: the first rule the request breaks (its `reason` names the rule).
        """
        access.check_request_target(method, raw_path)
        access.check_request_body(method, headers)
        if len(headers) > self.max_headers:
            raise HeadersTooLarge(
                f"more than {self.max_headers} request headers", reason="too_many_headers"
            )
        # h11 enforces its size limit only on a head that arrives in pieces; one that
        # arrives whole in a single read is measured here.
        size = len(raw_path) + sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self.max_header_bytes:
            raise HeadersTooLarge(
                f"request head over {self.max_header_bytes} bytes", reason="headers_too_large"
            )
        if any(_BAD_FIELD.search(value) for _, value in headers):
            # obs-text (RFC 9110 §5.5) is legal but no registry client sends it, and it
            # cannot be passed on: refuse it here rather than fail upstream.
            raise BadRequest(
                "request header with control or non-ASCII characters", reason="bad_header"
            )
        self.hosts.check(host)
        self.ips.check(client_ip)
        self.user_agents.check(header_policy.get(headers, "user-agent") or "")
        if self.local_rate is not None:
            self.local_rate.check(self.limit_key(client_ip), trio.current_time())
        elif self.own_rate is not None:
            key = self.limit_key(client_ip)
            try:
                wait = self.shared.rate_wait(key, self.rate, self.burst, time.time())
            except LimitsUnavailable:  # logged there; this process counts alone meanwhile
                self.shared.fallbacks += 1
                self.own_rate.check(key, trio.current_time())
                return
            if wait > 0:
                raise access.rate_limited(self.rate, self.burst, wait)

    async def settle_owed(self, stop: trio.Event, every: float = 2.0) -> None:
        """Until `stop`: give back, every `every` seconds, stream slots whose release the
        shared database could not take when they ended."""
        while not stop.is_set():
            with trio.move_on_after(every):
                await stop.wait()
            self.shared.settle()

    def limit_key(self, client_ip: str) -> str:
        """What per-client limits count under: the address, or the IPv6 /64 it is in."""
        return access.limit_key(client_ip, self.ipv6_prefix)

    # -- after routing -----------------------------------------------------------------------

    def check_route(self, route: routing.Route) -> None:
        """Raises:
        Denied: the registry's repository lists refuse the route's repository.
        """
        policy = self.repositories.get(route.registry)
        if policy is not None and route.upstream_name:
            policy.check(route.registry, route.upstream_name)

    @contextlib.asynccontextmanager
    async def download(
        self, client_ip: str, user: str | None, sent: Callable[[], int]
    ) -> AsyncIterator[DownloadMeter | None]:
        """Around one blob download: admit it, then charge what `sent()` says was sent.

        Yields the download's meter (its budget hold and bandwidth cap), or None when
        neither applies.

        Raises:
            TooManyRequests: too many downloads from this IP, or the budget is spent.
        """
        budget = self.budget
        client = self.limit_key(client_ip)
        hold = budget.open(user, self.clock(), client) if budget is not None else None
        try:
            if self.streams_per_ip:
                self._acquire("streams", client, self.streams_per_ip)
        except BaseException:
            if budget is not None and hold is not None:
                budget.settle(hold, 0, self.clock())
            raise
        try:
            throttle = self._throttle() if self.stream_rate else None
            metered = budget is not None or throttle is not None
            meter = DownloadMeter(budget, hold, throttle, self.record_reason, self.clock)
            yield meter if metered else None
        finally:
            if self.streams_per_ip:
                self.shared.release("streams", client)  # never raises
            if budget is not None and hold is not None:
                budget.settle(hold, sent(), self.clock())

    def _acquire(self, kind: str, client: str, limit: int) -> None:
        """Raises:
        TooManyRequests: `client` has `limit` `kind` streams open in the relay's processes.
        """
        if not self.shared.acquire(kind, client, limit):
            raise access.too_many_at_once(limit)

    @contextlib.contextmanager
    def upstream_stream(self, client_ip: str) -> Iterator[None]:
        """Around one request the upstream answers: at most `upstream_streams_per_ip` at once.

        Each holds an upstream connection while its client reads, so one client cannot
        take the pool that every other client's cache misses need.

        Raises:
            TooManyRequests: this IP already has that many (reason `upstream_streams_limited`).
        """
        limit = self.upstream_streams_per_ip
        if not limit:
            yield
            return
        client = self.limit_key(client_ip)
        if not self.shared.acquire("upstream", client, limit):
            raise TooManyRequests(
                f"too many upstream requests at once: at most {limit} per client",
                reason="upstream_streams_limited",
                headers=(("retry-after", "1"),),
            )
        try:
            yield
        finally:
            self.shared.release("upstream", client)

    def _throttle(self) -> Callable[[int], Awaitable[None]]:
        # One bucket per stream; a burst of one second's worth smooths small chunks.
        bucket = access.TokenBucket(self.stream_rate, self.stream_rate, trio.current_time())

        async def throttle(size: int) -> None:
            await trio.sleep(bucket.spend(trio.current_time(), size))

        return throttle

    # -- refusals ----------------------------------------------------------------------------

    def record(self, error: RelayError, *, client_ip: str, method: str, path: str) -> None:
        """Log and count a refusal (any 4xx the relay answers)."""
        self.refusals[error.reason] += 1
        log.info(
            "refused client=%s method=%s path=%s status=%d reason=%s: %s",
            client_ip, method, json.dumps(path), error.status, error.reason, error.message,
        )  # fmt: skip

    def record_reason(self, reason: str, detail: str) -> None:
        """Count a refusal that has no request of its own to answer (a connection over the
        cap), or whose answer has begun (a download cut off mid-body)."""
        self.refusals[reason] += 1
        log.warning("refused reason=%s: %s", reason, detail)


class SharedBudget:
    """This process's traffic budget, kept within what the shared counters grant it
    (`core.access.BudgetShare`); the calls of `core.access.Budget` a download makes."""

    def __init__(
        self, limits: access.BudgetLimits, shared: SharedLimits, ahead_per_client: int
    ) -> None:
        self.budget = access.Budget(limits, ahead_per_client=ahead_per_client)
        self.share = access.BudgetShare(self.budget)
        self.shared = shared

    def open(self, user: str | None, now: float, client: str) -> access.Hold:
        """Raises:
        TooManyRequests: a budget `user` falls under is spent in all processes.
        """
        self._refresh(self.budget.keys(user, now))
        return self.budget.open(user, now, client)

    def admit(self, hold: access.Hold, length: int | None, now: float) -> None:
        self._roll_over(hold, now)
        self._refresh(key for key, _, _ in hold.limits)  # a fresh view to admit by
        end = None if length is None else hold.sent + length
        self._ensure(hold, self._ahead_to(hold, hold.sent, end) - hold.amount)
        self.budget.admit(hold, length, now)

    def take(self, hold: access.Hold, size: int, now: float) -> None:
        self._roll_over(hold, now)
        sent = hold.sent + size
        if sent > hold.amount:  # past the hold: it grows by a look-ahead
            self._ensure(hold, self._ahead_to(hold, sent, hold.end) - hold.amount)
        self.budget.take(hold, size, now)

    def settle(self, hold: access.Hold, sent: int, now: float) -> None:
        before = dict(self.budget.counters)
        self.budget.settle(hold, sent, now)
        self._charged(before)
        for key, amount in self.share.idle():
            self.share.seen(key, self.shared.give_back(key, amount))

    def _roll_over(self, hold: access.Hold, now: float) -> None:
        if now >= hold.period_end:
            before = dict(self.budget.counters)
            self.budget.roll_over(hold, now)
            self._charged(before)

    def _refresh(self, keys: Iterator[str] | tuple[str, ...]) -> None:
        keys = tuple(keys)
        totals = self.shared.budget_totals(keys)
        for key in keys:
            self.share.seen(key, totals.get(key, 0))

    def _ahead_to(self, hold: access.Hold, sent: int, end: int | None) -> int:
        """The most `hold` may grow to once `sent` bytes are out (see `Budget._hold_ahead`)."""
        target = sent + self.budget.lookahead
        return target if end is None else max(sent, min(target, end))

    def _ensure(self, hold: access.Hold, more: int) -> None:
        """Ask for what `hold` growing by up to `more` needs beyond this process's grants."""
        if more <= 0:
            return
        for key, limit, need, extra in self.share.wants(hold, more):
            total, got = self.shared.grant(key, need, limit, extra=extra)
            self.share.granted(key, got, total)

    def _charged(self, before: Mapping[str, int]) -> None:
        for key, amount in self.share.charged(before).items():
            total, _ = self.shared.grant(key, amount, None)  # sent already: counted as is
            self.share.seen(key, total)


class DownloadMeter:
    """One blob download's share of the traffic budget, and its bandwidth cap.

    The answer's length must fit in what is left of the budget (`admit`) before its head
    goes out, so a download the budget cannot take is refused with a clean 429; each
    chunk then passes `sent`, which paces it and takes it out of the download's hold,
    grown a bounded look-ahead at a time: or, when the budget has run out meanwhile (the
    downloads in flight took it), ends the download.
    """

    def __init__(
        self,
        budget: SharedBudget | access.Budget | None,
        hold: access.Hold | None,
        throttle: Callable[[int], Awaitable[None]] | None,
        record_reason: Callable[[str, str], None] = lambda reason, detail: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.budget = budget
        self.clock = clock  # a download may run into the next day (or month)
        self.hold = hold
        self.throttle = throttle
        self.record_reason = record_reason  # counts a download cut off mid-body
        self.metered = False

    def start(self, status: int, length: int | None) -> None:
        """The answer's head is about to go out: a 2xx's body is held and metered;
        another's (an error, a few hundred bytes) is only charged at the end.

        Raises:
            TooManyRequests: the budget cannot take the 2xx's body.
        """
        self.metered = False
        if 200 <= status < 300:
            self.admit(length)
            self.metered = True

    def admit(self, length: int | None) -> None:
        """A body of `length` bytes (None: a length not said) is about to be answered:
        refuse it if the budget has not that much left, else hold its first look-ahead.

        Raises:
            TooManyRequests: the budget cannot take it (reason `budget_exhausted`).
        """
        if self.budget is None or self.hold is None:
            return
        self.budget.admit(self.hold, length, self.clock())

    async def sent(self, size: int) -> None:
        """Count (and pace) `size` bytes about to be sent.

        Raises:
            TooManyRequests: past the hold, and the budget has no more.
        """
        if self.metered and self.budget is not None and self.hold is not None:
            try:
                self.budget.take(self.hold, size, self.clock())
            except TooManyRequests as exc:
                # Its head is out, so no 429 tells the operator: the count and log do.
                detail = f"download cut off after {self.hold.sent} bytes: {exc.message}"
                self.record_reason(exc.reason, detail)
                raise
        if self.throttle is not None:
            await self.throttle(size)


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc
