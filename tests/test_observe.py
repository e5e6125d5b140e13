"""Operator paths in-process: /metrics access, /readyz, the landing page, logs, the CLI."""

from __future__ import annotations

import json
import logging
import time

import httpx
import trio
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.test_app import HUB, challenge_401, manifest_handler, never, relay, reply
from vpsrelay import cli, config
from vpsrelay.ops import logs


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def test_metrics_from_loopback_count_requests_and_refusals():
    async with relay(manifest_handler) as r:
        await r.client.get("/v2/alpine/manifests/latest")
        await r.client.put("/v2/alpine/manifests/latest", content=b"{}")
        await r.client.get("/v2/Alpine/manifests/latest")
        response = await r.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    assert metric(text, "vpsrelay_requests_total", registry="docker.io", kind="manifest",
                  status="200") == 1  # fmt: skip
    assert metric(text, "vpsrelay_refusals_total", reason="unsupported") == 1
    assert metric(text, "vpsrelay_refusals_total", reason="name_invalid") == 1
    assert metric(text, "vpsrelay_upstream_latency_seconds_count", registry="docker.io",
                  kind="manifest") == 1  # fmt: skip


async def test_metrics_need_an_allowed_address_or_the_token():
    overrides: dict[str, object] = {"metrics.allow": "10.0.0.0/8", "metrics.token": "s3cret"}
    async with relay(never, overrides) as r:
        assert (await r.client.get("/metrics")).status_code == 403
        wrong = await r.client.get("/metrics", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 403
        right = await r.client.get("/metrics", headers={"authorization": "Bearer s3cret"})
        assert right.status_code == 200


async def test_metrics_through_an_untrusted_proxy_need_the_token():
    async with relay(never) as r:  # loopback is allowed, but this came through a proxy
        response = await r.client.get("/metrics", headers={"x-forwarded-for": "198.51.100.9"})
    assert response.status_code == 403


async def test_metrics_can_be_switched_off():
    async with relay(never, {"metrics.enabled": False}) as r:
        response = await r.client.get("/metrics")
    assert response.status_code == 404
    assert response.text == "404 page not found\n"


def test_cache_interface_only_counts():
    from vpsrelay.ops.metrics import Metrics

    metrics = Metrics()
    metrics.cache_hit("docker.io", 10)
    metrics.cache_hit("docker.io", 0)
    metrics.cache_miss("docker.io")
    metrics.cache_size(1234)
    text = metrics.render().decode()
    assert metric(text, "vpsrelay_cache_hits_total", registry="docker.io") == 2
    assert metric(text, "vpsrelay_cache_served_bytes_total", registry="docker.io") == 10
    assert metric(text, "vpsrelay_cache_misses_total", registry="docker.io") == 1
    assert metric(text, "vpsrelay_cache_size_bytes") == 1234


def test_certificate_expiry_appears_only_with_a_certificate():
    from vpsrelay.ops.health import TlsStatus
    from vpsrelay.ops.metrics import Metrics

    tls = TlsStatus(enabled=True)
    metrics = Metrics(certificate_not_after=tls.expiry)
    assert (
        metric(metrics.render().decode(), "vpsrelay_certificate_expiry_timestamp_seconds") is None
    )
    tls.loaded(1_900_000_000.0)
    assert metric(metrics.render().decode(),
                  "vpsrelay_certificate_expiry_timestamp_seconds") == 1_900_000_000.0  # fmt: skip


def test_ratelimit_source_label_follows_the_latest():
    from vpsrelay.core.ratelimit import RateLimit
    from vpsrelay.ops.metrics import Metrics

    metrics = Metrics()
    metrics.ratelimit("docker.io", RateLimit(100, 5, 60, "a"))
    metrics.ratelimit("docker.io", RateLimit(None, None, None, "b"))
    text = metrics.render().decode()
    assert metric(text, "vpsrelay_upstream_ratelimit_source_info", registry="docker.io",
                  source="a") is None  # fmt: skip
    assert metric(text, "vpsrelay_upstream_ratelimit_source_info", registry="docker.io",
                  source="b") == 1  # fmt: skip


# --- /readyz


async def test_readyz_probes_the_upstream(tmp_path):
    async with relay(lambda request: challenge_401(), {"data_dir": str(tmp_path)}) as r:
        response = await r.client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"tls": "off", "data_dir": "ok", "upstream": "ok"}
    assert "GET hub.test/v2/" in r.seen_paths()  # every registry is probed at once


