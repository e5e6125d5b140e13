"""`GET /download/<image>`: an image as a tar `docker load` and `podman load` take.

The tar is built as it streams (`core.archive`), of manifests and blobs fetched with
subrequests through the relay's own ASGI app, made as the downloading client (its
address, Host; its credentials only to the relay's `/token` without access control):
authentication, repository lists, rate limits, the cache and its single-flight fill,
digest checks and redirect guards all apply as they do to a pull. The download itself
is metered as one blob download (`Guard.download`: one of the client's streams, the
bandwidth cap, the budget charged what it sends); its subrequests are not metered again.
Each download also counts against `download.downloads_per_client` for its whole life,
and its manifests and configs against the process-wide `download.held_bytes`.

Manifests and configs are small and fetched (and checked) before the first byte, so a
missing image, an unknown platform or a tar over the size cap is a clean error; so is a
refusal of the first layer, asked for before the head. Each layer is read whole (no
Range: an upstream's answer to one could not be checked), its digest checked on the
way, the bytes outside the range dropped, and the range's last bytes held back until
the blob matched: a mismatch breaks the download off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

import trio

from vpsrelay import config
from vpsrelay.core import archive, headers as header_policy, imageref, routing
from vpsrelay.core.access import too_many_at_once
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.core.registries import DOCKER_HUB
from vpsrelay.errors import (
    ClientError,
    DigestMismatch,
    NotFound,
    RelayError,
    RequestTooLarge,
    TooManyRequests,
    UpstreamProtocolError,
)
from vpsrelay.exchange import watch_disconnect
from vpsrelay.subrequest import Answer, Subrequests

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vpsrelay.access.shared import SharedLimits
    from vpsrelay.config import DownloadConfig, Settings
    from vpsrelay.exchange import Exchange
    from vpsrelay.subrequest import RelayApp


MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # Distribution refuses larger manifests too
MAX_CONFIG_BYTES = 1024 * 1024  # real configs are a few KiB; a few hundred with history
# Manifests and configs are held for the whole download: bounded in all, whatever the
# upstream says (real ones are a few KiB each).
MAX_HELD_BYTES = 16 * 1024 * 1024
# Held bytes (headers, JSON files, padding) are sent in pieces of at most this much.
FLUSH_BYTES = 64 * 1024


class TooManyImages(ClientError):
    code = "SIZE_INVALID"


class Disabled(NotFound):
    pass


class Limits:
    """What all downloads share: each client's count of downloads in flight (for each
    download's whole life, not only its blob subrequests), and the manifest and config
    bytes held by all of them."""

    def __init__(self, config: DownloadConfig, shared: SharedLimits | None = None) -> None:
        self.per_client = config.downloads_per_client
        self.running: dict[str, int] = {}  # this process's
        self.shared = shared  # the count in all of the relay's processes, when given
        self.held_cap = config.held_bytes
        self.held = 0

    @contextlib.contextmanager
    def running_for(self, client: str) -> Iterator[None]:
        """Raises:
        TooManyRequests: `client` runs `downloads_per_client` downloads already.
        """
        count = self.running.get(client, 0)
        if self.per_client and count >= self.per_client:
            raise too_many_at_once(self.per_client)
        shared = self.shared if self.per_client else None
        if shared is not None and not shared.acquire("downloads", client, self.per_client):
            raise too_many_at_once(self.per_client)
        self.running[client] = count + 1
        try:
            yield
        finally:
            if shared is not None:
                shared.release("downloads", client)
            if self.running[client] <= 1:
                del self.running[client]
            else:
                self.running[client] -= 1

    def hold(self, size: int) -> None:
        """Raises:
        TooManyRequests: all downloads hold `held_bytes` already.
        """
        if self.held_cap and self.held + size > self.held_cap:
            raise TooManyRequests(
                "the relay is busy with other downloads: try again later",
                reason="download_memory_limited",
                headers=(("retry-after", "5"),),
            )
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size


class Held:
    """One download's share of `Limits.held`: reserved before a read, trued up after,
    all given back when the download ends."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.size = 0

    def reserve(self, size: int) -> None:
        self.limits.hold(size)
        self.size += size

    def give_back(self, size: int) -> None:
        size = min(size, self.size)
        self.limits.release(size)
        self.size -= size


