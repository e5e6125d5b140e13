"""Component tests of the ASGI app: httpx's ASGITransport in front, a MockTransport behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import trio

from vpsrelay import config, errors
from vpsrelay.access.guard import Guard
from vpsrelay.app import RelayApp
from vpsrelay.core import auth
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.upstream import Upstream, read_body

HUB = "http://hub.test"
AUTH_REALM = "http://auth.test/token"
HUB_CHALLENGE = f'Bearer realm="{AUTH_REALM}",service="registry.docker.io"'
CDN = "http://cdn.test"

BLOB = b"layer bytes " * 5000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = b'{"schemaVersion":2}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
MANIFEST_TYPE = "application/vnd.oci.image.index.v1+json"

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


class Chunks(httpx.AsyncByteStream):
    """A streamed upstream body, optionally failing after its chunks."""

    def __init__(self, *chunks: bytes, error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


def reply(
    status: int, headers: dict[str, str] | None = None, body: bytes | httpx.AsyncByteStream = b""
) -> httpx.Response:
    """An upstream answer with a *streamed* body.

    httpx quirk: `httpx.Response(content=...)` reads its body at construction, so the
    relay's `aiter_raw()` would raise `StreamConsumed`; a real transport never does that.
    """
    stream = body if isinstance(body, httpx.AsyncByteStream) else Chunks(*split(body))
    return httpx.Response(status, headers=headers, stream=stream)


def split(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def challenge_401() -> httpx.Response:
    return reply(
        401,
        {"www-authenticate": HUB_CHALLENGE, "content-type": "application/json"},
        b'{"errors":[{"code":"UNAUTHORIZED"}]}',
    )


@dataclass
class Relay:
    client: httpx.AsyncClient
    app: RelayApp
    seen: list[httpx.Request] = field(default_factory=list)

    def seen_paths(self) -> list[str]:
        return [f"{r.method} {r.url.host}{r.url.path}" for r in self.seen]


@contextlib.asynccontextmanager
async def relay(
    handler: Handler,
    overrides: dict[str, object] | None = None,
    *,
    raise_app_exceptions: bool = True,
) -> AsyncIterator[Relay]:
    settings = config.load(None, {}, overrides or {}, upstreams={"docker.io": HUB})
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        response = handler(request)
        if not isinstance(response, httpx.Response):
            response = await response
        return response

    upstream = Upstream(settings, transport=httpx.MockTransport(record))
    app = RelayApp(settings, upstream)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://relay.test") as client:
            yield Relay(client, app, seen)
    finally:
        await upstream.aclose()


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the upstream must not be asked: {request.method} {request.url}")


def registry_json(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


def flatten(exc: BaseException) -> list[BaseException]:
    """Every exception in `exc`, its groups and its cause/context chain."""
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.append(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return found


# --- /v2/ and the challenge


@pytest.mark.parametrize(
    ("overrides", "headers", "realm"),
    [
        ({}, {}, "http://relay.test/token"),
        ({}, {"host": "mirror.example:5000"}, "http://mirror.example:5000/token"),
        ({"server.public_url": "https://relay.example.com/"}, {"host": "ignored.example"},
         "https://relay.example.com/token"),
        # X-Forwarded-* from an untrusted peer are ignored...
        ({}, {"x-forwarded-host": "evil.example", "x-forwarded-proto": "https"},
         "http://relay.test/token"),
        # ...and believed from a trusted proxy (ASGITransport's client is 127.0.0.1)
        ({"server.trusted_proxies": ["127.0.0.1"]},
         {"x-forwarded-host": "relay.example.com", "x-forwarded-proto": "https"},
         "https://relay.example.com/token"),
    ],
)  # fmt: skip
async def test_base_challenge_realm_points_at_the_relay(overrides, headers, realm):
    async with relay(lambda request: challenge_401(), overrides) as r:
        response = await r.client.get("/v2/", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="{realm}",service="registry.docker.io"'
    )
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert response.json() == {"errors": [{"code": "UNAUTHORIZED"}]}
    assert r.seen_paths() == ["GET hub.test/v2/"]


async def test_base_without_trailing_slash():
    async with relay(lambda request: challenge_401()) as r:
        response = await r.client.get("/v2")
    assert response.status_code == 401
    assert r.seen_paths() == ["GET hub.test/v2/"]


async def test_base_basic_challenge_passes_unchanged():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(401, {"www-authenticate": 'Basic realm="Registry"'})

    async with relay(handler) as r:
        response = await r.client.get("/v2/")
    assert response.headers["www-authenticate"] == 'Basic realm="Registry"'


async def test_base_malformed_challenge_is_502():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(401, {"www-authenticate": "Bearer realm"})

    async with relay(handler) as r:
        response = await r.client.get("/v2/")
    assert response.status_code == 502
    assert registry_json(response)["errors"][0]["code"] == "UNAVAILABLE"


async def test_base_200_passes():
    async with relay(lambda request: reply(200, body=b"{}")) as r:
        response = await r.client.get("/v2/")
        assert response.status_code == 200
        assert response.content == b"{}"
        # an open upstream needs no token: /token answers an anonymous one without asking
        token = await r.client.get("/token", params={"scope": "repository:alpine:pull"})
    assert token.status_code == 200
    assert token.json()["token"] == "anonymous"
    assert r.seen_paths() == ["GET hub.test/v2/"]


# --- /token


def token_handler(request: httpx.Request) -> httpx.Response:
    if request.url.host == "hub.test" and request.url.path == "/v2/":
        return challenge_401()
    if str(request.url).startswith(AUTH_REALM):
        return reply(
            200,
            {"content-type": "application/json", "set-cookie": "tracking=1"},
            json.dumps({"token": "upstream-token", "expires_in": 300}).encode(),
        )
    raise AssertionError(f"unexpected request {request.url}")


async def test_token_get_is_forwarded_to_the_discovered_realm():
    async with relay(token_handler) as r:
        response = await r.client.get(
            "/token",
            params=[
                ("service", "registry.docker.io"),
                ("scope", "repository:alpine:pull"),
                ("scope", "repository:bitnami/redis:pull,push"),
                ("account", "me"),
            ],
            auth=("me", "secret"),
            headers={"cookie": "session=1"},
        )
    assert response.status_code == 200
    assert response.json() == {"token": "upstream-token", "expires_in": 300}
    assert "set-cookie" not in response.headers
    discovery, token = r.seen
    assert discovery.url == f"{HUB}/v2/"
    assert "authorization" not in discovery.headers
    assert str(token.url).startswith(AUTH_REALM + "?")
    assert token.method == "GET"
    assert parse_qsl(token.url.query.decode()) == [
        ("service", "registry.docker.io"),
        ("account", "me"),
        ("scope", "repository:library/alpine:pull"),
        ("scope", "repository:bitnami/redis:pull"),  # a relay asks for pull only
    ]
    assert token.headers["authorization"] == httpx.BasicAuth("me", "secret")._auth_header
    assert "cookie" not in token.headers


async def test_token_post_form_is_rewritten():
    form = {
        "grant_type": "password",
        "service": "registry.docker.io",
        "client_id": "docker",
        "scope": "repository:alpine:pull",
        "username": "me",
        "password": "secret",
    }
    async with relay(token_handler) as r:
        response = await r.client.post("/token", data=form)
    assert response.status_code == 200
    token = r.seen[-1]
    assert token.method == "POST"
    assert str(token.url) == AUTH_REALM
    assert token.headers["content-type"] == "application/x-www-form-urlencoded"
    assert dict(parse_qsl(token.content.decode())) == {
        **form,
        "scope": "repository:library/alpine:pull",
    }


async def test_token_reuses_the_challenge_seen_on_v2():
    async with relay(token_handler) as r:
        await r.client.get("/v2/")
        await r.client.get("/token", params={"scope": "repository:alpine:pull"})
        await r.client.get("/token", params={"scope": "repository:busybox:pull"})
    assert r.seen_paths() == ["GET hub.test/v2/", "GET auth.test/token", "GET auth.test/token"]


async def test_token_with_invalid_scope_name_is_400():
    async with relay(token_handler) as r:
        response = await r.client.get("/token", params={"scope": "repository:UPPER:pull"})
    assert response.status_code == 400
    assert registry_json(response)["errors"][0]["code"] == "NAME_INVALID"
    assert r.seen_paths() == ["GET hub.test/v2/"]


# --- manifests


def manifest_handler(request: httpx.Request) -> httpx.Response:
    assert request.url.path == "/v2/library/alpine/manifests/latest"
    return reply(
        200,
        {
            "content-type": MANIFEST_TYPE,
            "content-length": str(len(MANIFEST)),
            "docker-content-digest": MANIFEST_DIGEST,
            "ratelimit-limit": "100;w=21600",
            "ratelimit-remaining": "99;w=21600",
            "docker-ratelimit-source": "203.0.113.7",
            "set-cookie": "tracking=1",
            "strict-transport-security": "max-age=1",
        },
        b"" if request.method == "HEAD" else MANIFEST,
    )


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_manifest_headers_pass(method):
    async with relay(manifest_handler) as r:
        response = await r.client.request(
            method,
            "/v2/alpine/manifests/latest",
            headers={"accept": MANIFEST_TYPE, "authorization": "Bearer t", "cookie": "c=1"},
        )
    assert response.status_code == 200
    assert response.headers["docker-content-digest"] == MANIFEST_DIGEST
    assert response.headers["content-type"] == MANIFEST_TYPE
    assert response.headers["content-length"] == str(len(MANIFEST))
    assert response.headers["ratelimit-limit"] == "100;w=21600"
    assert response.headers["ratelimit-remaining"] == "99;w=21600"
    assert response.headers["docker-ratelimit-source"] == "203.0.113.7"
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert "set-cookie" not in response.headers
    assert "strict-transport-security" not in response.headers
    assert response.content == (MANIFEST if method == "GET" else b"")
    (sent,) = r.seen
    assert sent.method == method
    assert sent.headers["accept"] == MANIFEST_TYPE
    assert sent.headers["authorization"] == "Bearer t"
    assert sent.headers["accept-encoding"] == "identity"
    assert sent.headers["user-agent"].startswith("python-httpx/")
    assert "vpsrelay/" in sent.headers["user-agent"]
    assert "cookie" not in sent.headers
    assert sent.url.query == b""


async def test_manifest_query_is_not_forwarded():
    async with relay(manifest_handler) as r:
        response = await r.client.get("/v2/alpine/manifests/latest?n=1&evil=1")
    assert response.status_code == 200
    assert r.seen[0].url.query == b""


async def test_manifest_401_challenge_is_rewritten_and_remembered():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/library/alpine/manifests/latest":
            return reply(
                401, {"www-authenticate": HUB_CHALLENGE + ',scope="repository:library/alpine:pull"'}
            )
        return token_handler(request)

    async with relay(handler) as r:
        response = await r.client.get("/v2/alpine/manifests/latest")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == (
            'Bearer realm="http://relay.test/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"'
        )
        await r.client.get("/token", params={"scope": "repository:alpine:pull"})
    # the challenge came with the manifest's 401: no separate /v2/ discovery
    assert r.seen_paths() == [
        "GET hub.test/v2/library/alpine/manifests/latest",
        "GET auth.test/token",
    ]


async def test_upstream_404_passes_with_its_body():
    body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'

    def handler(request: httpx.Request) -> httpx.Response:
        return reply(404, {"content-type": "application/json"}, body)

    async with relay(handler) as r:
        response = await r.client.get("/v2/alpine/manifests/nope")
    assert response.status_code == 404
    assert response.content == body


# --- blobs


def blob_handler(body: httpx.AsyncByteStream | bytes, cdn_status: int = 200) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "hub.test":
            assert request.url.path == f"/v2/library/alpine/blobs/{BLOB_DIGEST}"
            return reply(307, {"location": f"{CDN}/blobs/x?sig=abc"})
        assert request.url.host == "cdn.test"
        return reply(cdn_status, {"content-type": "application/octet-stream"}, body)

    return handler


async def test_blob_redirect_is_followed_without_authorization():
    async with relay(blob_handler(BLOB)) as r:
        response = await r.client.get(
            f"/v2/alpine/blobs/{BLOB_DIGEST}",
            headers={"authorization": "Bearer hub-token", "user-agent": "docker/27"},
        )
    assert response.status_code == 200
    assert response.content == BLOB
    assert response.headers["content-type"] == "application/octet-stream"
    assert "location" not in response.headers
    hub, cdn = r.seen
    assert hub.headers["authorization"] == "Bearer hub-token"
    assert str(cdn.url) == f"{CDN}/blobs/x?sig=abc"
    assert cdn.method == "GET"
    assert "authorization" not in cdn.headers
    assert cdn.headers["user-agent"].startswith("docker/27 vpsrelay/")


async def test_blob_head_follows_redirect_with_empty_body():
    async with relay(blob_handler(b"")) as r:
        response = await r.client.head(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert response.status_code == 200
    assert response.content == b""
    assert [request.method for request in r.seen] == ["HEAD", "HEAD"]


async def test_blob_range_request_is_not_verified():
    part = BLOB[:100]

    async with relay(blob_handler(part, cdn_status=206)) as r:
        response = await r.client.get(
            f"/v2/alpine/blobs/{BLOB_DIGEST}", headers={"range": "bytes=0-99"}
        )
    assert response.status_code == 206
    assert response.content == part
    assert [request.headers["range"] for request in r.seen] == ["bytes=0-99", "bytes=0-99"]


MISMATCHED = [BLOB[:-1], BLOB + b"!", b"x" * len(BLOB), b""]
MISMATCH_IDS = ["short", "long", "wrong", "empty"]


@pytest.mark.parametrize("body", MISMATCHED, ids=MISMATCH_IDS)
async def test_blob_digest_mismatch_breaks_the_response(body):
    async with relay(blob_handler(body)) as r:
        # Through ASGITransport an unfinished body surfaces as an exception: never a clean 200.
        with pytest.raises(Exception):  # noqa: B017
            await r.client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")


async def call_asgi(
    app: RelayApp,
    method: str,
    path: str,
    *,
    body: list[bytes] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    messages: list[dict[str, Any]] | None = None,
    disconnect_after: int | None = None,
) -> tuple[list[dict[str, Any]], BaseException | None]:
    """Drive the ASGI app by hand; return what it sent and what it raised.

    `messages` replaces the request messages built from `body`; with `disconnect_after`,
    the client goes away once that many response messages have been sent.
    """
    sent: list[dict[str, Any]] = []
    gone = trio.Event()
    incoming = messages or [
        {"type": "http.request", "body": chunk, "more_body": n < len(body or [b""]) - 1}
        for n, chunk in enumerate(body or [b""])
    ]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))
        if disconnect_after is not None and len(sent) >= disconnect_after:
            gone.set()

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(b"host", b"relay.test"), *(headers or [])],
        "client": ("127.0.0.1", 1234),
        "server": ("relay.test", 80),
        "scheme": "http",
    }
    try:
        await app(scope, receive, send)
    except Exception as exc:
        return sent, exc
    return sent, None


def bodies(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [message for message in sent if message["type"] == "http.response.body"]


@pytest.mark.parametrize("body", MISMATCHED, ids=MISMATCH_IDS)
async def test_blob_digest_mismatch_never_completes_the_body(body, caplog):
    caplog.set_level(logging.WARNING, logger="vpsrelay")
    async with relay(blob_handler(Chunks(*split(body)))) as r:
        sent, raised = await call_asgi(r.app, "GET", f"/v2/alpine/blobs/{BLOB_DIGEST}")
    # the app may raise or return, but it must never signal the end of the body
    assert raised is None or any(isinstance(e, errors.DigestMismatch) for e in flatten(raised))
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200
    assert all(message["more_body"] for message in bodies(sent))
    assert b"".join(message["body"] for message in bodies(sent)) != body or body == b""
    assert any(BLOB_DIGEST in record.getMessage() for record in caplog.records)


async def test_blob_digest_mismatch_is_logged_as_an_abort_not_a_bug(caplog):
    caplog.set_level(logging.WARNING, logger="vpsrelay")
    async with relay(blob_handler(BLOB[:-1])) as r:
        await call_asgi(r.app, "GET", f"/v2/alpine/blobs/{BLOB_DIGEST}")
    messages = [record.getMessage() for record in caplog.records if record.name == "vpsrelay.app"]
    assert any(message.startswith("aborted GET /v2/alpine/blobs/") for message in messages), (
        messages
    )
    assert not any(message.startswith("bug while serving") for message in messages), messages


async def test_blob_digest_match_completes_the_body():
    async with relay(blob_handler(Chunks(*split(BLOB)))) as r:
        sent, raised = await call_asgi(r.app, "GET", f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert raised is None
    assert bodies(sent)[-1]["more_body"] is False
    assert b"".join(message["body"] for message in bodies(sent)) == BLOB


async def test_upstream_error_mid_body_breaks_the_response(caplog):
    caplog.set_level(logging.WARNING, logger="vpsrelay")
    stream = Chunks(BLOB[:1000], BLOB[1000:2000], error=httpx.ReadError("connection reset"))
    async with relay(blob_handler(stream)) as r:
        sent, raised = await call_asgi(r.app, "GET", f"/v2/alpine/blobs/{BLOB_DIGEST}")
        with pytest.raises(Exception):  # noqa: B017
            await r.client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert raised is None or any(isinstance(e, errors.UpstreamUnavailable) for e in flatten(raised))
    assert sent[0]["status"] == 200
    assert all(message["more_body"] for message in bodies(sent))
    assert not any(rec.getMessage().startswith("bug while serving") for rec in caplog.records)


async def test_token_post_body_too_large_is_413():
    async with relay(token_handler) as r:
        sent, raised = await call_asgi(
            r.app, "POST", "/token", body=[b"x" * 40_000, b"x" * 40_000, b"never read"]
        )
    assert raised is None
    assert sent[0]["status"] == 413
    assert json.loads(bodies(sent)[-1]["body"])["errors"][0]["code"] == "SIZE_INVALID"


@pytest.mark.parametrize(
    ("location", "status"),
    [
        ("ftp://cdn.test/blob", 502),
        (None, 502),
    ],
)
async def test_bad_blob_redirect_is_502(location, status):
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(307, {"location": location} if location else {})

    async with relay(handler) as r:
        response = await r.client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert response.status_code == status
    assert registry_json(response)["errors"][0]["code"] == "UNAVAILABLE"
    assert len(r.seen) == 1


async def test_blob_redirect_with_bad_port_is_502():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(307, {"location": "http://cdn.test:99999/blob"})

    async with relay(handler) as r:
        response = await r.client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert response.status_code == 502


async def test_too_many_redirects_is_502():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(307, {"location": f"{CDN}/hop/{len(r.seen)}"})

    async with relay(handler, {"upstream.max_redirects": 2}) as r:
        response = await r.client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert response.status_code == 502
    assert len(r.seen) == 3


async def test_unverifiable_blob_digest_is_400():
    digest = "md5:d41d8cd98f00b204e9800998ecf8427e"
    async with relay(lambda request: reply(200)) as r:
        response = await r.client.get(f"/v2/alpine/blobs/{digest}")
    assert response.status_code == 400
    assert registry_json(response)["errors"][0]["code"] == "DIGEST_INVALID"


# --- refusals: nothing reaches the upstream


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("PUT", "/v2/alpine/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/alpine/blobs/{BLOB_DIGEST}", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/alpine/blobs/uploads/uuid", 405, "UNSUPPORTED"),
        ("POST", "/v2/alpine/blobs/uploads/", 405, "UNSUPPORTED"),
        ("GET", "/v2/alpine/blobs/uploads/uuid", 405, "UNSUPPORTED"),
        ("PUT", "/token", 405, "UNSUPPORTED"),
        ("GET", "/index.php", 404, "UNSUPPORTED"),  # "/" is the landing page
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        ("GET", "/v2/Alpine/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/alpine/manifests/.bad", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/alpine/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ],
)
async def test_refusals_never_reach_the_upstream(method, path, status, code):
    async with relay(never) as r:
        response = await r.client.request(
            method, path, content=b"data" if method != "GET" else None
        )
    assert response.status_code == status
    body = registry_json(response)
    assert body["errors"][0]["code"] == code
    assert body["errors"][0]["message"]
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert response.headers["content-length"] == str(len(response.content))
    assert r.seen == []


async def test_refusal_to_head_has_no_body():
    async with relay(never) as r:
        response = await r.client.head("/v2/Alpine/manifests/latest")
    assert response.status_code == 400
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0


# --- upstream failures


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (httpx.ConnectError("connection refused"), 502),
        (httpx.ReadError("reset"), 502),
        (httpx.RemoteProtocolError("garbage"), 502),
        (httpx.ConnectTimeout("slow"), 504),
        (httpx.ReadTimeout("slow"), 504),
        (httpx.PoolTimeout("busy"), 504),
        (httpx.UnsupportedProtocol("gopher"), 502),
    ],
)
@pytest.mark.parametrize("path", ["/v2/", "/v2/alpine/manifests/latest", "/token"])
async def test_upstream_failures_are_oci_errors(error, status, path):
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    async with relay(handler) as r:
        response = await r.client.get(path)
    assert response.status_code == status
    (entry,) = registry_json(response)["errors"]
    assert entry["code"] == "UNAVAILABLE"
    assert "hub.test" not in entry["message"]  # no upstream addresses leak


async def test_upstream_429_passes_with_retry_after():
    body = b'{"errors":[{"code":"TOOMANYREQUESTS"}]}'

    def handler(request: httpx.Request) -> httpx.Response:
        return reply(
            429,
            {"retry-after": "60", "ratelimit-remaining": "0;w=21600",
             "content-type": "application/json"},
            body,
        )  # fmt: skip

    async with relay(handler) as r:
        response = await r.client.get("/v2/alpine/manifests/latest")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "60"
    assert response.headers["ratelimit-remaining"] == "0;w=21600"
    # Reworded so the user learns whose limit it is (the relay's, at docker.io).
    error = registry_json(response)["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS"
    assert "docker.io" in error["message"]
    assert "retry in 60 s" in error["message"]
    assert body != response.content


async def test_relay_bug_is_500_json():
    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug")

    async with relay(handler) as r:
        response = await r.client.get("/v2/")
    assert response.status_code == 500
    assert registry_json(response) == {
        "errors": [{"code": "UNKNOWN", "message": "internal error in the relay"}]
    }


# --- tags list


async def test_tags_list_link_is_rewritten_to_the_clients_name():
    tags = json.dumps({"name": "library/alpine", "tags": ["3.19", "3.20"]}).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v2/library/alpine/tags/list"
        return reply(
            200,
            {
                "content-type": "application/json",
                "link": '<https://hub.test/v2/library/alpine/tags/list?last=3.20&n=2>; rel="next"',
            },
            tags,
        )

    async with relay(handler) as r:
        response = await r.client.get("/v2/alpine/tags/list?n=2&last=3.18&bogus=1")
    assert response.status_code == 200
    assert response.headers["link"] == '</v2/alpine/tags/list?last=3.20&n=2>; rel="next"'
    assert response.content == tags
    assert parse_qsl(r.seen[0].url.query.decode()) == [("n", "2"), ("last", "3.18")]


async def test_referrers_query_keeps_artifact_type():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, {"oci-filters-applied": "artifactType"}, b"{}")

    async with relay(handler) as r:
        response = await r.client.get(
            f"/v2/alpine/referrers/{BLOB_DIGEST}?artifactType=application/x&other=1"
        )
    assert response.headers["oci-filters-applied"] == "artifactType"
    assert r.seen[0].url.path == f"/v2/library/alpine/referrers/{BLOB_DIGEST}"
    assert parse_qsl(r.seen[0].url.query.decode()) == [("artifactType", "application/x")]


# --- the access log


async def test_access_log_line(caplog):
    caplog.set_level(logging.INFO, logger="vpsrelay.access")
    async with relay(manifest_handler) as r:
        await r.client.get("/v2/alpine/manifests/latest")
    (line,) = [rec.getMessage() for rec in caplog.records if rec.name == "vpsrelay.access"]
    assert "client=127.0.0.1 method=GET" in line
    assert 'path="/v2/alpine/manifests/latest" status=200' in line
    assert f"bytes={len(MANIFEST)}" in line


async def test_access_log_can_be_disabled(caplog):
    caplog.set_level(logging.INFO, logger="vpsrelay.access")
    async with relay(manifest_handler, {"log.access_log": False}) as r:
        await r.client.get("/v2/alpine/manifests/latest")
    assert not [rec for rec in caplog.records if rec.name == "vpsrelay.access"]


# --- lifespan


async def test_lifespan_startup_and_shutdown():
    settings = config.load(None, {}, upstreams={"docker.io": HUB})
    upstream = Upstream(settings, transport=httpx.MockTransport(never))
    app = RelayApp(settings, upstream)
    to_app_send, to_app_receive = trio.open_memory_channel[dict[str, Any]](2)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}},
                               to_app_receive.receive, send)  # fmt: skip
            await to_app_send.send({"type": "lifespan.startup"})
            await trio.testing.wait_all_tasks_blocked()
            assert sent == [{"type": "lifespan.startup.complete"}]
            await to_app_send.send({"type": "lifespan.shutdown"})
        assert sent == [
            {"type": "lifespan.startup.complete"},
            {"type": "lifespan.shutdown.complete"},
        ]
    finally:
        await upstream.aclose()


async def test_unknown_scope_type_is_ignored():
    settings = config.load(None, {})
    upstream = Upstream(settings, transport=httpx.MockTransport(never))

    async def receive() -> dict[str, Any]:
        raise AssertionError("not called")

    async def send(message: Any) -> None:
        raise AssertionError("not called")

    try:
        await RelayApp(settings, upstream)({"type": "websocket"}, receive, send)
    finally:
        await upstream.aclose()


# --- challenge discovery for /token


@pytest.mark.parametrize(
    ("discovery", "status"),
    [
        (lambda: reply(401), 502),  # 401 without a challenge
        (lambda: reply(401, {"www-authenticate": "Bearer realm"}), 502),
        (lambda: reply(500), 502),
        (lambda: reply(404), 502),
    ],
)
async def test_token_discovery_failures_are_502(discovery, status):
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v2/"
        response: httpx.Response = discovery()
        return response

    async with relay(handler) as r:
        response = await r.client.get("/token", params={"scope": "repository:alpine:pull"})
    assert response.status_code == status
    assert registry_json(response)["errors"][0]["code"] == "UNAVAILABLE"


async def test_token_with_basic_upstream_is_anonymous():
    async with relay(lambda request: reply(401, {"www-authenticate": 'Basic realm="r"'})) as r:
        response = await r.client.get("/token")
    assert response.status_code == 200
    assert response.json() == {"token": "anonymous", "access_token": "anonymous"}
    assert r.seen_paths() == ["GET hub.test/v2/"]


async def test_discovered_challenge_expires(autojump_clock):
    async with relay(token_handler) as r:
        await r.client.get("/token")
        await r.client.get("/token")
        await trio.sleep(601)
        await r.client.get("/token")
    assert r.seen_paths() == [
        "GET hub.test/v2/",
        "GET auth.test/token",
        "GET auth.test/token",
        "GET hub.test/v2/",
        "GET auth.test/token",
    ]


# --- clients that go away


class Endless(httpx.AsyncByteStream):
    """An upstream body that sends one chunk and then stalls forever."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first chunk"
        await trio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True


