"""ACME (RFC 8555) with certbot's `acme` library, and the certificate files on disk.

The only importer of `acme`. Everything here is synchronous (the library uses
`requests`): the Trio side calls it through `trio.to_thread.run_sync`, so a slow CA
never blocks the event loop.

Files, in certbot's layout under the data directory so other tools find them:

    acme/accounts/<directory>/private_key.json   the account key (0600), made once
    acme/accounts/<directory>/account.json       its URL at the CA (informational)
    live/<first domain>/fullchain.pem            leaf + intermediates
    live/<first domain>/cert.pem, chain.pem      leaf, intermediates
    live/<first domain>/privkey.pem              the certificate key (0600)

Each file is replaced atomically (write a temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.b64 import b64encode
from josepy.errors import Error as JoseError
from josepy.jwk import JWK, JWKRSA

from vpsrelay import __version__, private_files
from vpsrelay.core.renewal import Validity

if TYPE_CHECKING:
    from pathlib import Path

    from vpsrelay.config import TLSConfig

log = logging.getLogger("vpsrelay.acme")

USER_AGENT = f"vpsrelay/{__version__} (acme-python)"
ORDER_TIMEOUT = datetime.timedelta(seconds=180)
HTTP_TIMEOUT = 45  # seconds, per request to the CA


class AcmeError(Exception):
    """Obtaining a certificate failed; the message carries the CA's own words."""


class ChallengeSink(Protocol):
    """Where pending challenges are published for the listeners to answer (thread-safe)."""

    def add_http01(self, token: str, key_authorization: str) -> None: ...

    def add_tls_alpn01(self, domain: str, key_authorization: str) -> None: ...

    def remove_http01(self, token: str) -> None: ...

    def remove_tls_alpn01(self, domain: str) -> None: ...


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What `cert status` shows and the renewal check needs."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    serial: int
    validity: Validity

    def days_left(self, now: datetime.datetime) -> float:
        return (self.validity.not_after - now).total_seconds() / 86400


def describe(pem: bytes) -> CertificateInfo:
    """The leaf (first certificate) of a PEM chain.

    Raises:
        ValueError: no certificate in `pem`.
    """
    leaf = x509.load_pem_x509_certificates(pem)[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName)) + tuple(
            str(ip) for ip in san.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        names=names,
        serial=leaf.serial_number,
        validity=Validity(leaf.not_valid_before_utc, leaf.not_valid_after_utc),
    )


# --- files


def atomic_write(path: Path, data: bytes, mode: int = private_files.FILE_MODE) -> None:
    """Replace `path` with `data` so a reader sees the old or the new file, never half."""
    private_files.make_dir(path.parent)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def live_dir(data_dir: Path, domains: tuple[str, ...]) -> Path:
    """certbot's `live/<first domain>/`."""
    return data_dir / "live" / domains[0]


@dataclass(frozen=True, slots=True)
class Issued:
    fullchain_pem: bytes
    key_pem: bytes


ISSUER_FILE = "acme-directory"
"""Beside the certificate: the ACME directory it came from, so that moving from staging to
production (or to another CA) orders a new certificate instead of keeping the old one."""