# -- what the request asks for ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    refs: tuple[imageref.ImageRef, ...]
    platform: imageref.Platform
    platform_given: bool


def parse_request(path: str, query: str, max_images: int) -> Request:
    """`/download/<image>` and `/download?image=a&image=b`, with `platform=`.

    Raises:
        ClientError: no image, too many, or a malformed reference or platform.
    """
    params = parse_qsl(query, keep_blank_values=True)
    texts = [v for k, v in params if k == "image" and v.strip()]
    within = unquote(path.removeprefix("/download").lstrip("/"))
    if within:
        texts.insert(0, within)
    if not texts:
        raise ClientError("name an image: /download/<image>[:tag] or ?image=<image>")
    if len(texts) > max_images:
        raise TooManyImages(f"at most {max_images} images per download")
    platforms = [v for k, v in params if k == "platform" and v.strip()]
    platform = imageref.parse_platform(platforms[0]) if platforms else imageref.DEFAULT_PLATFORM
    refs = tuple(imageref.parse_image_ref(text) for text in texts)
    return Request(refs, platform, bool(platforms))


def repo_name(settings: Settings, name: str, host: str) -> str:
    """The name `docker load` tags with: `alpine`, `ghcr.io/owner/app` (the registry's
    own host, whatever alias or subdomain the client used).

    Raises:
        RelayError: a name the relay does not route (unknown registry, invalid).
    """
    route = routing.route(
        "GET", f"/v2/{name}/manifests/latest", table=config.registry_table(settings), host=host
    )
    if route.registry != DOCKER_HUB:
        return f"{route.registry}/{route.upstream_name}"
    official = route.upstream_name.removeprefix("library/")
    return official if "/" not in official else route.upstream_name


# -- the endpoint -------------------------------------------------------------------------------


# Plain-text errors name what the client asked for: never to be taken for a page.
_ERROR_HEADERS = (
    ("content-type", "text/plain; charset=utf-8"),
    ("x-content-type-options", "nosniff"),
    ("content-security-policy", "default-src 'none'"),
)


async def serve(app: RelayApp, exchange: Exchange, limits: Limits) -> None:
    """Answer a download: errors before the first byte in plain text for browsers
    (JSON for `Accept: application/json`), then the tar, whole or one range of it."""
    try:
        with limits.running_for(app.guard.limit_key(exchange.view.client_ip)):
            await _serve(app, exchange, limits)
    except RelayError as exc:
        accept = header_policy.get(exchange.headers, "accept") or ""
        if exchange.status or "application/json" in accept:
            raise
        if exc.status < 500:
            app.guard.record(
                exc, client_ip=exchange.view.client_ip, method=exchange.method,
                path=exchange.raw_path,
            )  # fmt: skip
        text = f"{exc.status} {exc.message}\n".encode()
        await exchange.respond_error(exc.status, (*_ERROR_HEADERS, *exc.headers), text)


async def _serve(app: RelayApp, exchange: Exchange, limits: Limits) -> None:
    config = app.settings.download
    if not config.enabled:
        raise Disabled("downloads are disabled on this relay")
    request = parse_request(exchange.path, exchange.query, config.max_images)
    names = tuple(repo_name(app.settings, ref.name, exchange.view.host) for ref in request.refs)
    sub = Subrequests(app, exchange)
    held = Held(limits)
    try:
        resolver = Resolver(sub, request, held)
        images = tuple(
            [
                await resolver.resolve(ref, name)
                for ref, name in zip(request.refs, names, strict=True)
            ]
        )
        await _answer(app, sub, exchange, request, images)
    finally:
        held.give_back(held.size)