async def test_client_disconnect_cancels_the_upstream_stream(caplog):
    caplog.set_level(logging.INFO, logger="vpsrelay.access")
    stream = Endless()
    async with relay(blob_handler(stream)) as r:
        with trio.fail_after(5):
            sent, raised = await call_asgi(
                r.app, "GET", f"/v2/alpine/blobs/{BLOB_DIGEST}", disconnect_after=1
            )
    assert raised is None
    assert sent[0]["status"] == 200
    assert all(message["more_body"] for message in bodies(sent))
    assert stream.closed
    (line,) = [rec.getMessage() for rec in caplog.records if rec.name == "vpsrelay.access"]
    assert line.endswith("disconnected=true")


async def test_client_disconnect_during_token_form_is_not_forwarded():
    async with relay(token_handler) as r:
        sent, raised = await call_asgi(
            r.app,
            "POST",
            "/token",
            messages=[
                {"type": "http.request", "body": b"scope=repository", "more_body": True},
                {"type": "http.disconnect"},
            ],
        )
    assert raised is None
    assert sent[0]["status"] == 502
    assert r.seen_paths() == []  # the form never went anywhere


async def test_concurrent_token_requests_discover_once():
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            await trio.sleep(0.05)  # let the other requests pile up on the lock
        return token_handler(request)

    async with relay(handler) as r:
        statuses: list[int] = []

        async def fetch() -> None:
            statuses.append((await r.client.get("/token")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(fetch)
    assert statuses == [200] * 5
    assert r.seen_paths().count("GET hub.test/v2/") == 1


# --- the operator's credentials stay in the relay (issue 12, finding 2)


@contextlib.asynccontextmanager
async def operator_relay(
    handler: Callable[[httpx.Request], httpx.Response], tmp_path: Any
) -> AsyncIterator[Relay]:
    """An open relay with the operator's credentials for Docker Hub (`someuser/*` denied)."""
    path = tmp_path / "relay.toml"
    path.write_text(
        '[registries."docker.io"]\nusername = "operator"\npassword = "s3cret"\n'
        'deny = ["someuser/*"]\n'
    )
    settings = config.load(path, {}, {"cache.enabled": False}, upstreams={"docker.io": HUB})
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    upstream = Upstream(settings, transport=httpx.MockTransport(record))
    app = RelayApp(settings, upstream)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://relay.test") as client:
            yield Relay(client, app, seen)
    finally:
        await upstream.aclose()


# --- issue 12: the upstream side


async def test_a_redirect_targets_challenge_does_not_move_the_realm():
    """A CDN's 401 names another realm: the relay neither learns it nor trusts it."""
    evil_challenge = 'Bearer realm="http://internal.test/token",service="registry.docker.io"'

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.test":
            return reply(401, {"www-authenticate": evil_challenge})
        if request.url.host == "hub.test" and "/blobs/" in request.url.path:
            return reply(307, {"location": f"{CDN}/blobs/x"})
        return token_handler(request)

    async with relay(handler) as r:
        await r.client.get("/token")
        poisoned = await r.client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
        await r.client.get("/token")
        link = r.app.upstream.links["docker.io"]
    assert poisoned.status_code == 401
    assert "internal.test" not in r.seen_paths()[-1]
    assert r.seen_paths()[-1] == "GET auth.test/token"
    assert link.targets.announced == ("auth.test", 80)
    assert not link.targets.is_trusted("internal.test", 80)


async def test_realms_are_trusted_per_registry_and_never_for_redirect_hops():
    settings = config.load(
        None, {}, {}, upstreams={"docker.io": HUB, "ghcr.io": "http://ghcr.test"}
    )
    upstream = Upstream(settings, transport=httpx.MockTransport(never))
    try:
        upstream.remember_challenge("docker.io", auth.parse_challenge(HUB_CHALLENGE))
        hub, ghcr = upstream.links["docker.io"], upstream.links["ghcr.io"]
        assert hub.targets.is_trusted("auth.test", 80)
        assert not ghcr.targets.is_trusted("auth.test", 80)
        # The redirect pool's targets are separate and know only the configured origins.
        assert hub.redirected is not hub.client
        assert upstream.client is not hub.client
        client, redirected = upstream._clients_for(AUTH_REALM, None)
        assert (client, redirected) == (hub.client, hub.redirected)
    finally:
        await upstream.aclose()


def operator_handler(request: httpx.Request) -> httpx.Response:
    if str(request.url).startswith(AUTH_REALM):
        body = json.dumps({"token": "operators-token", "refresh_token": "r"}).encode()
        return reply(200, {"content-type": "application/json"}, body)
    if request.url.path == "/v2/":
        return challenge_401()
    if request.headers.get("authorization") != "Bearer operators-token":
        return challenge_401()
    return manifest_handler(request)


async def test_anonymous_token_is_a_placeholder_the_relay_swaps_upstream(tmp_path):
    operator = httpx.BasicAuth("operator", "s3cret")._auth_header
    async with operator_relay(operator_handler, tmp_path) as r:
        token = await r.client.get(
            "/token",
            params=[("scope", "repository:alpine:push,pull,delete"),
                    ("scope", "repository:someuser/tool:pull"), ("offline_token", "true")],
        )  # fmt: skip
        assert token.status_code == 200
        assert "operators-token" not in token.text
        assert "refresh_token" not in token.json()
        placeholder = token.json()["token"]
        manifest = await r.client.get(
            "/v2/alpine/manifests/latest", headers={"authorization": f"Bearer {placeholder}"}
        )
        assert manifest.status_code == 200
    token_requests = [q for q in r.seen if str(q.url).startswith(AUTH_REALM)]
    # The relay asked once, for itself: pull on the served repository only.
    assert [parse_qsl(q.url.query.decode()) for q in token_requests] == [
        [("service", "registry.docker.io"), ("scope", "repository:library/alpine:pull")]
    ]
    assert all(q.headers["authorization"] == operator for q in token_requests)
    (upstream_manifest,) = [q for q in r.seen if "/manifests/" in q.url.path]
    assert upstream_manifest.headers["authorization"] == "Bearer operators-token"


async def test_a_clients_own_token_request_never_carries_the_operators_credentials(tmp_path):
    async with operator_relay(operator_handler, tmp_path) as r:
        own = await r.client.get(
            "/token",
            params=[("scope", "repository:alpine:push,pull"), ("offline_token", "true")],
            auth=("me", "mine"),
        )
        form = await r.client.post(
            "/token", data={"grant_type": "refresh_token", "refresh_token": "mine",
                            "scope": "repository:alpine:pull,push", "access_type": "offline"},
        )  # fmt: skip
    assert own.status_code == form.status_code == 200
    get, post = [q for q in r.seen if str(q.url).startswith(AUTH_REALM)]
    assert get.headers["authorization"] == httpx.BasicAuth("me", "mine")._auth_header
    assert parse_qsl(get.url.query.decode()) == [
        ("service", "registry.docker.io"), ("offline_token", "true"),
        ("scope", "repository:library/alpine:pull"),
    ]  # fmt: skip
    assert "authorization" not in post.headers
    assert dict(parse_qsl(post.content.decode()))["scope"] == "repository:library/alpine:pull"


@pytest.mark.parametrize("location", ["http://[::1]\\evil/", "http://xn--/blob"])
async def test_an_unparsable_location_is_a_502(location):
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(307, {"location": location})

    async with relay(handler) as r:
        response = await r.client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert response.status_code == 502
    assert registry_json(response)["errors"][0]["code"] == "UNAVAILABLE"


# The relay leaves httpx's body generators (aiter_raw and the stream's) suspended at a
# chunk when a send fails; trio finalizes them, with a ResourceWarning, once collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_client_that_takes_nothing_loses_the_stream_after_send_timeout(autojump_clock):
    """The send never returns (a shut HTTP/2 window): after `send_timeout` the request ends
    and the upstream body is closed."""
    stream = Chunks(BLOB[:4096], BLOB[4096:8192])
    async with relay(blob_handler(stream), {"limits.send_timeout": 30.0}) as r:
        sent: list[dict[str, Any]] = []

        async def stuck_send(message: Any) -> None:
            sent.append(dict(message))
            if message["type"] == "http.response.body":
                await trio.sleep_forever()

        async def receive() -> dict[str, Any]:
            await trio.sleep_forever()
            raise AssertionError

        scope = {
            "type": "http", "method": "GET", "path": f"/v2/alpine/blobs/{BLOB_DIGEST}",
            "query_string": b"", "headers": [(b"host", b"relay.test")],
            "client": ("127.0.0.1", 1234), "server": ("relay.test", 80),
        }  # fmt: skip
        began = trio.current_time()
        with trio.fail_after(60):
            await r.app(scope, receive, stuck_send)
        took = trio.current_time() - began
    assert 30 <= took < 31
    assert sent[0]["status"] == 200
    assert stream.closed


def test_upstream_streams_are_capped_per_client_ip():
    settings = config.load(None, {}, {"limits.upstream_streams_per_ip": 2})
    guard = Guard(settings)
    with guard.upstream_stream("192.0.2.1"), guard.upstream_stream("192.0.2.1"):
        with pytest.raises(errors.TooManyRequests) as refused, guard.upstream_stream("192.0.2.1"):
            pass
        with guard.upstream_stream("192.0.2.2"):  # another client is not affected
            pass
    assert refused.value.reason == "upstream_streams_limited"
    with guard.upstream_stream("192.0.2.1"):  # released again
        pass


def test_upstream_streams_cap_has_a_default_and_zero_disables_it():
    assert config.load(None, {}).limits.upstream_streams_per_ip == 32
    assert config.load(None, {}).limits.send_timeout == 60.0
    guard = Guard(config.load(None, {}, {"limits.upstream_streams_per_ip": 0}))
    assert guard.upstream_streams_per_ip == 0


# --- issue 13: transport errors become RelayErrors at the upstream boundary, body reads too


def stalled_token_handler(request: httpx.Request) -> httpx.Response:
    """The registry challenges; its token service sends a head, then times out mid-body."""
    if request.url.host == "hub.test" and request.url.path == "/v2/":
        return challenge_401()
    if str(request.url).startswith(AUTH_REALM):
        stalled = Chunks(b'{"token": "upstr', error=httpx.ReadTimeout("slow body"))
        return reply(200, {"content-type": "application/json", "content-length": "40"}, stalled)
    raise AssertionError(f"unexpected request {request.url}")


def assert_gateway_timeout(response: httpx.Response) -> None:
    assert response.status_code == 504
    (entry,) = registry_json(response)["errors"]
    assert entry["code"] == "UNAVAILABLE"
    assert "auth.test" not in entry["message"]  # no upstream addresses leak


async def test_a_token_service_timeout_mid_body_is_504_for_the_open_relays_token():
    async with relay(stalled_token_handler) as r:
        response = await r.client.get(
            "/token", params={"scope": "repository:alpine:pull"}, auth=("me", "secret")
        )
    assert_gateway_timeout(response)


async def test_a_token_service_timeout_mid_body_is_504_for_the_relays_own_token(tmp_path):
    """The open relay fetches its own token with the operator's credentials."""
    async with operator_relay(stalled_token_handler, tmp_path) as r:
        response = await r.client.get(
            "/v2/alpine/manifests/latest",
            headers={"authorization": "Bearer vpsrelay-relay-credentials"},
        )
    assert_gateway_timeout(response)


async def test_a_token_service_timeout_mid_body_is_504_in_auth_mode(tmp_path):
    overrides = {
        "auth.enabled": True,
        "auth.pull_tokens": ["ci-token-0123456789abcdef"],
        "data_dir": str(tmp_path / "data"),
    }
    async with relay(stalled_token_handler, overrides) as r:
        response = await r.client.get(
            "/v2/alpine/manifests/latest",
            headers={"authorization": "Bearer ci-token-0123456789abcdef"},
        )
    assert_gateway_timeout(response)


async def test_a_token_answer_larger_than_a_token_is_502():
    """A token service that streams without end is not buffered whole."""

    class Flood(httpx.AsyncByteStream):
        """Iterated by hand: an async generator stopped early would warn when collected."""

        def __aiter__(self) -> AsyncIterator[bytes]:
            return self

        async def __anext__(self) -> bytes:
            await trio.lowlevel.checkpoint()
            return b" " * 4096

    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url).startswith(AUTH_REALM):
            return reply(200, {"content-type": "application/json"}, Flood())
        return stalled_token_handler(request)

    async with relay(handler) as r:
        with trio.fail_after(5):  # without a bound, the relay streams for ever
            response = await r.client.get("/token", auth=("me", "secret"))
    assert response.status_code == 502
    assert registry_json(response)["errors"][0]["code"] == "UNAVAILABLE"


async def _read_with_aread(response: httpx.Response) -> None:
    await response.aread()


async def _read_with_aiter_raw(response: httpx.Response) -> None:
    async for _ in response.aiter_raw():
        pass


async def _read_with_read_body(response: httpx.Response) -> None:
    await read_body(response, what="docker.io", limit=1 << 20)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (httpx.ReadTimeout("slow"), 504),
        (httpx.ReadError("reset"), 502),
        (httpx.RemoteProtocolError("short body"), 502),
    ],
)
@pytest.mark.parametrize("read", [_read_with_aread, _read_with_aiter_raw, _read_with_read_body])
async def test_a_body_read_from_upstream_open_raises_only_relay_errors(error, status, read):
    """Whichever way a caller reads a response `Upstream.open` handed out."""

    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, {"content-type": "application/json"}, Chunks(b"{", error=error))

    settings = config.load(None, {}, {}, upstreams={"docker.io": HUB})
    upstream = Upstream(settings, transport=httpx.MockTransport(handler))
    request = UpstreamRequest("GET", f"{HUB}/v2/", (("user-agent", "test"),))
    try:
        with pytest.raises(errors.UpstreamError) as failed:
            async with upstream.open(request, what="docker.io") as response:
                await read(response)
        assert failed.value.status == status
        assert failed.value.code == "UNAVAILABLE"
    finally:
        await upstream.aclose()
