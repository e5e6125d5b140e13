"""The verified blob cache: content-addressed store, fills, manifests, eviction.

`storage` is the seam (the `BlobStore` interface the front uses), `store` its disk
implementation (files, space and fills, a module each: see its docstring), `index` what
is stored (in memory, kept in SQLite), `front` the HTTP side (hits, authorization,
manifests), `sending` a blob's bytes to a client; the decisions are in
`vpsrelay.core.cachepolicy`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.store import DiskStore

if TYPE_CHECKING:
    from vpsrelay.cache.storage import BlobStore
    from vpsrelay.config import Settings

log = logging.getLogger("vpsrelay.cache")


async def open_store(settings: Settings) -> BlobStore | None:
    """The store under `data_dir`, or None when the cache is disabled."""
    if not settings.cache.enabled:
        log.info("cache disabled: every pull passes through")
        return None
    if settings.cache.backend == "s3":
        from vpsrelay.cache.s3.store import S3Store

        s3 = settings.cache.s3
        shared = await S3Store.connect(settings.data_dir, settings.cache)
        log.info("cache: bucket %s at %s, prefix %r", s3.bucket, s3.endpoint, s3.prefix)
        return shared
    store = await trio.to_thread.run_sync(DiskStore.open_dir, settings.data_dir, settings.cache)
    log.info(
        "cache: %d objects, %d bytes in %s (cap %d bytes)",
        len(store.index.objects),
        store.index.used,
        settings.data_dir,
        settings.cache.max_size,
    )
    return store


__all__ = ["DiskStore", "open_store"]