async def _answer(
    app: RelayApp,
    sub: Subrequests,
    exchange: Exchange,
    request: Request,
    images: tuple[archive.ArchiveImage, ...],
) -> None:
    config = app.settings.download
    layout = archive.build_layout(images)
    if config.max_bytes and layout.size > config.max_bytes:
        raise RequestTooLarge(
            f"the tar would be {layout.size} bytes, over this relay's cap of {config.max_bytes}"
        )
    # Each blob is fetched from the first repository that has it.
    sources: dict[Digest, str] = {}
    for ref, image in zip(request.refs, images, strict=True):
        for layer in image.layers:
            sources.setdefault(layer.digest, ref.name)
    filename = archive.file_name(images, tuple(r.name for r in request.refs), layout.etag)
    headers: list[tuple[str, str]] = [
        ("content-type", "application/x-tar"),
        ("etag", layout.etag),
        ("accept-ranges", "bytes"),
        ("content-disposition", archive.content_disposition(filename)),
        ("cache-control", "private, no-transform"),
        ("x-content-type-options", "nosniff"),
    ]
    wanted = _wanted_range(exchange, layout)
    if wanted is None:
        status, start, end = 200, 0, layout.size
    else:
        status, start, end = 206, wanted.start, wanted.end
        headers.append(("content-range", wanted.content_range(layout.size)))
    headers.append(("content-length", str(end - start)))
    if exchange.method == "HEAD":
        await exchange.start(status, tuple(headers))
        await exchange.body(b"", more=False)
        return
    # The download is metered as one blob download is: one of the client's streams for
    # its whole life, its bandwidth cap, and the budget charged what it sends (its blob
    # subrequests are not metered again). The whole answer must fit in what is left.
    sent = lambda: exchange.bytes_sent  # noqa: E731
    async with app.guard.download(exchange.view.client_ip, exchange.user, sent) as meter:
        if meter is not None:
            meter.admit(end - start)
        exchange.meter = meter
        await _send(sub, exchange, layout, sources, (status, start, end), tuple(headers))


async def _send(
    sub: Subrequests,
    exchange: Exchange,
    layout: archive.Layout,
    sources: dict[Digest, str],
    answer: tuple[int, int, int],
    headers: header_policy.Headers,
) -> None:
    status, start, end = answer
    failure: RelayError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_disconnect, exchange, nursery.cancel_scope)
        try:
            async with contextlib.AsyncExitStack() as first_blob:
                # The first blob is asked for before the head goes out: its refusal (a
                # stream or rate limit, the budget, a 403 or 404) is a clean error, not a
                # broken tar.
                opened = await _open_first_blob(sub, layout, sources, start, end, first_blob)
                await exchange.start(status, headers)
                await _stream(sub, exchange, layout, sources, start, end, opened, first_blob)
        except RelayError as exc:  # re-raised outside, so it is not wrapped in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _open_first_blob(
    sub: Subrequests,
    layout: archive.Layout,
    sources: dict[Digest, str],
    start: int,
    end: int,
    stack: contextlib.AsyncExitStack,
) -> tuple[archive.BlobPiece, Answer] | None:
    """The subrequest of the range's first blob piece, open on `stack`; None: no blob."""
    for piece in archive.pieces(layout, start, end):
        if not isinstance(piece, bytes):
            repository = sources[piece.descriptor.digest]
            path = f"/v2/{repository}/blobs/{piece.descriptor.digest}"
            answer = await stack.enter_async_context(sub.get(repository, path))
            _check_answer(piece.descriptor, answer)
            return piece, answer
    return None


def _wanted_range(exchange: Exchange, layout: archive.Layout) -> archive.ByteRange | None:
    """The range to send; None for the whole (no Range, or an If-Range for another tar).

    Raises:
        RangeNotSatisfiable: several ranges, or one past the end.
    """
    value = header_policy.get(exchange.headers, "range")
    if_range = header_policy.get(exchange.headers, "if-range")
    if value is None or (if_range is not None and if_range.strip() != layout.etag):
        return None  # If-Range: a strong ETag comparison; a date never matches ours
    try:
        return archive.parse_range(value, layout.size)
    except archive.RangeNotSatisfiable as exc:
        raise archive.RangeNotSatisfiable(
            exc.message, headers=(("content-range", f"bytes */{layout.size}"),)
        ) from None


