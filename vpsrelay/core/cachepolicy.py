"""Cache decisions, without IO: sizes, byte ranges, eviction, tag freshness, authorization.

The blob store (`vpsrelay.cache`) asks these functions what to do and does it.
Every function takes the time as an argument (`now`, monotonic or wall seconds,
the caller's choice), so the decisions are tested without a clock.

Authorization, the rule this module enforces (README "Cache"): a cached object is
served for `registry/repository` only to a credential (the exact `Authorization`
header value, or none) that the upstream accepted for that repository within
`auth_ttl` seconds, and a cached blob only for a repository the upstream has shown
to hold that blob (it served the blob, or a manifest listing it, for that
repository). Digests are global; authorization is per repository.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KiB,
    "m": 1000**2, "mb": 1000**2, "mib": MiB,
    "g": 1000**3, "gb": 1000**3, "gib": GiB,
    "t": 1000**4, "tb": 1000**4, "tib": TiB,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
# At most 19 digits: longer numbers are no real offset, and int() of thousands of
# digits raises (and costs time).
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def parse_size(value: object) -> int:
    """`50GiB`, `500 MB`, `1024` (bytes) or an int to a byte count.

    Raises:
        ValueError: not a size (the config layer turns it into a `ConfigError`).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '50GiB', got {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and (found := _SIZE.fullmatch(value)):
        unit = found[2].lower()
        if unit in _UNITS:
            return int(float(found[1]) * _UNITS[unit])
    raise ValueError(f"expected a size such as '50GiB', got {value!r}")


def format_size(size: int) -> str:
    """A byte count for humans: `1.5 GiB`."""
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


# --- byte ranges (RFC 9110 §14.1.2), for cache hits


@dataclass(frozen=True, slots=True)
class ByteRange:
    """`first`..`last` inclusive, of a representation of `size` bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.size}"


class Unsatisfiable(Exception):
    """The range lies outside the representation: answer 416."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a `Range` header asks for, or None to send everything.

    RFC 9110 §14.2 lets a server ignore a Range it does not support, so a
    multi-range or malformed header gets the whole body (200), as the CDN does.

    Raises:
        Unsatisfiable: a well-formed range that selects nothing.
    """
    if header is None or not (found := _RANGE.fullmatch(header.strip())):
        return None
    first, last = found[1], found[2]
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise Unsatisfiable(header)
        return ByteRange(max(0, size - count), size - 1, size)
    start = int(first)
    if start >= size:
        raise Unsatisfiable(header)
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return None
    return ByteRange(start, end, size)


# --- eviction


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored object as eviction sees it."""

    key: str
    size: int
    last_used: float
    busy: bool  # being read or filled: never evicted


def plan_eviction(
    entries: list[Entry],
    *,
    used: int,
    max_size: int,
    free: int,
    min_free: int,
    incoming: int,
) -> tuple[list[str], bool]:
    """What to delete, least recently used first, to make room for `incoming` bytes.

    Args:
        entries: everything stored.
        used: bytes the cache holds now (committed plus reserved for fills).
        max_size: the cap on the cache's bytes.
        free: bytes free on the file system now.
        min_free: bytes that must stay free on the file system.
        incoming: bytes about to be written.

    Returns:
        The keys to delete, and whether the incoming bytes fit once they are gone
        (False: do not cache, pass through).
    """
    over_cap = used + incoming - max_size
    under_floor = min_free - (free - incoming)
    need = max(over_cap, under_floor, 0)
    if incoming > max_size:
        return [], False
    victims: list[str] = []
    for entry in sorted(entries, key=lambda e: e.last_used):
        if need <= 0:
            break
        if entry.busy:
            continue
        victims.append(entry.key)
        need -= entry.size
    return victims, need <= 0


# --- tag freshness


class TagAction(enum.Enum):
    SERVE = "serve"  # fresh: answer from the cache, no upstream request
    REVALIDATE = "revalidate"  # stale: HEAD upstream, reuse the body if the digest is unchanged


def tag_action(*, checked_at: float, now: float, ttl: float) -> TagAction:
    """Whether a cached tag -> digest mapping may be used without asking the upstream."""
    return TagAction.SERVE if 0 <= now - checked_at < ttl else TagAction.REVALIDATE


def may_serve_stale(*, checked_at: float, now: float, max_stale: float) -> bool:
    """Whether a mapping is young enough to be served while the upstream is failing."""
    return now - checked_at <= max_stale


def upstream_is_failing(status: int) -> bool:
    """Statuses after which a stale cached answer beats passing the error on."""
    return status == 429 or status >= 500


# --- authorization


def credential_key(authorization: str | None) -> str:
    """A short fingerprint of a request's credential (never stored in clear)."""
    return hashlib.sha256((authorization or "").encode("utf-8", "replace")).hexdigest()[:32]


class Grants:
    """Which credentials the upstream accepted for which repository, and when.

    Bounded: the oldest grants are forgotten first (they would expire anyway).
    """

    def __init__(self, *, ttl: float, limit: int = 100_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._granted: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def grant(self, credential: str, registry: str, repository: str, now: float) -> None:
        key = (credential, registry, repository)
        self._granted[key] = now
        self._granted.move_to_end(key)
        while len(self._granted) > self.limit:
            self._granted.popitem(last=False)

    def allowed(self, credential: str, registry: str, repository: str, now: float) -> bool:
        at = self._granted.get((credential, registry, repository))
        return at is not None and 0 <= now - at < self.ttl

    def __len__(self) -> int:
        return len(self._granted)


class Access(enum.Enum):
    SERVE = "serve"  # serve from the cache
    CHECK = "check"  # ask the upstream (HEAD with the client's credential) first


def blob_access(*, granted: bool, holds_blob: bool) -> Access:
    """May a cached blob be served for a repository to this credential?

    Args:
        granted: the upstream accepted this credential for the repository recently.
        holds_blob: the upstream has shown that the repository holds the blob.
    """
    return Access.SERVE if granted and holds_blob else Access.CHECK


def offline_access(*, granted: bool, public: bool, holds_object: bool) -> bool:
    """With the upstream failing: serve a cached object only if it is known to be
    readable by this credential (a live grant) or by anyone (a public repository)."""
    return holds_object and (granted or public)


# --- content negotiation (RFC 9110 §12.5.1): which manifest types a client's Accept admits

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One element of an `Accept`: `type/subtype`, `type/*` or `*/*` (lower case)."""

    type: str
    subtype: str
    parameters: tuple[tuple[str, str], ...]  # the media type's own, before the weight
    quality: float  # 0 (not acceptable) to 1

    def rank(self, type_: str, subtype: str) -> int:
        """How specifically this range names `type_/subtype`: 2 exactly, 1 as `type/*`,
        0 as `*/*`, -1 not at all."""
        if self.type == "*":
            return 0
        if self.type != type_:
            return -1
        if self.subtype == "*":
            return 1
        return 2 if self.subtype == subtype else -1


@dataclass(frozen=True, slots=True)
class Accept:
    """A parsed `Accept` (its header lines joined with commas)."""

    ranges: tuple[MediaRange, ...]
    malformed: bool  # some element was not a media range with a valid weight

    def quality(self, media_type: str) -> float:
        """How acceptable a (parameterless) media type is: 0 means not at all.

        The most specific range that names the type decides (RFC 9110 §12.5.1); among
        equally specific ones (`T, T;q=0`, or `T;v=1;q=0`: parameters are not told
        apart, as registries drop them) the lowest weight, so a refusal is never outvoted.
        """
        type_, _, subtype = media_type.split(";")[0].strip().lower().partition("/")
        best_rank, quality = -1, 0.0
        for media_range in self.ranges:
            rank = media_range.rank(type_, subtype)
            if rank > best_rank:
                best_rank, quality = rank, media_range.quality
            elif rank == best_rank >= 0:
                quality = min(quality, media_range.quality)
        return quality

    def names(self, media_type: str) -> bool:
        """Whether an element names exactly this type, with no parameters, acceptably."""
        type_, _, subtype = media_type.lower().partition("/")
        return any(
            r.rank(type_, subtype) == 2 and not r.parameters and r.quality > 0 for r in self.ranges
        )


def _split_unquoted(text: str, separator: str) -> list[str]:
    """`text` split at each `separator` outside a quoted string (`;v="a,b"` is one piece)."""
    pieces: list[str] = []
    start, quoted, escaped = 0, False, False
    for at, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            pieces.append(text[start:at])
            start = at + 1
    pieces.append(text[start:])
    return pieces


def _media_range(element: str) -> MediaRange | None:
    """One `Accept` element, or None if it is not a media range with a valid weight."""
    first, *rest = _split_unquoted(element, ";")
    type_, _, subtype = first.strip().partition("/")
    if not (_TOKEN.fullmatch(type_) and _TOKEN.fullmatch(subtype)) or (
        type_ == "*" and subtype != "*"
    ):
        return None
    parameters: list[tuple[str, str]] = []
    for piece in rest:
        name, _, value = piece.strip().partition("=")
        name, value = name.strip().lower(), value.strip()
        if name == "q":
            if not _QVALUE.fullmatch(value):
                return None
            # What follows the weight are extension parameters, not the media type's.
            return MediaRange(type_.lower(), subtype.lower(), tuple(parameters), float(value))
        parameters.append((name, value))
    return MediaRange(type_.lower(), subtype.lower(), tuple(parameters), 1.0)


def parse_accept(header: str) -> Accept:
    """The media ranges of an `Accept` value; an element that is not one (a bad weight
    included) names nothing and marks the whole as malformed."""
    ranges: list[MediaRange] = []
    malformed = False
    for element in _split_unquoted(header, ","):
        if not element.strip():
            continue  # an empty list element is allowed (RFC 9110 §5.6.1)
        media_range = _media_range(element)
        if media_range is None:
            malformed = True
        else:
            ranges.append(media_range)
    return Accept(tuple(ranges), malformed)


def accepts(accept_header: str | None, media_type: str) -> bool:
    """Whether a client's `Accept` admits a cached manifest's media type.

    No `Accept` admits everything; otherwise the type must be acceptable (weight above 0,
    wildcards included), else the upstream negotiates.
    """
    if accept_header is None:
        return True
    accept = parse_accept(accept_header)
    if not accept.ranges and not accept.malformed:
        return True  # blank
    return accept.quality(media_type) > 0


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# What a registry converts from when the client does not name it: a list or index to one
# platform's manifest, a schema 2 manifest to schema 1 (`*/*` does not count: Distribution
# answers it with schema 1). Only a request naming all of them sees a tag's own manifest.
UNCONVERTED = frozenset({OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST})


def records_tag(accept_header: str | None, media_type: str) -> bool:
    """Whether an upstream's answer for a tag may be remembered as the tag's manifest.

    Only if the request named every type a registry converts from, each exactly and
    as acceptable as anything the client accepts (an upstream that honours weights
    converts for `index;q=0` and may for `index;q=0.1, manifest`), so that the answer
    is not a conversion chosen for this client, and the answer is of a type it
    accepted. Any other answer is for that client alone: remembered, one client with
    a narrow `Accept` would choose what every later client gets for the tag. A
    malformed `Accept` is read differently by different upstreams: never remembered.
    """
    if not accept_header:
        return False
    accept = parse_accept(accept_header)
    if accept.malformed or not accept.ranges:
        return False
    top = max(r.quality for r in accept.ranges)
    return (
        top > 0
        and all(accept.names(t) and accept.quality(t) == top for t in UNCONVERTED)
        and accept.quality(media_type) > 0
    )


MAX_MANIFEST_BYTES = 4 * MiB  # Distribution refuses larger manifests too


def manifest_children(body: bytes) -> list[str]:
    """The digests a manifest or index refers to (config, layers, sub-manifests).

    A registry only accepts a manifest whose references exist in the same
    repository, so the upstream serving it for a repository shows that the
    repository holds them. Anything unparsable refers to nothing.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    refs: list[object] = [document.get("config")]
    for key in ("layers", "manifests", "blobs"):
        items = document.get(key)
        if isinstance(items, list):
            refs.extend(items)
    return [
        ref["digest"]
        for ref in refs
        if isinstance(ref, dict) and isinstance(ref.get("digest"), str)
    ]