async def test_readyz_unready_when_the_data_dir_takes_no_write(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    async with relay(lambda request: challenge_401(), {"data_dir": str(not_a_dir)}) as r:
        response = await r.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["data_dir"].startswith("not writable")


async def test_readyz_unready_when_the_upstream_fails(tmp_path):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with relay(down, {"data_dir": str(tmp_path)}) as r:
        response = await r.client.get("/readyz")
        assert response.status_code == 503
        five_hundred = await r.client.get("/readyz")  # probes again: nothing answered
    assert five_hundred.status_code == 503
    assert response.json()["checks"]["upstream"].startswith("no upstream answered: docker.io, ")


async def test_readyz_probes_go_through_the_upstream_boundary(tmp_path):
    """Issue 13: an error httpx raises outside its HTTPError tree (a URL it cannot use)
    is a failed probe, not a 500 from /readyz."""

    def unusable(request: httpx.Request) -> httpx.Response:
        raise httpx.InvalidURL("cannot use this URL")

    async with relay(unusable, {"data_dir": str(tmp_path)}) as r:
        response = await r.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["upstream"].startswith("no upstream answered: docker.io")


async def test_readyz_unready_with_tls_on_and_no_certificate(tmp_path):
    async with relay(lambda request: challenge_401(), {"data_dir": str(tmp_path)}) as r:
        r.app.health.tls.enabled = True
        response = await r.client.get("/readyz")
        assert response.json()["checks"]["tls"] == "no certificate loaded"
        assert response.status_code == 503
        r.app.health.tls.loaded(2e9)
        assert (await r.client.get("/readyz")).status_code == 200


async def test_recent_answer_spares_the_probe(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, {"date": "Sun, 29 Nov 2026 20:00:00 GMT"}, b"{}")

    async with relay(handler, {"data_dir": str(tmp_path)}) as r:
        await r.client.get("/v2/alpine/tags/list")
        response = await r.client.get("/readyz")
    assert response.status_code == 200
    assert r.seen_paths() == ["GET hub.test/v2/library/alpine/tags/list"]
    assert "clock_skew_seconds" in response.json()["upstreams"]["docker.io"]


# --- the landing page


async def test_landing_page_has_csp_and_the_relay_name():
    async with relay(never, {"server.public_url": "https://relay.example.com"}) as r:
        response = await r.client.get("/")
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert csp.startswith("default-src 'none'")
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert response.text.count(f'nonce="{nonce}"') == 2  # the style and the script
    assert "&quot;https://relay.example.com&quot;" in response.text  # daemon.json
    assert "http://" not in response.text.replace('href="#', "")  # nothing to fetch elsewhere


async def test_landing_page_uses_the_host_without_public_url():
    async with relay(never) as r:
        response = await r.client.get("/", headers={"host": "mirror.example.org:8443"})
    assert "mirror.example.org:8443/alpine" in response.text


async def test_landing_page_can_be_hidden():
    async with relay(never, {"ui.landing_page": False}) as r:
        response = await r.client.get("/")
    assert response.status_code == 404
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == "404 page not found\n"


# --- logs


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("vpsrelay.app", logging.WARNING, __file__, 1, "%s", ("x",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_and_redaction():
    formatter = logs.formatter("json")
    line = formatter.format(_record(msg="auth header was Bearer abcdefgh", args=()))
    parsed = json.loads(line)
    assert parsed["level"] == "warning"
    assert parsed["msg"] == "auth header was Bearer [redacted]"
    access = formatter.format(_record(fields=[("client", "1.2.3.4"), ("user", None)]))
    assert json.loads(access)["user"] is None


def test_text_format_is_redacted_too():
    line = logs.formatter("text").format(_record(msg="password=hunter2", args=()))
    assert "hunter2" not in line


async def test_access_log_fields(caplog):
    caplog.set_level(logging.INFO, logger="vpsrelay.access")
    async with relay(manifest_handler) as r:
        await r.client.get("/v2/alpine/manifests/latest", headers={"authorization": "Bearer zzz"})
    (record,) = [rec for rec in caplog.records if rec.name == "vpsrelay.access"]
    fields = dict(record.fields)
    assert fields["registry"] == "docker.io"
    assert fields["repository"] == "library/alpine"
    assert fields["kind"] == "manifest"
    assert fields["upstream_status"] == 200
    assert "user" in fields
    assert "cache" in fields
    assert "zzz" not in record.getMessage()


# --- the CLI


def test_config_show_redacts_secrets():
    result = CliRunner().invoke(cli.main, ["config", "show"],
                                env={"VPSRELAY_METRICS__TOKEN": "s3cret"})  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["metrics"]["token"] == "***"
    assert "s3cret" not in result.output


def test_snippets_docker_is_daemon_json():
    result = CliRunner().invoke(
        cli.main, ["snippets", "--format", "docker", "--url", "https://relay.example.com/"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"registry-mirrors": ["https://relay.example.com"]}


def test_snippets_all_formats_from_the_listen_address():
    result = CliRunner().invoke(cli.main, ["snippets"],
                                env={"VPSRELAY_SERVER__LISTEN": "0.0.0.0:5000"})  # fmt: skip
    assert result.exit_code == 0
    assert '[host."http://127.0.0.1:5000"]' in result.output
    assert "Synology" in result.output


def test_every_command_has_help_with_examples():
    for args in (["serve"], ["check"], ["snippets"], ["config", "show"], ["config", "check"]):
        result = CliRunner().invoke(cli.main, [*args, "--help"])
        assert result.exit_code == 0
        assert "Examples:" in result.output, args


def test_check_rejects_a_bad_image_flag():
    result = CliRunner().invoke(cli.main, ["check", "--image", "alpine"])
    assert result.exit_code == 2
    assert "expected REGISTRY=REPO:TAG" in result.output


def test_upstream_hub_is_the_test_hub():
    assert HUB == "http://hub.test"


# --- upstream.prefer_ipv4


async def test_prefer_ipv4_never_connects_over_ipv6():
    import socket

    import pytest

    from tests.infra._http import (
        BaseHandler,
        QuietThreadingHTTPServer,
        serve_in_thread,
        stop_server,
    )
    from vpsrelay import config
    from vpsrelay.errors import UpstreamUnavailable
    from vpsrelay.upstream import Upstream

    class V6Server(QuietThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Registry(BaseHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = V6Server(("::1", 0), Registry)
    thread = serve_in_thread(server, "v6-registry")
    url = f"http://[::1]:{server.server_address[1]}"
    try:
        for prefer_ipv4 in (False, True):
            settings = config.load(
                None, {}, {"upstream.prefer_ipv4": prefer_ipv4}, upstreams={"docker.io": url}
            )
            upstream = Upstream(settings)
            try:
                if prefer_ipv4:
                    with pytest.raises(UpstreamUnavailable):
                        await upstream.challenge(settings.registry("docker.io"))
                else:
                    assert await upstream.challenge(settings.registry("docker.io")) is None
            finally:
                await upstream.aclose()
    finally:
        stop_server(server, thread)


async def test_landing_page_has_the_download_form():
    async with relay(never, {"server.public_url": "https://relay.example.com"}) as r:
        response = await r.client.get("/")
    assert "form-action 'self'" in response.headers["content-security-policy"]
    assert '<form class="download" method="get" action="/download">' in response.text
    assert "curl -C - -o alpine_latest.tar 'https://relay.example.com/download?image=" in (
        response.text
    )
    async with relay(never, {"download.enabled": False}) as r:
        response = await r.client.get("/")
    assert "form-action 'none'" in response.headers["content-security-policy"]
    assert "<form" not in response.text


async def test_readyz_shows_the_pools_names_only_when_detailed(tmp_path):
    from vpsrelay.core.credpool import CredentialState
    from vpsrelay.ops.health import Health

    health = Health(tmp_path)
    state = health.state("docker.io")
    state.answered_at = time.monotonic()
    state.credentials = {"alice": CredentialState("alice"), "bob": CredentialState("bob")}
    state.credentials["bob"].rest_until = trio.current_time() + 600
    registries = config.load(None, {}, upstreams={"docker.io": "http://r.test"}).registries
    registries = tuple(r for r in registries if r.name == "docker.io")
    _, public = await health.readiness(registries, None, detailed=False)  # type: ignore[arg-type]
    entry = public["upstreams"]["docker.io"]  # type: ignore[index]
    assert entry["credential_counts"] == {"ready": 1, "resting": 1}
    assert "credentials" not in entry
    assert "alice" not in json.dumps(public)
    _, operator = await health.readiness(registries, None, detailed=True)  # type: ignore[arg-type]
    assert sorted(operator["upstreams"]["docker.io"]["credentials"]) == ["alice", "bob"]  # type: ignore[index]
