"""Tag objects in the bucket: what a node reads from them (a hint) and when it writes."""

from __future__ import annotations

import json
import time

from vpsrelay.cache.index import Obj, Tag
from vpsrelay.cache.s3.tags import decode, encode, newer_than_bucket

DIGEST = "sha256:" + "ab" * 32
OBJ = Obj(512, 0.0, "manifest", "application/vnd.oci.image.manifest.v1+json")


def _body(checked_at: float) -> bytes:
    return encode(Tag(DIGEST, checked_at), OBJ)


def test_a_tag_object_from_the_future_is_no_hint() -> None:
    now = time.time()
    assert decode(_body(now - 1)) is not None
    assert decode(_body(now + 30)) is None  # was accepted up to 60 s ahead


def test_a_node_never_replaces_a_tag_checked_later_than_its_own() -> None:
    now = time.time()
    mine = Tag(DIGEST, now - 100)
    assert not newer_than_bucket(mine, _body(now - 50))  # another node's, newer: kept
    assert not newer_than_bucket(mine, _body(now - 100))
    assert newer_than_bucket(mine, _body(now - 200))
    assert newer_than_bucket(mine, None)  # none yet
    assert newer_than_bucket(mine, b"{not json")  # malformed: replaced
    assert newer_than_bucket(mine, _body(now + 600))  # from the future: replaced
    assert newer_than_bucket(mine, json.dumps({"digest": DIGEST}).encode())
