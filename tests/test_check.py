"""`vpsrelay check` against an in-process relay served by Hypercorn over TLS (trustme CA)."""

from __future__ import annotations

import functools
import socket
import time

import httpx
import hypercorn.config
import hypercorn.trio
import trio
import trustme

from tests.test_app import manifest_handler, token_handler
from vpsrelay import config
from vpsrelay.app import RelayApp
from vpsrelay.ops import check
from vpsrelay.patches import hypercorn as hypercorn_patches
from vpsrelay.upstream import Upstream


def upstream(request: httpx.Request) -> httpx.Response:
    if "/manifests/" in request.url.path:
        return manifest_handler(request)
    return token_handler(request)


async def serve_tls(tmp_path, nursery, *, hostname: str = "localhost"):
    ca = trustme.CA()
    cert = ca.issue_cert(hostname)
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    settings = config.load(
        None, {}, {"data_dir": str(tmp_path)}, upstreams={"docker.io": "http://hub.test"}
    )
    up = Upstream(settings, transport=httpx.MockTransport(upstream))
    app = RelayApp(settings, up)
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.certfile, hc.keyfile = str(cert_file), str(key_file)
    hypercorn_patches.apply()
    stop = trio.Event()
    binds = await nursery.start(
        functools.partial(hypercorn.trio.serve, app, hc, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    )
    port = int(binds[0].rsplit(":", 1)[1])
    return port, str(ca_file), stop, up


async def test_check_over_tls_reads_the_served_certificate(tmp_path, nursery):
    port, ca_file, stop, up = await serve_tls(tmp_path, nursery)
    try:
        checker = check.Checker(
            f"https://localhost:{port}", {"docker.io": "alpine:latest"}, ca_file=ca_file
        )
        report = await trio.to_thread.run_sync(checker.run)
    finally:
        stop.set()
        await up.aclose()
    rows = {row.check: row for row in report.rows}
    assert rows["dns"].result == check.PASS
    assert "127.0.0.1" in rows["dns"].detail
    assert rows["tls"].result == check.PASS, rows["tls"]
    assert "expires in" in rows["tls"].detail
    assert rows["http/2"].result == check.PASS
    assert rows["/v2/"].result == check.PASS
    assert rows["token docker.io"].result == check.PASS
    assert rows["manifest HEAD docker.io"].result == check.PASS
    assert rows["manifest GET docker.io"].result == check.PASS
    assert rows["docker hub budget"].detail.startswith("99 of 100 pulls left per 6 h")
    assert rows["clock"].result == check.PASS
    assert report.ok, report.table()


async def test_check_names_an_untrusted_certificate(tmp_path, nursery):
    port, _, stop, up = await serve_tls(tmp_path, nursery)
    try:
        checker = check.Checker(f"https://localhost:{port}", {})
        report = await trio.to_thread.run_sync(checker.run)
    finally:
        stop.set()
        await up.aclose()
    tls = next(row for row in report.rows if row.check == "tls")
    assert tls.result == check.FAIL
    assert "certificate not trusted" in tls.detail
    assert tls.fix.startswith("clients will not trust it")
    assert not report.ok


async def test_check_flags_clock_skew(tmp_path, nursery):
    port, ca_file, stop, up = await serve_tls(tmp_path, nursery)
    try:
        checker = check.Checker(
            f"https://localhost:{port}", {}, ca_file=ca_file, clock=lambda: time.time() + 600
        )
        report = await trio.to_thread.run_sync(checker.run)
    finally:
        stop.set()
        await up.aclose()
    clock = next(row for row in report.rows if row.check == "clock")
    assert clock.result == check.FAIL
    assert "NTP" in clock.fix


def test_dns_failure_stops_and_has_a_fix(monkeypatch):
    def no_such_name(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # No resolver is asked: getaddrinfo is replaced, and nothing runs after a failed row.
    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    report = check.Checker("https://relay.example.test", {}).run()
    assert [row.check for row in report.rows] == ["dns"]
    assert not report.ok
    assert "fix: add an A (and AAAA) record for relay.example.test" in report.table()


def test_budget_rows():
    from vpsrelay.core.ratelimit import RateLimit

    checker = check.Checker("http://127.0.0.1:1", {})
    checker.budgets["docker.io"] = RateLimit(100, 0, 21600, "2001:db8::1")
    checker.budget()
    row = checker.rows[-1]
    assert row.result == check.FAIL
    assert "prefer_ipv4" in row.fix
    checker.budgets["docker.io"] = RateLimit(100, 5, 21600, "203.0.113.7")
    checker.budget()
    assert checker.rows[-1].result == check.WARN
    checker.client.close()


def test_parse_images():
    assert check.parse_images((), ("docker.io",)) == {"docker.io": "library/hello-world:latest"}
    assert check.parse_images(("docker.io=alpine:3",), ("docker.io",)) == {"docker.io": "alpine:3"}


def test_credential_rows_from_a_public_readyz_and_an_operators():
    checker = check.Checker("http://127.0.0.1:1", {})
    # What /readyz shows a client /metrics does not answer: counts, no names.
    checker._credentials_from_report("docker.io", {"credential_counts": {"ready": 1, "resting": 1}})
    assert [(r.check, r.result) for r in checker.rows] == [("credentials docker.io", check.WARN)]
    assert "1 ready, 1 resting" in checker.rows[-1].detail
    checker.rows.clear()
    entry = {
        "credential_counts": {"ready": 1, "resting": 0},
        "credentials": {"alice": {"limit": 100, "remaining": 90, "resting_seconds": 0}},
    }
    checker._credentials_from_report("docker.io", entry)
    assert [(r.check, r.result) for r in checker.rows] == [
        ("credential docker.io alice", check.PASS)
    ]
    checker.client.close()


def test_worker_rows_from_readyz():
    checker = check.Checker("http://127.0.0.1:1", {})
    checker._worker_rows(
        [
            {"worker": "w1", "state": "ready", "pid": 12, "heartbeat_seconds_ago": 0.4,
             "uptime_seconds": 61.2},
            {"worker": "w2", "state": "stale", "heartbeat_seconds_ago": 12.0},
            {"worker": "w3", "state": "exited"},
            "not an entry",
            {"worker": "w4", "state": "unready", "checks": {"tls": "no certificate loaded"}},
        ]
    )  # fmt: skip
    rows = [(r.check, r.result, r.detail) for r in checker.rows]
    assert rows == [
        ("worker w1", check.PASS, "ready, pid 12, heartbeat 0.4 s ago, up 61 s"),
        ("worker w2", check.FAIL, "stale, heartbeat 12.0 s ago"),
        ("worker w3", check.WARN, "exited"),
        ("worker w4", check.WARN, "unready, tls: no certificate loaded"),
    ]
    assert "hung" in checker.rows[1].fix
    checker.rows.clear()
    checker._worker_rows(None)  # a single-process relay: no rows
    assert checker.rows == []
    checker.client.close()
