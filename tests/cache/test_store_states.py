"""A hypothesis state machine over the blob store and its index: fills begun, pumped to a
commit with the right or a wrong body, cut short or abandoned; manifests stored, blobs
read, removed and evicted under a size cap; the store reopened from disk.

Invariants after every step: nothing partial is ever visible (checked between the
chunks of every fill too), the index's used bytes equal the sum of its objects and the
files on disk, eviction keeps the cache under its cap, and reservations and temporary
files match the fills in progress.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio
import trio.lowlevel
from hypothesis import HealthCheck, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vpsrelay.cache.storage import Fill, FillState
from vpsrelay.cache.store import DiskStore
from vpsrelay.config import CacheConfig
from vpsrelay.errors import DigestMismatch, UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from vpsrelay.cache.fills import DiskFill

CAP = 10_000
# Sizes chosen so that a few fit under the cap and some push others out; one never fits.
BLOBS = [bytes([n]) * size for n, size in enumerate([700, 1_800, 2_600, 3_900, 5_500, 12_000])]
MANIFESTS = [b'{"schemaVersion":2,"n":%d}' % n + b" " * (300 * n) for n in range(4)]
BLOB_INDEXES = st.integers(0, len(BLOBS) - 1)
MANIFEST_INDEXES = st.integers(0, len(MANIFESTS) - 1)
ENDINGS = st.sampled_from(["right", "wrong", "short", "cancelled"])
PIECE = 512


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="vpsrelay-store-"))
        self.config = CacheConfig(max_size=CAP, min_free=0)
        self.store = DiskStore.open_dir(self.root, self.config)
        self.contents: dict[str, bytes] = {sha256(b): b for b in [*BLOBS, *MANIFESTS]}
        self.claimed: dict[str, DiskFill] = {}

    def teardown(self) -> None:
        for fill in self.claimed.values():
            if fill.fd >= 0:
                os.close(fill.fd)
        trio.run(self.store.aclose)
        shutil.rmtree(self.root, ignore_errors=True)

    # --- fills

    @rule(n=BLOB_INDEXES)
    def claim(self, n: int) -> None:
        digest = sha256(BLOBS[n])
        if self.store.get(digest) is not None:
            return  # a hit: the front never claims a stored blob
        fill, lead = self.store.claim(digest)
        known = self.claimed.get(digest)
        if known is None:
            assert lead
            assert fill.state is FillState.PENDING
            self.claimed[digest] = fill
        else:
            assert (fill, lead) == (known, False)  # a second client joins

    @rule(n=BLOB_INDEXES, ending=ENDINGS)
    def fill_whole(self, n: int, ending: str) -> None:
        """Claim, begin and pump in one step, as one client leading a fill does."""
        digest = sha256(BLOBS[n])
        if self.store.get(digest) is not None or digest in self.claimed:
            return
        self.claim(n)
        fill = self.claimed[digest]
        if self._begin(fill):
            self._pump(fill, ending)

    @precondition(lambda self: self._in_state(FillState.PENDING))
    @rule(data=st.data())
    def begin(self, data: st.DataObject) -> None:
        self._begin(data.draw(st.sampled_from(self._in_state(FillState.PENDING))))

    def _begin(self, fill: Fill) -> bool:
        size = len(self.contents[fill.digest])
        began = trio.run(self.store.begin, fill, size, ())
        if began:
            assert fill.state is FillState.STREAMING
            assert fill.size == size
        else:
            assert size > CAP - self._reserved_by_others(fill)
            assert fill.state is FillState.DROPPED
            self._forget(fill)
        event(f"begin: {began}")
        return began

    @precondition(lambda self: self._in_state(FillState.PENDING))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        fill = data.draw(st.sampled_from(self._in_state(FillState.PENDING)))
        self.store.drop(fill)
        assert fill.state is FillState.DROPPED
        assert fill.digest not in self.store.fills
        self._forget(fill)

    @precondition(lambda self: self._in_state(FillState.STREAMING))
    @rule(data=st.data(), ending=ENDINGS)
    def pump(self, data: st.DataObject, ending: str) -> None:
        self._pump(data.draw(st.sampled_from(self._in_state(FillState.STREAMING))), ending)

    def _pump(self, fill: Fill, ending: str) -> None:
        event(f"pump: {ending}")
        body = self.contents[fill.digest]
        if ending == "wrong":
            body = body[:-1] + bytes([body[-1] ^ 1])
        elif ending == "short":
            body = body[: len(body) // 2]

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), PIECE):
                self._check_not_visible(fill.digest)
                yield body[start : start + PIECE]
                await trio.lowlevel.checkpoint()
                if ending == "cancelled":
                    scope.cancel()
            self._check_not_visible(fill.digest)

        async def run() -> None:
            with scope:
                await self.store.pump(fill, chunks())

        scope = trio.CancelScope()
        raised: BaseException | None = None
        try:
            trio.run(run)
        except (DigestMismatch, UpstreamError) as exc:
            raised = exc
        self._forget(fill)
        if ending == "right":
            assert raised is None
            assert fill.state is FillState.COMMITTED
            assert self.store.path(fill.digest).read_bytes() == body
        else:
            expected: dict[str, type[BaseException] | None] = {
                "wrong": DigestMismatch,
                "short": UpstreamError,
                "cancelled": None,  # the pump's own cancellation, not an error
            }
            wanted = expected[ending]
            assert raised is None if wanted is None else isinstance(raised, wanted)
            assert fill.state is FillState.FAILED
            assert self.store.get(fill.digest) is None
        assert fill.digest not in self.store.fills

    # --- small objects, lookups, removal, reopening

    @rule(n=MANIFEST_INDEXES)
    def put_manifest(self, n: int) -> None:
        body = MANIFESTS[n]
        trio.run(self.store.put_small, sha256(body), body, "manifest", "application/json")
        if len(body) <= CAP - self.store.reserved:
            assert self.store.get(sha256(body)) is not None

    @rule(n=st.integers(0, len(BLOBS) + len(MANIFESTS) - 1))
    def look_up(self, n: int) -> None:
        body = [*BLOBS, *MANIFESTS][n]
        digest = sha256(body)
        obj = self.store.get(digest)
        if obj is None:
            assert self.store.open(digest) is None or digest in self.store.index.objects
            return
        assert obj.size == len(body)
        self.store.index.touch(digest, obj.last_used + 1)
        if obj.kind == "manifest":
            assert trio.run(self.store.read_small, digest) == body
            return
        reader = self.store.open(digest)
        assert reader is not None
        try:
            assert trio.run(reader.read, 0, len(body) + 1) == body
        finally:
            reader.close()

    @rule(n=st.integers(0, len(BLOBS) + len(MANIFESTS) - 1))
    def remove(self, n: int) -> None:
        digest = sha256([*BLOBS, *MANIFESTS][n])
        removed = trio.run(self.store.remove, digest)
        assert removed == (digest not in self.store.fills)
        if removed:
            assert self.store.get(digest) is None

    @precondition(lambda self: not self.claimed)
    @rule()
    def reopen(self) -> None:
        before = {d: o.size for d, o in self.store.index.objects.items()}
        trio.run(self.store.aclose)
        self.store = DiskStore.open_dir(self.root, self.config)
        assert {d: o.size for d, o in self.store.index.objects.items()} == before

    # --- invariants

    @invariant()
    def used_bytes_are_the_objects_on_disk(self) -> None:
        index = self.store.index
        assert index.used == sum(obj.size for obj in index.objects.values())
        on_disk = {
            f"sha256:{path.name}": path.read_bytes()
            for path in (self.root / "blobs" / "sha256").glob("*/*")
        }
        assert set(on_disk) == set(index.objects)
        for digest, data in on_disk.items():
            assert sha256(data) == digest  # only verified bytes under blobs/
            assert index.objects[digest].size == len(data)

    @invariant()
    def the_cache_stays_under_its_cap(self) -> None:
        assert self.store.index.used + self.store.reserved <= CAP

    @invariant()
    def reservations_and_temporary_files_match_the_fills_in_progress(self) -> None:
        streaming = self._in_state(FillState.STREAMING)
        assert self.store.reserved == sum(fill.size for fill in streaming)
        assert len(list((self.root / "tmp").iterdir())) == len(streaming)
        assert set(self.store.fills) == set(self.claimed)

    # --- helpers

    def _in_state(self, state: FillState) -> list[Fill]:
        return [fill for fill in self.claimed.values() if fill.state is state]

    def _reserved_by_others(self, fill: Fill) -> int:
        return sum(f.size for f in self._in_state(FillState.STREAMING) if f is not fill)

    def _forget(self, fill: Fill) -> None:
        if self.claimed.get(fill.digest) is fill:
            del self.claimed[fill.digest]

    def _check_not_visible(self, digest: str) -> None:
        assert self.store.get(digest) is None
        assert not self.store.path(digest).exists()


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_states = StoreMachine.TestCase
