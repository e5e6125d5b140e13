"""The seam between the cache front and where verified blobs live.

`BlobStore` is what the front asks of a store: look an object up, open it for reading,
claim a fill (single-flight: one leader, the others join), pump the upstream body into
it (appended, verified against the digest, committed only if it matched), abandon it,
evict, and keep small objects (manifests). `DiskStore` (`store.py`) is the first
implementation; a store on an object bucket plugs in here without touching the front.
What is stored and for which repositories (`Index`: origins, tags, public repositories,
counters) is the sibling seam, shared by every implementation.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from vpsrelay.errors import DigestMismatch, RelayError, UpstreamError

if TYPE_CHECKING:
    import contextlib
    from collections.abc import AsyncIterator

    from vpsrelay.cache.index import Index, Obj, Tag
    from vpsrelay.config import CacheConfig
    from vpsrelay.core.digest import Verifier

log = logging.getLogger("vpsrelay.cache")


class FillState(enum.Enum):
    PENDING = "pending"  # a client is asking the upstream; others wait for its answer
    STREAMING = "streaming"
    COMMITTED = "committed"
    FAILED = "failed"  # digest mismatch, upstream broke off, write error
    DROPPED = "dropped"  # not cached after all (not a 200, no room): others ask themselves


@dataclass(eq=False)
class Fill:
    """One upstream download into the store, read by every client that wants the blob."""

    digest: str
    state: FillState = FillState.PENDING
    size: int = 0
    written: int = 0  # bytes the store holds so far, readable by `open_fill`
    readers: int = 0
    error: RelayError | None = None
    spilled: bool = False  # the store failed mid-fill: readers finish from the upstream
    headers: tuple[tuple[str, str], ...] = ()
    pump_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    _changed: trio.Event = field(default_factory=trio.Event)

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    @property
    def settled(self) -> bool:
        return self.state is not FillState.PENDING

    # What every store's leader does at the same steps of a fill.

    def start_streaming(self, size: int, headers: tuple[tuple[str, str], ...]) -> None:
        """The leader has somewhere to write: `size` bytes follow, readable as they come."""
        self.size, self.headers = size, headers
        self.state = FillState.STREAMING
        self.changed()

    def failure(self, exc: BaseException) -> RelayError:
        """What the fill fails with when `exc` stopped its pump: a `RelayError` as it is;
        anything else (cancelled, a bug) as the fill having stopped."""
        if isinstance(exc, RelayError):
            return exc
        return UpstreamError(f"the fill of {self.digest} stopped")

    def mark_failed(self, error: RelayError, index: Index) -> None:
        """Fail the fill with `error`, logged; a digest mismatch is counted in `index`."""
        self.error = error
        self.state = FillState.FAILED
        if isinstance(error, DigestMismatch):
            index.count("digest_mismatches")
            log.warning("cache: digest mismatch, not cached: %s", error.message)
        else:
            log.warning("cache: fill of %s failed: %s", self.digest, error.message)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """How full a store is: for metrics, `/readyz` and the `cache stats` command."""

    objects: int
    used_bytes: int
    fills: int  # in progress
    bucket: str | None = None  # a shared store's bucket: "ok" or why it is not used now


@dataclass(frozen=True, slots=True)
class Handover:
    """Where a verified read of an object stopped: `verifier` hashed its bytes up to
    `hashed`; `held` (at `held_at`) were read and hashed but not handed out."""

    verifier: Verifier
    hashed: int
    held: bytes = b""
    held_at: int = 0


class StoreReadFailed(UpstreamError):
    """The store failed under a read of a committed object (not the object's bytes, which
    would be a `DigestMismatch`): the client's download may be finished from the upstream,
    checked on from `handover`."""

    def __init__(self, message: str, handover: Handover) -> None:
        super().__init__(message)
        self.handover = handover


class StoreSpill(Exception):
    """The store failed during a fill: nothing is cached, and what it did not take goes
    to the first client from memory and the upstream instead (`Fill.spilled`).

    `pieces` were read from the upstream and hashed (in order) but not written; the rest
    of the body is still in the upstream stream the pump was reading.
    """

    def __init__(self, verifier: Verifier, pieces: list[bytes]) -> None:
        super().__init__("the cache store failed during a fill")
        self.verifier = verifier
        self.pieces = pieces


class BlobReader(Protocol):
    """Reads one stored object, or a fill as it grows, at any offset."""

    async def read(self, offset: int, count: int, verifier: Verifier | None = None) -> bytes:
        """Up to `count` bytes at `offset` (hashed into `verifier` if given).

        Raises:
            UpstreamError: the object ended early or could not be read.
        """
        ...

    def set_end(self, end: int) -> None:
        """The caller reads no further than `end` (a ranged read)."""
        ...

    def close(self) -> None: ...


class BlobStore(Protocol):
    """A content-addressed store of verified objects, with single-flight fills."""

    config: CacheConfig
    index: Index

    def get(self, digest: str) -> Obj | None:
        """What is stored under `digest`, if anything (the index; on a miss, what other
        processes of the relay stored: a point read, no waiting)."""
        ...

    def reread_tag(self, registry: str, repository: str, tag: str) -> Tag | None:
        """A tag as another process of the relay last checked it, if more recently."""
        ...

    def reread_origins(self, digest: str) -> None:
        """Learn the repositories other processes of the relay saw holding `digest`."""
        ...

    def reread_public(self, registry: str, repository: str) -> None:
        """Learn a public mark another process of the relay set."""
        ...

    def revalidating(
        self, registry: str, repository: str, tag: str
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the relay-wide claim to revalidate one tag (bounded wait)."""
        ...

    async def locate(self, digest: str, *, fill: bool, read: bool) -> Obj | None:
        """`get`, asking a store shared with other nodes: whether it holds `digest`
        (and, with `read`, that it can be read now); with `fill` it may wait for
        another node's fill of `digest` (bounded)."""
        ...

    async def refresh_tag(self, registry: str, repository: str, tag: str) -> str | None:
        """The digest a store shared with other nodes says the tag names, when this
        node's own copy is stale (None if not shared): a hint, never served before the
        upstream named the same digest."""
        ...

    def presigned(self, digest: str, size: int) -> str | None:
        """A short-lived URL from which a client may GET this one object itself (the
        caller has authorized the pull), or None: the relay sends the bytes."""
        ...

    def pinned(self, digest: str) -> contextlib.AbstractContextManager[None]:
        """Keep `digest` from eviction while it is read."""
        ...

    def open(self, digest: str) -> BlobReader | None:
        """A reader of a committed object; None if it is gone (then forgotten)."""
        ...

    def claim(self, digest: str) -> tuple[Fill, bool]:
        """The fill for `digest`: an existing one to join, or a new one to lead (True)."""
        ...

    async def begin(self, fill: Fill, size: int, headers: tuple[tuple[str, str], ...]) -> bool:
        """Reserve room for a led fill; False (the fill dropped): pass through instead."""
        ...

    def open_fill(self, fill: Fill) -> BlobReader:
        """A reader of a streaming fill: bytes up to `fill.written` are there."""
        ...

    async def pump(self, fill: Fill, chunks: AsyncIterator[bytes]) -> None:
        """Append the upstream body, verify it, commit it only if it matched its digest.

        Raises:
            RelayError: the fill failed (marked failed; nothing readable is left).
            StoreSpill: the store failed; what the first client still needs is in it.
        """
        ...

    def drop(self, fill: Fill) -> None:
        """Abandon a fill that never began; whoever waits asks the upstream itself."""
        ...

    async def remove(self, digest: str) -> bool:
        """Evict one object; False while it is read or filled."""
        ...

    async def put_small(self, digest: str, body: bytes, kind: str, media_type: str) -> None:
        """Keep a verified small object (a manifest); failures only log."""
        ...

    async def read_small(self, digest: str) -> bytes | None:
        """A small object's bytes; None if it is gone."""
        ...

    def stats(self) -> StoreStats: ...

    async def maintain(self) -> None:
        """Background upkeep for as long as the relay runs (cancelled at the end)."""
        ...

    async def flush(self, *, force: bool = False) -> None:
        """Write the index's pending changes (at most every few seconds unless forced)."""
        ...

    async def aclose(self) -> None: ...
