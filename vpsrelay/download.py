"""`GET /download/<image>`: an image as a tar `docker load` and `podman load` take.

The tar is built as it streams (`core.archive`), of manifests and blobs fetched with
subrequests through the relay's own ASGI app, made as the downloading client (its
address, Host and credentials): authentication, repository lists, per-client streams
and rate limits, budgets, the cache and its single-flight fill, digest checks and
redirect guards all apply exactly as they do to a pull, and nothing of them is
duplicated here. A 401 from a subrequest is answered the way a docker client answers
it: a token from the relay's own `/token`, with the client's credentials.

Manifests and configs are small and fetched (and checked) before the first byte, so a
missing image, an unknown platform or a tar over the size cap is a clean error; each
layer is then streamed in pieces of at most a few chunks, its digest checked on the
way, and a mismatch breaks the download off (the last chunk is held back until the
blob matched, as the relay does for blob pulls).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from vpsrelay.core import archive, headers as header_policy, imageref, routing
from vpsrelay.core.digest import Digest, Verifier, held_back
from vpsrelay.core.registries import DOCKER_HUB, Registry, RegistryTable
from vpsrelay.errors import (
    ClientError,
    DigestMismatch,
    NotFound,
    RelayError,
    RequestTooLarge,
    UpstreamProtocolError,
)
from vpsrelay.exchange import watch_disconnect
from vpsrelay.subrequest import Subrequests

if TYPE_CHECKING:
    from vpsrelay.config import Settings
    from vpsrelay.exchange import Exchange
    from vpsrelay.subrequest import RelayApp


MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # Distribution refuses larger manifests too
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Manifests and configs are held for the whole download: bounded in all, whatever the
# upstream says (real ones are a few KiB each).
MAX_HELD_BYTES = 16 * 1024 * 1024
# Held bytes (headers, JSON files, padding) are sent in pieces of about this much.
FLUSH_BYTES = 64 * 1024


class TooManyImages(ClientError):
    code = "SIZE_INVALID"


class Disabled(NotFound):
    pass


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


def registry_table(settings: Settings) -> RegistryTable:
    """The router's view of the registries (as the app builds it)."""
    base_domains = list(settings.server.base_domains)
    if settings.server.public_url:
        base_domains.append(urlsplit(settings.server.public_url).hostname or "")
    registries = (Registry(r.name, r.url, r.aliases, r.subdomain) for r in settings.registries)
    return RegistryTable(registries, [d for d in base_domains if d])


def repo_name(settings: Settings, name: str, host: str) -> str:
    """The name `docker load` tags with: `alpine`, `ghcr.io/owner/app` (the registry's
    own host, whatever alias or subdomain the client used).

    Raises:
        RelayError: a name the relay does not route (unknown registry, invalid).
    """
    route = routing.route(
        "GET", f"/v2/{name}/manifests/latest", table=registry_table(settings), host=host
    )
    if route.registry != DOCKER_HUB:
        return f"{route.registry}/{route.upstream_name}"
    official = route.upstream_name.removeprefix("library/")
    return official if "/" not in official else route.upstream_name


# -- the endpoint -------------------------------------------------------------------------------


async def serve(app: RelayApp, exchange: Exchange) -> None:
    """Answer a download: errors before the first byte in plain text for browsers
    (JSON for `Accept: application/json`), then the tar, whole or one range of it."""
    try:
        await _serve(app, exchange)
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
        headers = (("content-type", "text/plain; charset=utf-8"), *exc.headers)
        await exchange.respond_error(exc.status, headers, text)


async def _serve(app: RelayApp, exchange: Exchange) -> None:
    config = app.settings.download
    if not config.enabled:
        raise Disabled("downloads are disabled on this relay")
    request = parse_request(exchange.path, exchange.query, config.max_images)
    names = tuple(repo_name(app.settings, ref.name, exchange.view.host) for ref in request.refs)
    sub = Subrequests(app, exchange)
    images = []
    for ref, name in zip(request.refs, names, strict=True):
        images.append(await resolve(sub, ref, name, request))
        held = sum(len(i.manifest_bytes) + len(i.config_bytes) for i in images)
        if held > MAX_HELD_BYTES:
            raise UpstreamProtocolError(
                f"the images' manifests and configs are over {MAX_HELD_BYTES} bytes"
            )
    layout = archive.build_layout(tuple(images))
    if config.max_bytes and layout.size > config.max_bytes:
        raise RequestTooLarge(
            f"the tar would be {layout.size} bytes, over this relay's cap of {config.max_bytes}"
        )
    # Each blob is fetched from the first repository that has it.
    sources: dict[Digest, str] = {}
    for ref, image in zip(request.refs, images, strict=True):
        for layer in image.layers:
            sources.setdefault(layer.digest, ref.name)
    filename = archive.file_name(tuple(images), tuple(r.name for r in request.refs), layout.etag)
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
    await exchange.start(status, tuple(headers))
    if exchange.method == "HEAD":
        await exchange.body(b"", more=False)
        return
    failure: RelayError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_disconnect, exchange, nursery.cancel_scope)
        try:
            await _stream(sub, exchange, layout, sources, start, end)
        except RelayError as exc:  # re-raised outside, so it is not wrapped in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


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


