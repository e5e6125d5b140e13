"""Eviction across the nodes that share a bucket.

Every node writes the objects it served (and those it is serving) since its last batch as
one small object, `<prefix>access/batch-<node>-<n>.json`, every `evict_interval`. One node
at a time (the one holding the lease `<prefix>leases/evict/all`) folds the batches into
`<prefix>access/merged.json`, lists the blobs and picks the least recently accessed ones
until the bucket is under `max_size`, sparing anything accessed within `evict_grace`
(`vpsrelay.core.bucketeviction`).

A read that begins during a pass is covered by a handshake. The evictor writes a tombstone
per victim (`<prefix>evicting/sha256/<hex>`), THEN reads the batches once more (the last
look) and spares every victim named in a batch it had not read before, or accessed within
the grace; it deletes the rest and then its tombstones. A node, before it reads an object
from the bucket (streamed or by a presigned redirect), writes an access record for it (a
batch of one) THEN looks for its tombstone, and passes the request through if there is
one. With read-after-write consistency (S3, SeaweedFS, R2: a LIST sees every PUT that
ended before it began) one of the two sees the other's write: either the last look finds
the record and the object is spared, or the node finds the tombstone and does not read
it. A node whose own record of an object is younger than `evict_grace / 2` skips both
(`record_is_fresh`): that record keeps the object out of any plan until the node's next
batch, which names the objects it is reading, reaches the bucket.

The handshake holds only while the pass holds the eviction lease: another pass may clear
its tombstones and fold (and delete) the records that would spare its victims. So a pass
deletes only right after renewing its lease, and checks before each round of deletes
that the last renewal is younger than `lease_ttl / 2`; a last look that finds a batch it
had read gone (another pass deleted it) deletes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.s3.client import S3Error
from vpsrelay.cache.s3.lease import LeaseState
from vpsrelay.core import bucketeviction
from vpsrelay.core.leases import lapsed, lease_age

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable

    from vpsrelay.cache.s3.client import S3Client
    from vpsrelay.cache.s3.lease import Leases
    from vpsrelay.config import S3Config

log = logging.getLogger("vpsrelay.cache")

EVICT_LEASE = "evict:all"
MAX_LISTED = 200_000  # objects one pass looks at (bounded memory and time)
MAX_BATCH = 4 * 1024 * 1024
MAX_MERGED = 64 * 1024 * 1024
MAX_LIST_PAGES = 200  # batches or tombstones one look lists (1000 a page)
PARALLEL = 8  # bucket requests at once for a pass's batch reads, tombstones and deletes
MAX_RECORDED = 100_000  # digests whose last access record a node remembers
ABANDONED_TTLS = 3  # an upload this many lease_ttl old with no live lease is abandoned
ABANDONED_NO_LEASES = 24 * 3600.0  # without leases: a day, like a lifecycle rule's minimum
MAX_UPLOAD_PAGES = 100  # bounded time per pass
MAX_VICTIMS = 5000  # deleted by one pass at most (bounded time); the rest the next pass
FAILED_RECORD_MEMORY = 5.0  # seconds a digest whose record failed passes by the bucket
TOMBSTONE_MEMORY = 10.0  # seconds a node passes a tombstoned digest through without a look


class LeaseLapsed(Exception):
    """This pass can no longer show that it holds the eviction lease: it deletes nothing."""


def _leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _first_s3_error(group: BaseExceptionGroup[BaseException]) -> S3Error | None:
    """The S3Error in a nursery's group when it holds nothing else (trio groups the
    errors of a nursery's tasks), so callers can catch `S3Error`."""
    errors, rest = group.split(S3Error)
    if errors is None or rest is not None:
        return None
    first = _leaf(errors)
    return first if isinstance(first, S3Error) else None