class Resolver:
    """Resolves a download's images: each (name, reference) once, each manifest and
    config held once per digest (JSON bounded before parsing: `imageref`)."""

    def __init__(self, sub: Subrequests, request: Request, held: Held) -> None:
        self.sub, self.request, self.held = sub, request, held
        self.images: dict[tuple[str, str], archive.ArchiveImage] = {}
        self.blobs: dict[Digest, bytes] = {}  # manifests and configs by digest
        self.types: dict[Digest, str | None] = {}  # their Content-Types

    async def resolve(self, ref: imageref.ImageRef, name: str) -> archive.ArchiveImage:
        """Raises:
        RelayError: missing, refused, malformed, or a digest that does not match.
        """
        key = (ref.name, ref.reference)
        found = self.images.get(key)
        repo_tag = f"{name}:{ref.tag}" if ref.tag else None
        if found is None:
            found = self.images[key] = await self._resolve(ref)
        return dataclasses.replace(found, repo_tag=repo_tag)

    async def _read(
        self, repository: str, path: str, limit: int, digest: Digest | None
    ) -> tuple[bytes, str | None]:
        """The body (at most `limit` bytes), held: reserved before it is read, by its
        Content-Length when it says one (real manifests are a few KiB), else `limit`."""
        if digest is not None and digest in self.blobs:
            return self.blobs[digest], self.types.get(digest)
        accept = (("accept", imageref.MANIFEST_ACCEPT),) if "/manifests/" in path else ()
        async with self.sub.get(repository, path, accept) as answer:
            length = answer.header("content-length")
            if length is not None and length.isdigit() and len(length) < 19:
                limit = min(limit, int(length))
            self.held.reserve(limit)
            try:
                body = await answer.read(limit)
            finally:
                self.held.give_back(limit)
            content_type = answer.header("content-type")
        self.held.reserve(len(body))
        if digest is not None:
            self.types[digest] = content_type
        return body, content_type

    def _keep(self, digest: Digest, body: bytes) -> bytes:
        """One copy per digest: a repeated manifest or config is not held twice."""
        kept = self.blobs.setdefault(digest, body)
        if kept is not body:
            self.held.give_back(len(body))
        return kept

    async def _resolve(self, ref: imageref.ImageRef) -> archive.ArchiveImage:
        request = self.request
        body, content_type = await self._read(
            ref.name, f"/v2/{ref.name}/manifests/{ref.reference}", MAX_MANIFEST_BYTES, ref.digest
        )
        if ref.digest is not None:
            _check(ref.digest, body, "manifest")
        document = imageref.load_document(body, "manifest")
        media_type = imageref.media_type_of(document, content_type)
        digest = Digest("sha256", _sha256(body))
        if media_type in imageref.INDEX_TYPES:
            chosen = imageref.select_platform(document, request.platform)
            self.held.give_back(len(body))  # the index is not kept
            del document
            path = f"/v2/{ref.name}/manifests/{chosen.digest}"
            body, content_type = await self._read(ref.name, path, MAX_MANIFEST_BYTES, chosen.digest)
            _check(chosen.digest, body, "manifest")
            document = imageref.load_document(body, "manifest")
            media_type = imageref.media_type_of(document, content_type)
            if media_type not in imageref.IMAGE_TYPES:
                raise imageref.ManifestUnsupported("an index inside an index is not downloadable")
            digest = chosen.digest
        body = self._keep(digest, body)
        manifest = imageref.parse_image_manifest(document)
        if manifest.config.size > MAX_CONFIG_BYTES:
            raise UpstreamProtocolError(f"config of {manifest.config.size} bytes: not an image's")
        config, _ = await self._read(
            ref.name, f"/v2/{ref.name}/blobs/{manifest.config.digest}", MAX_CONFIG_BYTES,
            manifest.config.digest,
        )  # fmt: skip
        _check(manifest.config.digest, config, "config")
        if len(config) != manifest.config.size:
            raise DigestMismatch("the config's size is not the manifest's")
        config = self._keep(manifest.config.digest, config)
        platform = imageref.config_platform(imageref.load_document(config, "config"))
        if request.platform_given and not imageref.same_platform(request.platform, platform):
            raise imageref.PlatformUnknown(
                f"no image for {request.platform} (this one is {platform})"
            )
        if self.held.size > MAX_HELD_BYTES:
            raise UpstreamProtocolError(
                f"the images' manifests and configs are over {MAX_HELD_BYTES} bytes"
            )
        return archive.ArchiveImage(
            repo_tag=None,
            manifest=imageref.Descriptor(media_type, digest, len(body)),
            manifest_bytes=body,
            config=manifest.config,
            config_bytes=config,
            layers=manifest.layers,
            platform=platform,
        )


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _check(expected: Digest, body: bytes, what: str) -> None:
    """Raises:
    DigestMismatch: `body` does not hash to `expected`.
    """
    verifier = Verifier(expected)
    verifier.update(body)
    try:
        verifier.finish()
    except DigestMismatch as exc:
        raise DigestMismatch(f"{what}: {exc.message}") from None


