"""The bucket's health, and what this node distrusts in it: the first layer of `S3Store`.

`S3Bucket` holds what every layer uses: the client, the leases and the evictor, this
node's `Index` (memory, kept in `<data_dir>/s3cache.db`: a hint, corrected when the
bucket disagrees), and the work that sync calls leave for the next `flush` (responses to
close, leases to release). When the bucket fails, no request touches it (they pass
through) but for one probe every `RETRY_AFTER` seconds, until it answers; `/readyz` and
`/metrics` say so meanwhile. An object read back wrong is deleted and not read back for
`DISTRUST_SECONDS`; one read back gone is forgotten.

`S3Filling` (filling.py) adds the fills, `S3Lookups` (lookups.py) the lookups and reads,
`S3Store` (store.py) the rest of a `BlobStore`.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.indexwrites import IndexWrites
from vpsrelay.cache.memory import ManifestMemory
from vpsrelay.cache.s3.client import S3Client, S3Error
from vpsrelay.cache.s3.evict import Evictor
from vpsrelay.cache.s3.lease import Leases
from vpsrelay.cache.s3.tags import SharedIndex

if TYPE_CHECKING:
    from pathlib import Path

    from vpsrelay.cache.index import Database, Index
    from vpsrelay.cache.s3.reader import Closable
    from vpsrelay.config import CacheConfig

log = logging.getLogger("vpsrelay.cache")

RETRY_AFTER = 5.0  # seconds between probes of a failing bucket
DISTRUST_SECONDS = 3600.0  # an object that failed its check is not read back for this long


class S3Bucket:
    """The bucket as this node sees it: whether it answers, and what it holds wrongly."""

    def __init__(
        self, root: Path, config: CacheConfig, db: Database, index: Index, client: S3Client
    ) -> None:
        self.config = config
        self.s3 = config.s3
        self.db = db
        self.shared_index = SharedIndex.of(index)  # the same index: its tag writes
        self.index: Index = self.shared_index
        self.client = client
        self.node = secrets.token_hex(8)
        self.leases = Leases(client, self.s3.prefix, self.node, self.s3.lease_ttl)
        self.evictor = Evictor(client, self.leases, self.s3, self.node)
        self.failed_at: float | None = None  # monotonic: the bucket's last failure
        self.last_error = ""
        self._index_writes = IndexWrites(self.index, db)
        self._closing: list[Closable] = []
        self._pending_releases: list[str] = []
        # digest -> when its bucket copy failed the check: not read back until this node
        # publishes a verified copy itself (a store that keeps serving a tampered object
        # must not fail every pull of it)
        self._distrusted: dict[str, float] = {}
        self._manifests = ManifestMemory()

    def key(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return f"{self.s3.prefix}blobs/{algorithm}/{hexpart}"

    # --- the bucket's health

    @property
    def bucket_ok(self) -> bool:
        """False from the bucket's failure until the probe (`_probe_while_failing`) gets
        an answer: meanwhile no request touches the bucket (they pass through)."""
        return self.failed_at is None

    def bucket_state(self) -> str:
        """ "ok", or why the bucket is not used right now (for /readyz and metrics)."""
        return "ok" if self.bucket_ok else f"failing: {self.last_error}"

    def _failed(self, exc: S3Error) -> None:
        """The bucket failed a request: no request touches it until the probe's answer
        (a request that succeeds meanwhile, started before, says nothing of it now)."""
        if self.bucket_ok:
            log.warning("cache: the bucket failed (%s): passing pulls through", exc)
            self.failed_at = time.monotonic()
        self.last_error = exc.summary  # public in /readyz: the log has the details

    async def _probe_while_failing(self) -> None:
        """Forever: while the bucket is failing, one HEAD of a fixed key every
        `RETRY_AFTER` seconds (one at a time, with the control deadline); any answer
        brings the bucket back."""
        while True:
            await trio.sleep(RETRY_AFTER)
            if self.bucket_ok:
                continue
            try:
                await self.probe()
            except S3Error as exc:
                self.last_error = exc.summary
                log.debug("cache: the bucket still fails (%s)", exc)
                continue
            except Exception:  # the probe must never end the server
                log.exception("cache: the bucket's probe failed")
                continue
            log.info("cache: the bucket answers again")
            self.failed_at = None

    async def probe(self) -> None:
        """One cheap request that only a working bucket answers: a listing (a HEAD of a
        missing key says 404 whether or not the bucket exists).

        Raises:
            S3Error: the bucket failed (or does not exist).
        """
        await self.client.list(self.key("sha256:" + "0" * 64))

    # --- what the bucket holds wrongly

    def _is_distrusted(self, digest: str) -> bool:
        since = self._distrusted.get(digest)
        if since is not None and time.monotonic() - since > DISTRUST_SECONDS:
            del self._distrusted[digest]
            return False
        return since is not None

    async def _bad(self, digest: str, why: str) -> None:
        """An object read back was wrong or gone: forget it, and delete a wrong one."""
        self.index.remove(digest)
        self._manifests.forget(digest)
        if why == "gone":
            return
        self._distrusted[digest] = time.monotonic()
        self.index.count("digest_mismatches")
        log.warning("cache: the bucket's %s %s: deleting it", digest, why)
        with trio.CancelScope(shield=True), trio.move_on_after(self.s3.timeout):
            try:
                await self.client.delete(self.key(digest))
            except S3Error as exc:
                self._failed(exc)

    # --- what sync calls left for later, and the end

    async def flush(self, *, force: bool = False) -> None:
        """Close the responses and release the leases left for now; write the index."""
        closing, self._closing = self._closing, []
        releases, self._pending_releases = self._pending_releases, []
        with trio.CancelScope(shield=True):
            for response in closing:
                await response.aclose()
            for digest in releases:
                with trio.move_on_after(self.s3.timeout):
                    await self.leases.release(digest)
        await self._index_writes.flush(force=force)

    async def aclose(self) -> None:
        await self.flush(force=True)
        await self.client.aclose()
        await trio.to_thread.run_sync(self.db.close)
