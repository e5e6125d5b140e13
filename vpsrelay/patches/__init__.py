"""Every reach into a library's internals, its version gate, and what happens when a gate
does not open.

| reach                                   | where                  | kind        |
|-----------------------------------------|------------------------|-------------|
| HTTP/2 buffer bound, stream reset,      | patches/hypercorn.py   | safety      |
| write coalescing, connection caps       |                        |             |
| redirect-target guard (`_pool` swap)    | upstream/netguard.py   | safety      |
| proxy and address family (`_pool` swap) | upstream/routes.py     | safety      |
| upstream read size                      | patches/httpcore.py    | performance |
| metrics files allocated before mapped   | patches/prometheus.py  | safety      |
| (workers > 1)                           |                        |             |
| ClientHello hook (`_msg_callback`)      | tls/contexts.py        | function    |

A safety reach that cannot apply (another hypercorn, h2, httpx or, with workers,
prometheus-client than the pinned one) stops the relay before it listens, with one line
naming the library and its version; with `server.allow_unpatched` (`serve
--allow-unpatched`) it runs degraded instead, and says so
in its log, in `/readyz` and in `vpsrelay check`. A performance reach degrades with a
warning. The ClientHello hook is needed only for TLS-ALPN-01 challenges: it is required
when `tls.challenge` is "tls-alpn-01", a warning otherwise. The pins themselves are in
pyproject.toml and constraints.txt; the tests next to each patch module pin the source of
every function they touch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Literal

from vpsrelay.patches import (
    httpcore as httpcore_patches,
    hypercorn as hypercorn_patches,
    prometheus as prometheus_patches,
)
from vpsrelay.upstream import netguard

if TYPE_CHECKING:
    from collections.abc import Callable

    from vpsrelay.config import Settings

log = logging.getLogger("vpsrelay")

Kind = Literal["safety", "performance", "function"]
HYPERCORN = "hypercorn"
NETGUARD = "netguard"
HTTPCORE = "httpcore"
PROMETHEUS = "prometheus"
CLIENT_HELLO = "client_hello"


@dataclass(frozen=True, slots=True)
class Degraded:
    """A reach that did not apply: the relay runs without it."""

    reach: str  # one of the names above
    kind: Kind
    detail: str  # one line: which library, which version, what is lost


@dataclass(frozen=True, slots=True)
class _Reach:
    name: str
    kind: Kind
    what: str  # what the reach provides, for the message
    lost: str  # what the relay goes without when it cannot apply
    problem: Callable[[], str | None]  # why the gate stays shut, or None
    apply: Callable[[], object]
    required: bool = True  # a "function" reach the configuration depends on


def installed_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def version_problem(pinned: dict[str, str]) -> str | None:
    """What is wrong, e.g. "hypercorn 0.19.0 is installed, vpsrelay needs hypercorn==0.18.0";
    None if every library is at its pinned version."""
    installed = {name: installed_version(name) for name in pinned}
    wrong = {name: have for name, have in installed.items() if have != pinned[name]}
    if not wrong:
        return None
    found = " and ".join(f"{name} {have}" for name, have in wrong.items())
    needed = ", ".join(f"{name}=={pinned[name]}" for name in wrong)
    verb = "is" if len(wrong) == 1 else "are"
    return f"{found} {verb} installed, vpsrelay needs {needed}"


def _client_hello_problem() -> str | None:
    from vpsrelay.tls import contexts as tls  # late: plain mode needs no TLS stack

    if tls.client_hello_hook_available():
        return None
    return "this Python's ssl.SSLContext has no _msg_callback hook"


def _reaches(settings: Settings) -> list[_Reach]:
    reaches = [
        _Reach(
            HYPERCORN, "safety",
            "the HTTP/2 buffer bound, stream reset and connection caps",
            "HTTP/2 buffering is unbounded, stopped blobs are not reset, connections uncapped",
            lambda: version_problem(hypercorn_patches.PINNED),
            hypercorn_patches.apply,
        ),
        _Reach(
            NETGUARD, "safety",
            "the redirect-target guard",
            "redirects to private addresses may not be refused",
            lambda: version_problem(netguard.PINNED),
            lambda: None,  # netguard.GuardedTransport applies it per client
        ),
        _Reach(
            HTTPCORE, "performance",
            "the 512 KiB upstream reads",
            "upstream reads stay 64 KiB (more CPU per byte)",
            lambda: version_problem(httpcore_patches.PINNED),
            httpcore_patches.apply,
        ),
    ]  # fmt: skip
    if settings.server.workers > 1:  # the single process keeps its metrics in memory
        reaches.append(
            _Reach(
                PROMETHEUS, "safety",
                "the metrics files allocated before they are mapped",
                "a full data-dir disk can kill a worker (SIGBUS) and drop its connections",
                lambda: version_problem(prometheus_patches.PINNED),
                prometheus_patches.apply,
            )
        )  # fmt: skip
    if settings.tls.enabled:
        reaches.append(
            _Reach(
                CLIENT_HELLO, "function",
                "the ClientHello hook for TLS-ALPN-01",
                "TLS-ALPN-01 challenges cannot be answered",
                _client_hello_problem,
                lambda: None,  # tls.TLSState sets it on its front context
                required=settings.tls.challenge == "tls-alpn-01",
            )
        )  # fmt: skip
    return reaches


def apply_all(settings: Settings) -> tuple[Degraded, ...]:
    """Apply every reach whose gate opens; the ones that did not (all logged).

    Raises:
        hypercorn_patches.PatchError: a required reach cannot apply and
            `server.allow_unpatched` is off (one line for the user).
    """
    reaches = [(reach, reach.problem()) for reach in _reaches(settings)]
    # Every gate is read before anything is patched: a refusal leaves the libraries alone.
    for reach, problem in reaches:
        required = reach.kind == "safety" or (reach.kind == "function" and reach.required)
        if problem is not None and required and not settings.server.allow_unpatched:
            raise hypercorn_patches.PatchError(
                f"{problem} for {reach.what} (install the pinned versions: "
                f"pip install -c constraints.txt vpsrelay; or run degraded with "
                f"--allow-unpatched)"
            )
    degraded: list[Degraded] = []
    for reach, problem in reaches:
        if problem is None:
            reach.apply()
            continue
        detail = f"{problem}: {reach.lost}"
        log.warning("running without %s: %s", reach.what, detail)
        degraded.append(Degraded(reach.name, reach.kind, detail))
    return tuple(degraded)


def applied(reach: str, degraded: tuple[Degraded, ...]) -> bool:
    return all(entry.reach != reach for entry in degraded)
