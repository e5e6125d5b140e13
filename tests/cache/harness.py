"""An in-process registry stand-in and a relay with its cache on, for the cache's fast tests.

`FakeRegistry` answers like Distribution behind `httpx.MockTransport` (blobs, manifests
by tag and digest, HEAD, ranges, a token realm when asked); its switches make it fail
the ways the cache must survive. `cached_relay` is `tests.test_app.relay` with a real
`BlobStore` on a temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import trio

from tests.test_app import HUB, Chunks, reply, split
from vpsrelay import config
from vpsrelay.app import RelayApp
from vpsrelay.cache.store import DiskStore
from vpsrelay.upstream import Upstream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

REPO = "library/alpine"
TOKEN_REALM = "http://auth.test/token"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Over one write batch (1 MiB): a fill writes in several steps, and a disk can fail midway.
BLOB = bytes(range(256)) * 12_000
BLOB_DIGEST = sha256(BLOB)
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"digest": "sha256:" + "c" * 64, "size": 2},
        "layers": [{"digest": BLOB_DIGEST, "size": len(BLOB)}],
    }
).encode()
MANIFEST_DIGEST = sha256(MANIFEST)
OTHER_MANIFEST = MANIFEST.replace(b'"size": 2', b'"size": 3')
OTHER_DIGEST = sha256(OTHER_MANIFEST)


@dataclass
class FakeRegistry:
    """Distribution's answers for one repository, with switches to make it misbehave."""

    blobs: dict[str, bytes] = field(default_factory=lambda: {BLOB_DIGEST: BLOB})
    manifests: dict[str, bytes] = field(
        default_factory=lambda: {MANIFEST_DIGEST: MANIFEST, OTHER_DIGEST: OTHER_MANIFEST}
    )
    tags: dict[str, str] = field(default_factory=lambda: {"latest": MANIFEST_DIGEST})
    repositories: set[str] = field(default_factory=lambda: {REPO})
    # Authorization values the registry refuses with 401 (None: no header at all).
    refused: set[str | None] = field(default_factory=set)
    down: bool = False  # every request fails to connect
    failing_status: int | None = None  # every request but the token realm's gets this
    ranges: bool = True  # honours `Range` with a 206
    token_realm: bool = False  # `/v2/` asks for a Bearer token from TOKEN_REALM
    token_service: str | None = "hub"  # the challenge's service (None: it names none)
    token_answer: tuple[int, bytes] = (200, b'{"token": "anon-token"}')  # the realm's
    gate: trio.Event | None = None  # a blob body stops after its first chunk until set
    manifest_digest_header: bool = True  # manifests come with `Docker-Content-Digest`
    manifest_type: str | None = MANIFEST_TYPE  # their `Content-Type` (None: none sent)
    seen: list[httpx.Request] = field(default_factory=list)

    def requests(self, method: str | None = None, path_part: str = "") -> list[httpx.Request]:
        return [
            r
            for r in self.seen
            if (method is None or r.method == method) and path_part in r.url.path
        ]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "auth.test":
            status, answer = self.token_answer
            return reply(status, {"content-type": "application/json"}, answer)
        if self.failing_status is not None:
            return reply(self.failing_status, {"content-type": "application/json"}, b"{}")
        path = request.url.path
        if path == "/v2/":
            if self.token_realm:
                challenge = f'Bearer realm="{TOKEN_REALM}"'
                if self.token_service is not None:
                    challenge += f',service="{self.token_service}"'
                return reply(401, {"www-authenticate": challenge})
            return reply(200, {"content-type": "application/json"}, b"{}")
        if request.headers.get("authorization") in self.refused:
            return reply(401, {"content-type": "application/json"}, b'{"errors":[]}')
        name, _, rest = path.removeprefix("/v2/").partition("/manifests/")
        if rest:
            return self._manifest(request, name, rest)
        name, _, digest = path.removeprefix("/v2/").partition("/blobs/")
        if digest and name in self.repositories and digest in self.blobs:
            return self._blob(request, self.blobs[digest])
        return reply(404, {"content-type": "application/json"}, b'{"errors":[]}')

    def _manifest(self, request: httpx.Request, name: str, reference: str) -> httpx.Response:
        digest = self.tags.get(reference, reference)
        body = self.manifests.get(digest)
        if name not in self.repositories or body is None:
            return reply(404, {"content-type": "application/json"}, b'{"errors":[]}')
        headers = {"content-length": str(len(body))}
        if self.manifest_type is not None:
            headers["content-type"] = self.manifest_type
        if self.manifest_digest_header:
            headers["docker-content-digest"] = digest
        return reply(200, headers, b"" if request.method == "HEAD" else body)

    def _blob(self, request: httpx.Request, body: bytes) -> httpx.Response:
        headers = {"content-type": "application/octet-stream", "content-length": str(len(body))}
        if request.method == "HEAD":
            return reply(200, headers)
        wanted = request.headers.get("range")
        if wanted is not None and self.ranges:
            first_text, _, last_text = wanted.removeprefix("bytes=").partition("-")
            first = int(first_text)
            last = int(last_text) if last_text else len(body) - 1
            headers["content-range"] = f"bytes {first}-{last}/{len(body)}"
            headers["content-length"] = str(last + 1 - first)
            return reply(206, headers, body[first : last + 1])
        if self.gate is not None:
            return httpx.Response(200, headers=headers, stream=GatedBody(body, self.gate))
        return reply(200, headers, body)


