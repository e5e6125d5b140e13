"""Liveness and readiness, and what the relay last heard from each upstream.

`/healthz` says the process answers. `/readyz` says it can serve: a certificate
is loaded when TLS is on, the data directory takes a write, and an upstream
answered recently (if none did, each is asked for `/v2/` now, with a short
timeout; a recorded failure since the last answer forces that probe). A relay started
with `server.allow_unpatched` whose library patches did not all apply is ready but
"degraded", and lists what it runs without.

One of several workers (`server.workers` > 1) answers for the relay: the checks above,
plus every worker's state from the status files they write (`ops/fleet.py`). The relay
is ready while at least one worker is (`core/fleet.py` says why); "degraded" while some
are not.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from vpsrelay import private_files, worker_identity
from vpsrelay.core.fleet import FleetView, WorkerStatus
from vpsrelay.errors import RelayError
from vpsrelay.ops import fleet

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from vpsrelay.config import RegistryConfig
    from vpsrelay.core.credpool import CredentialState
    from vpsrelay.core.ratelimit import RateLimit
    from vpsrelay.patches import Degraded
    from vpsrelay.upstream import Upstream
    from vpsrelay.worker_identity import WorkerIdentity

# An upstream answer this recent (and no failure after it) makes the relay ready.
RECENT_SECONDS = 30.0
PROBE_TIMEOUT = 5.0


@dataclass(slots=True)
class TlsStatus:
    """What TLS serves. `enabled` False: plain HTTP (behind a TLS proxy, or for tests).

    The TLS layer (certificate loading and renewal) calls `loaded(not_after)` each time
    it puts a certificate in service; until then a TLS relay is not ready.
    """

    enabled: bool = False
    not_after: float | None = None  # Unix time

    def loaded(self, not_after: float) -> None:
        self.not_after = not_after

    def expiry(self) -> float | None:
        return self.not_after if self.enabled else None


@dataclass(slots=True)
class UpstreamState:
    """What one upstream last said."""

    answered_at: float | None = None  # monotonic
    failed_at: float | None = None  # monotonic
    clock_skew: float | None = None  # upstream Date minus our clock, seconds
    ratelimit: RateLimit | None = None
    # The operator's credentials by username: their budgets (the pool's live states).
    credentials: dict[str, CredentialState] = field(default_factory=dict)


@dataclass(slots=True)
class Health:
    """Readiness state shared by the app and `/readyz`."""

    data_dir: Path
    tls: TlsStatus = field(default_factory=TlsStatus)
    upstreams: dict[str, UpstreamState] = field(default_factory=dict)
    # The library patches that did not apply (`vpsrelay.patches.apply_all`).
    degraded: tuple[Degraded, ...] = ()
    identity: WorkerIdentity = field(default_factory=worker_identity.current)
    started: float = field(default_factory=time.monotonic)
    # A shared cache bucket's state ("ok" or why not), when the cache has one.
    cache_bucket: Callable[[], str | None] | None = None

    def state(self, registry: str) -> UpstreamState:
        return self.upstreams.setdefault(registry, UpstreamState())

    def answered(self, registry: str, date_header: str | None) -> float | None:
        """Record an upstream answer; returns the clock skew if a Date came with it."""
        state = self.state(registry)
        state.answered_at = time.monotonic()
        if date_header:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                upstream_time = email.utils.parsedate_to_datetime(date_header).timestamp()
                state.clock_skew = round(upstream_time - time.time(), 1)
        return state.clock_skew

    def failed(self, registry: str) -> None:
        self.state(registry).failed_at = time.monotonic()

    def recently_answered(self, registry: str) -> bool:
        state = self.upstreams.get(registry)
        if state is None or state.answered_at is None:
            return False
        if state.failed_at is not None and state.failed_at >= state.answered_at:
            return False
        return time.monotonic() - state.answered_at < RECENT_SECONDS

    async def readiness(
        self,
        registries: tuple[RegistryConfig, ...],
        upstream: Upstream,
        *,
        detailed: bool = False,
    ) -> tuple[bool, dict[str, object]]:
        """(ready, a small JSON-able report).

        `detailed`: the operator's credentials by username and budget (an operator's
        request, as for /metrics); otherwise only how many are ready and resting.
        """
        checks: dict[str, str] = {"tls": self._tls_check()}
        checks["data_dir"] = await trio.to_thread.run_sync(_probe_writable, self.data_dir)
        checks["upstream"] = await self._upstream_check(registries, upstream)
        ready = all(value in ("ok", "off") for value in checks.values())
        workers = await trio.to_thread.run_sync(self.survey) if self.identity.supervised else None
        if workers is not None:
            checks["workers"] = workers.summary()
            ready = ready and workers.ready
        status = "ready" if ready else "unready"
        if ready and workers is not None and not workers.all_ready:
            status = "degraded"  # served, by fewer workers than configured
        if self.degraded:
            # The operator chose to serve without them: degraded, not unready.
            names = ", ".join(entry.reach for entry in self.degraded)
            checks["patches"] = f"degraded: without {names}"
            status = "degraded" if ready else status
        bucket = self.cache_bucket() if self.cache_bucket is not None else None
        if bucket is not None:
            # Pulls pass through while the bucket fails: degraded, not unready.
            checks["cache_bucket"] = bucket
            status = "degraded" if ready and bucket != "ok" else status
        report: dict[str, object] = {"status": status, "checks": checks}
        if workers is not None:
            report["worker"] = self.identity.label  # the one that answered
            report["workers"] = [view.report(detailed=detailed) for view in workers.workers]
        if self.degraded:
            report["degraded"] = [
                {"reach": entry.reach, "kind": entry.kind, "detail": entry.detail}
                for entry in self.degraded
            ]
        upstreams: dict[str, object] = {}
        for registry in registries:
            state = self.upstreams.get(registry.name)
            if state is None:
                continue
            entry: dict[str, object] = {}
            if state.answered_at is not None:
                entry["answered_seconds_ago"] = round(time.monotonic() - state.answered_at, 1)
            if state.clock_skew is not None:
                entry["clock_skew_seconds"] = state.clock_skew
            if state.ratelimit is not None:
                entry["ratelimit"] = {
                    "limit": state.ratelimit.limit,
                    "remaining": state.ratelimit.remaining,
                    "window_seconds": state.ratelimit.window_seconds,
                    "source": state.ratelimit.source,
                }
            if state.credentials:
                entry["credential_counts"] = _credential_counts(state.credentials)
                if detailed:
                    entry["credentials"] = _credentials_report(state.credentials)
            upstreams[registry.name] = entry
        if upstreams:
            report["upstreams"] = upstreams
        return ready, report

    def _tls_check(self) -> str:
        if not self.tls.enabled:
            return "off"
        return "ok" if self.tls.not_after is not None else "no certificate loaded"

    def own_status(self) -> WorkerStatus | None:
        """This worker's status for its file; None for the single process of `workers = 1`."""
        if not self.identity.supervised:
            return None
        tls = self._tls_check()
        return WorkerStatus(
            number=self.identity.number,
            pid=os.getpid(),
            started=self.started,
            heartbeat=time.monotonic(),
            ready=tls in ("ok", "off"),
            checks={"tls": tls},
            certificate_not_after=self.tls.expiry(),
        )

    def survey(self) -> FleetView | None:
        """Every worker's state (blocking: reads their status files); None unsupervised."""
        own = self.own_status()
        if own is None:
            return None
        return fleet.survey(self.data_dir, self.identity.count, own)

    async def _upstream_check(
        self, registries: tuple[RegistryConfig, ...], upstream: Upstream
    ) -> str:
        if any(self.recently_answered(r.name) for r in registries):
            return "ok"
        answered: list[str] = []

        async def probe(registry: RegistryConfig) -> None:
            with trio.move_on_after(PROBE_TIMEOUT):
                try:
                    status, date = await upstream.probe(
                        f"{registry.url}/v2/", what=registry.name, registry=registry.name
                    )
                except RelayError:
                    self.failed(registry.name)
                    return
                if status < 500:
                    self.answered(registry.name, date)
                    answered.append(registry.name)
                else:
                    self.failed(registry.name)

        async with trio.open_nursery() as nursery:
            for registry in registries:
                nursery.start_soon(probe, registry)
        if answered:
            return "ok"
        return "no upstream answered: " + ", ".join(r.name for r in registries)


def _credential_counts(states: dict[str, CredentialState]) -> dict[str, int]:
    """How many of the operator's credentials serve and how many rest: no names."""
    now = trio.current_time()
    resting = sum(1 for state in states.values() if state.resting(now))
    return {"ready": len(states) - resting, "resting": resting}


def _credentials_report(states: dict[str, CredentialState]) -> dict[str, object]:
    """Each operator credential's budget by username (never its secret)."""
    now = trio.current_time()
    return {
        name: {
            "limit": state.limit,
            "remaining": state.remaining,
            "window_seconds": state.window_seconds,
            "resting_seconds": round(max(0.0, state.rest_until - now))
            if state.rest_until is not None and state.resting(now)
            else 0,
            "refusals": state.refusals,
        }
        for name, state in sorted(states.items())
    }


def _probe_writable(directory: Path) -> str:
    """Write, sync and remove a small file; 'ok' or why not."""
    probe = directory / f".readyz-{uuid.uuid4().hex}"
    try:
        with os.fdopen(private_files.open_file(probe, os.O_WRONLY | os.O_EXCL), "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        return f"not writable: {exc.strerror or exc}"
    return "ok"