async def resolve(
    sub: Subrequests, ref: imageref.ImageRef, name: str, request: Request
) -> archive.ArchiveImage:
    """One image's manifest (the platform's, from an index) and config, both checked.

    Raises:
        RelayError: missing, refused, malformed, or a digest that does not match.
    """
    body, content_type = await _read(sub, ref.name, f"/v2/{ref.name}/manifests/{ref.reference}")
    if ref.digest is not None:
        _check(ref.digest, body, "manifest")
    media_type = imageref.media_type_of(body, content_type)
    digest = Digest("sha256", _sha256(body))
    if media_type in imageref.INDEX_TYPES:
        chosen = imageref.select_platform(body, request.platform)
        path = f"/v2/{ref.name}/manifests/{chosen.digest}"
        body, content_type = await _read(sub, ref.name, path)
        _check(chosen.digest, body, "manifest")
        media_type = imageref.media_type_of(body, content_type)
        if media_type not in imageref.IMAGE_TYPES:
            raise imageref.ManifestUnsupported("an index inside an index is not downloadable")
        digest = chosen.digest
    manifest = imageref.parse_image_manifest(body)
    if manifest.config.size > MAX_CONFIG_BYTES:
        raise UpstreamProtocolError(f"config of {manifest.config.size} bytes: not an image's")
    config, _ = await _read(
        sub, ref.name, f"/v2/{ref.name}/blobs/{manifest.config.digest}", MAX_CONFIG_BYTES
    )
    _check(manifest.config.digest, config, "config")
    if len(config) != manifest.config.size:
        raise DigestMismatch("the config's size is not the manifest's")
    platform = imageref.config_platform(config)
    if request.platform_given and (platform.os, platform.architecture) != (
        request.platform.os, request.platform.architecture,
    ):  # fmt: skip
        raise imageref.PlatformUnknown(f"no image for {request.platform} (this one is {platform})")
    return archive.ArchiveImage(
        repo_tag=f"{name}:{ref.tag}" if ref.tag else None,
        manifest=imageref.Descriptor(media_type, digest, len(body)),
        manifest_bytes=body,
        config=manifest.config,
        config_bytes=config,
        layers=manifest.layers,
        platform=platform,
    )


async def _read(
    sub: Subrequests, repository: str, path: str, limit: int = MAX_MANIFEST_BYTES
) -> tuple[bytes, str | None]:
    accept = (("accept", imageref.MANIFEST_ACCEPT),) if "/manifests/" in path else ()
    async with sub.get(repository, path, accept) as answer:
        return await answer.read(limit), answer.header("content-type")


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
) -> None:
    held = bytearray()
    for piece in archive.pieces(layout, start, end):
        if isinstance(piece, bytes):
            held += piece
            if len(held) >= FLUSH_BYTES:
                await exchange.body(bytes(held), more=True)
                held.clear()
            continue
        if held:
            await exchange.body(bytes(held), more=True)
            held.clear()
        await _stream_blob(sub, exchange, piece, sources[piece.descriptor.digest])
    if held:
        await exchange.body(bytes(held), more=True)
    await exchange.body(b"", more=False)


async def _stream_blob(
    sub: Subrequests, exchange: Exchange, piece: archive.BlobPiece, repository: str
) -> None:
    """Send `piece` of a blob: exactly its bytes, or an error that ends the download.

    Raises:
        DigestMismatch: the whole blob does not match its digest (its last chunk kept back).
        UpstreamProtocolError: the blob is not the size the manifest said.
    """
    descriptor = piece.descriptor
    extra: header_policy.Headers = ()
    if not piece.whole:
        extra = (("range", f"bytes={piece.start}-{piece.start + piece.length - 1}"),)
    path = f"/v2/{repository}/blobs/{descriptor.digest}"
    async with sub.get(repository, path, extra) as answer:
        skip = piece.start if answer.status == 200 and not piece.whole else 0
        length = header_policy.get(answer.headers, "content-length")
        expected = piece.length + skip
        if answer.status == 206:
            expected = piece.length
        if length is not None and length.isdigit() and int(length) != expected:
            raise UpstreamProtocolError(
                f"blob {descriptor.digest} is {length} bytes, not the {expected} its manifest"
                " said: the download is broken off"
            )
        body = answer.chunks()
        if piece.whole:
            body = held_back(body, Verifier(descriptor.digest))
        remaining = piece.length
        async with contextlib.aclosing(body) as chunks:
            async for chunk in chunks:
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if len(chunk) > remaining:
                    raise UpstreamProtocolError(f"blob {descriptor.digest} is longer than said")
                remaining -= len(chunk)
                if chunk:
                    await exchange.body(chunk, more=True)
        if remaining:
            raise UpstreamProtocolError(f"blob {descriptor.digest} is shorter than said")
