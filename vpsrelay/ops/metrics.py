"""Prometheus metrics, one registry per app (tests run several apps side by side).

Everything is a `prometheus_client` metric on a private `CollectorRegistry`; `/metrics`
renders it with `generate_latest`. The blob cache (and any other part) only calls
the small methods here: `cache_hit`, `cache_miss`, `cache_size`; it never touches
the metric objects or the registry.

Under a supervisor (`server.workers` > 1) every worker's metrics are prometheus-client's
multiprocess values (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor before the worker
starts, so the library picks the file-backed value class at import), and `/metrics`,
whichever worker answers, renders all workers' files: counters and histograms summed,
each gauge merged the way its `multiprocess_mode` (below, with why) says. The collectors
that compute at scrape time (certificate expiry, workers) read every worker's status
file instead, since prometheus-client cannot merge them across processes.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from vpsrelay import worker_identity
from vpsrelay.core.fleet import State
from vpsrelay.ops import fleet as fleet_files

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from prometheus_client import Metric

    from vpsrelay.core.credpool import CredentialState
    from vpsrelay.core.fleet import FleetView
    from vpsrelay.core.ratelimit import RateLimit
    from vpsrelay.worker_identity import WorkerIdentity

log = logging.getLogger("vpsrelay.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Time to the upstream's response headers (after any redirect hops), in seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NO_REGISTRY = "none"
HEADER_BYTES = 8  # of a metrics file: the bytes used, and padding


class _CertificateCollector:
    """`vpsrelay_certificate_expiry_timestamp_seconds`, only while a certificate is loaded."""

    def __init__(self, not_after: Callable[[], float | None]) -> None:
        self._not_after = not_after

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value = self._not_after()
        family = GaugeMetricFamily(
            "vpsrelay_certificate_expiry_timestamp_seconds",
            "When the served TLS certificate expires (Unix time); absent when TLS is off.",
        )
        if value is not None:
            family.add_metric([], value)
        yield family


class _WorkersCollector:
    """`vpsrelay_workers{state}`: how many workers are in each state (supervised only)."""

    def __init__(self, fleet: FleetView) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vpsrelay_workers",
            "Worker processes by state (ready, unready, draining, stale, exited, starting).",
            labels=["state"],
        )
        for state in State:
            family.add_metric([state.value], self._fleet.count(state))
        yield family


def _multiprocess_dir(identity: WorkerIdentity) -> Path | None:
    """Where this worker's metrics files are, when it is one of several."""
    if not identity.supervised:
        return None  # the single process: its private registry, as always
    # Not a setting: the supervisor sets it for the worker, prometheus-client reads it.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # noqa: TID251
    if not directory or not getattr(values.ValueClass, "_multiprocess", False):
        log.warning(
            "worker %s has no PROMETHEUS_MULTIPROC_DIR at start: /metrics shows it alone",
            identity.label,
        )
        return None
    return Path(directory)


_P = ParamSpec("_P")