async def _stream(
    sub: Subrequests,
    exchange: Exchange,
    layout: archive.Layout,
    sources: dict[Digest, str],
    start: int,
    end: int,
    opened: tuple[archive.BlobPiece, Answer] | None = None,
    first_blob: contextlib.AsyncExitStack | None = None,
) -> None:
    """Send bytes `start` to `end` of the tar; `opened` is the first blob piece's answer,
    open on `first_blob` (closed once sent: it holds one of the client's streams)."""
    held = bytearray()
    for piece in archive.pieces(layout, start, end):
        if isinstance(piece, bytes):
            held += piece
            while len(held) >= FLUSH_BYTES:  # never one message of a whole config
                await exchange.body(bytes(held[:FLUSH_BYTES]), more=True)
                del held[:FLUSH_BYTES]
            continue
        if held:
            await exchange.body(bytes(held), more=True)
            held.clear()
        if opened is not None:
            await _stream_blob(sub, exchange, piece, sources[piece.descriptor.digest], opened[1])
            opened = None
            if first_blob is not None:
                await first_blob.aclose()
            continue
        await _stream_blob(sub, exchange, piece, sources[piece.descriptor.digest])
    if held:
        await exchange.body(bytes(held), more=True)
    await exchange.body(b"", more=False)


def _check_answer(descriptor: imageref.Descriptor, answer: Answer) -> None:
    """Raises:
    UpstreamProtocolError: not the whole blob, or not of the size its manifest said.
    """
    length = answer.header("content-length")
    if answer.status != 200 or (
        length is not None and length.isdigit() and int(length) != descriptor.size
    ):
        raise UpstreamProtocolError(
            f"blob {descriptor.digest} is {length} bytes, not the {descriptor.size} its"
            " manifest said: the download is broken off"
        )


async def _stream_blob(
    sub: Subrequests,
    exchange: Exchange,
    piece: archive.BlobPiece,
    repository: str,
    answer: Answer | None = None,
) -> None:
    """Send `piece` of a blob: exactly its bytes, or an error that ends the download.

    The whole blob is always read (no Range: the cache fills and checks it, and an
    upstream's answer to a Range could not be checked), the bytes outside the piece are
    dropped, and the piece's last bytes go out only once the whole blob matched.

    Raises:
        DigestMismatch: the blob does not match its digest (the piece's end kept back).
        UpstreamProtocolError: the blob is not the size the manifest said.
    """
    descriptor = piece.descriptor
    path = f"/v2/{repository}/blobs/{descriptor.digest}"
    async with contextlib.AsyncExitStack() as stack:
        if answer is None:
            answer = await stack.enter_async_context(sub.get(repository, path))
        _check_answer(descriptor, answer)
        verifier = Verifier(descriptor.digest)
        begin, stop = piece.start, piece.start + piece.length
        position = 0
        pending = b""
        async with contextlib.aclosing(answer.chunks()) as chunks:
            async for chunk in chunks:
                verifier.update(chunk)
                at, position = position, position + len(chunk)
                if position > descriptor.size:
                    raise UpstreamProtocolError(f"blob {descriptor.digest} is longer than said")
                part = chunk[max(0, begin - at) : max(0, stop - at)]
                if part:
                    if pending:
                        await exchange.body(pending, more=True)
                    pending = part
        if position != descriptor.size:
            raise UpstreamProtocolError(f"blob {descriptor.digest} is shorter than said")
        verifier.finish()
        if pending:
            await exchange.body(pending, more=True)