def _digest_of(key: str) -> str:
    """`sha256:<hex>` from `<prefix>blobs/sha256/<hex>` (or a tombstone's key)."""
    algorithm, hexpart = key.rsplit("/", 2)[-2:]
    return f"{algorithm}:{hexpart}"


@dataclass(eq=False)
class Fold:
    """What one read of the access batches found (`Evictor._fold_batches`)."""

    keys: list[str]  # the batch keys read (or tried)
    complete: bool  # the listing got to its end
    listed: set[str]  # every batch key listed (the skipped ones too)
    unreadable: list[str] = field(default_factory=list)  # a GET failed (key and why)
    gone: list[str] = field(default_factory=list)  # listed, then not found


@dataclass(eq=False)
class EvictionPass:
    """What one pass knows, step by step (`Evictor.plan`, `mark`, `last_look`,
    `delete_victims`, `finish`, `unmark`)."""

    merged: dict[str, float]  # digest -> its latest recorded access
    folded: set[str]  # the batch keys read (deleted once merged)
    present: set[str]  # the digests listed
    victims: list[str]  # the digests to delete
    keys: dict[str, str]  # victim digest -> its key, as listed
    marked: list[str] = field(default_factory=list)  # digests with a tombstone written
    deleted: list[str] = field(default_factory=list)
    # A batch or merged.json that could not be read may name any victim: none deleted.
    doubtful: bool = False
    # ... and, the first time it failed, the history is kept as it is (no `finish`): one
    # failed GET must not wipe every record. Failing again next pass, it is given up.
    keep_history: bool = False


