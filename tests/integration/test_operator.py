"""Issue 8, end to end: the landing page in Chromium, /metrics after a skopeo pull,
/readyz, `vpsrelay check`, rate-limit headers, and no secret in any log line."""

from __future__ import annotations

import base64
import contextlib
import html.parser
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infra import require_binary
from tests.infra.browser import run_chromium
from tests.infra.clients import DeadPort
from tests.infra.front import DOCKER_HUB_RATELIMIT
from tests.infra.hub import iter_blobs
from tests.infra.oci import BuiltImage
from tests.infra.pebble import free_port
from tests.infra.relay import REPO_ROOT, RelayProcess
from tests.infra.tmpfs import mounted_tmpfs
from tests.integration.test_pull import anonymous_token, host, skopeo_copy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
PUBLIC_URL = "https://relay.example.test"


@pytest.fixture(scope="module")
def relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with RelayProcess(
        tmp_path_factory.mktemp("relay"), "--upstream", f"docker.io={hub.registry_url}"
    ) as process:
        yield process


def scrape(relay: RelayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    response = httpx.get(f"{relay.url}/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def value(samples: Samples, name: str, **labels: str) -> float:
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


def vpsrelay(
    *args: str, check: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vpsrelay", *args],
        capture_output=True, text=True, timeout=120, check=check, cwd=REPO_ROOT,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


# --- /metrics


def test_metrics_move_by_the_exact_amounts_of_a_skopeo_pull(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    blobs = list(iter_blobs(image))
    before = scrape(relay)
    skopeo_copy(tmp_path, f"{host(relay)}/alpine:latest")
    after = scrape(relay)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    blob_bytes = sum(blob.size for blob in blobs)
    assert delta("vpsrelay_served_bytes_total", registry="docker.io", kind="blob") == blob_bytes
    assert delta("vpsrelay_upstream_bytes_total", registry="docker.io", kind="blob") == blob_bytes
    assert delta("vpsrelay_requests_total", registry="docker.io", kind="blob", status="200") == len(
        blobs
    )
    manifest_gets = delta("vpsrelay_requests_total", registry="docker.io", kind="manifest",
                          status="200")  # fmt: skip
    assert manifest_gets >= 1
    # Every manifest answer was this manifest (HEADs send no body).
    served_manifest = delta("vpsrelay_served_bytes_total", registry="docker.io", kind="manifest")
    assert served_manifest > 0
    assert served_manifest % len(image.manifest_bytes) == 0
    tokens = delta("vpsrelay_token_requests_total", registry="docker.io", status="200")
    assert tokens >= 1
    assert tokens == delta("vpsrelay_requests_total", registry="docker.io", kind="token",
                           status="200")  # fmt: skip
    latency = delta("vpsrelay_upstream_latency_seconds_count", registry="docker.io", kind="blob")
    assert latency == len(blobs)
    assert value(after, "vpsrelay_active_streams") == 0
    # The scrape before this one is counted too, as an "other" request.
    assert delta("vpsrelay_requests_total", registry="none", kind="other", status="200") == 1
    assert ("vpsrelay_certificate_expiry_timestamp_seconds", ()) not in after  # TLS is off


def test_metrics_refuse_a_client_outside_the_allow_list(tmp_path: Path) -> None:
    with DeadPort() as dead, RelayProcess(
        tmp_path, "--upstream", f"docker.io={dead.url}",
        env={"VPSRELAY_METRICS__ALLOW": "10.0.0.0/8", "VPSRELAY_METRICS__TOKEN": "t0ps3cret"},
    ) as relay:  # fmt: skip
        assert httpx.get(f"{relay.url}/metrics").status_code == 403
        auth = {"authorization": "Bearer t0ps3cret"}
        response = httpx.get(f"{relay.url}/metrics", headers=auth)
        assert response.status_code == 200
        samples = list(text_string_to_metric_families(response.text))
        refusals = {
            s.labels["reason"]: s.value
            for f in samples
            for s in f.samples
            if s.name == "vpsrelay_refusals_total"
        }
        assert refusals == {"metrics_forbidden": 1.0}
        assert "t0ps3cret" not in relay.log_text()


def test_metrics_on_a_separate_listener(tmp_path: Path) -> None:
    with DeadPort() as dead, RelayProcess(
        tmp_path, "--upstream", f"docker.io={dead.url}",
        env={"VPSRELAY_METRICS__LISTEN": "127.0.0.1:0"},
    ) as relay:  # fmt: skip
        assert httpx.get(f"{relay.url}/metrics").status_code == 404
        log = relay.log_text()
        line = next(ln for ln in log.splitlines() if "metrics served at" in ln)
        metrics_url = line.split("metrics served at ")[1].split('"')[0]
        response = httpx.get(metrics_url)
        assert response.status_code == 200
        assert "vpsrelay_requests_total" in response.text


# --- rate limits


def test_ratelimit_headers_reach_metrics_check_and_the_page(
    relay: RelayProcess, clean_hub: Hub
) -> None:
    clean_hub.front.ratelimit = DOCKER_HUB_RATELIMIT
    token = anonymous_token(relay, "alpine")
    response = httpx.head(
        f"{relay.url}/v2/alpine/manifests/latest", headers={"authorization": f"Bearer {token}"}
    )
    assert response.headers["ratelimit-remaining"] == "76;w=21600"
    samples = scrape(relay)
    assert value(samples, "vpsrelay_upstream_ratelimit_limit", registry="docker.io") == 100
    assert value(samples, "vpsrelay_upstream_ratelimit_remaining", registry="docker.io") == 76
    assert value(samples, "vpsrelay_upstream_ratelimit_window_seconds", registry="docker.io") == (
        21600
    )
    assert value(samples, "vpsrelay_upstream_ratelimit_source_info", registry="docker.io",
                 source="203.0.113.7") == 1  # fmt: skip

    done = vpsrelay("check", "--url", relay.url, "--image", "docker.io=alpine:latest", "--json")
    rows = {row["check"]: row for row in json.loads(done.stdout)["rows"]}
    assert rows["docker hub budget"]["result"] == "ok"
    assert "76 of 100 pulls left per 6 h" in rows["docker hub budget"]["detail"]
    assert "203.0.113.7" in rows["docker hub budget"]["detail"]

    page = httpx.get(f"{relay.url}/").text
    assert "docker.io pull budget: 76 of 100 per 6 h left" in page


# --- /readyz


def test_readyz_follows_the_upstream(hub: Hub, tmp_path: Path) -> None:
    """An upstream that goes away (socat before the hub, killed with its connections)."""
    socat = require_binary("socat")
    port = free_port()
    forwarder = subprocess.Popen(
        [socat, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
         f"TCP:127.0.0.1:{hub.front.port}"],
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_port(port)
        with RelayProcess(tmp_path, "--upstream", f"docker.io=http://127.0.0.1:{port}") as relay:
            ready = httpx.get(f"{relay.url}/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"tls": "off", "data_dir": "ok", "upstream": "ok"}
            os.killpg(forwarder.pid, signal.SIGKILL)
            forwarder.wait(5)
            assert httpx.get(f"{relay.url}/v2/").status_code == 502
            unready = httpx.get(f"{relay.url}/readyz")
            assert unready.status_code == 503
            assert unready.json()["checks"]["upstream"].startswith(
                "no upstream answered: docker.io"
            )
            assert unready.json()["checks"]["data_dir"] == "ok"
    finally:
        if forwarder.poll() is None:
            os.killpg(forwarder.pid, signal.SIGKILL)
            forwarder.wait(5)


def _wait_port(port: int, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_readyz_is_unready_when_no_upstream_ever_answered(tmp_path: Path) -> None:
    with DeadPort() as dead, RelayProcess(tmp_path, "--upstream", f"docker.io={dead.url}") as relay:
        response = httpx.get(f"{relay.url}/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "unready"
        assert httpx.get(f"{relay.url}/healthz").status_code == 200  # alive all the same


def test_readyz_is_unready_when_the_data_dir_is_read_only(hub: Hub, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "data", "1m") as data, RelayProcess(
        tmp_path, "--upstream", f"docker.io={hub.registry_url}", "--data-dir", str(data),
        # The blob cache keeps its index open for writing, and Linux refuses to remount
        # a file system read-only under an open writer; this test is about /readyz.
        env={"VPSRELAY_CACHE__ENABLED": "false"},
    ) as relay:  # fmt: skip
        assert httpx.get(f"{relay.url}/readyz").status_code == 200
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        response = httpx.get(f"{relay.url}/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["data_dir"].startswith("not writable: Read-only")
        assert response.json()["checks"]["upstream"] == "ok"


# --- vpsrelay check


def test_check_passes_every_row_against_a_healthy_relay(relay: RelayProcess, clean_hub: Hub):
    done = vpsrelay("check", "--url", relay.url, "--image", "docker.io=alpine:latest")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout
    report = vpsrelay("check", "--url", relay.url, "--image", "docker.io=alpine:latest", "--json")
    rows = {row["check"]: row["result"] for row in json.loads(report.stdout)["rows"]}
    for name in ("/v2/", "token docker.io", "manifest HEAD docker.io", "manifest GET docker.io",
                 "readiness", "clock"):  # fmt: skip
        assert rows[name] == "ok", rows
    assert set(rows.values()) <= {"ok", "n/a"}, rows


def test_check_logs_in_for_a_private_image(relay: RelayProcess, clean_hub: Hub) -> None:
    user, password = clean_hub.creds
    args = ("check", "--url", relay.url, "--image", "docker.io=private/secret:1.0")
    anonymous = vpsrelay(*args)
    assert anonymous.returncode == 1
    logged_in = vpsrelay(*args, "--user", user, env={"VPSRELAY_CHECK_PASSWORD": password})
    assert logged_in.returncode == 0, logged_in.stdout + logged_in.stderr
    assert password not in logged_in.stdout


def test_check_names_the_failing_row_when_the_upstream_is_down(tmp_path: Path) -> None:
    with DeadPort() as dead, RelayProcess(tmp_path, "--upstream", f"docker.io={dead.url}") as relay:
        done = vpsrelay("check", "--url", relay.url, "--image", "docker.io=alpine:latest")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    v2 = next(line for line in lines if line.startswith("/v2/"))
    assert "FAIL" in v2
    assert "502" in v2
    assert any("fix: the relay cannot reach its upstream" in line for line in lines)
    assert "some checks FAILED" in done.stdout


# --- secrets never logged


def test_a_pull_with_credentials_leaves_no_secret_in_the_log(
    clean_hub: Hub, tmp_path: Path
) -> None:
    user, password = clean_hub.creds
    with RelayProcess(
        tmp_path, "--upstream", f"docker.io={clean_hub.registry_url}", "--log-level", "debug",
        env={"VPSRELAY_LOG__FORMAT": "json"},
    ) as relay:  # fmt: skip
        skopeo_copy(tmp_path, f"{host(relay)}/private/secret:1.0", f"--src-creds={user}:{password}")
        token = httpx.get(
            f"{relay.url}/token",
            params={"service": clean_hub.service, "scope": "repository:private/secret:pull"},
            auth=(user, password),
        ).json()["token"]
        httpx.get(
            f"{relay.url}/v2/private/secret/manifests/1.0?token={token}",
            headers={"authorization": f"Bearer {token}"},
        )
        log = relay.log_text()
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    lines = log.splitlines()
    assert len(lines) > 10
    for secret in (password, basic, token, token.split(".")[2], "eyJ"):
        assert secret not in log, f"{secret[:12]}... is in the log"
    access = [json.loads(line) for line in lines if '"logger":"vpsrelay.access"' in line]
    assert any(entry["repository"] == "private/secret" and entry["status"] == 200
               for entry in access)  # fmt: skip
    assert all(json.loads(line) for line in lines)  # every line is one JSON object


# --- the landing page in a real browser


class _Pre(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "pre":
            self._id = dict(attrs).get("id")
            if self._id:
                self.texts[self._id] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._id:
            self.texts[self._id] += data


def test_landing_page_in_chromium(hub: Hub, tmp_path: Path) -> None:
    with RelayProcess(
        tmp_path, "--upstream", f"docker.io={hub.registry_url}", "--public-url", PUBLIC_URL
    ) as relay:
        page = f"{relay.url}/"
        shot = tmp_path / "landing.png"
        shown = run_chromium(page, f"--screenshot={shot}")
        dom = run_chromium(page, "--dump-dom")
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in (shown, dom):
        assert run.page_requests(page), "the net log shows no request for the page"
        assert run.foreign_requests(page) == []
        assert run.csp_violations() == []
    parser = _Pre()
    parser.feed(dom.stdout)
    daemon = json.loads(parser.texts["daemon-json"])
    assert daemon == {"registry-mirrors": [PUBLIC_URL]}
    assert "relay.example.test/alpine" in parser.texts["docker-pull"]
    # The script ran: the copy buttons are shown.
    button = dom.stdout.split('class="copy"')[1][:80]
    assert "hidden" not in button


def test_the_browser_checks_can_fail(tmp_path: Path) -> None:
    """The two detectors above are live: a page that loads from another host is caught,
    by the net log without a CSP, by the console with one."""
    from tests.infra._http import (
        BaseHandler,
        QuietThreadingHTTPServer,
        serve_in_thread,
        stop_server,
    )

    class Page(BaseHandler):
        csp = False

        def do_GET(self) -> None:
            body = b'<!doctype html><p>x</p><img src="http://127.0.0.2:9/x.png">'
            self.send_response(200)
            self.send_header("content-type", "text/html")
            if "csp" in self.path:
                self.send_header("content-security-policy", "default-src 'none'")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = QuietThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = serve_in_thread(server, "page")
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        plain = run_chromium(f"{base}/plain", "--dump-dom")
        strict = run_chromium(f"{base}/csp", "--dump-dom")
    finally:
        stop_server(server, thread)
    assert plain.foreign_requests(f"{base}/plain") == ["http://127.0.0.2:9/x.png"]
    assert strict.foreign_requests(f"{base}/csp") == []
    assert strict.csp_violations()
