"""Tags shared through the bucket: a tag one node fetched saves the others a manifest GET.

Each tag is a small object, `<prefix>tags/<registry>/<repository>/<tag>`, holding the
manifest digest it named, when the upstream last confirmed it, and the manifest's media
type and size (the manifest itself is a verified content-addressed object beside the
blobs). A node reads it when its own copy is older than the tag TTL, as a hint only: it
asks the upstream with a free HEAD, and serves the bucket's manifest only when the
upstream names the same digest (a bucket writer can cost a node a HEAD, never change
what a tag serves, nor which repositories hold what). A node writes the tags it learned
at its next flush. Public marks are not shared either.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields

from vpsrelay.cache.index import Index, Obj, Tag
from vpsrelay.core import grammar

MAX_TAG_OBJECT = 64 * 1024


@dataclass(slots=True)
class SharedIndex(Index):
    """An `Index` that remembers which tags to write to the bucket."""

    tag_writes: dict[tuple[str, str, str], None] = field(default_factory=dict)

    @classmethod
    def of(cls, index: Index) -> SharedIndex:
        return cls(**{f.name: getattr(index, f.name) for f in fields(Index)})

    def set_tag(self, registry: str, repository: str, tag: str, digest: str, now: float) -> None:
        Index.set_tag(self, registry, repository, tag, digest, now)
        self.tag_writes[(registry, repository, tag)] = None


def tag_key(prefix: str, registry: str, repository: str, tag: str) -> str:
    return f"{prefix}tags/{registry}/{repository}/{tag}"


def encode(tag: Tag, obj: Obj) -> bytes:
    return json.dumps(
        {
            "digest": tag.digest,
            "checked_at": tag.checked_at,
            "media_type": obj.media_type,
            "size": obj.size,
        }
    ).encode()


def decode(body: bytes) -> tuple[Tag, Obj] | None:
    """A tag object's contents, or None when it is malformed (the bucket is another
    trust domain: only well-formed values are taken, and a time in the future is not).
    What it says is a hint: `S3Store.refresh_tag` takes only its digest, to be confirmed
    by the upstream."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    digest, checked_at = data.get("digest"), data.get("checked_at")
    media_type, size = data.get("media_type"), data.get("size")
    if not (
        isinstance(digest, str)
        and grammar.is_valid_digest(digest)
        and isinstance(checked_at, int | float)
        and math.isfinite(checked_at)
        and checked_at <= time.time()
        and isinstance(media_type, str)
        and 0 < len(media_type) < 256
        and isinstance(size, int)
        and 0 < size <= 4 * 1024 * 1024
    ):
        return None
    return Tag(digest, float(checked_at)), Obj(size, time.time(), "manifest", media_type)


def newer_than_bucket(tag: Tag, shared: bytes | None) -> bool:
    """Whether this node's tag should replace the bucket's copy `shared` (None: there is
    none): only when it was checked later (a malformed copy is replaced)."""
    decoded = decode(shared) if shared is not None else None
    return decoded is None or decoded[0].checked_at < tag.checked_at
