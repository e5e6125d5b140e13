"""Issue 13: a token service that sends its head, then stalls its body past the relay's
`upstream.read_timeout`, is a 504 with an OCI body on every path that fetches a token
(the open relay's `/token`, the relay's own token with the operator's credentials, and
auth mode's), never a 500 or a 200 cut short."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.relay import RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from http.server import ThreadingHTTPServer
    from pathlib import Path

READ_TIMEOUT = "1"  # seconds: the relay gives up on the stalled body after this
STALL_SECONDS = 30.0  # far past it; the test ends the stall when it is done
PULL_TOKEN = "ci-token-0123456789abcdef"


class StalledTokenService:
    """A registry on loopback whose token service answers a head and then stalls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.token_requests = 0
        service = self

        class Handler(BaseHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/token"):
                    service.token_requests += 1
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", "64")
                    self.end_headers()
                    self.wfile.write(b'{"token": "upstr')
                    self.wfile.flush()
                    service.release.wait(STALL_SECONDS)
                    self.close_connection = True
                    return
                realm = f"{service.url}/token"
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}'
                self.send_response(401)
                self.send_header("www-authenticate", f'Bearer realm="{realm}",service="stalled"')
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server: ThreadingHTTPServer = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = serve_in_thread(self.server, "stalled-token-service")

    def close(self) -> None:
        self.release.set()
        stop_server(self.server, self.thread)


@pytest.fixture
def stalled() -> Iterator[StalledTokenService]:
    service = StalledTokenService()
    try:
        yield service
    finally:
        service.close()


def start_relay(tmp_path: Path, upstream: str, mode: str) -> RelayProcess:
    env = {"VPSRELAY_UPSTREAM__READ_TIMEOUT": READ_TIMEOUT, "VPSRELAY_CACHE__ENABLED": "false"}
    args = ["--upstream", f"docker.io={upstream}"]
    if mode == "operator":
        config = tmp_path / "relay.toml"
        config.write_text('[registries."docker.io"]\nusername = "operator"\npassword = "s3cret"\n')
        args += ["--config", str(config)]
    elif mode == "auth":
        env |= {"VPSRELAY_AUTH__ENABLED": "true", "VPSRELAY_AUTH__PULL_TOKENS": PULL_TOKEN}
    return RelayProcess(tmp_path / "relay", *args, env=env)


def ask(relay: RelayProcess, mode: str) -> httpx.Response:
    with httpx.Client(base_url=relay.url, timeout=20.0, trust_env=False) as client:
        if mode == "open":  # a client's own token request, passed to the token service
            return client.get(
                "/token", params={"scope": "repository:library/alpine:pull"}, auth=("me", "pw")
            )
        bearer = PULL_TOKEN if mode == "auth" else "vpsrelay-relay-credentials"
        return client.get(
            "/v2/library/alpine/manifests/latest", headers={"authorization": f"Bearer {bearer}"}
        )


@pytest.mark.parametrize("mode", ["open", "operator", "auth"])
def test_a_token_body_stalled_past_the_read_timeout_is_a_504(
    stalled: StalledTokenService, tmp_path: Path, mode: str
) -> None:
    with start_relay(tmp_path, stalled.url, mode) as relay:
        response = ask(relay, mode)
        log = relay.log_text()
    assert stalled.token_requests == 1
    assert response.status_code == 504, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    (error,) = response.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert "127.0.0.1" not in error["message"]  # no upstream addresses leak
    assert "bug while serving" not in log