class Evictor:
    def __init__(self, client: S3Client, leases: Leases, config: S3Config, node: str) -> None:
        self.client = client
        self.leases = leases
        self.config = config
        self.node = node
        self.accessed: dict[str, float] = {}  # since the last batch
        self._batches = 0
        self._recorded = bucketeviction.RecentRecords(config.evict_grace, MAX_RECORDED)
        self._recording: dict[str, trio.Event] = {}  # records being written
        # digest -> until when (monotonic) its requests pass the bucket by without a look:
        # its tombstone was found, or its record could not be written. Cleared by each batch.
        self._passing_by: dict[str, float] = {}
        self._renewed_at: float | None = None  # the eviction lease's (monotonic)
        self._renewing = trio.Lock()
        self._merged_failed_before = False  # the last pass could not read merged.json
        self._unreadable_before: set[str] = set()  # batches the last pass could not read

    @property
    def _access_prefix(self) -> str:
        return f"{self.config.prefix}access/"

    def tombstone_key(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return f"{self.config.prefix}evicting/{algorithm}/{hexpart}"

    # --- what every node does

    def touch(self, digest: str) -> None:
        self.accessed[digest] = time.time()

    async def _write(self, batch: dict[str, float]) -> None:
        self._batches += 1
        key = f"{self._access_prefix}batch-{self.node}-{self._batches:08d}.json"
        await self.client.put(key, json.dumps(batch).encode(), content_type="application/json")

    async def write_batch(self, in_use: set[str]) -> None:
        """Record what this node served (and serves now) since the last batch."""
        self._passing_by.clear()  # look again: one record per digest per batch at most
        now = time.time()
        batch = {**self.accessed, **dict.fromkeys(in_use, now)}
        if not batch:
            return
        # Taken before the PUT: a read touched while it is sent goes in the next batch.
        taken, self.accessed = self.accessed, {}
        try:
            await self._write(batch)
        except BaseException:
            self.accessed = {**taken, **self.accessed}
            raise

    def _passes_by(self, digest: str) -> bool:
        until = self._passing_by.get(digest)
        if until is not None and time.monotonic() < until:
            return True
        self._passing_by.pop(digest, None)
        return False

    def _pass_by(self, digest: str, seconds: float) -> None:
        now = time.monotonic()
        if len(self._passing_by) >= MAX_RECORDED:  # bounded even while no batch is written
            self._passing_by = {d: t for d, t in self._passing_by.items() if t > now}
        self._passing_by[digest] = now + seconds

    async def may_read(self, digest: str) -> bool:
        """Before this node reads `digest` from the bucket: unless its own record of it is
        fresh, write one (a batch of that digest alone) and THEN look for a tombstone.
        False: an eviction pass may be deleting it, or the record could not be written
        (the bucket answered with errors twice: only this blob passes by; or it did not
        answer: the S3Error is raised, and the caller marks the bucket failing). Either is
        remembered until the next batch (`TOMBSTONE_MEMORY`, `FAILED_RECORD_MEMORY` at
        most): the requests meanwhile, concurrent ones too, pass by without a record each."""
        pending = self._recording.get(digest)
        if pending is not None:  # a concurrent request is writing it: one record for both
            await pending.wait()
        if self._passes_by(digest):
            return False
        if self._recorded.fresh(digest, time.monotonic()):
            return True
        done = self._recording[digest] = trio.Event()
        try:
            for attempt in range(2):
                try:
                    return await self._record_and_look(digest)
                except S3Error as exc:
                    if exc.status is None:  # no answer (a deadline, the network): the bucket
                        self._pass_by(digest, FAILED_RECORD_MEMORY)  # fails: raised
                        raise
                    if attempt:  # answered twice with an error: only this blob passes by
                        log.warning("cache: %s: passing this request through (%s)", digest, exc)
            self._pass_by(digest, FAILED_RECORD_MEMORY)
            return False
        finally:
            if self._recording.get(digest) is done:
                del self._recording[digest]
            done.set()

    async def _record_and_look(self, digest: str) -> bool:
        started = time.monotonic()
        self._recorded.forget(digest)
        await self._write({digest: time.time()})
        if await self.client.head(self.tombstone_key(digest)) is not None:
            log.info("cache: %s is being evicted from the bucket: passing it through", digest)
            self._pass_by(digest, TOMBSTONE_MEMORY)
            return False
        self._recorded.remember(digest, started, time.monotonic())
        return True

    # --- the pass (one node at a time)

    async def run_pass(self) -> list[str]:
        """One eviction pass if this node gets the lease; the digests deleted."""
        if await self.leases.take(EVICT_LEASE) is LeaseState.OTHER:
            return []
        self._renewed_at = time.monotonic()
        deleted: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, nursery.cancel_scope)
                await self.clear_tombstones()
                await self._abort_abandoned_uploads()
                if self.config.max_size > 0:
                    await self._evict(deleted)
                else:  # another node may evict: its records still need folding
                    state = await self.plan(evict=False)
                    self._check_lease()  # a lapsed pass must not delete another's late batches
                    if not state.keep_history:
                        await self.finish(state)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            lapsed, rest = group.split(LeaseLapsed)
            if lapsed is not None and rest is None:
                log.warning("cache: eviction pass stopped: %s", _leaf(lapsed))
            elif (error := _first_s3_error(group)) is not None:
                raise error from group
            else:
                raise
        finally:
            self._renewed_at = None
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.timeout):
                await self.leases.release(EVICT_LEASE)
        return deleted

    async def _keep_lease(self, evicting: trio.CancelScope) -> None:
        """Renew the eviction lease while a pass runs (it may run longer than
        `lease_ttl`); a pass whose lease was taken over stops at once."""
        while True:
            await trio.sleep(self.config.lease_ttl / 3)
            if not await self._renew():
                log.warning("cache: the eviction lease was taken over: pass stopped")
                evicting.cancel()
                return

    async def _renew(self) -> bool:
        async with self._renewing:  # two renewals at once: the second's If-Match fails
            asked = time.monotonic()
            if not await self.leases.renew(EVICT_LEASE):
                self._renewed_at = None
                return False
            self._renewed_at = asked  # the lease lives lease_ttl from the request, at least
            return True

    def _holds_lease(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and time.monotonic() - renewed < self.config.lease_ttl / 2

    def _check_lease(self) -> None:
        """Raise unless the lease was renewed less than `lease_ttl / 2` ago: a pass that
        froze (a paused VM, a stalled event loop) may have lost it without knowing, and
        another pass may have folded the records that spare its victims.

        Raises:
            LeaseLapsed: it was not.
        """
        if not self._holds_lease():
            raise LeaseLapsed("the eviction lease was not renewed in time: nothing deleted")

    async def _each(self, items: Iterable[str], action: Callable[[str], Awaitable[object]]) -> None:
        """`action` on every item, `PARALLEL` at a time; the first `S3Error` is raised
        once all have run."""
        queue = iter(items)
        errors: list[S3Error] = []

        async def work() -> None:
            for item in queue:  # shared: each item is taken once
                try:
                    await action(item)
                except S3Error as exc:
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(PARALLEL):
                nursery.start_soon(work)
        if errors:
            raise errors[0]

    async def _list_all(self, prefix: str) -> tuple[list[str], bool]:
        """The keys under `prefix`, and whether the listing got to its end."""
        sizes, complete = await self._list_sizes(prefix)
        return list(sizes), complete

    async def _list_sizes(self, prefix: str) -> tuple[dict[str, int], bool]:
        """The keys under `prefix` with their sizes, and whether the listing got to its
        end."""
        sizes: dict[str, int] = {}
        token: str | None = ""
        for _ in range(MAX_LIST_PAGES):
            page, token = await self.client.list(prefix, token or "")
            sizes.update((item.key, item.size) for item in page)
            if token is None:
                return sizes, True
        return sizes, False

    async def clear_tombstones(self) -> None:
        """Delete the tombstones an earlier pass left (its node died, or the bucket failed
        under it); this node holds the eviction lease, so no other pass is running."""
        keys, _ = await self._list_all(f"{self.config.prefix}evicting/")
        await self._each(keys, self.client.delete)
        if keys:
            log.info("cache: removed %d tombstone(s) an earlier eviction pass left", len(keys))

    async def _abort_abandoned_uploads(self) -> None:
        """Abort the multipart uploads no fill is behind any more: a dead node's, or one
        whose abort failed while the bucket was down. With leases: started more than
        `ABANDONED_TTLS` x `lease_ttl` ago and no live lease on the digest; without
        (`conditional_writes = false`), started more than `ABANDONED_NO_LEASES` ago."""
        now = time.time()
        leased = self.config.conditional_writes
        oldest = now - (self.config.lease_ttl * ABANDONED_TTLS if leased else ABANDONED_NO_LEASES)
        after: tuple[str, str] | None = ("", "")
        aborted = pages = 0
        while after is not None and pages < MAX_UPLOAD_PAGES:
            page, after = await self.client.uploads_page(f"{self.config.prefix}blobs/", after)
            pages += 1
            for upload in page:
                if upload.initiated is None or upload.initiated.timestamp() > oldest:
                    continue
                digest = "sha256:" + upload.key.rsplit("/", 1)[-1]
                if leased and await self._lease_is_live(digest):
                    continue
                await self.client.abort_upload(upload.key, upload.upload_id)
                aborted += 1
        if aborted:
            log.info("cache: aborted %d abandoned upload(s) in the bucket", aborted)

    async def _lease_is_live(self, digest: str) -> bool:
        head = await self.client.head(self.leases.key(digest))
        if head is None:
            return False
        age = lease_age(head.date, head.last_modified)
        return age is None or not lapsed(age, self.config.lease_ttl)

    async def _fold_batches(self, merged: dict[str, float], skip: Collection[str] = ()) -> Fold:
        """Fold every batch not in `skip` into `merged`. A batch larger than `MAX_BATCH`
        or not JSON is ignored (the bucket is another trust domain); one whose GET fails
        is reported (it may name any object); all are deleted by `finish`."""
        listed, complete = await self._list_sizes(f"{self._access_prefix}batch-")
        fold = Fold([key for key in listed if key not in skip], complete, set(listed))
        malformed: list[str] = []

        async def read(key: str) -> None:
            if listed[key] > MAX_BATCH:
                malformed.append(key)
                return
            try:
                body = await self.client.get_small(key, MAX_BATCH)
            except S3Error as exc:
                fold.unreadable.append(f"{key} ({exc})")
                return
            if body is None:
                fold.gone.append(key)
                return
            try:
                bucketeviction.merge(merged, json.loads(body), now=time.time())
            except ValueError:
                malformed.append(key)

        await self._each(fold.keys, read)  # a node's records are one object each: many
        if malformed:  # once a pass: a bucket writer may plant many
            log.warning(
                "cache: ignoring %d malformed access batch(es), e.g. %s",
                len(malformed),
                malformed[0],
            )
        if fold.unreadable:
            log.warning(
                "cache: could not read %d access batch(es) (e.g. %s): no object evicted this pass",
                len(fold.unreadable),
                fold.unreadable[0],
            )
        return fold

    async def _evict(self, deleted: list[str]) -> None:
        state = await self.plan()
        unmark = True
        try:
            if state.victims:
                await self.mark(state)
                await self.last_look(state)
                await self.delete_victims(state)
            self._check_lease()
            if not state.keep_history:
                await self.finish(state)
        except LeaseLapsed:
            unmark = False  # another pass may have written tombstones at the same keys
            raise
        finally:
            deleted += state.deleted
            # A DELETE takes `timeout` at most, PARALLEL at once; and never past the
            # lease's sure life (renewals have stopped): after it another pass may have
            # written tombstones at the same keys, which these deletes would remove.
            rounds = math.ceil(len(state.marked) / PARALLEL) + 1
            renewed = self._renewed_at
            sure = 0.0 if renewed is None else renewed + self.config.lease_ttl / 2
            limit = min(self.config.timeout * rounds, sure - time.monotonic())
            with trio.CancelScope(shield=True), trio.move_on_after(max(0.0, limit)):
                if unmark and self._holds_lease():
                    await self.unmark(state)

    async def plan(self, *, evict: bool = True) -> EvictionPass:
        """Fold the access records and pick the victims, `MAX_VICTIMS` at most (nothing
        written yet; none without `evict`)."""
        merged_key = f"{self._access_prefix}merged.json"
        merged: dict[str, float] = {}
        doubtful = False
        try:
            body = await self.client.get_small(merged_key, MAX_MERGED)
            if body is not None:
                bucketeviction.merge(merged, json.loads(body), now=time.time())
        except ValueError:
            log.warning("cache: ignoring a malformed %s (it is rewritten)", merged_key)
        except S3Error as exc:  # too large, or failing: rewritten from the batches
            log.warning(
                "cache: could not read %s (%s): no object evicted this pass", merged_key, exc
            )
            doubtful = True
        fold = await self._fold_batches(merged)
        unreadable = set(fold.unreadable)
        keep_history = (doubtful and not self._merged_failed_before) or bool(
            unreadable - self._unreadable_before
        )
        self._merged_failed_before, self._unreadable_before = doubtful, unreadable
        doubtful = doubtful or bool(unreadable)
        stored: list[bucketeviction.Stored] = []
        token: str | None = ""
        while token is not None and len(stored) < MAX_LISTED:
            page, token = await self.client.list(f"{self.config.prefix}blobs/", token or "")
            for item in page:
                uploaded = item.last_modified.timestamp() if item.last_modified else time.time()
                last = max(merged.get(_digest_of(item.key), 0.0), uploaded)
                stored.append(bucketeviction.Stored(item.key, item.size, last))
        victims = (
            bucketeviction.plan(
                stored,
                max_size=self.config.max_size,
                now=time.time(),
                grace=self.config.evict_grace,
                limit=MAX_VICTIMS,
            )
            if evict and not doubtful
            else []
        )
        return EvictionPass(
            merged,
            set(fold.keys),
            {_digest_of(item.key) for item in stored},
            [_digest_of(key) for key in victims],
            {_digest_of(key): key for key in victims},
            doubtful=doubtful,
            keep_history=keep_history,
        )

    async def mark(self, state: EvictionPass) -> None:
        """A tombstone for every victim, before the last look."""

        async def mark_one(digest: str) -> None:
            await self.client.put(self.tombstone_key(digest), b"")
            state.marked.append(digest)

        await self._each(list(state.victims), mark_one)

    async def last_look(self, state: EvictionPass) -> None:
        """Read the batches that appeared since `plan` (after the tombstones exist) and
        spare the victims they name, or that were accessed within the grace. Spare them
        all when a batch could not be read, or when one read by `plan` is gone: another
        pass deleted it, so this one may have lost its lease unknowingly and not seen
        records folded meanwhile."""
        late: dict[str, float] = {}
        fold = await self._fold_batches(late, skip=state.folded)
        state.folded.update(fold.keys)
        bucketeviction.merge(state.merged, late, now=time.time())
        if not fold.complete:  # a batch not seen may name any of them
            log.warning("cache: too many access batches to read: no object evicted this pass")
            state.victims = []
            return
        if fold.gone or not state.folded <= fold.listed:
            log.warning("cache: another eviction pass ran meanwhile: no object evicted this pass")
            state.victims = []
            return
        if fold.unreadable:
            state.victims = []
            return
        state.victims = bucketeviction.last_look(
            state.victims,
            late=late.keys(),
            accessed=state.merged,
            now=time.time(),
            grace=self.config.evict_grace,
        )

    async def delete_victims(self, state: EvictionPass) -> None:
        """Delete the victims still marked, `PARALLEL` at a time, while this pass can show
        it holds the eviction lease: renewed right before, and checked before each round
        (a pass that froze past `lease_ttl / 2` stops; see `_check_lease`).

        Raises:
            LeaseLapsed: the lease could not be renewed, or not in time.
        """
        marked = set(state.marked)
        victims = [d for d in state.victims if d in marked]
        if not victims:
            return
        if not await self._renew():
            raise LeaseLapsed("the eviction lease is no longer this node's: nothing deleted")

        async def delete(digest: str) -> None:
            await self.client.delete(state.keys[digest])
            state.deleted.append(digest)

        try:
            for start in range(0, len(victims), PARALLEL):
                self._check_lease()
                await self._each(victims[start : start + PARALLEL], delete)
        finally:
            if state.deleted:
                log.info(
                    "cache: evicted %d object(s) from the bucket (cap %d bytes)",
                    len(state.deleted),
                    self.config.max_size,
                )

    async def finish(self, state: EvictionPass) -> None:
        """Keep the folded access times in `merged.json`; delete the batches read."""
        deleted = set(state.deleted)
        live = {d: t for d, t in state.merged.items() if d in state.present and d not in deleted}
        await self.client.put(
            f"{self._access_prefix}merged.json",
            json.dumps(live).encode(),
            content_type="application/json",
        )

        async def delete_batch(key: str) -> None:
            try:
                await self.client.delete(key)
            except S3Error as exc:
                log.warning("cache: could not delete the access batch %s: %s", key, exc)

        await self._each(sorted(state.folded), delete_batch)

    async def unmark(self, state: EvictionPass) -> None:
        """Delete this pass's tombstones (the spared victims' too); one that stays is
        removed by the next pass."""
        marked, state.marked = state.marked, []
        try:
            await self._each(marked, lambda digest: self.client.delete(self.tombstone_key(digest)))
        except S3Error as exc:
            log.warning("cache: could not delete a tombstone (the next pass will): %s", exc)
