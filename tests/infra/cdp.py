"""Drive headless Chromium through the DevTools protocol: fill a form, click, download.

The command line alone (`--screenshot`, `--dump-dom`) cannot click. Chromium listens for
DevTools on a loopback port it picks (`--remote-debugging-port=0`, the port is in the
profile's `DevToolsActivePort`); this client speaks the protocol over a WebSocket with
`wsproto` (already installed: Hypercorn uses it). Every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from tests.infra import require_binary
from tests.infra.browser import FLAGS

if TYPE_CHECKING:
    from collections.abc import Iterator

START_TIMEOUT = 30.0
CALL_TIMEOUT = 60.0


class DevToolsError(RuntimeError):
    pass


class DevTools:
    """One WebSocket to a DevTools target (the browser, or a page)."""

    def __init__(self, ws_url: str) -> None:
        parts = urlsplit(ws_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        self.sock = socket.create_connection((host, port), timeout=CALL_TIMEOUT)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[dict[str, Any]] = []
        self._replies: dict[int, dict[str, Any]] = {}
        self._text = ""
        self._next = 0
        self.sock.sendall(self.ws.send(Request(host=f"{host}:{port}", target=parts.path)))
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepted():
            if time.monotonic() > deadline:
                raise DevToolsError("no WebSocket handshake")

    def _accepted(self) -> bool:
        self.ws.receive_data(self._recv())
        return any(isinstance(e, AcceptConnection) for e in self.ws.events())

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise DevToolsError("DevTools closed the connection")
        return data

    def _pump(self) -> None:
        self.ws.receive_data(self._recv())
        for event in self.ws.events():
            if isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise DevToolsError("DevTools closed the WebSocket")
            elif isinstance(event, TextMessage):
                self._text += event.data
                if event.message_finished:
                    message = json.loads(self._text)
                    self._text = ""
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)

    def call(self, method: str, **params: object) -> dict[str, Any]:
        self._next += 1
        number = self._next
        payload = json.dumps({"id": number, "method": method, "params": params})
        self.sock.sendall(self.ws.send(TextMessage(data=payload)))
        deadline = time.monotonic() + CALL_TIMEOUT
        while number not in self._replies:
            if time.monotonic() > deadline:
                raise DevToolsError(f"{method}: no answer within {CALL_TIMEOUT} s")
            self._pump()
        reply = self._replies.pop(number)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def wait_event(self, method: str, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    params: dict[str, Any] = event.get("params", {})
                    return params
            if time.monotonic() > deadline:
                raise DevToolsError(f"no {method} within {timeout} s")
            self._pump()

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")  # the viewport
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def chromium(width: int = 1000, height: int = 1400) -> Iterator[tuple[DevTools, DevTools]]:
    """Headless Chromium on about:blank: (the browser's DevTools, the page's)."""
    binary = require_binary("chromium")
    with tempfile.TemporaryDirectory(prefix="vpsrelay-cdp-") as tmp:
        profile = Path(tmp) / "profile"
        command = [
            binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}",
            "about:blank",
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp
        )
        sockets: list[DevTools] = []
        try:
            port, browser_path = _active_port(profile / "DevToolsActivePort", process)
            page_url = _page_target(port)
            browser = DevTools(f"ws://127.0.0.1:{port}{browser_path}")
            sockets.append(browser)
            page = DevTools(page_url)
            sockets.append(page)
            yield browser, page
        finally:
            for devtools in sockets:
                devtools.close()
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _active_port(path: Path, process: subprocess.Popen[bytes]) -> tuple[int, str]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DevToolsError(f"chromium exited {process.returncode}")
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= 2:
            return int(lines[0]), lines[1]
        time.sleep(0.05)
    raise DevToolsError("chromium wrote no DevToolsActivePort")


def _page_target(port: int) -> str:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy variables
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with direct.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            targets = json.load(answer)
        for target in targets:
            if target.get("type") == "page":
                return str(target["webSocketDebuggerUrl"])
        time.sleep(0.05)
    raise DevToolsError("chromium shows no page target")
