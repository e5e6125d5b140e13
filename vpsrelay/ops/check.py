"""`vpsrelay check`: diagnose a relay from the VPS or from a client machine.

Each row is one question (does the name resolve, is the certificate good, does
`/v2/` challenge with a realm on the relay, does a token come, does a manifest
come through for each registry, how much Docker Hub budget is left, are the
clocks right) with a result and, for a failure, the fix. Plain, blocking code:
it runs once, row after row, and talks only to the URL it is given.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import ssl
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from vpsrelay import __version__
from vpsrelay.core import auth, ratelimit
from vpsrelay.errors import RelayError
from vpsrelay.upstream.tokens import fetch_token_blocking

if TYPE_CHECKING:
    from collections.abc import Callable

PASS, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "n/a"
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
DEFAULT_IMAGES = {"docker.io": "library/hello-world:latest"}
CLOCK_SKEW_LIMIT = 30.0
CERT_WARN_DAYS = 14
TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Row:
    check: str
    result: str  # PASS, WARN, FAIL or SKIP
    detail: str
    fix: str = ""


@dataclass(slots=True)
class Report:
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(row.result != FAIL for row in self.rows)

    def table(self) -> str:
        width = max([len(r.check) for r in self.rows] + [5])
        lines = [f"{'CHECK':<{width}}  {'RESULT':<6}  DETAIL"]
        for row in self.rows:
            lines.append(f"{row.check:<{width}}  {row.result:<6}  {row.detail}")
            if row.fix:
                lines.append(f"{'':<{width}}  {'':<6}  fix: {row.fix}")
        verdict = "all checks passed" if self.ok else "some checks FAILED"
        return "\n".join([*lines, "", verdict])

    def as_json(self) -> str:
        return json.dumps({"ok": self.ok, "rows": [asdict(r) for r in self.rows]}, indent=2)


class Checker:
    """Runs the rows against one relay URL."""

    def __init__(
        self,
        url: str,
        images: dict[str, str],
        *,
        ca_file: str | None = None,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] = time.time,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.credentials = credentials
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.images = images
        self.clock = clock
        self.context = ssl.create_default_context(cafile=ca_file)
        self.client = httpx.Client(
            verify=self.context if self.scheme == "https" else False,
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": f"vpsrelay-check/{__version__}"},
        )
        self.rows: list[Row] = []
        self.budgets: dict[str, ratelimit.RateLimit] = {}
        self.date_skews: list[float] = []

    def add(self, check: str, result: str, detail: str, fix: str = "") -> Row:
        row = Row(check, result, detail, fix)
        self.rows.append(row)
        return row

    def run(self) -> Report:
        try:
            if self.dns():
                if self.scheme == "https":
                    self.tls()
                    self.port_80()
                else:
                    self.add("tls", SKIP, "plain HTTP: no certificate to check")
                    self.add("http/2", SKIP, "plain HTTP: HTTP/2 is negotiated over TLS")
                challenge = self.challenge()
                for registry, image in self.images.items():
                    token = self.token(registry, image, challenge)
                    self.manifest(registry, image, token)
                self.readiness()
                self.budget()
                self.clock_skew()
        finally:
            self.client.close()
        return Report(self.rows)

    # --- rows

    def dns(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            pass
        else:
            self.add("dns", SKIP, f"{self.host} is an address, not a name")
            return True
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.add(
                "dns",
                FAIL,
                f"{self.host} does not resolve: {exc}",
                f"add an A (and AAAA) record for {self.host} pointing at the VPS",
            )
            return False
        addresses = sorted({str(info[4][0]) for info in infos})
        self.add("dns", PASS, f"{self.host} -> {', '.join(addresses)}")
        return True

    def tls(self) -> None:
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=TIMEOUT) as raw,
                self._wrap(raw) as tls,
            ):
                cert = tls.getpeercert() or {}
                alpn = tls.selected_alpn_protocol()
                version = tls.version()
        except ssl.SSLCertVerificationError as exc:
            self.add(
                "tls",
                FAIL,
                f"certificate not trusted: {exc.verify_message}",
                _tls_fix(exc.verify_message or ""),
            )
            self.add("http/2", SKIP, "no TLS connection")
            return
        except (OSError, ssl.SSLError) as exc:
            self.add(
                "tls",
                FAIL,
                f"no TLS handshake with {self.host}:{self.port}: {exc}",
                f"check that the relay listens on port {self.port} with TLS and that the "
                "firewall lets it in",
            )
            self.add("http/2", SKIP, "no TLS connection")
            return
        expires = ssl.cert_time_to_seconds(str(cert.get("notAfter", "")))
        days = (expires - self.clock()) / 86400
        issuer = _name(cert.get("issuer", ()))
        detail = f"{version}, issued by {issuer}, expires in {days:.0f} days"
        if days < CERT_WARN_DAYS:
            self.add(
                "tls",
                WARN,
                detail,
                "renewal should have happened by now: check the relay's log for ACME errors",
            )
        else:
            self.add("tls", PASS, detail)
        if alpn == "h2":
            self.add("http/2", PASS, "negotiated h2 (ALPN)")
        else:
            self.add(
                "http/2",
                WARN,
                f"server chose {alpn or 'no protocol'} instead of h2",
                "if a proxy terminates TLS, enable HTTP/2 there",
            )

    def _wrap(self, raw: socket.socket) -> ssl.SSLSocket:
        self.context.set_alpn_protocols(["h2", "http/1.1"])
        return self.context.wrap_socket(raw, server_hostname=self.host)

    def port_80(self) -> None:
        try:
            with socket.create_connection((self.host, 80), timeout=5):
                pass
        except OSError:
            self.add(
                "port 80",
                WARN,
                "port 80 is closed",
                "HTTP-01 cannot validate: open port 80, or use TLS-ALPN-01",
            )
            return
        self.add("port 80", PASS, "open (HTTP-01 can validate)")

    def challenge(self) -> auth.Challenge | None:
        try:
            response = self.client.get(f"{self.url}/v2/")
        except httpx.HTTPError as exc:
            self.add(
                "/v2/",
                FAIL,
                f"no answer: {exc}",
                "is the relay running, and does the firewall let the port in?",
            )
            return None
        self._note_date(response)
        if response.status_code == 200:
            self.add("/v2/", PASS, "200: the upstream needs no token")
            return None
        if response.status_code != 401:
            self.add(
                "/v2/",
                FAIL,
                f"answered {response.status_code}: {_error_message(response)}",
                _status_fix(response.status_code),
            )
            return None
        header = response.headers.get("www-authenticate", "")
        try:
            challenge = auth.parse_challenge(header)
        except Exception:
            challenge = None
        if challenge is None or not challenge.is_bearer or not challenge.realm:
            self.add("/v2/", FAIL, f"401 without a Bearer realm: {header!r}", "")
            return None
        try:
            realm = urlsplit(auth.token_url(challenge.realm, ()))
        except ValueError as exc:
            self.add("/v2/", FAIL, str(exc), "set server.public_url to the relay's http(s) URL")
            return None
        if (realm.scheme, realm.netloc) != (self.scheme, urlsplit(self.url).netloc):
            self.add(
                "/v2/",
                FAIL,
                f"realm {challenge.realm} is not on the relay: clients fetch tokens elsewhere",
                f'set server.public_url = "{self.url}" (or the X-Forwarded-* of a trusted proxy)',
            )
            return challenge
        self.add("/v2/", PASS, f"401 Bearer, realm {challenge.realm}")
        return challenge

    def token(self, registry: str, image: str, challenge: auth.Challenge | None) -> str | None:
        if challenge is None or not challenge.realm:
            return None
        repository = image.partition(":")[0].partition("@")[0]
        check = f"token {registry}"
        scopes = [f"repository:{repository}:pull"]
        try:
            token = fetch_token_blocking(self.client, challenge, scopes, self.credentials)
        except RelayError as exc:
            status = exc.detail.get("status") if isinstance(exc.detail, dict) else None
            if status == 200:
                self.add(check, WARN, "token service answered without a token", "")
            else:
                self.add(check, FAIL, exc.message, _status_fix(status) if status else "")
            return None
        self.add(check, PASS, f"pull token for {repository}")
        return token

    def manifest(self, registry: str, image: str, token: str | None) -> None:
        name, _, tag = image.rpartition(":")
        if not name or "/" in tag:
            name, tag = image, "latest"
        headers = {"accept": MANIFEST_ACCEPT}
        if token:
            headers["authorization"] = f"Bearer {token}"
        path = f"{self.url}/v2/{name}/manifests/{tag}"
        for method in ("HEAD", "GET"):
            check = f"manifest {method} {registry}"
            try:
                response = self.client.request(method, path, headers=headers)
            except httpx.HTTPError as exc:
                self.add(check, FAIL, f"{name}:{tag}: {exc}", "")
                continue
            self._note_date(response)
            budget = ratelimit.parse((k.lower(), v) for k, v in response.headers.multi_items())
            if budget is not None:
                self.budgets[registry] = budget
            if response.status_code != 200:
                self.add(
                    check,
                    FAIL,
                    f"{name}:{tag}: {response.status_code} {_error_message(response)}",
                    _status_fix(response.status_code),
                )
                continue
            digest = response.headers.get("docker-content-digest", "")
            if method == "GET":
                actual = "sha256:" + hashlib.sha256(response.content).hexdigest()
                if digest and digest != actual:
                    self.add(
                        check,
                        FAIL,
                        f"{name}:{tag}: body hashes to {actual}, header says {digest}",
                        "something between you and the registry changes the bytes",
                    )
                    continue
                detail = f"{name}:{tag}: {len(response.content)} bytes, {actual[:19]}..."
            else:
                detail = f"{name}:{tag}: {digest[:19] or 'no digest'}..."
            self.add(check, PASS, detail)

    def budget(self) -> None:
        budget = self.budgets.get("docker.io")
        if budget is None:
            self.add(
                "docker hub budget",
                SKIP,
                "no ratelimit headers seen (an account without limits, or not Docker Hub)",
            )
            return
        detail = f"{budget.remaining} of {budget.limit} pulls left"
        if budget.window_seconds:
            detail += f" per {budget.window_seconds // 3600 or budget.window_seconds} h"
        if budget.source:
            detail += f", counted for {budget.source}"
        fix = ""
        if budget.source and ":" in budget.source:
            fix = (
                "the budget is counted for an IPv6 /64 that neighbours may share: "
                "set upstream.prefer_ipv4 = true (or, for Docker Hub alone, "
                'registries."docker.io".address_family = "ipv4")'
            )
        if budget.remaining == 0:
            self.add(
                "docker hub budget",
                FAIL,
                detail,
                fix or "wait for the window to pass, or log the relay in to Docker Hub",
            )
        elif budget.remaining is not None and budget.limit and budget.remaining < budget.limit / 10:
            self.add("docker hub budget", WARN, detail, fix)
        else:
            self.add("docker hub budget", WARN if fix else PASS, detail, fix)

    def readiness(self) -> None:
        try:
            response = self.client.get(f"{self.url}/readyz")
        except httpx.HTTPError as exc:
            self.add("readiness", FAIL, f"no answer: {exc}", "")
            return
        try:
            body = response.json()
        except ValueError:
            body = {}
        checks = body.get("checks", {}) if isinstance(body, dict) else {}
        summary = ", ".join(f"{k}: {v}" for k, v in checks.items())
        if response.status_code == 200:
            self.add("readiness", PASS, summary or "ready")
        elif response.status_code == 404:
            self.add("readiness", SKIP, "no /readyz (an older relay or another server)")
        else:
            bad = [k for k, v in checks.items() if v not in ("ok", "off")]
            fix = {
                "data_dir": "the data directory is not writable: check its owner and the disk",
                "upstream": "the relay cannot reach its upstream: check the VPS's outbound "
                "network, DNS and the upstream URL",
                "tls": "no certificate is loaded: check the relay's log for ACME errors",
                "workers": "no worker is ready: see the worker rows and the relay's log",
            }
            self.add(
                "readiness",
                FAIL,
                summary or f"{response.status_code}",
                "; ".join(fix[k] for k in bad if k in fix),
            )
        self._worker_rows(body.get("workers") if isinstance(body, dict) else None)
        self._degraded_patches(body.get("degraded") if isinstance(body, dict) else None)
        for name, entry in (body.get("upstreams") or {}).items() if isinstance(body, dict) else ():
            self._budget_from_report(name, entry)
            self._credentials_from_report(name, entry)
            skew = entry.get("clock_skew_seconds") if isinstance(entry, dict) else None
            if isinstance(skew, int | float) and abs(skew) > CLOCK_SKEW_LIMIT:
                self.add(
                    f"clock {name}",
                    FAIL,
                    f"the relay's clock is {-skew:+.0f} s off {name}'s",
                    "run an NTP client on the VPS (chrony or systemd-timesyncd)",
                )

    def _worker_rows(self, entries: object) -> None:
        """One row per worker of a relay that runs several (`server.workers`)."""
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict):
                continue
            state = str(entry.get("state", "?"))
            details = [state]
            if isinstance(pid := entry.get("pid"), int):
                details.append(f"pid {pid}")
            if isinstance(age := entry.get("heartbeat_seconds_ago"), int | float):
                details.append(f"heartbeat {age:.1f} s ago")
            if isinstance(uptime := entry.get("uptime_seconds"), int | float):
                details.append(f"up {uptime:.0f} s")
            failing = entry.get("checks")
            if isinstance(failing, dict):
                details += [f"{key}: {value}" for key, value in failing.items()]
            result, fix = _WORKER_STATES.get(state, (WARN, "see the relay's log"))
            self.add(f"worker {entry.get('worker', '?')}", result, ", ".join(details), fix)

    def _degraded_patches(self, entries: object) -> None:
        """A relay started with `--allow-unpatched` whose library patches did not all apply:
        a missing safety patch fails the check (the relay is exposed), others warn."""
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict):
                continue
            self.add(
                f"patches {entry.get('reach', '?')}",
                FAIL if entry.get("kind") == "safety" else WARN,
                str(entry.get("detail", "")),
                "install the pinned versions (pip install -c constraints.txt vpsrelay) "
                "and restart without --allow-unpatched",
            )

    def _credentials_from_report(self, registry: str, entry: object) -> None:
        """One row per operator credential of a pool the relay reported (by username), or
        one row with how many rest when it shows this client counts only."""
        pool = entry.get("credentials") if isinstance(entry, dict) else None
        counts = entry.get("credential_counts") if isinstance(entry, dict) else None
        if not isinstance(pool, dict) and isinstance(counts, dict):
            ready, resting = counts.get("ready"), counts.get("resting")
            detail = f"{ready} ready, {resting} resting (names for an allowed address only)"
            if isinstance(resting, int) and resting > 0:
                fix = "the pool's other credentials serve meanwhile; add another account"
                self.add(f"credentials {registry}", WARN, detail, fix)
            else:
                self.add(f"credentials {registry}", PASS, detail)
            return
        for name, seen in pool.items() if isinstance(pool, dict) else ():
            if not isinstance(seen, dict):
                continue
            remaining, limit = seen.get("remaining"), seen.get("limit")
            left = "?" if remaining is None else remaining
            detail = f"{left} of {'?' if limit is None else limit} pulls left"
            resting = seen.get("resting_seconds")
            if isinstance(resting, int) and resting > 0:
                detail += f"; resting {resting} s after a 429 or an empty budget"
                fix = "the pool's other credentials serve meanwhile; add another account"
                self.add(f"credential {registry} {name}", WARN, detail, fix)
            else:
                self.add(f"credential {registry} {name}", PASS, detail)

    def _budget_from_report(self, registry: str, entry: object) -> None:
        """The budget the relay last saw upstream, when our own requests were answered from
        its cache (which sends no `ratelimit-*` of its own)."""
        if registry in self.budgets or not isinstance(entry, dict):
            return
        seen = entry.get("ratelimit")
        if isinstance(seen, dict):
            self.budgets[registry] = ratelimit.RateLimit(
                limit=seen.get("limit"),
                remaining=seen.get("remaining"),
                window_seconds=seen.get("window_seconds"),
                source=seen.get("source"),
            )

    def clock_skew(self) -> None:
        if not self.date_skews:
            self.add("clock", SKIP, "the relay sent no Date header")
            return
        skew = max(self.date_skews, key=abs)
        detail = f"relay and this machine differ by {skew:+.0f} s"
        if abs(skew) > CLOCK_SKEW_LIMIT:
            self.add(
                "clock",
                FAIL,
                detail,
                "tokens are time-limited: run an NTP client (chrony or systemd-timesyncd)",
            )
        else:
            self.add("clock", PASS, detail)

    def _note_date(self, response: httpx.Response) -> None:
        date = response.headers.get("date")
        if not date:
            return
        try:
            self.date_skews.append(parsedate_to_datetime(date).timestamp() - self.clock())
        except (TypeError, ValueError, IndexError):
            return


# A worker's state in /readyz: the row's result and the fix.
_WORKER_STATES = {
    "ready": (PASS, ""),
    "unready": (WARN, "its own checks fail (listed): see the relay's log"),
    "draining": (WARN, "it is stopping (SIGTERM): its pulls finish, new ones go to the others"),
    "starting": (WARN, "it has not served yet; if it stays so, see the relay's log"),
    "exited": (WARN, "it ended and is restarted; if it keeps ending, see the relay's log"),
    "stale": (
        FAIL,
        "its heartbeat stopped: the worker is hung and its connections stall; see the relay's "
        "log and restart the relay",
    ),
}


def _name(rdns: object) -> str:
    try:
        for rdn in rdns:  # type: ignore[attr-defined]
            for key, value in rdn:
                if key in ("organizationName", "commonName"):
                    return str(value)
    except (TypeError, ValueError):
        pass
    return "?"


def _error_message(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        return str(errors[0].get("message", "")) if errors else response.text[:200]
    except (ValueError, AttributeError, IndexError):
        return response.text[:200].strip()


def _status_fix(status: int) -> str:
    return {
        401: "the relay wants credentials: pass them, or check access control",
        403: "access denied: check the relay's access control",
        404: "the image is not there: pass --image REGISTRY=REPO:TAG of an image that exists",
        429: "the upstream's rate limit was hit: wait, or log the relay in to raise it",
        502: "the relay cannot reach its upstream: check the VPS's outbound network, DNS, "
        "and the registry URL in the config",
        504: "the upstream is too slow or unreachable: check the VPS's outbound network",
    }.get(status, "see the relay's log")


def _tls_fix(message: str) -> str:
    lowered = message.lower()
    if "expired" in lowered:
        return "the certificate expired: check that renewal works (port 80 or TLS-ALPN-01)"
    if "hostname" in lowered or "ip address mismatch" in lowered:
        return "the certificate is for another name: issue one for this name"
    if "self" in lowered or "unable to get local issuer" in lowered:
        return "clients will not trust it: use an ACME certificate, or pass --ca for a private CA"
    return "see the relay's TLS settings"


def parse_images(items: tuple[str, ...], registries: tuple[str, ...]) -> dict[str, str]:
    """`REGISTRY=REPO:TAG` flags over the defaults, for the configured registries.

    Raises:
        ValueError: an item without `=`.
    """
    chosen = {name: DEFAULT_IMAGES[name] for name in registries if name in DEFAULT_IMAGES}
    for item in items:
        registry, sep, image = item.partition("=")
        if not sep or not registry or not image:
            raise ValueError(f"--image: expected REGISTRY=REPO:TAG, got {item!r}")
        chosen[registry] = image
    return chosen