def _dropped_on_full_disk(
    record: Callable[Concatenate[Metrics, _P], None],
) -> Callable[Concatenate[Metrics, _P], None]:
    """A worker's first value of a new series needs room in its metrics file
    (`patches/prometheus.py`): on a full disk that value is not counted, the request goes on."""

    def recorded(self: Metrics, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(self, *args, **kwargs)
        except OSError as exc:
            self.dropped(exc)

    functools.update_wrapper(recorded, record)
    return recorded


class Metrics:
    """The relay's metrics. Methods are cheap and never raise."""

    def __init__(
        self,
        *,
        certificate_not_after: Callable[[], float | None] = lambda: None,
        identity: WorkerIdentity | None = None,
    ) -> None:
        self.multiprocess_dir = _multiprocess_dir(identity or worker_identity.current())
        self._certificate_not_after = certificate_not_after
        self._told_dropped = False  # said once: a full disk drops every new series
        try:
            self._create()
        except OSError as exc:
            # A worker starting on a full disk cannot make its metrics files: it counts in
            # its own memory instead, left out of /metrics until it restarts.
            log.warning(
                "cannot make this worker's metrics files in %s (%s): its counts are left "
                "out of /metrics until it restarts",
                self.multiprocess_dir,
                exc,
            )
            values.ValueClass = values.MutexValue
            self._create()

    def _create(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vpsrelay_requests",
            "Requests answered, by registry, kind (manifest/blob/token/other) and status.",
            ["registry", "kind", "status"],
            registry=r,
        )
        self.served_bytes = Counter(
            "vpsrelay_served_bytes",
            "Body bytes sent to clients.",
            ["registry", "kind"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "vpsrelay_upstream_bytes",
            "Body bytes read from upstreams (registries and their CDNs).",
            ["registry", "kind"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "vpsrelay_upstream_latency_seconds",
            "Time until the upstream's response headers, redirect hops included.",
            ["registry", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_responses = Counter(
            "vpsrelay_upstream_responses",
            "Upstream answers by status.",
            ["registry", "status"],
            registry=r,
        )
        self.token_requests = Counter(
            "vpsrelay_token_requests",
            "Token requests relayed to the upstream's token service, by status.",
            ["registry", "status"],
            registry=r,
        )
        self.refusals = Counter(
            "vpsrelay_refusals",
            "Requests the relay refused itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.connection_errors = Counter(
            "vpsrelay_connection_errors",
            "Client connections ended by an unexpected error (logged), by exception type.",
            ["error"],
            registry=r,
        )
        # Gauges' `multiprocess_mode` says how workers' values merge (ignored by the single
        # process). `live*`: a dead worker's value leaves with it. In-flight streams are
        # each worker's own: their sum, over live workers.
        self.active_streams = Gauge(
            "vpsrelay_active_streams", "Response bodies being streamed now.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.cache_hits = Counter(
            "vpsrelay_cache_hits", "Blob requests served from the cache.", ["registry"], registry=r
        )
        self.cache_misses = Counter(
            "vpsrelay_cache_misses", "Blob requests the cache could not serve.", ["registry"],
            registry=r,
        )  # fmt: skip
        self.cache_store_failovers = Counter(
            "vpsrelay_cache_store_failovers",
            "Cache hits finished from the upstream after the store failed mid-body.",
            ["registry"],
            registry=r,
        )
        self.cache_served_bytes = Counter(
            "vpsrelay_cache_served_bytes",
            "Body bytes served from the cache.",
            ["registry"],
            registry=r,
        )
        # One cache for all workers, measured by whichever served last: the latest value.
        self.cache_size_bytes = Gauge(
            "vpsrelay_cache_size_bytes", "Bytes held in the blob cache.", registry=r,
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        # What the upstream last stated, to any worker, is what holds now: the latest.
        self.ratelimit_limit = Gauge(
            "vpsrelay_upstream_ratelimit_limit",
            "The upstream's pull limit per window, from its last ratelimit-limit header.",
            ["registry"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_remaining = Gauge(
            "vpsrelay_upstream_ratelimit_remaining",
            "Pulls left in the window, from the upstream's last ratelimit-remaining header.",
            ["registry"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_window = Gauge(
            "vpsrelay_upstream_ratelimit_window_seconds",
            "The rate-limit window the upstream stated (w=).",
            ["registry"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_source = Gauge(
            "vpsrelay_upstream_ratelimit_source_info",
            "Whose budget it is (docker-ratelimit-source: an address or account); always 1.",
            ["registry", "source"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.credential_limit = Gauge(
            "vpsrelay_upstream_credential_ratelimit_limit",
            "Pull limit per window of one operator credential (by username), as last stated.",
            ["registry", "credential"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.credential_remaining = Gauge(
            "vpsrelay_upstream_credential_ratelimit_remaining",
            "Pulls left in the window for one operator credential (0 after a 429).",
            ["registry", "credential"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.credential_rest_until = Gauge(
            "vpsrelay_upstream_credential_rest_until_timestamp_seconds",
            "Until when the credential rests after a 429 or an empty budget (Unix time; 0: not).",
            ["registry", "credential"],
            registry=r,
            # Each worker's pool rests it on its own: the longest rest of a live worker.
            multiprocess_mode="livemax",
        )
        self.credential_refusals = Gauge(
            "vpsrelay_upstream_credential_refusals",
            "429 answers to the credential since the relay started.",
            ["registry", "credential"],
            registry=r,
            # Each worker counts its own: the sum, a dead worker's count included.
            multiprocess_mode="sum",
        )
        self.upstream_last_answer = Gauge(
            "vpsrelay_upstream_last_answer_timestamp_seconds",
            "When the upstream last answered (Unix time).",
            ["registry"],
            registry=r,
            multiprocess_mode="max",  # the latest answer to any worker, dead ones included
        )
        self.upstream_clock_skew = Gauge(
            "vpsrelay_upstream_clock_skew_seconds",
            "The upstream's Date minus the relay's clock, at its last answer.",
            ["registry"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.upstream_resumes = Counter(
            "vpsrelay_upstream_resumes",
            "Upstream blob bodies that broke off and were resumed with a range request.",
            ["registry"],
            registry=r,
        )
        self.upstream_stale_retries = Counter(
            "vpsrelay_upstream_stale_retries",
            "GETs and HEADs sent again on a fresh connection after a stale pooled one.",
            registry=r,
        )
        r.register(_CertificateCollector(self._certificate_not_after))
        self._sources: dict[str, str] = {}

    def dropped(self, error: OSError) -> None:
        """A new series that could not be stored (a full disk); said once."""
        if not self._told_dropped:
            log.warning("metrics: new series are not counted while this fails: %s", error)
        self._told_dropped = True

    # --- what the observer (`ops/observe.py`) and the cache call

    @_dropped_on_full_disk
    def request_done(self, registry: str, kind: str, status: int, served: int) -> None:
        self.requests.labels(registry, kind, str(status)).inc()
        if served:
            self.served_bytes.labels(registry, kind).inc(served)

    @_dropped_on_full_disk
    def upstream_answered(self, registry: str, kind: str, status: int, seconds: float) -> None:
        self.upstream_latency.labels(registry, kind).observe(seconds)
        self.upstream_responses.labels(registry, str(status)).inc()
        self.upstream_last_answer.labels(registry).set(time.time())

    @_dropped_on_full_disk
    def upstream_read(self, registry: str, kind: str, nbytes: int) -> None:
        self.upstream_bytes.labels(registry, kind).inc(nbytes)

    @_dropped_on_full_disk
    def upstream_resumed(self, registry: str) -> None:
        self.upstream_resumes.labels(registry).inc()

    def upstream_stale_retry(self) -> None:
        self.upstream_stale_retries.inc()

    @_dropped_on_full_disk
    def token_request(self, registry: str, status: int) -> None:
        self.token_requests.labels(registry, str(status)).inc()

    @_dropped_on_full_disk
    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    @_dropped_on_full_disk
    def connection_error(self, error: str) -> None:
        """A connection's handling raised `error` (a type name); the server went on."""
        self.connection_errors.labels(error).inc()

    @_dropped_on_full_disk
    def ratelimit(self, registry: str, budget: RateLimit) -> None:
        if budget.limit is not None:
            self.ratelimit_limit.labels(registry).set(budget.limit)
        if budget.remaining is not None:
            self.ratelimit_remaining.labels(registry).set(budget.remaining)
        if budget.window_seconds is not None:
            self.ratelimit_window.labels(registry).set(budget.window_seconds)
        if budget.source is not None and self._sources.get(registry) != budget.source:
            if (old := self._sources.get(registry)) is not None:
                if self.multiprocess_dir is not None:
                    # Series cannot be removed from the shared files: the old one reads 0.
                    self.ratelimit_source.labels(registry, old).set(0)
                else:
                    self.ratelimit_source.remove(registry, old)
            self._sources[registry] = budget.source
            self.ratelimit_source.labels(registry, budget.source).set(1)

    @_dropped_on_full_disk
    def credential(self, registry: str, state: CredentialState, rest_until: float | None) -> None:
        """One operator credential's budget; `rest_until` in Unix time, if it rests."""
        labels = (registry, state.name)
        if state.limit is not None:
            self.credential_limit.labels(*labels).set(state.limit)
        if state.remaining is not None:
            self.credential_remaining.labels(*labels).set(state.remaining)
        self.credential_rest_until.labels(*labels).set(rest_until or 0)
        self.credential_refusals.labels(*labels).set(state.refusals)

    @_dropped_on_full_disk
    def clock_skew(self, registry: str, seconds: float) -> None:
        self.upstream_clock_skew.labels(registry).set(seconds)

    # --- what the cache calls (issue 6): it only has to count

    @_dropped_on_full_disk
    def cache_hit(self, registry: str, nbytes: int) -> None:
        """A blob was served from the cache: `nbytes` body bytes."""
        self.cache_hits.labels(registry).inc()
        if nbytes:
            self.cache_served_bytes.labels(registry).inc(nbytes)

    @_dropped_on_full_disk
    def cache_miss(self, registry: str) -> None:
        """A blob was not in the cache and goes to the upstream."""
        self.cache_misses.labels(registry).inc()

    @_dropped_on_full_disk
    def cache_store_failover(self, registry: str) -> None:
        """A hit whose store (the bucket) failed mid-body is finished from the upstream."""
        self.cache_store_failovers.labels(registry).inc()

    def watch_cache_bucket(self, up: Callable[[], bool]) -> None:
        """Export `vpsrelay_cache_bucket_up` (1 or 0), read from `up` at each scrape."""
        gauge = Gauge(
            "vpsrelay_cache_bucket_up",
            "1 while the shared cache bucket is used, 0 while pulls pass it by.",
            registry=self.registry,
        )
        gauge.set_function(lambda: 1.0 if up() else 0.0)

    def cache_size(self, nbytes: int) -> None:
        """The cache now holds `nbytes` bytes."""
        self.cache_size_bytes.set(nbytes)

    # --- exposition

    def render(self, fleet: FleetView | None = None) -> bytes:
        """The exposition; under a supervisor, every worker's (`fleet`: their states).

        Raises:
            OSError: a supervised worker cannot read the shared metrics directory.
            ValueError: a metrics file there cannot be parsed.
        """
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        # A fresh registry with only the merged files and the scrape-time collectors: the
        # metrics above are in the files already (registering them again would double them).
        registry = CollectorRegistry()
        _WorkerFiles(registry, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        if fleet is not None:
            oldest = fleet.oldest_certificate()
            registry.register(_CertificateCollector(lambda: oldest))
            registry.register(_WorkersCollector(fleet))
        else:
            registry.register(_CertificateCollector(self._certificate_not_after))
        with fleet_files.metrics_lock(self.multiprocess_dir, exclusive=False):
            try:
                return generate_latest(registry)
            except struct.error as exc:  # the library's reader on a cut file: not an OSError
                raise ValueError(f"a metrics file is cut short: {exc}") from None


class _WorkerFiles(MultiProcessCollector):
    """The workers' `*.db` files, without any shorter than its 8-byte header: the library's
    reader fails the whole scrape on one (a file made by an older version, which created
    it empty and then sized it)."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):  # gone meanwhile: a dead worker's, folded
                if os.stat(name).st_size >= HEADER_BYTES:
                    files.append(name)
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]