def issued_by(data_dir: Path, domains: tuple[str, ...]) -> str | None:
    try:
        return (live_dir(data_dir, domains) / ISSUER_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def store(
    data_dir: Path, domains: tuple[str, ...], issued: Issued, directory_url: str | None = None
) -> Path:
    """Write the certificate files; the key first, so a new chain never meets an old key
    for long (a reader that sees a mismatch retries)."""
    directory = live_dir(data_dir, domains)
    private_files.make_dir(directory)
    directory.chmod(private_files.DIR_MODE)
    certificates = x509.load_pem_x509_certificates(issued.fullchain_pem)
    pem = [c.public_bytes(serialization.Encoding.PEM) for c in certificates]
    atomic_write(directory / "privkey.pem", issued.key_pem, 0o600)
    atomic_write(directory / "cert.pem", pem[0])
    atomic_write(directory / "chain.pem", b"".join(pem[1:]))
    atomic_write(directory / "fullchain.pem", b"".join(pem))
    if directory_url is not None:
        atomic_write(directory / ISSUER_FILE, directory_url.encode() + b"\n")
    return directory


def load_live(data_dir: Path, domains: tuple[str, ...]) -> Issued | None:
    """The stored certificate for `domains`, or None if there is none (or it is unreadable)."""
    directory = live_dir(data_dir, domains)
    try:
        return Issued(
            (directory / "fullchain.pem").read_bytes(), (directory / "privkey.pem").read_bytes()
        )
    except FileNotFoundError:
        return None


def covers(info: CertificateInfo, domains: tuple[str, ...]) -> bool:
    """Whether the certificate names every configured domain (a new domain needs a new one)."""
    return set(domains) <= {name.lower() for name in info.names}


# --- the ACME conversation


def _directory_slug(url: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", url.split("://", 1)[-1]).strip("_")


def _account_key(data_dir: Path, directory_url: str) -> tuple[JWKRSA, Path]:
    folder = data_dir / "acme" / "accounts" / _directory_slug(directory_url)
    path = folder / "private_key.json"
    if path.exists():
        return JWKRSA.json_loads(path.read_text()), folder
    key = JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    private_files.make_dir(folder)
    folder.chmod(private_files.DIR_MODE)
    atomic_write(path, key.json_dumps().encode(), 0o600)
    log.info("created an ACME account key in %s", path)
    return key, folder


def _key_authorization(token: str, account_key: JWK) -> str:
    """RFC 8555 §8.1: token || '.' || base64url(JWK thumbprint)."""
    thumbprint = b64encode(account_key.thumbprint(hash_function=hashes.SHA256)).decode()
    return f"{token}.{thumbprint}"


def _token(challb: messages.ChallengeBody) -> str:
    # acme 5 dropped its TLS-ALPN-01 class: that challenge arrives unrecognized, as JSON.
    if isinstance(challb.chall, challenges.UnrecognizedChallenge):
        return str(challb.chall.jobj["token"])
    return str(challb.chall.encode("token"))


def _challenge_type(challb: messages.ChallengeBody) -> str:
    if isinstance(challb.chall, challenges.UnrecognizedChallenge):
        return str(challb.chall.jobj.get("type"))
    return str(challb.chall.typ)


def _problem(exc: BaseException) -> str:
    """The CA's words for a failure, as one line."""
    if isinstance(exc, errors.ValidationError):
        details = [
            f"{authz.body.identifier.value}: {challenge.error}"
            for authz in exc.failed_authzrs
            for challenge in authz.body.challenges
            if challenge.error is not None
        ]
        return "validation failed: " + ("; ".join(details) or "no detail from the CA")
    if isinstance(exc, errors.TimeoutError):
        return "the CA did not finish validating in time"
    if isinstance(exc, requests.RequestException):
        return f"cannot reach the ACME server: {exc}"
    return str(exc) or type(exc).__name__


class AcmeClient:
    """One relay's ACME account at one CA."""

    def __init__(self, tls: TLSConfig, data_dir: Path) -> None:
        self.tls = tls
        self.data_dir = data_dir
        self.account_key, self.account_dir = _account_key(data_dir, tls.acme_directory)

    def _client(self) -> client.ClientV2:
        bundle = self.tls.acme_ca_bundle
        verify: bool | str = str(bundle) if bundle is not None else True
        network = client.ClientNetwork(
            self.account_key,
            user_agent=USER_AGENT,
            timeout=HTTP_TIMEOUT,
            # Passed on to requests, which takes a CA file where the annotation says bool.
            verify_ssl=cast("bool", verify),
        )
        directory = client.ClientV2.get_directory(self.tls.acme_directory, network)
        acme = client.ClientV2(directory, network)
        self._register(acme, directory)
        return acme

    def _register(self, acme: client.ClientV2, directory: messages.Directory) -> None:
        # new-account with a known key answers the existing account (RFC 8555 §7.3.1);
        # asking each time survives a CA that forgot us (pebble does, at every restart).
        eab = None
        if self.tls.eab_kid and self.tls.eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self.account_key.public_key(),
                kid=self.tls.eab_kid,
                hmac_key=self.tls.eab_hmac_key.reveal(),
                directory=directory,
            )
        registration = messages.NewRegistration.from_data(
            email=self.tls.email,
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
        try:
            account = acme.new_account(registration)
            uri = account.uri
            log.info("registered ACME account %s", uri)
        except errors.ConflictError as existing:
            uri = existing.location
            acme.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        account_file = self.account_dir / "account.json"
        record = json.dumps({"uri": uri, "directory": self.tls.acme_directory}).encode()
        if not account_file.exists() or account_file.read_bytes() != record:
            atomic_write(account_file, record, 0o600)

    def issue(self, domains: tuple[str, ...], sink: ChallengeSink) -> Issued:
        """Order, validate and download a certificate for `domains`.

        Raises:
            AcmeError: with the CA's error (or why the CA could not be reached).
        """
        try:
            return self._issue(domains, sink)
        except AcmeError:
            raise
        except (errors.Error, messages.Error, requests.RequestException, JoseError) as exc:
            raise AcmeError(_problem(exc)) from exc

    def _issue(self, domains: tuple[str, ...], sink: ChallengeSink) -> Issued:
        acme = self._client()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = acme.new_order(crypto_util.make_csr(key_pem, list(domains)))
        published: list[tuple[str, str]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # the CA reuses a recent validation
                domain = authz.body.identifier.value
                challb = self._pick(authz, domain)
                key_authorization = _key_authorization(_token(challb), self.account_key)
                if self.tls.challenge == "http-01":
                    token = key_authorization.partition(".")[0]
                    sink.add_http01(token, key_authorization)
                    published.append(("http-01", token))
                else:
                    sink.add_tls_alpn01(domain, key_authorization)
                    published.append(("tls-alpn-01", domain))
                # The response body is `{}` for every key-authorization challenge (§7.5.1).
                acme.answer_challenge(
                    challb,
                    challenges.HTTP01Response(key_authorization=key_authorization),
                )
            deadline = datetime.datetime.now() + ORDER_TIMEOUT
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for kind, what in published:
                if kind == "http-01":
                    sink.remove_http01(what)
                else:
                    sink.remove_tls_alpn01(what)
        if not order.fullchain_pem:
            raise AcmeError("the CA finalized the order without a certificate")
        return Issued(order.fullchain_pem.encode(), key_pem)

    def _pick(self, authz: messages.AuthorizationResource, domain: str) -> messages.ChallengeBody:
        for challb in authz.body.challenges:
            if _challenge_type(challb) == self.tls.challenge:
                return challb
        offered = ", ".join(sorted({_challenge_type(c) for c in authz.body.challenges}))
        raise AcmeError(f"{domain}: the CA does not offer {self.tls.challenge} (only {offered})")

    def suggested_renewal(self, fullchain_pem: bytes) -> datetime.datetime | None:
        """The CA's ACME Renewal Information (RFC 9773) time, if it offers ARI.

        Any failure is logged and answers None: the lifetime rule still applies.
        """
        try:
            when, _next_check = self._client().renewal_time(fullchain_pem)
        except Exception as exc:  # ARI is advisory: never fatal
            log.info("no renewal information from the CA: %s", _problem(exc))
            return None
        if when is None:
            return None
        return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
