"""Headless Chromium (Debian's `chromium`) as a real browser for page tests.

Every run gets a fresh profile, a net log (JSON: every URL the browser asked for)
and its console on stderr (CSP violations show there). Name resolution is mapped
to NOTFOUND for everything but loopback addresses, so neither the page nor the
browser's own background services can make a DNS query leave the machine.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.infra import require_binary

BROWSER_TIMEOUT = 60.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-pings",
    # The browser's own form-autofill queries to Google (not the page's): a page with a
    # form triggers them, and they would show as foreign requests in the net log.
    "--disable-features=AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE 127.0.0.2",
    "--enable-logging=stderr",
    "--v=0",
)


@dataclass(frozen=True)
class PageRequest:
    url: str
    initiator: str
    isolation_key: str


@dataclass(frozen=True)
class BrowserRun:
    stdout: str
    stderr: str
    requests: list[PageRequest]

    def page_requests(self, page_url: str) -> list[PageRequest]:
        """Requests made for the page (its network isolation key is the page's site),
        not by the browser's own services."""
        parts = urlsplit(page_url)
        site = f"{parts.scheme}://{parts.hostname}"
        return [r for r in self.requests if r.isolation_key.split(" ")[0] == site]

    def foreign_requests(self, page_url: str) -> list[str]:
        origin = urlsplit(page_url).netloc
        return [r.url for r in self.page_requests(page_url) if urlsplit(r.url).netloc != origin]

    def csp_violations(self) -> list[str]:
        return [
            line
            for line in self.stderr.splitlines()
            if "Content Security Policy" in line or "Refused to" in line
        ]


def _net_log_requests(path: Path) -> list[PageRequest]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # a log cut short: close the events array
        data = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    found = []
    for event in data["events"]:
        params = event.get("params") or {}
        if names.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in params:
            found.append(
                PageRequest(
                    params["url"],
                    str(params.get("initiator", "")),
                    str(params.get("network_isolation_key", "")),
                )
            )
    return found


def run_chromium(url: str, *extra: str, width: int = 390, height: int = 2400) -> BrowserRun:
    """Load `url` once with `extra` flags (`--screenshot=...`, `--dump-dom`)."""
    binary = require_binary("chromium")
    with tempfile.TemporaryDirectory(prefix="vpsrelay-chromium-") as tmp:
        net_log = Path(tmp) / "net.json"
        command = [
            binary,
            *FLAGS,
            f"--user-data-dir={tmp}/profile",
            f"--log-net-log={net_log}",
            f"--window-size={width},{height}",
            *extra,
            url,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}")
        return BrowserRun(done.stdout, done.stderr, _net_log_requests(net_log))