class GatedBody(Chunks):
    """A body that sends its first chunk, then waits for `gate` before the rest."""

    def __init__(self, body: bytes, gate: trio.Event) -> None:
        super().__init__(*split(body, 64 * 1024))
        self.gate = gate

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for number, chunk in enumerate(self.chunks):
            if number == 1:
                await self.gate.wait()
            yield chunk


class ClientSide(httpx.AsyncBaseTransport):
    """Calls the ASGI app as a server would, and, unlike `httpx.ASGITransport`, accepts a
    response the app ends without its last body message: a body broken off after its
    start (a digest mismatch, a failed fill), which a client sees as a short body.
    `response.extensions["complete"]` says whether the body was finished."""

    def __init__(self, app: RelayApp) -> None:
        self.app = app
        # The client hangs up once it has this many body bytes (0: once it has the status
        # line; None: it reads to the end).
        self.hang_up_after: int | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": "http",
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port or 80),
            "client": ("127.0.0.1", 40000),
        }
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        body: list[bytes] = []
        complete = trio.Event()
        hung_up = trio.Event()
        requested = False
        received = 0

        async def receive() -> dict[str, object]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            async with trio.open_nursery() as nursery:  # whichever comes first
                for event in (complete, hung_up):
                    nursery.start_soon(_wait_then_cancel, event, nursery.cancel_scope)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            nonlocal status, headers, received
            if message["type"] == "http.response.start":
                status = message["status"]  # type: ignore[assignment]
                headers = list(message.get("headers", []))  # type: ignore[call-overload]
                if self.hang_up_after == 0:
                    hung_up.set()
            elif message["type"] == "http.response.body":
                chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
                if hung_up.is_set():
                    return  # gone: nothing reaches it any more
                body.append(chunk)
                received += len(chunk)
                if self.hang_up_after is not None and received >= self.hang_up_after:
                    hung_up.set()
                if not message.get("more_body", False):
                    complete.set()

        with contextlib.suppress(Exception):  # the app's error is the broken body
            await self.app(scope, receive, send)  # type: ignore[arg-type]
        finished = complete.is_set()
        complete.set()  # a watcher of `receive` would otherwise wait forever
        return httpx.Response(
            status,
            headers=headers,
            content=b"".join(body),
            extensions={"complete": finished},
        )


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@dataclass
class CachedRelay:
    transport: ClientSide
    client: httpx.AsyncClient
    app: RelayApp
    store: DiskStore
    registry: FakeRegistry


@contextlib.asynccontextmanager
async def cached_relay(
    tmp_path: Path,
    registry: FakeRegistry | None = None,
    overrides: dict[str, object] | None = None,
    *,
    store_class: Callable[[Path, config.CacheConfig], DiskStore] = DiskStore.open_dir,
) -> AsyncIterator[CachedRelay]:
    """The relay app with its cache on `tmp_path`, in front of `registry`."""
    registry = registry or FakeRegistry()
    settings = config.load(
        None,
        {},
        {"data_dir": str(tmp_path), "cache.min_free": 0, **(overrides or {})},
        upstreams={"docker.io": HUB},
    )
    store = store_class(tmp_path, settings.cache)
    upstream = Upstream(settings, transport=registry.transport())
    app = RelayApp(settings, upstream, store)
    transport = ClientSide(app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://relay.test") as client:
            yield CachedRelay(transport, client, app, store, registry)
    finally:
        await upstream.aclose()
        await store.aclose()
